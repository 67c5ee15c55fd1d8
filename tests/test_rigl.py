"""sparsecore/rigl: distributions (ERK, uniform), the update schedule, and the updater (RigL
exact and sampled) against a dense masked float64 reference and by its invariants."""

import numpy as np
import pytest

from sparsecore.layers import SoftmaxCrossEntropy, mlp
from sparsecore.optim import SGD, Adam
from sparsecore.rigl import RigL, UpdateSchedule, erk_densities, uniform_densities
from sparsecore.train import TrainConfig, Trainer
from tests.cases import mnist_subset, ref_forward_backward, small_model

# ---------------------------------------------------------------- distributions


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


# ---------------------------------------------------------------- schedule
def test_schedule():
    s = UpdateSchedule(t_end=750, delta_t=100, alpha=0.3)
    assert [t for t in range(1000) if s.is_update_step(t)] == [100, 200, 300, 400, 500, 600, 700]
    assert s.drop_fraction(0) == pytest.approx(0.3)
    assert s.drop_fraction(375) == pytest.approx(0.15)
    assert s.n_updates() == 7
    with pytest.raises(ValueError, match=r"delta_t \(ΔT\) must be a positive integer, got 0"):
        UpdateSchedule(t_end=10, delta_t=0)


# ---------------------------------------------------------------- updater
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
    model = small_model(rng, (30, 40, 20, 5), 0.3)
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


def test_rigl_sampled_update_invariants(rng):
    model = mlp([30, 40, 20, 5], [0.3, 0.3, 0.3], seed=int(rng.integers(1 << 30)))
    opt = SGD(model.params(), lr=0.05, momentum=0.9)
    x = rng.standard_normal((30, 16)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    for _ in range(3):
        model.backward(SoftmaxCrossEntropy()(model.forward(x), y)[1])
        opt.step(0.05)
    before = [
        (l.W.copy(), opt.state[f"{l.name}.W"]["momentum"].copy()) for l in model.sparse_layers()
    ]
    model.backward(SoftmaxCrossEntropy()(model.forward(x), y)[1])
    upd = RigL(
        UpdateSchedule(t_end=1000, delta_t=10, alpha=0.3), seed=0, grow="sampled", candidates=3
    )
    report = upd.update(10, model, opt)
    for (W0, m0), layer, rep in zip(before, model.sparse_layers(), report.per_layer, strict=True):
        W1 = layer.W
        assert W1.nnz == W0.nnz and rep["grown"] == rep["dropped"] > 0
        f0 = W0.row_ids().astype(np.int64) * W0.shape[1] + W0.indices
        old = dict(zip(f0.tolist(), zip(W0.data, m0, strict=True), strict=True))
        m1 = opt.state[f"{layer.name}.W"]["momentum"]
        n_new = 0
        f1 = W1.row_ids().astype(np.int64) * W1.shape[1] + W1.indices
        for f, v, mv in zip(f1.tolist(), W1.data, m1, strict=True):
            if f in old:
                assert (v, mv) == old[f]
            else:
                assert v == 0 and mv == 0
                n_new += 1
        assert n_new == rep["new"]
    # same seed, same topology
    model2 = mlp([30, 40, 20, 5], [0.3, 0.3, 0.3], seed=1)
    model3 = mlp([30, 40, 20, 5], [0.3, 0.3, 0.3], seed=1)
    for mdl in (model2, model3):
        mdl.backward(SoftmaxCrossEntropy()(mdl.forward(x), y)[1])
        RigL(UpdateSchedule(t_end=100, delta_t=10), seed=4, grow="sampled").update(0, mdl)
    for a, b in zip(model2.sparse_layers(), model3.sparse_layers(), strict=True):
        np.testing.assert_array_equal(a.W.indices, b.W.indices)
        np.testing.assert_array_equal(a.W.indptr, b.W.indptr)


def test_rigl_grow_options_are_checked():
    with pytest.raises(ValueError, match="grow must be one of"):
        RigL(UpdateSchedule(t_end=10), grow="approx")
    with pytest.raises(ValueError, match="candidates .* must be >= 1"):
        RigL(UpdateSchedule(t_end=10), grow="sampled", candidates=0.5)


@pytest.mark.parametrize("bad", ["dy", "x"])
def test_exact_grow_on_a_non_finite_gradient_says_the_run_diverged(bad, rng):
    """The updater calls the trusted grow launcher: its result is checked where it returns
    (exactly k connections, finite scores), not later as "nnz changed"."""
    from sparsecore.rigl.selection import TrainingDiverged

    model = small_model(rng, (30, 40, 20, 5), 0.3)
    x = rng.standard_normal((30, 16)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    _, d, _ = SoftmaxCrossEntropy()(model.forward(x), y)
    model.backward(d)
    layer = model.sparse_layers()[1]
    getattr(layer, bad)[3, :] = np.nan
    upd = RigL(UpdateSchedule(t_end=1000, delta_t=10, alpha=0.3), seed=0)
    name = {"dy": "dY", "x": "X"}[bad]
    with pytest.raises(TrainingDiverged, match=rf"layer {layer.name}: {name} holds NaN or inf"):
        upd.update(10, model)


def test_exact_grow_that_comes_back_short_is_refused(rng, monkeypatch):
    model = small_model(rng, (30, 40, 20, 5), 0.3)
    x = rng.standard_normal((30, 16)).astype(np.float32)
    _, d, _ = SoftmaxCrossEntropy()(model.forward(x), rng.integers(0, 5, 16))
    model.backward(d)
    dev = model.sparse_layers()[0].dev
    real = dev.grow

    def short(*a, **kw):
        rows, cols, scores = real(*a, **kw)
        return rows[1:], cols[1:], scores[1:]

    monkeypatch.setattr(dev, "grow", short)
    upd = RigL(UpdateSchedule(t_end=1000, delta_t=10, alpha=0.3), seed=0)
    with pytest.raises(RuntimeError, match=r"found \d+ connections, expected \d+ with finite"):
        upd.update(10, model)


def test_exact_grow_on_a_gradient_that_could_overflow_says_the_run_diverged(rng):
    from sparsecore.rigl.selection import TrainingDiverged

    model = small_model(rng, (30, 40, 20, 5), 0.3)
    x = rng.standard_normal((30, 16)).astype(np.float32)
    _, d, _ = SoftmaxCrossEntropy()(model.forward(x), rng.integers(0, 5, 16))
    model.backward(d)
    layer = model.sparse_layers()[1]
    layer.dy[...] = layer.x[...] = 1e19  # finite, but |dY·Xᵀ| could pass float32 max
    upd = RigL(UpdateSchedule(t_end=1000, delta_t=10, alpha=0.3), seed=0)
    with pytest.raises(TrainingDiverged, match=rf"layer {layer.name}: dY·Xᵀ may overflow"):
        upd.update(10, model)


def test_a_diverging_grow_in_training_names_the_step_and_the_checkpoint(tmp_path, monkeypatch):
    from sparsecore.rigl import selection
    from sparsecore.train import TrainingDiverged

    def huge(*a):
        raise OverflowError("dY·Xᵀ may overflow float32: the largest row norms are 1e30")

    cfg = TrainConfig(
        arch=[784, 32, 10], sparsity=0.9, epochs=2, batch_size=64, delta_t=5, progress=False,
        out=str(tmp_path),
    )  # fmt: skip
    tr = Trainer(cfg, mnist_subset(512, 128))
    monkeypatch.setattr(selection, "check_scores_fit_float32", huge)
    with pytest.raises(
        TrainingDiverged,
        match=r"^at step 5 \(epoch 0\), RigL's exact grow of layer fc0: dY·Xᵀ may overflow .*this run wrote no checkpoint yet",
    ):
        tr.run()
