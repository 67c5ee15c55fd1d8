"""The benchmark suite: its analysis, its workers, and `sparsecore bench` end to end (tiny shapes)."""

import json
import math

import numpy as np
import pytest

from sparsecore import cli
from sparsecore.benchmarks import step as S
from sparsecore.benchmarks import suite
from sparsecore.benchmarks.common import log_crossing


def test_log_crossing():
    assert log_crossing([]) is None
    assert log_crossing([(0.01, 4.0), (0.1, 2.0)]) == math.inf
    assert log_crossing([(0.01, 0.5), (0.1, 0.2)]) == 0.0
    # speed-up 4 at 1%, 1/4 at 100%: log-linear crossing at the geometric middle, 10%
    assert log_crossing([(1.0, 0.25), (0.01, 4.0)]) == pytest.approx(0.1)
    # the highest density still >= 1 counts, even if a sparser point dips below (noise)
    be = log_crossing([(0.001, 0.9), (0.01, 1.5), (0.05, 1.2), (0.1, 0.5)])
    assert 0.05 < be < 0.1
    assert log_crossing([(0.01, 3.0), (0.02, 0.8), (0.05, 1.1)]) == math.inf
    assert log_crossing([(0.01, 2.0), (0.1, 0.0)]) > 0.01  # y = 0: no division by zero


def test_step_jobs_respect_the_preset():
    cfg = dict(
        widths=[64, 128],
        sparsities=[0.5, 0.9, 0.99],
        baseline_sparsities=[0.9],
        min_sparsity={128: 0.8},
        steps={64: 7},
        updates=2,
    )
    jobs = suite.step_jobs(cfg, ["sparsecore", "dense", "torch-masked"], 32, 100, "d")
    auto = suite.step_jobs(cfg, ["sparsecore-auto"], 32, 100, "d")
    assert sorted((j["arch"][1], j["sparsity"]) for j in auto) == [(64, 0.5), (64, 0.9), (128, 0.9)]
    got = sorted((j["arch"][1], j["impl"], j["sparsity"]) for j in jobs)
    assert got == sorted(
        [
            (64, "dense", 0.0),
            (64, "sparsecore", 0.5),
            (64, "sparsecore", 0.9),
            (64, "sparsecore", 0.99),
            (64, "torch-masked", 0.9),
            (128, "dense", 0.0),
            (128, "sparsecore", 0.9),
            (128, "sparsecore", 0.99),
            (128, "torch-masked", 0.9),
        ]
    )
    assert {j["steps"] for j in jobs if j["arch"][1] == 64} == {7}
    assert all(j["batch"] == 32 and j["data"] == "d" for j in jobs)


def test_scaling_jobs_fix_the_fan_in():
    jobs = suite.scaling_jobs(dict(widths=[256, 512], fan_in=16, steps=5), 32, 100, "d")
    for j in jobs:
        w = j["arch"][1]
        assert j["distribution"] == "uniform"
        assert round((1 - j["sparsity"]) * w) == 16


def test_summary_amortises_the_update():
    kinds = S._classify([False, False, True, False, False, True, False])
    assert kinds == ["normal", "normal", "update", "after", "normal", "update", "after"]
    times = [1.0, 1.0, 11.0, 2.0, 1.0, 13.0, 4.0]
    out = S._summary(kinds, times, delta_t=10)
    assert out["median_step_s"] == 1.0
    assert out["n_updates"] == 2
    assert out["update_step_s"] == 12.0 and out["after_update_step_s"] == 3.0
    assert out["amortised_step_s"] == pytest.approx(1.0 + (12.0 + 3.0 - 2.0) / 10)


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return S.prepare_data(tmp_path_factory.mktemp("benchdata"), 512)


def _worker(prefix, impl, **kw):
    cfg = dict(impl=impl, arch=[784, 48, 40, 10], sparsity=0.9, batch=32, steps=6, updates=2)
    cfg.update(kw, data=prefix)
    return suite.run_worker(cfg, threads=None)


def test_prepared_data_is_standardised(data_prefix):
    d = S.load_data(data_prefix)
    assert d.x_train.shape == (512, 784) and d.x_train.dtype == np.float32
    assert abs(float(d.x_train.mean())) < 1e-3 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert d.y_train.shape == (512,) and d.y_train.max() < 10


@pytest.mark.slow
def test_engine_workers_measure_and_account(data_prefix):
    from sparsecore.rigl.distributions import layer_densities

    sp = _worker(data_prefix, "sparsecore")
    de = _worker(data_prefix, "dense")
    assert sp["n_steps"] == 6 and sp["n_updates"] == 2 and de["n_updates"] == 0
    assert sp["amortised_step_s"] >= sp["median_step_s"] > 0
    shapes = [(48, 784), (40, 48), (10, 40)]
    n_dense = sum(m * n for m, n in shapes)
    assert de["nnz"] == n_dense and sp["nnz"] < n_dense
    dens = layer_densities(0.9, shapes, "erk")
    want = sum(min(1.0, d) * m * n for d, (m, n) in zip(dens, shapes, strict=True))
    assert abs(sp["nnz"] - want) <= len(shapes)  # rounding per layer
    # FLOPs: forward + dW + dX (not for the first layer), grow amortised over ΔT
    assert de["flops_per_step"] == pytest.approx(
        sum(2 * m * n * 32 * (2 if l == 0 else 3) for l, (m, n) in enumerate(shapes))
    )
    assert sp["flops_per_step_dense"] == pytest.approx(de["flops_per_step"])
    assert sp["flops_per_step"] < de["flops_per_step"]
    assert sp["state_bytes"] < sp["state_bytes_dense"] == de["state_bytes"]
    for r in (sp, de):
        assert r["peak_rss_mib"] >= r["base_rss_mib"] > 0
        assert r["model_rss_mib"] >= 0


def test_engine_worker_at_a_sparsity_too_high_for_its_warm_up_model(data_prefix):
    # the worker warms up on a 16-wide model first; at 99.9% uniform a 16 x 16 layer keeps no
    # connection (the config refuses that), which must not stop the measured model (W = 600)
    r = _worker(
        data_prefix, "sparsecore", arch=[784, 600, 600, 10], sparsity=0.999,
        distribution="uniform", steps=4,
    )  # fmt: skip
    assert r["n_steps"] == 4 and r["config"]["sparsity"] == 0.999
    assert r["nnz"] == sum(round(0.001 * m * n) for m, n in [(600, 784), (600, 600), (10, 600)])


@pytest.mark.slow
def test_torch_workers(data_prefix):
    pytest.importorskip("torch")
    m = _worker(data_prefix, "torch-masked")
    t = _worker(data_prefix, "torch-sparse")
    assert m["n_updates"] == 2 and t["n_updates"] == 0
    assert m["state_bytes"] > m["state_bytes_dense"] > t["state_bytes"]


def test_worker_errors_name_the_configuration(data_prefix):
    with pytest.raises(RuntimeError, match="impl must be one of"):
        _worker(data_prefix, "nope")


def test_forward_check_catches_a_wrong_model():
    from sparsecore.layers import mlp

    model = mlp([20, 8, 3], [0.5, None], seed=0)
    x = np.random.default_rng(0).standard_normal((20, 5)).astype(np.float32)
    S.check_forward(model, x)
    model.weighted()[0].b += 1.0  # the reference reads the same weights: still equal
    S.check_forward(model, x)
    layer = model.weighted()[0]
    original = layer.forward

    def wrong(inp, **kw):
        return original(inp, **kw) + 1.0

    layer.forward = wrong
    with pytest.raises(AssertionError, match="float64 reference"):
        S.check_forward(model, x)


@pytest.mark.slow
def test_cli_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "b"
    rc = cli.main(
        ["bench", "--levels", "kernels,step", "--widths", "96", "--densities", "0.05,0.3",
         "--sparsities", "0.5,0.9", "--batch-sizes", "16", "--baselines", "scipy",
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    assert {r["impl"] for r in res["kernels"]["products"]} == {"sparsecore", "scipy"}
    assert {r["density"] for r in res["kernels"]["products"]} == {0.05, 0.3}
    impls = sorted((r["config"]["impl"], r["config"]["sparsity"]) for r in res["step"])
    assert impls == [
        ("dense", 0.0),
        ("sparsecore", 0.5),
        ("sparsecore", 0.9),
        ("sparsecore-auto", 0.5),
        ("sparsecore-auto", 0.9),
    ]
    auto = {r["config"]["sparsity"]: r for r in res["step"] if r["config"]["impl"] != "dense"}
    assert all(set(r["layer_compute"]) <= {"sparse", "dense"} for r in auto.values())
    md = (out / "bench.md").read_text()
    assert "### W = 96" in md and "Break-even density of the training step" in md
    assert "With `--dense-fallback auto`" in md and "× dense's step time (at" in md
    for png in ("speedup_m96.png", "step_speedup.png", "step_memory.png"):
        assert (out / png).stat().st_size > 1000
    # the report rebuilds from the JSON alone
    capsys.readouterr()
    assert cli.main(["bench", "--from-json", str(out / "bench.json"), "--out", str(out)]) == 0
    assert "### W = 96" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--levels", "kernels,gpu"], "--levels must be a subset"),
        (["--baselines", "mkl"], "--baselines must be a subset"),
        (["--sparsities", "0.5,1.0"], "--sparsities must lie in"),
        (["--threads", "0"], "--threads must be"),
    ],
)
def test_cli_bench_rejects_bad_arguments(tmp_path, args, message, capsys):
    assert cli.main(["bench", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsecore bench: error: ") and message in err[0]
