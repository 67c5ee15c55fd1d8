"""sparsecore/optim.py: SGD and Adam against their formulas, state across a topology update,
state_dict, learning-rate schedules."""

import numpy as np
import pytest

from sparsecore.layers import Param, SoftmaxCrossEntropy
from sparsecore.optim import SGD, Adam, lr_at
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
