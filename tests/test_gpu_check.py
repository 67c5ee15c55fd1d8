"""bench/gpu_check.py without a GPU: the run stops at the device with one clear line and writes
env.txt and summary.json; its pure pieces (arguments, the budget, the summary, the parsers, the
comparisons, the constructed exact cases) are checked against NumPy and the float64 reference;
and its GPU steps run end to end on the emulated CUDA launches (tests/test_cuda_emulated.py's
NumPy models), where a wrong launcher, a misaligned float4 choice or flush-to-zero scores must
show up as failures."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bench import gpu_check as G
from kernels import reference as R
from kernels import validation as V
from kernels.cuda import _module
from kernels.cuda import grow as cu_grow
from tests import cases
from tests import test_cuda_emulated as emu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GPU = V.gpu_unavailable_reason() is not None
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="this machine has a CUDA device")


# ---------------------------------------------------------------------------- the run itself
@needs_no_gpu
def test_without_a_device_the_run_exits_2_with_one_line_and_writes_env_and_summary(tmp_path):
    out = tmp_path / "gc"
    res = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_check: no CUDA device (") and last.endswith(")")
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert last == 'gpu_check: no CUDA device (CuPy not installed: pip install -e ".[gpu]")'
    assert sorted(os.listdir(out)) == ["env.txt", "summary.json"]
    env = (out / "env.txt").read_text()
    for section in ("== host ==", "numpy:", "numba:", "== nvidia-smi ==", "== nvcc --version ==",
                    "== compute-sanitizer --version ==", "== cupy.show_config() ==",
                    "kernels/cuda/grow.cu: "):  # fmt: skip
        assert section in env
    s = json.loads((out / "summary.json").read_text())
    assert s["exit_status"] == 2 and s["device"] is None and s["no_device"] == last
    steps = {x["name"]: x for x in s["steps"]}
    assert list(steps) == list(G.STEPS)
    assert steps["env"]["status"] == "ok"
    for name in G.STEPS[1:]:
        assert steps[name]["status"] == "skipped"
        assert "no CUDA device" in steps[name]["error"]
    assert s["counts"] == {"ok": 1, "skipped": 7}
    assert G.out_files_problems(str(out)) == []


@needs_no_gpu
def test_a_gpu_step_without_a_device_is_skipped_by_its_child(tmp_path):
    ctx = G.Context(out=str(tmp_path), quick=True, seed=1, clock=G.Clock(60))
    status, figures, error = G.step_worker("probe")(ctx, 60)
    assert status == "skipped" and "no CUDA device" in error
    assert not (tmp_path / "probe.json").exists()


def test_the_main_run_plans_budgets_skips_and_records_every_outcome(tmp_path, monkeypatch):
    """Fake steps on a fake clock: timeouts as planned, a raising step is an error, later steps
    skipped when the deadline leaves them less than their minimum, --steps deselects."""
    t = [0.0]
    real_clock = G.Clock
    monkeypatch.setattr(G, "Clock", lambda budget_s: real_clock(budget_s, now=lambda: t[0]))
    got = {}

    def fake(name, status, advance=0.0, raises=False):
        def run(ctx, timeout_s):
            got[name] = timeout_s
            t[0] += advance
            if name == "env":
                ctx.device_name = "Fake GPU"
            if raises:
                raise RuntimeError("boom")
            return status, {"headline": f"{name} figures"}, None if status == "ok" else "bad"

        return run

    funcs = {n: fake(n, "ok") for n in G.STEPS}
    funcs.update(tests=fake("tests", "failed", 200), probe=fake("probe", "ok", 0, True))
    funcs.update(grow=fake("grow", "ok", 300))
    monkeypatch.setattr(G, "STEP_FUNCS", funcs)
    out = tmp_path / "o"
    rc = G.main(["--out", str(out), "--steps", "mnist,tests,probe,grow,sanitizer,suite"])
    assert rc == 1
    assert got == {"env": 90, "tests": 150, "probe": 60, "grow": 90}
    s = json.loads((out / "summary.json").read_text())
    by = {x["name"]: x for x in s["steps"]}
    assert [by[n]["status"] for n in G.STEPS] == [
        "ok", "failed", "error", "ok", "skipped", "skipped", "skipped", "skipped"
    ]  # fmt: skip
    assert "RuntimeError: boom" in by["probe"]["error"]
    assert by["timings"]["error"] == "not selected (--steps)"
    for n in ("sanitizer", "suite", "mnist"):
        assert by[n]["error"].startswith("no time left")
    assert s["device"] == "Fake GPU" and s["exit_status"] == 1
    assert s["selected"] == ["tests", "probe", "grow", "sanitizer", "suite", "mnist"]


FAKE_SANITIZER = """
import json, os, sys
with open(os.environ["FAKE_SAN_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
tool = sys.argv[sys.argv.index("--tool") + 1]
bad = tool == os.environ.get("FAKE_SAN_BAD")
if bad:
    print("========= Invalid __global__ read of size 4 bytes", flush=True)
print(f"========= ERROR SUMMARY: {int(bad)} errors", flush=True)
sys.exit(1 if bad else 0)
"""


def test_the_sanitizer_step_runs_every_tool_on_the_small_worker(tmp_path, monkeypatch):
    """With a stand-in compute-sanitizer (records its arguments; racecheck reports an error)."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_SANITIZER))
    fake.chmod(0o755)
    monkeypatch.setattr(G, "find_sanitizer", lambda: str(fake))
    monkeypatch.setenv("FAKE_SAN_LOG", str(tmp_path / "argv.log"))
    monkeypatch.setenv("FAKE_SAN_BAD", "racecheck")
    ctx = G.Context(out=str(tmp_path / "o"), quick=False, seed=3, clock=G.Clock(500))
    os.makedirs(ctx.out)
    status, figures, error = G.step_sanitizer(ctx, 180)
    tools = figures["tools"]
    assert (
        status == "failed"
        and error == "racecheck: ========= Invalid __global__ read of size 4 bytes"
    )
    assert tools["memcheck"]["status"] == tools["synccheck"]["status"] == "ok"
    assert tools["racecheck"]["errors"] == 1 and tools["memcheck"]["errors"] == 0
    calls = [json.loads(line) for line in (tmp_path / "argv.log").read_text().splitlines()]
    assert [c[c.index("--tool") + 1] for c in calls] == list(G.SANITIZER_TOOLS)
    for c in calls:
        assert c[c.index("--error-exitcode") + 1] == "1"
        i = c.index(sys.executable)
        assert c[i + 1 : i + 4] == [G.SCRIPT, "--only", "probe,grow"]
        assert "--small" in c and "--no-pool" in c and c[c.index("--seed") + 1] == "3"
    log = (tmp_path / "o" / "sanitizer.log").read_text()
    headers = [line for line in log.splitlines() if line.startswith("===== ")]
    assert [h.split()[1] for h in headers] == ["memcheck:", "racecheck:", "synccheck:"]
    assert log.count("ERROR SUMMARY") == 3
    monkeypatch.setattr(G, "find_sanitizer", lambda: None)
    assert G.step_sanitizer(ctx, 180)[0] == "skipped"


@needs_no_gpu
def test_the_suite_step_without_a_device_is_skipped(tmp_path):
    ctx = G.Context(out=str(tmp_path), quick=False, seed=3, clock=G.Clock(500))
    status, figures, error = G.step_suite(ctx, 100)
    assert status == "skipped" and "nothing to run here" in error
    assert figures["quick"] and figures["time_limit"] == 60  # (100 s < 280 s: --quick)


# ---------------------------------------------------------------------------- arguments, budget
def test_arguments(capsys):
    a = G.parse_args([])
    assert a.out == "bench/results/gpu_check" and a.budget_s == 540 and a.steps == G.STEPS
    assert not a.quick and a.only is None and G.run_mode(a) == "full"
    a = G.parse_args(["--steps", "timings, probe", "--quick", "--budget-s", "100"])
    assert a.steps == ("probe", "timings") and a.budget_s == 100 and G.run_mode(a) == "quick"
    a = G.parse_args(["--only", "grow,probe", "--small", "--no-pool"])
    assert a.only == ("probe", "grow") and a.no_pool and G.run_mode(a) == "small"
    for bad in (
        ["--steps", "probe,gpu"],
        ["--steps", ""],
        ["--only", "tests"],
        ["--budget-s", "0"],
    ):
        with pytest.raises(SystemExit):
            G.parse_args(bad)
    with pytest.raises(SystemExit):
        G.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--steps" in text and "--budget-s" in text and "--only" not in text  # (the children's)


def test_budget_and_deadline():
    assert G.plan_timeout(150, 40, 540) == 150
    assert G.plan_timeout(150, 40, 50) == 45  # what the deadline leaves, after the reserve
    assert G.plan_timeout(150, 40, 44) is None  # 39 s < its minimum
    assert G.plan_timeout(90, 0, 5.5) is None  # never under a second
    assert G.plan_timeout(90, 0, 7) == 2
    now = [10.0]
    c = G.Clock(100, now=lambda: now[0])
    now[0] = 35.0
    assert c.elapsed() == 25 and c.remaining() == 75


# ---------------------------------------------------------------------------- results, parsers
def test_summary_table_and_json(tmp_path):
    recs = [G.StepRecord("env", "ok", 1.23, {"headline": "H200"}), G.StepRecord("tests")]
    recs[1].status, recs[1].error = "failed", "3 failed\nmore text"
    recs.append(G.StepRecord("probe", "ok", 2.0, {"x": float("nan"), "y": np.float32(1.5)}))
    data = G.write_summary(str(tmp_path / "summary.json"), recs, {"budget_s": 540})
    back = json.loads((tmp_path / "summary.json").read_text())
    assert back == json.loads(json.dumps(data)) and back["counts"] == {"ok": 2, "failed": 1}
    assert back["steps"][2]["figures"] == {"x": "nan", "y": 1.5}
    assert back["steps"][0]["seconds"] == 1.2
    table = G.format_table(recs).splitlines()
    assert table[2].split()[:3] == ["env", "ok", "1.2"] and table[2].endswith("H200")
    assert table[3].split()[:2] == ["tests", "failed"] and table[3].endswith("3 failed")
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left


def test_out_folder_limits(tmp_path):
    assert G.out_files_problems(str(tmp_path)) == []
    for i in range(8):
        (tmp_path / f"f{i}.json").write_text("{}")
    assert G.out_files_problems(str(tmp_path)) == []
    (tmp_path / "bad name.txt").write_text("")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("")
    problems = " | ".join(G.out_files_problems(str(tmp_path)))
    assert "10 files" in problems and "bad name.txt" in problems and "2 folders deep" in problems


def test_parse_pytest_summary():
    text = "..s.F\n== 1 failed, 3 passed, 1 skipped, 2 warnings, 1 error in 12.34s (0:00:12) ==\n"
    c = G.parse_pytest_summary(text)
    assert (c["passed"], c["failed"], c["skipped"], c["error"], c["seconds"]) == (3, 1, 1, 1, 12.34)
    assert G.parse_pytest_summary("295 skipped, 567 deselected in 3.36s")["deselected"] == 567
    assert G.parse_pytest_summary("no tests ran in 0.10s")["passed"] == 0
    assert G.parse_pytest_summary("collecting ... \nKeyboardInterrupt") is None


def test_parse_sanitizer_summary():
    text = "\n".join([
        "========= COMPUTE-SANITIZER",
        "========= Invalid __global__ read of size 16 bytes",
        "=========     at sparsecore_spmm4_i32+0x1a0",
        "gpu_check probe: ok",
        "========= ERROR SUMMARY: 2 errors",
    ])  # fmt: skip
    v = G.parse_sanitizer_summary(text)
    assert v["errors"] == 2 and v["summary_lines"] == ["========= ERROR SUMMARY: 2 errors"]
    assert v["first_errors"] == ["========= Invalid __global__ read of size 16 bytes"]
    assert G.parse_sanitizer_summary("========= ERROR SUMMARY: 0 errors")["errors"] == 0
    race = "========= Error: Race reported between Write access at 0x10 in k\n"
    race += "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
    v = G.parse_sanitizer_summary(race)
    assert v["errors"] == 1 and len(v["first_errors"]) == 1 and v["api_errors"] == 0
    api = "========= Program hit cudaErrorInvalidValue (error 1) on CUDA API call to cudaX.\n"
    v = G.parse_sanitizer_summary(api + "========= ERROR SUMMARY: 1 error")
    assert v["errors"] == 1 and v["api_errors"] == 1
    assert G.parse_sanitizer_summary("python crashed")["errors"] is None


def test_pytest_run_logs_and_counts_a_session(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): pass\n"
        "def test_c(): assert 0\n"
        "def test_d(): pytest.skip('no')\n"
    )
    log = tmp_path / "tests.log"
    run = G.pytest_run("demo", [str(tmp_path / "test_x.py")], 60, str(log))
    assert (run["passed"], run["failed"], run["skipped"]) == (2, 1, 1)
    assert run["returncode"] == 1 and G.pytest_status(run) == "failed"
    assert "===== gpu_check demo" in log.read_text() and "test_c" in log.read_text()


def test_run_streamed_kills_a_command_that_overruns(tmp_path):
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)\nprint('never')"
    log = tmp_path / "x.log"
    res = G.run_streamed([sys.executable, "-c", code], 1.5, log_path=str(log), collect="start")
    assert res["timed_out"] and res["seconds"] < 20 and res["collected"] == ["started"]
    assert "started" in log.read_text() and "killed after" in log.read_text()
    assert "never" not in res["tail"]


def test_no_device_messages():
    m = G.no_device_message({"cupy_error": "ModuleNotFoundError: No module named 'cupy'"})
    assert m == 'gpu_check: no CUDA device (CuPy not installed: pip install -e ".[gpu]")'
    m = G.no_device_message({"cupy": "13.6.0", "device_count": 0})
    assert m == "gpu_check: no CUDA device (CuPy 13.6.0 sees no device)"
    m = G.no_device_message({"cupy": "13.6.0", "device_error": "CUDARuntimeError: no driver"})
    assert "no driver" in m
    assert G.no_device_message({"cupy": "13.6.0", "device_count": 1}) is None


# ---------------------------------------------------------------------------- comparisons
def test_compare_product_bound_nans_and_shapes():
    ref = np.array([[1.0, -2.0], [0.0, 3.0]])
    absref = np.array([[1.0, 2.0], [0.0, 3.0]])
    got = ref.astype(np.float32)
    assert G.compare_product(got, ref, absref, 1e-5)["ok"]
    off = got.copy()
    off[1, 1] += 1e-3
    r = G.compare_product(off, ref, absref, 1e-5)
    assert not r["ok"] and r["max_ratio"] > 1
    nan = got.copy()
    nan[0, 0] = np.nan
    r = G.compare_product(nan, ref, absref, 1e-5)
    assert not r["ok"] and r["nan_left"] == 1
    tiny = got.copy()
    tiny[1, 0] = 1e-20  # an output with no terms must be exactly 0
    assert not G.compare_product(tiny, ref, absref, 1e-5)["ok"]
    assert not G.compare_product(got[:1], ref, absref, 1e-5)["ok"]
    assert G.product_rtol(1) == 1e-5 and G.product_rtol(500) > 2e-5


def _int_case(rng, m=13, n=17):
    W = cases.make("odd_37x53", rng) if m == 37 else G.grow_pattern(rng, m, n)
    dY = rng.integers(-2, 3, size=(m, 4)).astype(np.float32)
    X = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    return W, dY, X


def test_compare_grow_exact(rng):
    W, dY, X = _int_case(rng)
    rr, cc, ss = R.topk_grow(W.indptr, W.indices, W.shape, dY, X, 20)
    rows, cols = rr.astype(np.int32), cc.astype(np.int32)
    assert G.compare_grow_exact(rows, cols, ss.astype(np.float32), rr, cc, ss, 17)["ok"]
    keys = ss.astype(np.float32).view(np.int32)  # a launcher returning its score keys
    assert G.compare_grow_exact(rows, cols, keys, rr, cc, ss, 17)["ok"]
    moved = cols.copy()
    moved[3] = (moved[3] + 1) % 17
    r = G.compare_grow_exact(rows, moved, ss, rr, cc, ss, 17)
    assert not r["ok"] and r["wrong_entries"] >= 1 and "entry 3" in r["error"]
    assert not G.compare_grow_exact(rows[:-1], cols[:-1], ss[:-1], rr, cc, ss, 17)["ok"]
    sub = np.zeros(3)
    sub[1] = 2.0**-140  # a subnormal score reported as 0 (flushed) is wrong
    r = G.compare_grow_exact(np.zeros(3, np.int32), np.arange(3, dtype=np.int32), np.zeros(3),
                             np.zeros(3), np.arange(3), sub, 17)  # fmt: skip
    assert not r["ok"] and r["wrong_scores"] == 1


def test_check_float_grow(rng):
    W = G.grow_pattern(rng, 20, 30)
    dY = rng.standard_normal((20, 8)).astype(np.float32)
    X = rng.standard_normal((30, 8)).astype(np.float32)
    S = R.grow_scores(W.indptr, W.indices, W.shape, dY, X)
    bound = 1e-5 * (np.abs(dY.astype(np.float64)) @ np.abs(X.astype(np.float64)).T)
    k = 25
    rr, cc, ss = R.topk_grow(W.indptr, W.indices, W.shape, dY, X, k)
    assert G.check_float_grow(S, bound, rr, cc, ss.astype(np.float32), k)["ok"]
    # swap the best chosen entry for the worst absent one
    flat = rr * 30 + cc
    best = flat[np.argmax(ss)]
    worst = int(np.argmin(np.where(np.isfinite(S), S, np.inf)))
    f2 = np.sort(np.append(flat[flat != best], worst))
    r = G.check_float_grow(S, bound, f2 // 30, f2 % 30, S.ravel()[f2], k)
    assert not r["ok"] and "scores clearly higher" in r["error"]
    present = int(np.flatnonzero(~np.isfinite(S.ravel()))[0])
    f3 = np.sort(np.append(flat[1:], present))
    assert not G.check_float_grow(S, bound, f3 // 30, f3 % 30, np.zeros(k), k)["ok"]
    assert not G.check_float_grow(S, bound, rr[::-1], cc[::-1], ss[::-1], k)["ok"]


def test_exact_in_float32():
    rng = np.random.default_rng(1)
    ints = rng.integers(-3, 4, size=(6, 5)).astype(np.float32)
    assert G.exact_in_float32(ints, ints)
    assert G.exact_in_float32(*G.subnormal_operands(rng, 30, 40))
    f = rng.standard_normal((6, 5)).astype(np.float32)
    assert not G.exact_in_float32(f, f)  # 48-bit products
    a = np.array([[2.0**-75]], np.float32)
    assert not G.exact_in_float32(a, a)  # 2^-150: below the smallest subnormal
    big = np.array([[2.0**13, 1.0]], np.float32)
    assert not G.exact_in_float32(big, big)  # 2^26 + 1 needs 27 bits
    assert G.exact_in_float32(np.zeros((3, 2), np.float32), f[:4, :2])


def test_the_subnormal_cases_hold_subnormal_scores_that_flush_to_zero_would_misrank():
    """NumPy only: the case's float32 scores are exact, some are subnormal, and one of its k
    cuts inside the subnormals, where ranking flushed scores (as -ftz would) changes the answer."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        case = G.grow_case("subnormal", rng, 37, 53)
        W, dY, X = case["W"], case["dY"], case["X"]
        assert case["exact"] and dY.shape[1] == X.shape[1] == 1
        p32 = dY[:, None, 0] * X[None, :, 0]  # float32 products, as a device computes them
        p64 = dY.astype(np.float64)[:, None, 0] * X.astype(np.float64)[None, :, 0]
        np.testing.assert_array_equal(p32.astype(np.float64), p64)
        assert G.float32_subnormal(p32).sum() > 20
        assert np.abs(dY[dY != 0]).min() < 1e-20 and np.abs(X[X != 0]).min() < 1e-19
        S = R.grow_scores(W.indptr, W.indices, W.shape, dY, X)
        cls = G.score_classes(S)
        assert cls["subnormal"] > 0 and cls["normal"] > 0 and cls["zero"] > 0
        k_sub = cls["normal"] + cls["subnormal"] // 2
        assert k_sub in G.grow_ks(S)
        rr, cc, ss = R.topk_grow(W.indptr, W.indices, W.shape, dY, X, k_sub)
        assert G.float32_subnormal(ss).any()  # the cut is inside the subnormal scores
        flushed = np.where(G.float32_subnormal(S), 0.0, S).ravel()  # (-inf stays at present)
        order = np.lexsort((np.arange(flushed.size), -flushed))[:k_sub]
        assert not np.array_equal(rr * 53 + cc, np.sort(order))


@pytest.mark.parametrize("variant", ["zero", "tail", "tail_cut"])
def test_the_big_grow_answer_by_construction_is_the_reference(variant):
    rng = np.random.default_rng(7)
    m, n = 31, 45
    case = G.big_grow_case(m, n, variant, rng, n_zero=25, tail_rows=3, tail_cols=12)
    W, dY, X, k = case["W"], case["dY"], case["X"], case["k"]
    assert G.exact_in_float32(dY, X)
    rr, cc, ss = R.topk_grow(W.indptr, W.indices, W.shape, dY, X, k)
    er, ec, es = case["expected"]
    np.testing.assert_array_equal(er, rr)
    np.testing.assert_array_equal(ec, cc)
    np.testing.assert_array_equal(es, ss)
    if variant == "zero":
        assert not ss.any() and k == 25
    else:  # the nonzero scores sit in the last rows: all of them, then 25 zeros; or half
        assert (rr[ss > 0] >= m - 3).all()
        assert (ss > 0).sum() == (k - 25 if variant == "tail" else k)


def test_lowest_absent():
    np.testing.assert_array_equal(G.lowest_absent([0, 2, 3, 7], 5), [1, 4, 5, 6, 8])
    np.testing.assert_array_equal(G.lowest_absent([], 3), [0, 1, 2])
    np.testing.assert_array_equal(G.lowest_absent([9, 1, 1], 2), [0, 2])


def test_offset_views_are_misaligned_or_aligned_as_asked():
    from kernels import config
    from kernels.cuda import spmm as cu_spmm

    vals = np.arange(12, dtype=np.float32).reshape(3, 4)
    for offset, want_mod, want_vec in ((1, 4, 1), (4, 0, 4), (2, 8, 1)):
        v = G.offset_view(np, (3, 4), offset, vals)
        assert v.flags.c_contiguous and v.dtype == np.float32 and v.shape == (3, 4)
        assert G.address(v) % 16 == want_mod
        np.testing.assert_array_equal(v, vals)
        if G.address(v.base) % 16 == 0:  # (as CuPy's always are) the view ends the buffer
            assert G.address(v.base) + 4 * v.base.size == G.address(v) + 4 * v.size
        assert config.CUDA_SPMM_FLOAT4 and cu_spmm.vector_width(4, v, v) == want_vec
    assert np.isnan(G.offset_view(np, (2, 2), 1)).all()  # outputs start as NaN


def test_drop_values_hold_the_hard_cases():
    d = G.drop_values(np.random.default_rng(3), 4000)
    assert d.dtype == np.float32
    zeros, neg0, sub = (
        (d == 0).sum(),
        ((d == 0) & np.signbit(d)).sum(),
        G.float32_subnormal(d).sum(),
    )
    assert zeros > 100 and neg0 > 100 and sub > 500
    assert len(np.unique(np.abs(d[G.float32_subnormal(d)]))) < sub  # tied subnormal magnitudes
    ks = G.drop_ks(d)
    assert {0, int(zeros), int(zeros + sub), 4000} <= set(ks)


# ---------------------------------------------------------------------------- emulated GPU steps
PROBE_CFG = {"matrices": [(9, 11, 0.3), (6, 7, 0.0)], "batches": [1, 4, 5], "public_batches": [4]}
GROW_CFG = {"big": 30, "big_batch": 4, "big_variants": ["zero", "tail", "tail_cut"],
            "ref": [(13, 17, 64)], "kinds": G.GROW_KINDS, "buffer_factor": 1.01, "drop_nnz": 500}  # fmt: skip
TIMING_CFG = {"launches": 10, "products": (64, 64, 0.1), "batches": [4], "grow": (48, 40, 8, 0.1),
              "grow_fraction": 0.3}  # fmt: skip


@pytest.fixture
def emulated(monkeypatch, rng):
    """The CUDA launchers on NumPy arrays, every kernel launch run by its NumPy model, and the
    public kernels.* routed to that side (tests/cases.py's "cuda-emulated")."""
    cases.make_backend("cuda-emulated", monkeypatch, rng)
    return G.Side(np)


def test_the_gpu_steps_run_on_the_emulated_launches(emulated, tmp_path):
    for name, cfg in (("probe", PROBE_CFG), ("grow", GROW_CFG), ("timings", TIMING_CFG)):
        rep = G.run_worker_step(name, emulated, cfg, "test", str(tmp_path), seed=5)
        assert rep.status == "ok", rep.failures + rep.data["errors"]
        data = json.loads((tmp_path / G.FILES[name]).read_text())
        assert data["complete"] and data["status"] == "ok" and data["cases"]
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert (
        probe["figures"]["n_cases"] == 4 * 4 * 3 * 3 + 4 + 2 and probe["figures"]["nan_left"] == 0
    )
    assert {(c["float4"], c["offset"], c["vec"]) for c in probe["cases"] if c["op"] == "spmm" and c["B"] == 4} == {
        (False, 4, 1), (False, 1, 1), (True, 4, 4), (True, 1, 1)}  # fmt: skip
    grow = json.loads((tmp_path / "grow.json").read_text())
    parts = grow["figures"]["parts"]
    assert parts["big"] == {"cases": 3, "ok": 3} and parts["drop"]["ok"] == parts["drop"]["cases"]
    assert grow["figures"]["subnormal_products"]["sgemm_exact"]
    timings = json.loads((tmp_path / "timings.json").read_text())["figures"]
    assert timings["grow"]["host_syncs"] >= 1 and timings["grow"]["tile_shape"]
    assert timings["launch"]["launcher_us"] > 0
    assert G.out_files_problems(str(tmp_path)) == []


def test_the_probe_sees_a_wrong_launcher_and_a_misaligned_float4_choice(emulated, monkeypatch):
    from kernels import config
    from kernels.cuda import spmm as cu_spmm

    real = cu_spmm.spmm

    def last_row_unwritten(indptr, indices, data, x, out, *a, **kw):
        keep = out[-1].copy()
        real(indptr, indices, data, x, out, *a, **kw)
        out[-1] = keep  # (NaN, as the probe filled it)
        return out

    monkeypatch.setattr(cu_spmm, "spmm", last_row_unwritten)
    monkeypatch.setattr(  # ignores the alignment
        cu_spmm, "vector_width", lambda b, *a: 4 if config.CUDA_SPMM_FLOAT4 and b % 4 == 0 else 1
    )
    rep = G.run_worker_step("probe", emulated, PROBE_CFG, "test", None, seed=5)
    assert rep.status == "failed"
    bad = [c for c in rep.data["cases"] if not c["ok"]]
    assert bad and {c["op"] for c in bad} <= {"spmm", "public"} and "spmm" in {c["op"] for c in bad}
    assert all(c["nan_left"] > 0 for c in bad if c["op"] == "spmm")
    # float4 chosen on the offset-1 views: counted (on a device, a misaligned-address fault)
    assert rep.figures["vec_mismatch"] == 2 * 2 * 2  # (matrices x dtypes x {spmm, spmm_t} at B=4)


def test_the_probe_tells_a_gate_that_flushes_subnormals_from_a_wrong_one(emulated, monkeypatch):
    """The ReLU-backward gate compared as floats under flush-to-zero (a positive subnormal
    blocks dX) is recorded as such; a gate that blocks more than that fails."""
    rep = G.run_worker_step("probe", emulated, PROBE_CFG, "test", None, seed=5)
    assert set(rep.figures["subnormal_gate"].values()) == {"keeps subnormals"}
    real = emu._MODELS["sparsecore_spmm"]

    def ftz_gate(plan, rng):
        args = list(plan.args)
        args[9] = np.where(G.float32_subnormal(args[9]), np.float32(0), args[9])
        return real(plan._replace(args=tuple(args)), rng)

    monkeypatch.setitem(emu._MODELS, "sparsecore_spmm", ftz_gate)
    monkeypatch.setitem(emu._MODELS, "sparsecore_spmm4", ftz_gate)
    rep = G.run_worker_step("probe", emulated, PROBE_CFG, "test", None, seed=5)
    assert rep.status == "ok"
    assert set(rep.figures["subnormal_gate"].values()) == {"flushes subnormals"}

    def blocks_tiny_normals_too(plan, rng):
        args = list(plan.args)
        args[9] = np.where(np.abs(args[9]) < 1e-3, np.float32(0), args[9])
        return real(plan._replace(args=tuple(args)), rng)

    monkeypatch.setitem(emu._MODELS, "sparsecore_spmm", blocks_tiny_normals_too)
    monkeypatch.setitem(emu._MODELS, "sparsecore_spmm4", blocks_tiny_normals_too)
    monkeypatch.setattr(G, "probe_inputs", _with_tiny_normal_gates(G.probe_inputs))
    rep = G.run_worker_step("probe", emulated, PROBE_CFG, "test", None, seed=5)
    bad = [c for c in rep.data["cases"] if not c["ok"]]
    assert rep.status == "failed" and bad
    assert "neither" in rep.figures["subnormal_gate"].values()


def _with_tiny_normal_gates(real_inputs):
    """probe_inputs whose gates also hold positive normal values below 1e-3."""

    def inputs(rng, W, batch, subnormal_gate=False):
        out = real_inputs(rng, W, batch, subnormal_gate)
        g = out["gate"]
        g[(g > 0) & (g < 0.5)] = np.float32(1e-4)
        Wd = R.dense(W.indptr, W.indices, W.data, W.shape)  # (the references, for these gates)
        P = Wd.T @ out["dY"].astype(np.float64)
        _, absT, terms = out["spmm_t"]
        out["spmm_t"] = (np.where(g > 0, P, 0.0), absT, terms)
        out["spmm_t_flushed"] = (np.where((g > 0) & ~G.float32_subnormal(g), P, 0.0), absT, terms)
        return out

    return inputs


def test_the_grow_check_sees_flush_to_zero_scores(emulated, monkeypatch):
    """Scores keyed as if -ftz flushed the subnormal products: the subnormal cases fail, the
    integer and few-level ones still pass."""

    def ftz_key(a):
        key = (np.asarray(a, np.float32).view(np.int32) & 0x7FFFFFFF).astype(np.int64)
        return np.where(key < 0x00800000, 0, key)

    monkeypatch.setattr(emu, "_key", ftz_key)
    cfg = {**GROW_CFG, "big": 0, "drop_nnz": 0, "ref": [(37, 53, 4096)]}
    rep = G.run_worker_step("grow", emulated, cfg, "test", None, seed=5)
    assert rep.status == "failed"
    failed = {c["kind"] for c in rep.data["cases"] if not c["ok"]}
    assert "subnormal" in failed and not failed & {"ints", "levels", "zero"}


def test_the_drop_check_sees_a_drop_that_flushes_subnormals(emulated, monkeypatch):
    from kernels.cuda import drop as cu_drop

    real = cu_drop.magnitude_drop

    def ftz_drop(data, k):
        return real(np.where(G.float32_subnormal(data), np.float32(0), data), k)

    monkeypatch.setattr(cu_drop, "magnitude_drop", ftz_drop)
    cfg = {**GROW_CFG, "big": 0, "ref": [], "drop_nnz": 500}
    rep = G.run_worker_step("grow", emulated, cfg, "test", None, seed=5)
    bad = [c for c in rep.data["cases"] if not c["ok"]]
    assert rep.status == "failed" and bad
    assert all("subnormal" in c["error"] or "zero" in c["error"] for c in bad if c.get("error"))


def test_grow_hooks_count_host_reads_and_restore(emulated, rng, monkeypatch):
    W, dY, X = _int_case(rng)
    D = emulated.device_csr(W)
    with G.grow_hooks() as h:
        cu_grow.topk_grow(D.indptr, D.indices, None, dY, X, 30, tile_bytes=64, buffer_factor=1.01)
    assert h["to_host"] >= 4 and h["tile_bytes"] == 64 and h["tile_shape"] == [1, 16]
    assert sum(h["launches"].values()) >= 13 and any("grow_select" in k for k in h["launches"])
    assert cu_grow.to_host is _module.to_host and cu_grow.tile_shape.__name__ == "tile_shape"
