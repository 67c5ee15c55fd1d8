"""sparsecore/layers.py: gradients against a float64 reference and finite differences, dense
layers, scipy export/import, names."""

import numpy as np
import pytest

import kernels
from sparsecore.layers import (
    LeakyReLU,
    Linear,
    Param,
    ReLU,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
    SparseLinear,
    Tanh,
)
from sparsecore.optim import SGD
from sparsecore.train import Trainer
from tests.cases import mnist_cfg, mnist_subset, ref_forward_backward, small_model


def test_gradients_against_finite_differences(rng):
    model = small_model(rng)
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


def test_scipy_export_and_import(rng):
    model = small_model(rng)
    pairs = model.to_scipy()
    again = Sequential.from_matrices([w for w, _ in pairs], [b for _, b in pairs])
    x = rng.standard_normal((13, 4)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(x), again.forward(x))
    with pytest.raises(ValueError, match=r"weight 1 has 3 inputs, but weight 0 has 11 outputs"):
        Sequential.from_matrices([pairs[0][0], np.ones((2, 3))])


def test_dense_layers_and_dense_method(tmp_path):
    data = mnist_subset(n_train=256, n_test=64)
    tr = Trainer(mnist_cfg(tmp_path, method="dense", epochs=1), data)
    assert all(isinstance(l, Linear) for l in tr.model.weighted())
    summary = tr.run()
    assert summary["cost"]["params"] == summary["cost"]["params_dense"]
    seq = Sequential(
        [SparseLinear(kernels.CSR.random((8, 6), 0.5, seed=1)), ReLU(), Linear(np.ones((3, 8)))]
    )
    assert seq.forward(np.ones((6, 2), np.float32)).shape == (3, 2)
    assert SGD(seq.params(), lr=0.1).state_bytes() > 0


def test_duplicate_layer_names_are_refused():
    W = kernels.CSR.random((4, 4), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"layer name\(s\) \['sparse'\] appear more than once"):
        Sequential([SparseLinear(W), ReLU(), SparseLinear(W.copy())])
    with pytest.raises(ValueError, match=r"parameter name\(s\) \['w'\] appear more than once"):
        SGD([Param("w", np.ones(2), np.ones(2)), Param("w", np.ones(2), np.ones(2))], lr=0.1)


ACTIVATIONS = {
    "ReLU": (ReLU(), lambda x: np.maximum(x, 0)),
    "LeakyReLU": (LeakyReLU(0.1), lambda x: np.where(x > 0, x, 0.1 * x)),
    "Tanh": (Tanh(), np.tanh),
    "Sigmoid": (Sigmoid(), lambda x: 1 / (1 + np.exp(-x))),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_backward_is_the_derivative(name, rng):
    """Forward against its float64 definition, backward against central differences."""
    act, definition = ACTIVATIONS[name]
    x = rng.uniform(-3, 3, (7, 9)).astype(np.float32)
    x[np.abs(x) < 0.05] = 0.5  # away from ReLU's kink
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(
        act.forward(x), definition(x.astype(np.float64)), rtol=1e-6, atol=1e-7
    )
    dx = act.backward(dy)
    eps = 1e-2
    fd = (act.forward(x + eps).astype(np.float64) - act.forward(x - eps)) / (2 * eps)
    np.testing.assert_allclose(dx, dy * fd, rtol=1e-3, atol=1e-4)


def test_predict_is_the_forward_pass_in_batches(rng):
    model = small_model(rng)
    x = rng.standard_normal((37, 13)).astype(np.float32)
    want = model.forward(np.ascontiguousarray(x.T)).T
    got = model.predict(x, batch_size=8)  # 5 batches, the last of 5 rows
    assert got.shape == (37, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert model.predict(x[:0]).shape == (0, 5)  # no rows: still the 5 outputs
