"""CI entry of the fuzzing layer (tests/fuzz): the saved failures of tests/fuzz/corpus/ first,
then a fixed-seed selection of generated cases of every category, all run in spawn-started
worker processes (a segfault or a hang fails its case, never pytest). Each test asserts that
its share of the campaign found no failure, listing them with reproducers otherwise; the
closing line of the session gives the case counts per category.

A random hunt for new failures: ``python -m tests.fuzz --minutes N``.
"""

from __future__ import annotations

import time

import pytest

from tests.fuzz import engine as E

SCALE = 4.0  # about a minute on two cores (the budget of the fuzz stage is 3 minutes)
BUDGET_S = 135.0  # generated cases stop being submitted after this (corpus replay included)
CI_TIMEOUTS = {"kernels": 6.0, "checkpoint": 10.0, "dataset": 10.0, "cli": 16.0, "selftest": 2.0}


class _Summary:
    """A plugin registered for the session: the closing line of the terminal summary."""

    def __init__(self, report):
        self.report = report

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(self.report.summary_line())


@pytest.fixture(scope="module")
def report(request):
    t0 = time.monotonic()
    camp = E.Campaign(n_workers=2)
    camp.timeout = lambda cat: CI_TIMEOUTS[cat]
    try:
        corpus = [(c, r, case) for c, r, case, _ in E.load_corpus()]
        camp.run_items(corpus, origin="corpus")
        camp.run_items(E.ci_items(seed=0, scale=SCALE), deadline=t0 + BUDGET_S)
        selftest = [
            camp.pool.run_one({"cat": "selftest", "action": a}, CI_TIMEOUTS["selftest"])["status"]
            for a in ("segv", "hang", "ok")
        ]
        rep = camp.report
        rep.selftest = selftest
        rep.restarts = camp.pool.restarts()
    finally:
        camp.close()
    rep.wall_s = time.monotonic() - t0
    request.config.pluginmanager.register(_Summary(rep), "sparsecore-fuzz-summary")
    return rep


def _fail_listing(failures):
    failures = sorted(failures, key=lambda f: f.signature)
    return f"{len(failures)} distinct failure(s):\n" + E.format_failures(failures)


def test_worker_isolation(report):
    """A case that segfaults its worker, then one that hangs, then a normal one: each is
    reported as what it was, and the worker is replaced."""
    assert report.selftest == ["crash", "timeout", "ok"]


def test_corpus_replays_clean(report):
    bad = [f for f in report.failures.values() if f.origin == "corpus"]
    if bad:
        pytest.fail(_fail_listing(bad), pytrace=False)


@pytest.mark.parametrize("category", E.CATEGORIES)
def test_generated_cases_clean(report, category):
    assert report.counts[category] > 0
    bad = [f for f in report.failures.values() if f.origin == "generated" and f.category == category]
    if bad:
        pytest.fail(_fail_listing(bad), pytrace=False)


# ----------------------------------------------------------------- Hypothesis-driven cases
# The same recipes, their choices drawn by Hypothesis (tests/fuzz/strategies.py): derandomized
# in CI, a failing recipe shrunk to a minimal one; run in the same spawn-started workers.
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.fuzz import judge as J  # noqa: E402
from tests.fuzz.strategies import recipes  # noqa: E402

HYPOTHESIS_EXAMPLES = {"kernels": 2000, "checkpoint": 200, "dataset": 200}
_hyp_counts: dict = {}


class _HypSummary:
    def pytest_terminal_summary(self, terminalreporter):
        counts = ", ".join(f"{k}={v}" for k, v in _hyp_counts.items())
        terminalreporter.write_line(f"fuzz (hypothesis): {sum(_hyp_counts.values())} cases run ({counts})")


@pytest.fixture(scope="module")
def campaign(request):
    camp = E.Campaign(n_workers=1)
    camp.timeout = lambda cat: CI_TIMEOUTS[cat]
    camp.pool.start()
    request.config.pluginmanager.register(_HypSummary(), "sparsecore-fuzz-hypothesis")
    yield camp
    camp.close()


def _hyp_test(category):
    build = E.GEN[category][1]

    @settings(max_examples=HYPOTHESIS_EXAMPLES[category], derandomize=True, database=None,
              deadline=None, suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(recipe=recipes(category))
    def check(campaign, recipe):
        try:
            case = build(recipe)
        except Exception:  # a recipe the builder cannot realise: not a case
            return
        out = campaign.outcome(category, case)
        if out["status"] == "setup_error":
            return
        _hyp_counts[category] = _hyp_counts.get(category, 0) + 1
        f = J.judge(case, out)
        assert f is None, f"{f['problem']}: {f['detail']}\nrecipe: {recipe}"

    return check


test_hypothesis_kernels = _hyp_test("kernels")
test_hypothesis_checkpoints = _hyp_test("checkpoint")
test_hypothesis_datasets = _hyp_test("dataset")


def test_hypothesis_cases_ran():
    """The Hypothesis tests above judged real cases (not only unbuildable recipes or setup
    errors): at least half their examples of every category."""
    for cat, n in HYPOTHESIS_EXAMPLES.items():
        assert _hyp_counts.get(cat, 0) >= n // 2, (cat, _hyp_counts)
