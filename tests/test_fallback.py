"""The dense fallback (sparsecore/fallback.py, SparseLinear.set_compute): a sparse layer that
computes its products on BLAS through a dense copy of W gives the kernels' results, keeps its
state nnz-sized and sparse, and is chosen (off | auto | on) within the memory budget."""

import json
import re
import warnings

import numpy as np
import pytest

from kernels import CSR
from sparsecore import fallback
from sparsecore.cli import main
from sparsecore.layers import SparseLinear
from sparsecore.plan import describe_plan, memory_plan
from sparsecore.train import TrainConfig, Trainer
from tests.cases import blobs_npz, small_model


def _pair(rng, m=37, n=53, density=0.4):
    W = CSR.random((m, n), density, seed=int(rng.integers(1 << 30)))
    b = rng.standard_normal(m).astype(np.float32)
    return SparseLinear(W.copy(), b.copy()), SparseLinear(W.copy(), b.copy())


def _check(a, b, rng, batch=9):
    m, n = a.W.shape
    x = rng.standard_normal((n, batch)).astype(np.float32)
    dy = rng.standard_normal((m, batch)).astype(np.float32)
    gate = np.where(rng.random((n, batch)) < 0.5, 0, rng.random((n, batch))).astype(np.float32)
    for relu, g, need in ((False, None, True), (True, gate, True), (True, None, False)):
        ya, yb = a.forward(x, relu=relu), b.forward(x, relu=relu)
        np.testing.assert_allclose(ya, yb, rtol=1e-5, atol=1e-5)
        da, db = a.backward(dy, need_dx=need, gate=g), b.backward(dy, need_dx=need, gate=g)
        if need:
            np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-5)
        else:
            assert da is None and db is None
        np.testing.assert_allclose(a.gW, b.gW, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.gb, b.gb, rtol=1e-5, atol=1e-5)


def test_dense_compute_gives_the_kernels_results(rng):
    sparse, dense = _pair(rng)
    dense.set_compute("dense")
    _check(sparse, dense, rng)
    assert dense._dense.shape == (37, 53) and dense.gW.shape == (dense.W.nnz,)
    # the dense copy is zero off the pattern and holds the values on it
    mask = np.zeros((37, 53), bool)
    mask[dense.W.row_ids(), dense.W.indices] = True
    assert not dense._dense[~mask].any()
    np.testing.assert_array_equal(dense._dense[dense.W.row_ids(), dense.W.indices], dense.W.data)


def test_dense_compute_follows_value_and_topology_changes(rng):
    sparse, dense = _pair(rng)
    dense.set_compute("dense")
    _check(sparse, dense, rng)
    for layer in (sparse, dense):  # an optimizer step writes the values in place
        layer.W.data *= np.float32(-0.5)
    _check(sparse, dense, rng)
    W2 = CSR.random((37, 53), 0.4, seed=int(rng.integers(1 << 30)))  # a topology update
    sparse.set_weight(W2.copy())
    dense.set_weight(W2.copy())
    _check(sparse, dense, rng)
    mask = np.zeros((37, 53), bool)
    mask[W2.row_ids(), W2.indices] = True
    assert not dense._dense[~mask].any(), "the old pattern's entries were not cleared"


def test_set_compute_refuses_what_it_cannot_do(rng):
    layer, _ = _pair(rng)
    with pytest.raises(ValueError, match="compute must be 'sparse' or 'dense', got 'blas'"):
        layer.set_compute("blas")
    layer.shard = object()
    with pytest.raises(ValueError, match="split by rows over MPI ranks"):
        layer.set_compute("dense")


def test_choose_off_on_and_the_memory_left(rng):
    model = small_model(rng, (30, 40, 20, 5), 0.5)
    recs = fallback.choose(model, "on", 16)
    assert [r["compute"] for r in recs] == ["dense"] * 3
    assert all(layer.compute == "dense" for layer in model.sparse_layers())
    recs = fallback.choose(model, "off", 16)
    assert {layer.compute for layer in model.sparse_layers()} == {"sparse"}
    assert all(r["why"] == "dense fallback off" for r in recs)
    first = model.sparse_layers()[0].dense_bytes()  # 2 copies of 40 x 30 float32
    assert first == 8 * 40 * 30
    recs = fallback.choose(model, "on", 16, spare_bytes=first + 1)
    assert [r["compute"] for r in recs] == ["dense", "sparse", "sparse"]
    assert "exceeds the memory left" in recs[1]["why"]
    with pytest.raises(ValueError, match="dense_fallback must be one of off, auto, on"):
        fallback.choose(model, "yes", 16)


def test_dense_layers_warn_when_openblas_threads_spin(rng, monkeypatch):
    from kernels import _threads

    model = small_model(rng, (30, 40, 20, 5), 0.5)
    monkeypatch.setattr(_threads, "blas_spin_warning", lambda: "NumPy was imported before")
    with pytest.warns(RuntimeWarning, match="dense fallback: NumPy was imported before"):
        fallback.choose(model, "on", 16)
    with warnings.catch_warnings():  # no dense layer: nothing to say
        warnings.simplefilter("error")
        fallback.choose(model, "off", 16)
    monkeypatch.setattr(_threads, "blas_spin_warning", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fallback.choose(model, "on", 16)


def test_auto_goes_dense_only_where_timed_faster(rng, monkeypatch):
    model = small_model(rng, (30, 40, 20, 5), 0.5)
    times = iter([{"sparse": 2.0, "dense": 1.0}, {"sparse": 1.0, "dense": 1.0}])
    monkeypatch.setattr(fallback, "_step_time", lambda *a, **k: next(times))
    thin = model.sparse_layers()[2]
    thin.set_weight(CSR.random(thin.W.shape, 0.01, seed=3))  # below the floor: never timed
    recs = fallback.choose(model, "auto", 16)
    assert [r["compute"] for r in recs] == ["dense", "sparse", "sparse"]
    assert recs[0]["sparse_ms"] == 2000.0 and "2.00x" in recs[0]["why"]
    assert "sparse_ms" not in recs[2] and "density" in recs[2]["why"]
    # timing leaves no trace: gradients zero, no batch kept
    assert all(not layer.gW.any() and layer.x is None for layer in model.sparse_layers())


def test_auto_times_the_real_products(rng):
    """No stub: on a dense-ish layer the timing runs both paths and returns two medians."""
    model = small_model(rng, (64, 64, 5), 0.6)
    recs = fallback.choose(model, "auto", 32, reps=2)
    assert all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 for r in recs)
    assert {r["compute"] for r in recs} <= {"sparse", "dense"}


def _cfg(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = dict(
        arch=[20, 48, 32, 3],
        sparsity=0.5,
        epochs=2,
        batch_size=16,
        delta_t=4,
        t_end=0.9,
        lr=0.05,
        progress=False,
        out=str(tmp_path),
        dataset=str(blobs_npz(tmp_path / "toy.npz")),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_a_run_with_every_layer_dense_follows_the_sparse_run(tmp_path):
    """Same seed, same updates: the topology after each RigL update is the same, and losses
    agree to float32 rounding (BLAS sums in another order)."""
    sparse = Trainer(_cfg(tmp_path / "s"))
    dense = Trainer(_cfg(tmp_path / "d", dense_fallback="on"))
    assert {layer.compute for layer in dense.model.sparse_layers()} == {"dense"}
    a, b = sparse.run(), dense.run()
    np.testing.assert_allclose(
        [h["train_loss"] for h in sparse.history],
        [h["train_loss"] for h in dense.history],
        rtol=1e-3,
    )
    assert abs(a["test_acc"] - b["test_acc"]) <= 0.02
    for ls, ld in zip(sparse.model.sparse_layers(), dense.model.sparse_layers(), strict=True):
        assert ls.W.nnz == ld.W.nnz
        np.testing.assert_array_equal(ls.W.indptr, ld.W.indptr)
        np.testing.assert_array_equal(ls.W.indices, ld.W.indices)
    cost = b["cost"]
    assert [layer["compute"] for layer in cost["layers"]] == ["dense", "dense", None]
    assert b["dense_fallback"][0]["why"] == "dense fallback on"
    # the checkpoint is the same CSR format, and resumes
    again = Trainer(_cfg(tmp_path / "d2", dense_fallback="on", epochs=3))
    with pytest.warns(UserWarning, match="different epochs"):
        again.load_checkpoint(str(tmp_path / "d" / "checkpoint.npz"))
    assert again.epoch == 2
    again.run()
    assert again.epoch == 3 and {lay.compute for lay in again.model.sparse_layers()} == {"dense"}


def test_plan_counts_the_dense_copies():
    off = memory_plan([784, 300, 10], 0.9)
    on = memory_plan([784, 300, 10], 0.9, dense_fallback="on")
    auto = memory_plan([784, 300, 10], 0.9, dense_fallback="auto")
    extra = 8 * 300 * 784  # (the 10-output layer is kept dense by ERK: no copy)
    assert [r["density"] < 1 for r in on["layers"]] == [True, False]
    assert on["pieces"]["dense fallback (copies of W, dW)"] == extra
    assert on["total_bytes"] == off["total_bytes"] + extra
    assert auto["total_bytes"] == off["total_bytes"]
    assert auto["dense_fallback_up_to_bytes"] == extra
    assert "dense fallback auto: up to" in describe_plan(auto)


def test_cli_reports_the_choice(tmp_path, capsys):
    p = blobs_npz(tmp_path / "toy.npz")
    args = ["train", "--dataset", str(p), "--arch", "20-32-3", "--sparsity", "0.5"]
    args += ["--epochs", "1", "--batch-size", "32", "--no-progress"]
    assert main([*args, "--dense-fallback", "on", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dense fallback: fc0 \(\d+%: dense fallback on\) compute on BLAS", out)
    assert "1 sparse layer(s) computed on dense BLAS (dense fallback)" in out
    metrics = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert metrics
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main([*args, "--dense-fallback", "sometimes", "--out", str(tmp_path / "b")])
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


def test_on_within_a_budget_the_plan_counted_is_not_refused(tmp_path):
    """Under "on" the plan holds the copies already: a budget of exactly the plan's total
    makes every layer dense (the copies must not be subtracted a second time)."""
    cfg = _cfg(tmp_path / "p", dense_fallback="on")
    plan = memory_plan(cfg)
    tr = Trainer(_cfg(tmp_path / "p", dense_fallback="on", max_memory=plan["total_bytes"]))
    assert [r["compute"] for r in tr.fallback] == ["dense", "dense"]
    auto = memory_plan(_cfg(tmp_path / "q", dense_fallback="auto"))
    tight = Trainer(_cfg(tmp_path / "q", dense_fallback="auto", max_memory=auto["total_bytes"]))
    assert [r["compute"] for r in tight.fallback] == ["sparse", "sparse"]  # no room left
    assert all("exceeds the memory left" in r["why"] for r in tight.fallback)
