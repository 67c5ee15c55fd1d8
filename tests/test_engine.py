"""The training engine: gradients, RigL as a dense masked float64 reference, checkpoints, errors."""

import json

import numpy as np
import pytest

import kernels
from sparsecore import data as D
from sparsecore.layers import Linear, ReLU, Sequential, SoftmaxCrossEntropy, SparseLinear, mlp
from sparsecore.optim import SGD, Adam, lr_at
from sparsecore.rigl import RigL, UpdateSchedule, erk_densities, uniform_densities
from sparsecore.train import TrainConfig, Trainer, TrainingDiverged
from tests.cases import blobs_npz, mnist_subset


# ---------------------------------------------------------------- a dense float64 reference
def ref_forward_backward(Ws, bs, masks, x, y):
    """Masked-dense MLP with ReLU in float64: returns (loss, grads of W (masked), grads of b)."""
    acts, h = [x], x
    for l, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        z = (W * masks[l]) @ h + b[:, None]
        h = np.maximum(z, 0) if l < len(Ws) - 1 else z
        acts.append(h)
    z = h - h.max(axis=0, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=0, keepdims=True)
    B = x.shape[1]
    loss = -np.mean(np.log(p[y, np.arange(B)]))
    d = p.copy()
    d[y, np.arange(B)] -= 1
    d /= B
    gW, gb = [None] * len(Ws), [None] * len(Ws)
    for l in range(len(Ws) - 1, -1, -1):
        gW[l] = (d @ acts[l].T) * masks[l]
        gb[l] = d.sum(axis=1)
        if l:
            d = ((Ws[l] * masks[l]).T @ d) * (acts[l] > 0)
    return loss, gW, gb


def _small_model(rng, sizes=(13, 11, 7, 5), density=0.5):
    return mlp(list(sizes), [density] * (len(sizes) - 1), seed=int(rng.integers(1 << 30)))


def test_gradients_against_finite_differences(rng):
    model = _small_model(rng)
    x = rng.standard_normal((13, 9)).astype(np.float32)
    y = rng.integers(0, 5, 9)
    Ws = [l.W.to_dense(np.float64) for l in model.weighted()]
    masks = [l.W.to_dense(np.float64) != 0 for l in model.weighted()]
    bs = [l.b.astype(np.float64) for l in model.weighted()]
    loss, gW, gb = ref_forward_backward(Ws, bs, masks, x.astype(np.float64), y)
    # the reference's analytic gradient agrees with central differences at stored entries
    eps = 1e-6
    for l in range(len(Ws)):
        for i, j in list(zip(*np.nonzero(masks[l]), strict=True))[:12]:
            Wp = [w.copy() for w in Ws]
            Wp[l][i, j] += eps
            Wm = [w.copy() for w in Ws]
            Wm[l][i, j] -= eps
            fd = (
                ref_forward_backward(Wp, bs, masks, x, y)[0]
                - ref_forward_backward(Wm, bs, masks, x, y)[0]
            ) / (2 * eps)
            assert abs(fd - gW[l][i, j]) < 1e-6 * max(1, abs(fd))
    # the engine (float32 kernels, nnz-sized gradients) agrees with the reference
    loss32, dlogits, _ = SoftmaxCrossEntropy()(model.forward(x), y)
    model.backward(dlogits)
    assert abs(loss32 - loss) < 1e-5
    for l, layer in enumerate(model.weighted()):
        rows, cols = layer.W.row_ids(), layer.W.indices
        np.testing.assert_allclose(layer.gW, gW[l][rows, cols], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(layer.gb, gb[l], rtol=1e-4, atol=1e-6)


def test_true_sparse_rigl_equals_dense_masked_float64_reference():
    """Loss curve and topology of the sparse engine = a dense float64 masked-weights RigL, for
    200 steps with 7 topology updates (ΔT = 20, T_end = 150), on MNIST."""
    data = mnist_subset(n_train=2560)
    cfg = TrainConfig(
        arch=[784, 48, 10],
        sparsity=0.9,
        distribution="uniform",
        method="rigl",
        delta_t=20,
        alpha=0.3,
        epochs=10,
        batch_size=128,
        lr=0.05,
        momentum=0.9,
        weight_decay=0.0,
        lr_schedule="constant",
        max_steps=200,
        progress=False,
    )
    tr = Trainer(cfg, data)
    layers = tr.model.weighted()
    Ws = [l.W.to_dense(np.float64) for l in layers]
    masks = [l.W.to_dense(np.float64) != 0 for l in layers]
    bs = [l.b.astype(np.float64) for l in layers]
    vel = [np.zeros_like(w) for w in Ws]
    velb = [np.zeros_like(b) for b in bs]
    sched = tr.schedule
    n_updates = 0
    for step, idx in zip(range(200), (i for e in range(10) for i in tr.batches(e)), strict=False):
        xb = np.ascontiguousarray(data.x_train[idx].T)
        yb = data.y_train[idx]
        loss_ref, gW, gb = ref_forward_backward(Ws, bs, masks, xb.astype(np.float64), yb)
        loss, _, report = tr.train_step(xb, yb)
        assert abs(loss - loss_ref) < 2e-4 * max(1, abs(loss_ref)), (
            f"step {step}: {loss} vs {loss_ref}"
        )
        if sched.is_update_step(step):
            n_updates += 1
            f = sched.drop_fraction(step)
            _, G_all, _ = _full_grad(Ws, bs, masks, xb.astype(np.float64), yb)
            for l in range(len(Ws)):
                k = int(f * masks[l].sum())
                # drop: k smallest |w| among stored, ties to the lower flat index
                flat_mask = masks[l].ravel()
                pos = np.flatnonzero(flat_mask)
                mag = np.abs(Ws[l].ravel()[pos])
                drop = pos[np.lexsort((pos, mag))[:k]]
                kept = flat_mask.copy()
                kept[drop] = False
                # grow: k largest |dL/dW| (the full dense gradient) among absent-after-drop
                G = np.abs(G_all[l]).ravel()
                G[kept] = -np.inf
                grow = np.lexsort((np.arange(G.size), -G))[:k]
                new = kept.copy()
                new[grow] = True
                fresh = np.zeros_like(flat_mask)
                fresh[grow] = ~flat_mask[grow]  # truly new: weight and velocity start at 0
                for arr in (Ws[l].ravel(), vel[l].ravel()):  # views: edits land in Ws, vel
                    arr[fresh] = 0.0
                    arr[~new] = 0.0
                masks[l] = new.reshape(masks[l].shape)
            # official RigL: no optimizer step on an update iteration
        else:
            for l in range(len(Ws)):
                vel[l] = 0.9 * vel[l] + gW[l]
                Ws[l] -= 0.05 * vel[l] * masks[l]
                velb[l] = 0.9 * velb[l] + gb[l]
                bs[l] -= 0.05 * velb[l]
        for l, layer in enumerate(layers):
            pattern = np.zeros(masks[l].shape, bool)
            pattern[layer.W.row_ids(), layer.W.indices] = True
            np.testing.assert_array_equal(pattern, masks[l])
    assert n_updates == 7  # t = 20, 40, ..., 140 < T_end = 0.75·200
    for l, layer in enumerate(layers):
        np.testing.assert_allclose(
            layer.W.to_dense(np.float64), Ws[l] * masks[l], rtol=2e-3, atol=2e-5
        )


def _full_grad(Ws, bs, masks, x, y):
    """Gradient w.r.t. every entry (stored or not) of each masked layer: d(loss)/d(W*mask)."""
    acts, h = [x], x
    for l in range(len(Ws)):
        z = (Ws[l] * masks[l]) @ h + bs[l][:, None]
        h = np.maximum(z, 0) if l < len(Ws) - 1 else z
        acts.append(h)
    z = h - h.max(axis=0, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=0, keepdims=True)
    B = x.shape[1]
    d = p.copy()
    d[y, np.arange(B)] -= 1
    d /= B
    g = [None] * len(Ws)
    for l in range(len(Ws) - 1, -1, -1):
        g[l] = d @ acts[l].T
        if l:
            d = ((Ws[l] * masks[l]).T @ d) * (acts[l] > 0)
    return None, g, None


def test_update_invariants_and_optimizer_state(rng):
    model = _small_model(rng, (30, 40, 20, 5), 0.3)
    opt = Adam(model.params(), lr=1e-3)
    x = rng.standard_normal((30, 16)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    for _ in range(3):
        _, d, _ = SoftmaxCrossEntropy()(model.forward(x), y)
        model.backward(d)
        opt.step()
    before = [(l.W.copy(), opt.state[f"{l.name}.W"]["m"].copy()) for l in model.sparse_layers()]
    _, d, _ = SoftmaxCrossEntropy()(model.forward(x), y)
    model.backward(d)
    upd = RigL(UpdateSchedule(t_end=1000, delta_t=10, alpha=0.3), seed=0)
    report = upd.update(10, model, opt)
    for (W0, m0), layer, rep in zip(before, model.sparse_layers(), report.per_layer, strict=True):
        W1 = layer.W
        assert W1.nnz == W0.nnz == rep["nnz"] and rep["dropped"] == rep["grown"] > 0
        old = {
            (int(r), int(c)): (v, mv)
            for r, c, v, mv in zip(W0.row_ids(), W0.indices, W0.data, m0, strict=True)
        }
        m1 = opt.state[f"{layer.name}.W"]["m"]
        assert m1.shape == (W1.nnz,)
        n_new = 0
        for r, c, v, mv in zip(W1.row_ids(), W1.indices, W1.data, m1, strict=True):
            if (int(r), int(c)) in old:  # kept or dropped-and-regrown: bit-identical
                assert v == old[(int(r), int(c))][0] and mv == old[(int(r), int(c))][1]
            else:  # new: zero weight, zero state
                assert v == 0 and mv == 0
                n_new += 1
        assert n_new == rep["new"]
        assert layer.gW.shape == (W1.nnz,)
    # the optimizer now steps on the new arrays
    model.backward(SoftmaxCrossEntropy()(model.forward(x), y)[1])
    opt.step()
    assert all(opt.params[f"{l.name}.W"].value is l.W.data for l in model.sparse_layers())


def test_erk_and_uniform():
    shapes = [(300, 784), (100, 300), (10, 100)]
    d = erk_densities(0.9, shapes)
    total = sum(m * n for m, n in shapes)
    assert abs(sum(di * m * n for di, (m, n) in zip(d, shapes, strict=True)) - 0.1 * total) < 1
    # ERK: density ∝ (m + n)/(m·n), so the classifier is densest
    assert d[2] > d[1] > d[0]
    eps = d[0] * 300 * 784 / (300 + 784)
    assert abs(d[1] - eps * 400 / 30000) < 1e-12
    # at low sparsity the small layer would exceed 1: it becomes dense and the rest is rescaled
    d2 = erk_densities(0.2, shapes)
    assert d2[2] == 1.0 and max(d2) == 1.0
    assert abs(sum(di * m * n for di, (m, n) in zip(d2, shapes, strict=True)) - 0.8 * total) < 1
    assert uniform_densities(0.9, shapes) == [pytest.approx(0.1)] * 3
    with pytest.raises(ValueError, match=r"sparsity must be a number in \(0, 1\), got 1.5"):
        erk_densities(1.5, shapes)


def test_schedule():
    s = UpdateSchedule(t_end=750, delta_t=100, alpha=0.3)
    assert [t for t in range(1000) if s.is_update_step(t)] == [100, 200, 300, 400, 500, 600, 700]
    assert s.drop_fraction(0) == pytest.approx(0.3)
    assert s.drop_fraction(375) == pytest.approx(0.15)
    assert s.n_updates() == 7
    with pytest.raises(ValueError, match=r"delta_t \(ΔT\) must be a positive integer, got 0"):
        UpdateSchedule(t_end=10, delta_t=0)


def test_lr_schedules():
    assert lr_at(0, base=1.0, total=100, warmup=10) == pytest.approx(0.1)
    assert lr_at(100, base=1.0, total=100) == pytest.approx(0.0)
    assert lr_at(
        25, base=1.0, total=100, schedule="step", step_every=10, gamma=0.5
    ) == pytest.approx(0.25)


def _cfg(tmp_path, **kw):
    base = dict(
        arch=[784, 64, 10],
        sparsity=0.9,
        method="rigl",
        delta_t=10,
        epochs=2,
        batch_size=64,
        lr=0.05,
        progress=False,
        out=str(tmp_path),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_resume_gives_the_same_result_as_not_stopping(tmp_path):
    data = mnist_subset(n_train=640, n_test=128)
    a = Trainer(_cfg(tmp_path / "a", epochs=4), data)
    a.run()
    b = Trainer(_cfg(tmp_path / "b", epochs=4), data)
    b.cfg.epochs = 2  # stop half way (a checkpoint is written every epoch)...
    b.run()
    c = Trainer(_cfg(tmp_path / "b", epochs=4), data)  # ...and resume in a fresh process state
    with pytest.warns(UserWarning, match=r"resuming with different epochs \(2 -> 4\)"):
        c.load_checkpoint(tmp_path / "b" / "checkpoint.npz")
    assert c.step == b.step and c.epoch == 2
    c.run()
    for la, lc in zip(a.model.weighted(), c.model.weighted(), strict=True):
        np.testing.assert_array_equal(la.W.indices, lc.W.indices)
        np.testing.assert_array_equal(la.W.data, lc.W.data)
        np.testing.assert_array_equal(la.b, lc.b)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in c.history]
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "test_acc" in json.loads(lines[-1])
    assert (tmp_path / "a" / "learning_curve.png").stat().st_size > 1000


def test_divergence_stops_with_a_message_and_keeps_the_checkpoint(tmp_path):
    data = mnist_subset(n_train=640, n_test=128)
    tr = Trainer(_cfg(tmp_path, epochs=3, lr=0.05), data)
    tr.cfg.epochs = 1
    tr.run()
    good = (tmp_path / "checkpoint.npz").read_bytes()
    tr.cfg.epochs = 3
    tr.cfg.lr = 1e30
    with pytest.raises(
        TrainingDiverged, match=r"the loss became (nan|inf) at step \d+ .* last good checkpoint"
    ):
        tr.run()
    assert (tmp_path / "checkpoint.npz").read_bytes() == good
    with pytest.warns(UserWarning, match="resuming with different"):
        Trainer(_cfg(tmp_path, epochs=3), data).load_checkpoint(tmp_path / "checkpoint.npz")


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    Trainer(_cfg(tmp_path, epochs=1), data).run()
    other = Trainer(_cfg(tmp_path / "o", arch=[784, 32, 10], epochs=1), data)
    with pytest.raises(
        ValueError, match=r"written with arch=\[784, 64, 10\], this run has arch=\[784, 32, 10\]"
    ):
        other.load_checkpoint(tmp_path / "checkpoint.npz")


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(sparsity=1.5), r"sparsity \(--sparsity\) must be a finite number in \(0, 1\), got 1.5"),
        (dict(delta_t=0), r"delta_t \(--delta-t\) must be >= 1 \(ΔT, steps between topology updates\), got 0"),
        (dict(method="magic"), r"method \(--method\) must be one of rigl, set, static, dense; got 'magic'"),
        (dict(arch=[100, 10]), r"arch starts with 100 inputs but the dataset has 784 features"),
        (dict(arch=[784, 5]), r"arch ends with 5 outputs but the labels go up to 9"),
    ],
)
def test_bad_configs(kw, msg, tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    with pytest.raises(ValueError, match=msg):
        Trainer(_cfg(tmp_path, **kw), data)


def test_bad_data():
    with pytest.raises(ValueError, match=r"x_train has 3 rows but y_train has 2 labels"):
        D.from_arrays(np.ones((3, 4)), [0, 1], np.ones((1, 4)), [0])
    with pytest.raises(ValueError, match=r"x_train holds NaN or inf"):
        D.from_arrays(np.full((2, 4), np.nan), [0, 1], np.ones((1, 4)), [0])
    with pytest.raises(ValueError, match=r"y_train holds a negative label"):
        D.from_arrays(np.ones((2, 4)), [0, -1], np.ones((1, 4)), [0])
    with pytest.raises(FileNotFoundError, match=r"not a bundled dataset"):
        D.load("no/such/file.npz")


def test_user_npz_and_cli(tmp_path, capsys):
    from sparsecore.cli import main

    p = blobs_npz(tmp_path / "toy.npz")
    rc = main(
        [
            "train",
            "--dataset",
            str(p),
            "--arch",
            "20-32-3",
            "--sparsity",
            "0.5",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--delta-t",
            "5",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    acc = float(out.strip().splitlines()[-1].split(":")[1].strip().rstrip("%"))
    assert acc > 90.0  # three well-separated blobs
    assert "FLOPs/step" in out and "training state" in out
    rc = main(
        [
            "train",
            "--dataset",
            str(p),
            "--arch",
            "20-32-3",
            "--sparsity",
            "2",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "sparsity (--sparsity) must be a finite number in (0, 1), got 2.0" in capsys.readouterr().err


def test_scipy_export_and_import(rng):
    model = _small_model(rng)
    pairs = model.to_scipy()
    again = Sequential.from_matrices([w for w, _ in pairs], [b for _, b in pairs])
    x = rng.standard_normal((13, 4)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(x), again.forward(x))
    with pytest.raises(ValueError, match=r"weight 1 has 3 inputs, but weight 0 has 11 outputs"):
        Sequential.from_matrices([pairs[0][0], np.ones((2, 3))])


def test_dense_layers_and_dense_method(tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    tr = Trainer(_cfg(tmp_path, method="dense", epochs=1), data)
    assert all(isinstance(l, Linear) for l in tr.model.weighted())
    summary = tr.run()
    assert summary["cost"]["params"] == summary["cost"]["params_dense"]
    seq = Sequential(
        [SparseLinear(kernels.CSR.random((8, 6), 0.5, seed=1)), ReLU(), Linear(np.ones((3, 8)))]
    )
    assert seq.forward(np.ones((6, 2), np.float32)).shape == (3, 2)
    assert SGD(seq.params(), lr=0.1).state_bytes() > 0


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_sgd_matches_its_formula(nesterov, wd, rng):
    from sparsecore.layers import Param

    p = rng.standard_normal(5000).astype(np.float32)
    g = rng.standard_normal(5000).astype(np.float32)
    opt = SGD([Param("w", p.copy(), g)], lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd)
    v = np.zeros(5000)
    w = p.astype(np.float64)
    for _ in range(3):
        opt.step()
        gg = g + wd * w
        v = 0.9 * v + gg
        w -= 0.1 * (gg + 0.9 * v if nesterov else v)
    np.testing.assert_allclose(opt.params["w"].value, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.state["w"]["momentum"], v, rtol=1e-5, atol=1e-6)


def test_adam_matches_its_formula(rng):
    from sparsecore.layers import Param

    p = rng.standard_normal(100).astype(np.float32)
    g = rng.standard_normal(100).astype(np.float32)
    for decoupled in (False, True):
        opt = Adam([Param("w", p.copy(), g)], lr=0.01, weight_decay=0.1, decoupled=decoupled)
        w, m, v = p.astype(np.float64), np.zeros(100), np.zeros(100)
        for t in range(1, 4):
            opt.step()
            gg = g if decoupled else g + 0.1 * w
            m = 0.9 * m + 0.1 * gg
            v = 0.999 * v + 0.001 * gg * gg
            if decoupled:
                w = w - 0.01 * 0.1 * w
            w = w - 0.01 / (1 - 0.9**t) * m / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(opt.params["w"].value, w, rtol=1e-4, atol=1e-6)


def test_divergence_on_the_last_step_of_an_epoch_is_not_saved(tmp_path):
    """The loss is checked before each step; a step that blows up the weights at the end of an
    epoch must still not reach the checkpoint."""
    data = mnist_subset(n_train=640, n_test=128)
    tr = Trainer(_cfg(tmp_path, epochs=2, method="static"), data)
    tr.cfg.epochs = 1
    tr.run()
    good = (tmp_path / "checkpoint.npz").read_bytes()
    tr.cfg.epochs = 2
    last = 2 * tr.steps_per_epoch - 1
    real_lr = tr.lr
    tr.lr = lambda: 1e38 if tr.step == last else real_lr()
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 2 .* last good checkpoint"):
        tr.run()
    assert (tmp_path / "checkpoint.npz").read_bytes() == good


def test_resume_refuses_a_different_structure(tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    Trainer(_cfg(tmp_path, epochs=1), data).run()
    other = Trainer(_cfg(tmp_path / "o", epochs=1, sparsity=0.8), data)
    with pytest.raises(ValueError, match=r"written with sparsity=0.9, this run has sparsity=0.8"):
        other.load_checkpoint(tmp_path / "checkpoint.npz")


def test_duplicate_layer_names_are_refused():
    from sparsecore.layers import Param

    W = kernels.CSR.random((4, 4), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"layer name\(s\) \['sparse'\] appear more than once"):
        Sequential([SparseLinear(W), ReLU(), SparseLinear(W.copy())])
    with pytest.raises(ValueError, match=r"parameter name\(s\) \['w'\] appear more than once"):
        SGD([Param("w", np.ones(2), np.ones(2)), Param("w", np.ones(2), np.ones(2))], lr=0.1)


def test_step_on_update_uses_the_batch_gradient(rng):
    model = _small_model(rng, (30, 40, 5), 0.3)
    opt = SGD(model.params(), lr=0.1, momentum=0.0)
    x = rng.standard_normal((30, 16)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    model.backward(SoftmaxCrossEntropy()(model.forward(x), y)[1])
    layer = model.sparse_layers()[0]
    W0 = layer.W
    before = {
        (int(r), int(c)): (v, g)
        for r, c, v, g in zip(W0.row_ids(), W0.indices, W0.data, layer.gW, strict=True)
    }
    RigL(UpdateSchedule(t_end=100, delta_t=10), seed=0).update(10, model, opt)
    opt.step()  # what TrainConfig(step_on_update=True) does after an update
    W1 = layer.W
    assert W1 is not W0
    n_old = 0
    for r, c, v in zip(W1.row_ids(), W1.indices, W1.data, strict=True):
        if (int(r), int(c)) in before:
            v0, g0 = before[(int(r), int(c))]
            assert v == pytest.approx(v0 - 0.1 * g0, abs=1e-6)
            n_old += 1
        else:
            assert v == 0.0
    assert 0 < n_old < W1.nnz


def test_cli_lr_schedules_and_bad_resume(tmp_path, capsys):
    from sparsecore.cli import main

    rng = np.random.default_rng(0)
    p = tmp_path / "toy.npz"
    np.savez(
        p,
        x_train=rng.standard_normal((200, 20)),
        y_train=rng.integers(0, 3, 200),
        x_test=rng.standard_normal((50, 20)),
        y_test=rng.integers(0, 3, 50),
    )
    base = [
        "train",
        "--dataset",
        str(p),
        "--arch",
        "20-32-3",
        "--sparsity",
        "0.5",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--no-progress",
    ]
    assert main([*base, "--lr-schedule", "step", "--out", str(tmp_path / "a")]) == 2
    assert "needs lr_step_every > 0" in capsys.readouterr().err
    assert (
        main([*base, "--lr-schedule", "step", "--lr-step-every", "3", "--out", str(tmp_path / "b")])
        == 0
    )
    capsys.readouterr()
    assert main([*base, "--resume", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert (
        "error" in capsys.readouterr().err
    )  # a folder is not a checkpoint: an error, not a traceback


def test_dataset_from_a_folder_of_npy_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.standard_normal((50, 6)),
        "y_train": rng.integers(0, 3, 50),
        "x_test": rng.standard_normal((10, 6)),
        "y_test": rng.integers(0, 3, 10),
    }
    for k, v in arrays.items():
        np.save(tmp_path / f"{k}.npy", v)
    d = D.load(str(tmp_path))
    ref = D.from_arrays(**arrays)
    np.testing.assert_allclose(np.asarray(d.x_train), ref.x_train, rtol=1e-6, atol=1e-6)
    assert d.n_classes == ref.n_classes and d.name == tmp_path.name
    (tmp_path / "y_test.npy").unlink()
    with pytest.raises(ValueError, match=r"lacks y_test.npy"):
        D.load(str(tmp_path))


def test_memory_plan_matches_the_arrays_the_engine_allocates(tmp_path):
    """The plan's state bytes within 10% of the arrays a built trainer actually holds."""
    data = mnist_subset(n_train=256, n_test=64)
    for optimizer, method in (("sgd", "rigl"), ("adam", "static"), ("sgd", "dense")):
        tr = Trainer(
            _cfg(tmp_path, optimizer=optimizer, method=method, arch=[784, 200, 50, 10]), data
        )
        held = 0
        for layer in tr.model.weighted():
            if isinstance(layer, SparseLinear):
                W = layer.W
                held += sum(
                    a.nbytes
                    for a in (
                        W.data,
                        W.indices,
                        W.indptr,
                        *W.transpose_structure(),
                        layer.gW,
                        layer._t_data,
                    )
                )
            else:
                held += layer.W.nbytes + layer.gW.nbytes
            held += layer.b.nbytes + layer.gb.nbytes
        held += sum(a.nbytes for st in tr.opt.state.values() for a in st.values())
        planned = tr.plan["state_bytes"]
        assert abs(planned - held) <= 0.1 * held, (optimizer, method, planned, held)
        assert tr.plan["dense_state_bytes"] >= planned


def test_max_memory_refuses_before_allocating(tmp_path, capsys):
    from sparsecore.cli import main
    from sparsecore.plan import parse_bytes
    from sparsecore.train import MemoryBudgetExceeded

    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match=r"a memory size must look like 8GB"):
        parse_bytes("lots")
    with pytest.raises(
        MemoryBudgetExceeded, match=r"more than --max-memory .*\nmemory plan: 784-100000-10"
    ):
        Trainer(_cfg(tmp_path, arch=[784, 100000, 10], sparsity=0.999, max_memory=10**6))
    rc = main(
        [
            "train",
            "--arch",
            "784-100000-100000-10",
            "--sparsity",
            "0.999",
            "--max-memory",
            "100MB",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "nothing was allocated" in capsys.readouterr().err
    assert main(["plan", "--arch", "784-100000-100000-10", "--sparsity", "0.999"]) == 0
    out = capsys.readouterr().out
    assert "transpose structure" in out and "dense equivalent" in out and "GiB" in out
