"""sparsecore/benchmarks/ops.py: the timed operations, one body per backend; and the pieces of
bench/gpu_suite.py that run without a GPU (its sweep path over the emulated CUDA backend)."""

import numpy as np
import pytest

import kernels
from bench import gpu_suite
from kernels.backend import cuda_backend, get_backend
from sparsecore import CSR
from sparsecore.benchmarks import ops, report, timing
from sparsecore.layers import mlp


def _operands(b, rng, m=37, n=29, batch=8, density=0.2):
    W = CSR.random((m, n), density, seed=int(rng.integers(1 << 31)))
    X = rng.standard_normal((n, batch), dtype=np.float32)
    dY = rng.standard_normal((m, batch), dtype=np.float32)
    return W, b.csr(W), b.asarray(X), b.asarray(dY), X, dY


@pytest.mark.parametrize("via", ops.VIA)
def test_product_calls_compute_the_products_on_every_backend(backend, rng, via):
    # the kernels' Backend of the fixture's side: on "cuda-emulated" the CUDA launchers over
    # NumPy (tests/cases.py make_backend routes every call there)
    b = {"cpu": get_backend("cpu"), "cuda-emulated": cuda_backend(np)}.get(backend.name)
    b = b or get_backend("cuda")
    W, Wb, Xb, dYb, X, dY = _operands(b, rng)
    calls = ops.product_calls(b, Wb, Xb, dYb, via=via)
    assert sorted(calls) == sorted(ops.KERNELS)
    Wd = W.to_dense().astype(np.float64)
    want = {
        "spmm": Wd @ X,
        "spmm_t": Wd.T @ dY,
        "sddmm": (dY.astype(np.float64) @ X.T.astype(np.float64))[W.row_ids(), W.indices],
    }
    for name, fn in calls.items():
        got = np.asarray(kernels.backend.to_host(fn()), np.float64)
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-5, err_msg=name)
        t = timing.median_time(fn, reps=2, sync=b.sync)  # the timer over this backend
        assert t["reps"] == 2 and t["median_s"] >= 0


def test_product_calls_refuse_an_unknown_way_in(rng):
    b = get_backend("cpu")
    W, *_ = _operands(b, rng)
    with pytest.raises(ValueError, match="via must be one of"):
        ops.product_calls(b, W, np.zeros((29, 2), np.float32), np.zeros((37, 2), np.float32),
                          via="raw")  # fmt: skip


@pytest.mark.parametrize("out", [False, True])
def test_dense_calls(rng, out):
    Wd = rng.standard_normal((6, 5), dtype=np.float32)
    X = rng.standard_normal((5, 3), dtype=np.float32)
    dY = rng.standard_normal((6, 3), dtype=np.float32)
    rows, cols = np.array([0, 2, 5]), np.array([4, 0, 1])
    calls = ops.dense_calls(np, Wd, X, dY, out=out, gather=(rows, cols))
    np.testing.assert_allclose(calls["spmm"](), Wd @ X, rtol=1e-6)
    np.testing.assert_allclose(calls["spmm_t"](), Wd.T @ dY, rtol=1e-6)
    np.testing.assert_allclose(calls["sddmm"](), (dY @ X.T)[rows, cols], rtol=1e-6)
    assert ops.dense_calls(np, Wd, X, dY)["sddmm"]().shape == (6, 5)  # no gather: the product


@pytest.mark.parametrize("with_buffer", [False, True])
def test_naive_grow_is_the_top_k_of_the_absent_scores(rng, with_buffer):
    W = CSR.random((12, 9), 0.3, seed=3)
    X = rng.standard_normal((9, 4), dtype=np.float32)
    dY = rng.standard_normal((12, 4), dtype=np.float32)
    k = 10
    buf = np.empty((12, 9), np.float32) if with_buffer else None
    flat = ops.naive_grow(np, W.row_ids(), W.indices, dY, X, k, product_out=buf)
    S = np.abs(dY.astype(np.float64) @ X.T.astype(np.float64))
    S[W.row_ids(), W.indices] = -1.0
    assert len(set(flat.tolist())) == k
    assert set(flat.tolist()) == set(np.argsort(-S.ravel(), kind="stable")[:k].tolist())
    r, c, s = kernels.topk_grow(W, dY, X, k)  # the fused grow passes the suite's check
    ops.check_grow_host(W, dY, X, k, (r, c, s))
    with pytest.raises(AssertionError, match="disagrees"):
        ops.check_grow_host(W, dY, X, k, (r, (c + 1) % 9, s))


def test_check_products_catches_a_wrong_kernel(rng, monkeypatch):
    W = CSR.random((40, 30), 0.2, seed=1)
    X = rng.standard_normal((30, 6), dtype=np.float32)
    dY = rng.standard_normal((40, 6), dtype=np.float32)
    ops.check_products(W, W.to_scipy(), X, dY, rng)
    right = kernels.spmm_t
    monkeypatch.setattr(kernels, "spmm_t", lambda *a, **k: right(*a, **k) * 1.001)
    with pytest.raises(AssertionError, match="spmm_t: .* differ from the float64 reference"):
        ops.check_products(W, W.to_scipy(), X, dY, rng)


def test_gpu_suite_without_a_gpu(capsys):
    """Importable, its arguments parse, it says why it cannot run; its MLP step (the engine's
    layers) trains on the CPU; its table prints from a result dictionary."""
    args = gpu_suite.parse_args(["--quick", "--skip-tests"])
    assert args.quick and args.skip_tests
    if kernels.validation.gpu_unavailable_reason() is not None:
        assert gpu_suite.main(["--out", "/nonexistent"]) == 2
        assert "nothing to run here" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 16), dtype=np.float32)
    y = rng.integers(0, 3, 16)
    model = mlp([20, 12, 3], [0.5, None], seed=0)
    step = gpu_suite.sgd_step(model, x, y, lr=0.1, device="cpu")
    w0 = model.params()[0].value.copy()
    step()
    assert not np.array_equal(model.params()[0].value, w0)  # a step moved the weights
    row = dict(op="spmm", shape="m=4 n=4 B=2 d=0.5", correct=True, ms=0.01, cusparse_ms=0.02,
               dense_ms=None, gflops=1.0, vs_cusparse=2.0, vs_dense=None)  # fmt: skip
    res = {"kernels": [row], "grow_memory": [], "train_step": None}
    report.print_gpu_tables(res)
    out = capsys.readouterr().out
    assert "spmm" in out and "m=4 n=4 B=2 d=0.5" in out and "2.00" in out
