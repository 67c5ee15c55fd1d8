"""sparsecore/optim.py: SGD and Adam against their formulas, state across a topology update,
state_dict, learning-rate schedules."""

import numpy as np
import pytest

from sparsecore.layers import Param, SoftmaxCrossEntropy
from sparsecore.optim import SGD, Adam, AdamW, lr_at
from sparsecore.rigl import RigL, UpdateSchedule
from tests.cases import small_model


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_sgd_matches_its_formula(nesterov, wd, rng):
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


def _numpy_adam(p, g, m, v, lr, b1, b2, eps, wd, decoupled, t):
    """Adam in NumPy float32, the formula the fused kernel must reproduce bit for bit."""
    f = np.float32
    if wd and not decoupled:
        g = g + f(wd) * p
    m *= f(b1)
    m += f(1 - b1) * g
    v *= f(b2)
    v += f(1 - b2) * (g * g)
    step = f(lr / (1 - b1**t)) * m / (np.sqrt(v / f(1 - b2**t)) + f(eps))
    if wd and decoupled:
        p -= f(lr * wd) * p
    p -= step


@pytest.mark.parametrize("n", [0, 1, 7, 4097, 70001])  # (4097 and up: several thread chunks)
@pytest.mark.parametrize(("wd", "decoupled"), [(0.0, False), (0.1, False), (0.01, True)])
def test_fused_adam_is_numpys_formula_bit_for_bit(rng, n, wd, decoupled):
    p = rng.standard_normal(n).astype(np.float32)
    a = Adam([Param("w", p.copy(), np.zeros(n, np.float32))], lr=3e-3, weight_decay=wd,
             decoupled=decoupled)  # fmt: skip
    w, m, v = p.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for t in range(1, 6):
        g = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
        a.params["w"].grad[...] = g
        a.step()
        _numpy_adam(w, g, m, v, 3e-3, 0.9, 0.999, 1e-8, wd, decoupled, t)
    np.testing.assert_array_equal(a.params["w"].value, w)
    np.testing.assert_array_equal(a.state["w"]["m"], m)
    np.testing.assert_array_equal(a.state["w"]["v"], v)


@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_adam_keeps_numpys_answer_for_diverged_weights(rng, decoupled):
    # no weight decay: a weight already inf or NaN must not turn its moments NaN through 0·inf
    p = rng.standard_normal(64).astype(np.float32)
    p[[3, 9]] = np.inf
    p[17] = np.nan
    p[21] = -0.0
    a = Adam([Param("w", p.copy(), np.zeros(64, np.float32))], lr=1e-3, decoupled=decoupled)
    w, m, v = p.copy(), np.zeros(64, np.float32), np.zeros(64, np.float32)
    for t in range(1, 4):
        g = rng.standard_normal(64).astype(np.float32)
        a.params["w"].grad[...] = g
        a.step()
        _numpy_adam(w, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, decoupled, t)
    for got, want in ((a.params["w"].value, w), (a.state["w"]["m"], m), (a.state["w"]["v"], v)):
        np.testing.assert_array_equal(got, want)
        assert np.array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize(
    "make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ps: Adam(ps, lr=0.01)],
    ids=["sgd-momentum", "adam"],
)  # fmt: skip
def test_fused_updates_reach_non_contiguous_arrays(make, rng):
    # a Param over a transposed (Fortran-ordered) array, and state loaded from Fortran-ordered
    # checkpoint members: the fused pass must update them, not a flattened copy
    W = rng.standard_normal((6, 9)).astype(np.float32)
    G = rng.standard_normal((6, 9)).astype(np.float32)
    c = make([Param("w", W.copy(), G.copy())])
    f = make([Param("w", np.asfortranarray(W), np.asfortranarray(G))])
    assert not f.params["w"].value.flags.c_contiguous
    for _ in range(3):
        c.step()
        f.step()
    np.testing.assert_array_equal(f.params["w"].value, c.params["w"].value)
    for key in c.state["w"]:
        np.testing.assert_array_equal(f.state["w"][key], c.state["w"][key])
        assert np.any(f.state["w"][key] != 0)
    state = {k: np.asfortranarray(v) if v.ndim == 2 else v for k, v in c.state_dict().items()}
    c2 = make([Param("w", c.params["w"].value.copy(), G.copy())])
    c2.load_state_dict(state)
    assert all(a.flags.c_contiguous for a in c2.state["w"].values())
    before = {k: a.copy() for k, a in c2.state["w"].items()}
    c2.step()
    assert all(np.any(c2.state["w"][k] != before[k]) for k in before)


def test_step_on_update_uses_the_batch_gradient(rng):
    model = small_model(rng, (30, 40, 5), 0.3)
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


def test_lr_schedules():
    assert lr_at(0, base=1.0, total=100, warmup=10) == pytest.approx(0.1)
    assert lr_at(100, base=1.0, total=100) == pytest.approx(0.0)
    assert lr_at(
        25, base=1.0, total=100, schedule="step", step_every=10, gamma=0.5
    ) == pytest.approx(0.25)


# ---------------------------------------------------------------- the optimizer's public API
def _params(rng, n=50):
    return [
        Param(
            "w",
            rng.standard_normal(n).astype(np.float32),
            rng.standard_normal(n).astype(np.float32),
        )
    ]


def test_optimizer_arguments_are_checked(rng):
    with pytest.raises(ValueError, match=r"lr must be a positive number, got 0"):
        SGD(_params(rng), lr=0)
    with pytest.raises(ValueError, match=r"lr must be a positive number, got nan"):
        Adam(_params(rng), lr=float("nan"))
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0, got -0.1"):
        SGD(_params(rng), lr=0.1, weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        SGD(_params(rng), lr=0.1, momentum=1.0)


def test_plain_sgd_keeps_no_state_and_matches_its_formula(rng):
    (p,) = _params(rng)
    w = p.value.astype(np.float64)
    opt = SGD([p], lr=0.1, momentum=0.0, weight_decay=0.01)
    assert opt.state == {"w": {}} and opt.state_bytes() == 0
    for _ in range(3):
        opt.step()
        w -= 0.1 * (p.grad + 0.01 * w)
    np.testing.assert_allclose(p.value, w, rtol=1e-5, atol=1e-6)
    opt.step(lr=0.5)  # a learning rate given to step() wins over the optimizer's
    w -= 0.5 * (p.grad + 0.01 * w)
    np.testing.assert_allclose(p.value, w, rtol=1e-5, atol=1e-6)


def test_adamw_is_adam_with_decoupled_weight_decay(rng):
    a, b = _params(rng), _params(rng)
    b[0].value[:], b[0].grad[:] = a[0].value, a[0].grad
    opt_a = AdamW(a, lr=0.01)
    opt_b = Adam(b, lr=0.01, weight_decay=1e-2, decoupled=True)
    assert opt_a.decoupled and opt_a.weight_decay == 1e-2
    for _ in range(3):
        opt_a.step()
        opt_b.step()
    np.testing.assert_array_equal(a[0].value, b[0].value)


@pytest.mark.parametrize(
    "make", [lambda p: SGD(p, lr=0.1), lambda p: Adam(p, lr=0.01)], ids=["sgd", "adam"]
)
def test_state_dict_round_trip(make, rng):
    """A fresh optimizer loaded from state_dict() continues exactly as the original."""
    p1 = _params(rng)
    p2 = [Param("w", p1[0].value.copy(), p1[0].grad.copy())]
    a = make(p1)
    for _ in range(3):
        a.step()
    p2[0].value[:] = p1[0].value
    d = a.state_dict()
    assert int(d["t"]) == 3 and set(d) == {"t", *(f"w/{k}" for k in a.state_names)}
    assert all(isinstance(v, np.ndarray) for v in d.values())
    b = make(p2)
    b.load_state_dict(d)
    a.step()
    b.step()
    assert a.t == b.t == 4
    np.testing.assert_array_equal(p1[0].value, p2[0].value)
    for k in a.state_names:
        np.testing.assert_array_equal(a.state["w"][k], b.state["w"][k])


def test_load_state_dict_refuses_a_wrong_shape(rng):
    opt = Adam(_params(rng, 5), lr=0.01)
    d = opt.state_dict()
    d["w/v"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"optimizer state w/v has shape \(3,\), expected \(5,\)"):
        opt.load_state_dict(d)


def test_remap_carries_the_state_to_a_new_topology(rng):
    """After a topology update each moment follows its connection (src[i]: the old position
    of new entry i, -1 for a new connection, whose state starts at zero)."""
    opt = Adam(_params(rng, 6), lr=0.01)
    for _ in range(2):
        opt.step()
    m, v = opt.state["w"]["m"].copy(), opt.state["w"]["v"].copy()
    src = np.array([4, -1, 0, 5, -1, 2, 3], np.int64)
    opt.remap("w", src)
    for key, old in (("m", m), ("v", v)):
        new = opt.state["w"][key]
        assert new.shape == (7,) and new.dtype == np.float32
        np.testing.assert_array_equal(new[src >= 0], old[src[src >= 0]])
        np.testing.assert_array_equal(new[src < 0], 0.0)


def test_lr_at_warms_up_linearly_then_follows_the_schedule():
    base, total, warmup = 0.5, 110, 10
    for s in range(warmup):
        assert lr_at(s, base=base, total=total, warmup=warmup) == pytest.approx(
            base * (s + 1) / warmup
        )
    # after the warm-up the cosine starts from base and ends at min_lr at `total`
    assert lr_at(warmup, base=base, total=total, warmup=warmup) == pytest.approx(base)
    half = warmup + (total - warmup) // 2
    assert lr_at(half, base=base, total=total, warmup=warmup, min_lr=0.1) == pytest.approx(0.3)
    assert lr_at(total, base=base, total=total, warmup=warmup, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(5 * total, base=base, total=total, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(37, base=base, total=total, schedule="constant", warmup=warmup) == base
    # the step schedule counts its steps from the end of the warm-up
    assert (
        lr_at(warmup + 9, base=1.0, total=total, schedule="step", warmup=warmup, step_every=10)
        == 1.0
    )
    assert lr_at(
        warmup + 10, base=1.0, total=total, schedule="step", warmup=warmup, step_every=10
    ) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"the step schedule needs step_every > 0"):
        lr_at(3, base=1.0, total=total, schedule="step")
    with pytest.raises(
        ValueError, match=r"schedule must be 'constant', 'cosine' or 'step', got 'linear'"
    ):
        lr_at(3, base=1.0, total=total, schedule="linear")
