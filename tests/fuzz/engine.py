"""The campaign: replay the corpus, run generated cases on the worker pool, judge, deduplicate
by signature, shrink (hunt mode), render reproducers, save new failures to the corpus."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.fuzz import codec as C
from tests.fuzz import gen_files as GF
from tests.fuzz import gen_kernels as GK
from tests.fuzz import judge as J
from tests.fuzz.pool import Pool

CATEGORIES = ("kernels", "checkpoint", "dataset", "cli")
CORPUS = Path(__file__).parent / "corpus"
CORPUS_MAX = 40
TIMEOUTS = {"kernels": 6.0, "checkpoint": 20.0, "dataset": 20.0, "cli": 40.0, "selftest": 3.0}


def _ident(r):
    return r


GEN = {
    "kernels": (GK.generate, GK.build, GK.shrink, GK.describe),
    "checkpoint": (GF.gen_checkpoint, _ident, GF.shrink_checkpoint, GF.describe_checkpoint),
    "dataset": (GF.gen_dataset, GF.build_dataset, GF.shrink_dataset, GF.describe_dataset),
    "cli": (GF.gen_cli, _ident, GF.shrink_cli, GF.describe_cli),
}


@dataclass
class Failure:
    signature: str
    category: str
    problem: str
    detail: str
    recipe: dict
    case: dict
    count: int = 1
    origin: str = "generated"  # "corpus" | "generated"
    reproducer: str = ""


@dataclass
class Report:
    counts: dict = field(default_factory=lambda: {c: 0 for c in CATEGORIES})
    corpus_cases: int = 0
    skipped: dict = field(default_factory=lambda: {c: 0 for c in CATEGORIES})
    failures: dict = field(default_factory=dict)  # signature -> Failure
    collateral: int = 0
    restarts: int = 0
    wall_s: float = 0.0
    saved: list = field(default_factory=list)

    def by_category(self, cat):
        return [f for f in self.failures.values() if f.category == cat or (cat == "harness" and f.signature.startswith("harness"))]

    def summary_line(self) -> str:
        per = ", ".join(f"{c}={self.counts[c]}" for c in CATEGORIES)
        n_f = len(self.failures)
        tot = sum(f.count for f in self.failures.values())
        return (
            f"fuzz: {sum(self.counts.values())} cases run ({per}; {self.corpus_cases} replayed from "
            f"the corpus); {n_f} distinct failures ({tot} failing cases); "
            f"{sum(self.skipped.values())} unbuildable; {self.restarts} worker restarts; "
            f"{self.wall_s:.1f} s"
        )


def _corpus_files():
    return sorted(CORPUS.glob("*.json")) if CORPUS.exists() else []


def load_corpus(categories=CATEGORIES):
    items = []
    for p in _corpus_files():
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if d.get("category") in categories:
            items.append((d["category"], d.get("recipe"), d["case"], d.get("signature", "")))
    return items


class Campaign:
    def __init__(self, n_workers=2, root=None, timeout_scale=1.0, log=print):
        self._tmp = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sparsecore-fuzz-")
            root = self._tmp.name
        self.pool = Pool(root, n_workers)
        self.timeout_scale = timeout_scale
        self.log = log
        self.report = Report()

    def timeout(self, cat):
        return TIMEOUTS[cat] * self.timeout_scale

    def close(self):
        self.pool.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # ------------------------------------------------------------------ running
    def run_items(self, items, deadline=None, origin="generated"):
        """items: list of (category, recipe, case). Judges every outcome; crashes are re-run once
        in a fresh worker (a crash that does not repeat was caused by an earlier case's damage)."""
        self.pool.start()
        rep = self.report
        crashed = []
        work = [(i, case, self.timeout(cat)) for i, (cat, _, case) in enumerate(items)]
        for cid, out in self.pool.run(work, deadline=deadline):
            cat, recipe, case = items[cid]
            rep.counts[cat] += 1
            if origin == "corpus":
                rep.corpus_cases += 1
            if out["status"] == "crash":
                crashed.append(cid)
                continue
            self._record(cat, recipe, case, out, origin)
        for cid in crashed:
            cat, recipe, case = items[cid]
            out = self.pool.run_one(case, self.timeout(cat), fresh=True)
            if out["status"] != "crash":
                rep.collateral += 1
            self._record(cat, recipe, case, out, origin)
        rep.restarts = self.pool.restarts()

    def _record(self, cat, recipe, case, out, origin):
        rep = self.report
        if out["status"] == "setup_error":
            rep.skipped[cat] += 1
            return
        f = J.judge(case, out)
        if f is None:
            return
        sig = f["signature"]
        if sig in rep.failures:
            rep.failures[sig].count += 1
            return
        rep.failures[sig] = Failure(sig, cat, f["problem"], f["detail"], recipe, case, origin=origin)

    def outcome(self, cat, case):
        out = self.pool.run_one(case, self.timeout(cat))
        if out["status"] == "crash":
            out = self.pool.run_one(case, self.timeout(cat), fresh=True)
        return out

    # ------------------------------------------------------------------ shrinking
    def shrink(self, failure: Failure, budget_s=20.0, max_tries=80):
        if failure.recipe is None:
            return failure
        _, build, shrink, _ = GEN[failure.category]
        t0, tries = time.monotonic(), 0
        best_r, best_c = failure.recipe, failure.case
        improved = True
        while improved and tries < max_tries and time.monotonic() - t0 < budget_s:
            improved = False
            for cand in shrink(best_r):
                if tries >= max_tries or time.monotonic() - t0 > budget_s:
                    break
                tries += 1
                try:
                    case = build(cand)
                except Exception:
                    continue
                out = self.outcome(failure.category, case)
                f = J.judge(case, out)
                if f is not None and f["signature"] == failure.signature:
                    best_r, best_c = cand, case
                    failure.detail = f["detail"]
                    improved = True
                    break
        failure.recipe, failure.case = best_r, best_c
        return failure

    # ------------------------------------------------------------------ corpus
    def save(self, failure: Failure) -> Path | None:
        known = set()
        files = _corpus_files()
        for p in files:
            try:
                known.add(corpus_key(json.loads(p.read_text()).get("signature", "")))
            except (OSError, ValueError):
                pass
        if corpus_key(failure.signature) in known or len(files) >= CORPUS_MAX:
            return None
        CORPUS.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha1(failure.signature.encode()).hexdigest()[:10]
        path = CORPUS / f"{failure.category}-{h}.json"
        text = json.dumps(
            {
                "category": failure.category,
                "signature": failure.signature,
                "problem": failure.problem,
                "detail": failure.detail[:600],
                "reproducer": reproducer(failure),
                "recipe": failure.recipe,
                "case": failure.case,
            },
            indent=1,
            allow_nan=False,
        )
        if len(text) > 60_000:  # keep the corpus small
            return None
        path.write_text(text + "\n")
        self.report.saved.append(path)
        return path


def corpus_key(sig: str) -> str:
    """Signatures that differ only in the kernel called but fail in the same shared code
    (the conversion of W, say) are one corpus entry."""
    import re

    if " at " in sig and "kernels/__init__.py" not in sig.split(" at ")[-1]:
        sig = re.sub(r"^(\w+)/[\w.]+: ", r"\1: ", sig)
    return sig


def generated_items(cat, n, seed):
    """n cases of a category from a seeded generator (the same cases for the same seed)."""
    gen, build, _, _ = GEN[cat]
    rng = np.random.default_rng([seed, CATEGORIES.index(cat)])
    items = []
    tries = 0
    while len(items) < n and tries < 3 * n:
        tries += 1
        r = gen(rng)
        try:
            items.append((cat, r, build(r)))
        except Exception:
            pass
    return items


def ci_items(seed=0, scale=1.0):
    """The CI selection: fixed seeds, sized for a couple of minutes on two cores."""
    n = {"kernels": 2500, "checkpoint": 130, "dataset": 130, "cli": 0}
    items = []
    for cat in ("kernels", "checkpoint", "dataset"):
        items += generated_items(cat, int(n[cat] * scale), seed)
    grid = GF.cli_grid()
    rng = np.random.default_rng([seed, 99])
    pick = sorted(rng.choice(len(grid), size=min(len(grid), int(170 * scale)), replace=False))
    items += [("cli", grid[i], grid[i]) for i in pick]
    return items


# ------------------------------------------------------------------------- reproducers

_HELPERS = {
    "readonly(": "def readonly(a):\n    a = a.view(); a.flags.writeable = False; return a",
    "misaligned(": (
        "def misaligned(a):\n    buf = np.zeros(a.nbytes + 1, np.uint8)\n"
        "    v = buf[1:].view(a.dtype).reshape(a.shape); v[...] = a; return v"
    ),
}


def reproducer(f: Failure) -> str:
    case = f.case
    cat = f.category
    if cat == "kernels":
        from tests.fuzz.oracle import POSITIONAL, call_text

        R = C.Renderer()
        op = case["op"]
        rendered = {}
        for k, spec in case["args"].items():
            rendered[k] = R.render(spec, hint=k)
            R.names[k] = rendered[k]
        pos = [rendered[k] for k in POSITIONAL[op] if k in rendered]
        kw = [f"{k}={v}" for k, v in rendered.items() if k not in POSITIONAL[op]]
        call = f"{call_text(op)}({', '.join(pos + kw)})"
        body = R.lines + [call]
        src = "\n".join(body)
        helpers = [h for key, h in _HELPERS.items() if key in src]
        return "\n".join(C.HEADER + helpers + body)
    if cat == "checkpoint":
        muts = json.dumps(case["muts"])
        load = (
            "from sparsecore.train import Trainer\n"
            f"Trainer(A.base_config('fz', {case['base']!r})).load_checkpoint(bad)"
            if case["via"] == "api"
            else "from sparsecore import cli\n"
            f"cli.main(A.cli_train_args('fz', {case['base']!r}) + ['--max-steps', '6', '--resume', bad, '--out', 'fz/out'])"
        )
        return (
            "from tests.fuzz import artifacts as A  # a tiny 8-16-3 run, trained once into ./fz\n"
            f"# {GF.describe_checkpoint(case)}\n"
            f"bad = A.corrupt_npz(A.base_checkpoint('fz', {case['base']!r}), 'fz/bad.npz', {muts})\n"
            + load
        )
    if cat == "dataset":
        return _dataset_repro(f)
    if cat == "cli":
        case["argv"]
        files = case.get("files", {})
        pre = ""
        if files:
            pre = "# files: " + ", ".join(
                f"{{TMP}}/{n} = {C.materialize({'$bytes': b})!r}" for n, b in files.items()
            ) + "\n"
        return (
            pre + "# {DATA}: tests/fuzz/artifacts.base_dataset (8 features, 3 classes); {OUT}, {TMP}: "
            "empty folders; {CKPT}: a checkpoint of that run\n" + GF.describe_cli(case)
        )
    return json.dumps(case)[:500]


def _dataset_repro(f):
    case = f.case
    load = (
        "data.load(path)" if case["via"] == "api"
        else f"cli.main(['train', '--dataset', path, '--arch', {case['arch']!r}, '--max-steps', '2', "
        "'--batch-size', '4', '--epochs', '1', '--delta-t', '1', '--no-progress', '--out', 'fz/out'])"
    )  # fmt: skip
    head = f"# {GF.describe_dataset(f.recipe)}\n" if f.recipe else ""
    return (
        head + "from pathlib import Path\nfrom sparsecore import cli, data\n"
        "from tests.fuzz import execute, gen_files\n"
        f"case = gen_files.build_dataset({json.dumps(f.recipe)})\n"
        "Path('fz').mkdir(exist_ok=True)\n"
        "path, _ = execute._write_dataset(case, Path('fz'))\n" + load
    )


def format_failures(failures, limit=None) -> str:
    out = []
    for f in list(failures)[:limit]:
        out.append(f"- [{f.count}x] {f.signature}\n    {f.problem}: {f.detail[:400]}")
        try:
            rep = reproducer(f)
        except Exception as e:
            rep = f"(no reproducer: {e})"
        lines = [ln if len(ln) < 400 else ln[:400] + " ..." for ln in rep.splitlines()[:25]]
        out.append("    reproducer:\n" + "\n".join("      " + ln for ln in lines))
    return "\n".join(out)
