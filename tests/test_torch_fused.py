"""SparseLinear's fused ReLU (activation="relu", what sparsify makes of Linear + ReLU): the
same forward, gradients and RigL recording as the layer followed by an nn.ReLU."""

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sparsecore.torch import RigL, SparseLinear, sparsify  # noqa: E402


def _twins(rng, n=23, m=31, sparsity=0.6):
    seed = int(rng.integers(2**31))
    torch.manual_seed(seed)
    plain = SparseLinear(n, m, sparsity=sparsity, seed=seed)
    fused = SparseLinear(n, m, sparsity=sparsity, seed=seed, activation="relu")
    with torch.no_grad():
        fused.bias.copy_(plain.bias)
    return plain, fused


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_relu_equals_linear_then_relu(rng, compiled):
    plain, fused = _twins(rng)
    x = torch.from_numpy(rng.standard_normal((9, 23)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((9, 31)).astype(np.float32))
    run = fused if not compiled else torch.compile(fused, backend="aot_eager", fullgraph=True)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = torch.relu(plain(xa))
    yb = run(xb)
    assert (ya > 0).any() and (ya == 0).any()  # both sides of the ReLU are exercised
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    for a, b in ((xa.grad, xb.grad), (plain.values.grad, fused.values.grad),
                 (plain.bias.grad, fused.bias.grad)):  # fmt: skip
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_sparsify_fuses_only_a_swapped_layer_followed_by_relu():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 6), nn.ReLU(),
        nn.Linear(6, 3),
    )  # fmt: skip
    sparsify(m, 0.5, exclude="4")
    kinds = [type(c).__name__ for c in m]
    assert kinds == ["SparseLinear", "Identity", "SparseLinear", "Tanh", "Linear", "ReLU",
                     "SparseLinear"]  # fmt: skip
    assert [getattr(c, "activation", "-") for c in m] == ["relu", "-", None, "-", "-", "-", None]
    keep = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
    sparsify(keep, 0.5, fuse_relu=False)
    assert type(keep[1]) is nn.ReLU and keep[0].activation is None


def test_fused_and_unfused_rigl_runs_agree(rng):
    """The recorded gradient of a fused layer is the one before its ReLU: the same topology
    and weights after every update as with the ReLU modules kept."""
    seed = int(rng.integers(2**31))
    x = torch.from_numpy(rng.standard_normal((64, 16)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 5, 64))
    runs = []
    for fuse in (False, True):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(),
                          nn.Linear(20, 5))  # fmt: skip
        sparsify(m, 0.7, seed=seed, fuse_relu=fuse)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        rigl = RigL(m, opt, delta_t=3, alpha=0.4, t_end=20)
        topo = []
        for t in range(16):
            opt.zero_grad()
            b = slice(4 * t % 48, 4 * t % 48 + 16)
            nn.functional.cross_entropy(m(x[b]), y[b]).backward()
            if rigl.step():
                opt.step()
            if t % 3 == 0 and t:
                topo.append([l.indices.clone() for _, l in rigl.layers])
        runs.append((topo, [l.values.detach().clone() for _, l in rigl.layers]))
    (ta, wa), (tb, wb) = runs
    assert len(ta) == 5
    for a, b in zip(ta, tb, strict=True):
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(v, u, rtol=0, atol=0)
    for u, v in zip(wa, wb, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)


def test_recording_a_fused_layer_keeps_nothing_alive_after_the_updates():
    """The hook of a fused layer needs its output (the ReLU's mask); that reference goes with
    the update, so no activation outlives it (a cycle through the output's own hook would)."""
    import gc

    torch.manual_seed(0)
    m = nn.Sequential(SparseLinear(12, 333, density=0.2, activation="relu"),
                      SparseLinear(333, 4, density=0.5))  # fmt: skip
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    rigl = RigL(m, opt, delta_t=1, t_end=100, grow="sampled")
    x, y = torch.randn(12, 29).T, torch.randint(0, 4, (29,))
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        if rigl.step():
            opt.step()
    assert len(rigl.updates) == 5
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.shape == (333, 29)]
    assert not alive, f"{len(alive)} recorded activations outlived the updates"


def test_cpu_products_flush_subnormals_and_restore_the_mode(rng):
    """The products compute with FTZ/DAZ (a subnormal result is 0), like the engine's training,
    and leave the calling thread's mode as it was (the conftest fixture fails a test that
    leaves flush-to-zero on)."""
    from kernels.cpu import fpmode
    from sparsecore.torch import _ops

    layer = SparseLinear.from_csr(sp.csr_array(np.array([[1e-20, 0.0], [0.0, 1.0]], np.float32)))
    x = torch.tensor([[1e-20], [2.0]], dtype=torch.float32).T  # (1, 2): 1e-40 is subnormal
    with torch.no_grad():
        y = layer(x)
    assert y[0, 0].item() == 0.0 and y[0, 1].item() == 2.0
    assert not fpmode.flushing()
    old = _ops.FLUSH_DENORMALS
    try:
        _ops.FLUSH_DENORMALS = False
        with torch.no_grad():
            y = layer(x)
        assert 0.0 < y[0, 0].item() < 1.2e-38  # IEEE subnormal kept
    finally:
        _ops.FLUSH_DENORMALS = old


def test_layers_given_one_input_share_its_transposed_copy(rng):
    """q, k and v projections of one batch-major input: one layout copy, not three, and the
    same outputs and gradients as dense references; an in-place change of the input between
    the layers makes a fresh copy."""
    from sparsecore.torch import layout_copies

    seed = int(rng.integers(2**31))
    torch.manual_seed(seed)
    q, k, v = (SparseLinear(24, 24, sparsity=0.7, seed=[seed, i]) for i in range(3))
    leaf = torch.from_numpy(rng.standard_normal((3, 5, 24)).astype(np.float32))
    leaf.requires_grad_(True)
    x = leaf * 1.0  # (an op's output, as a LayerNorm's is: the copy is shared)
    c0 = layout_copies()
    out = q(x) + k(x) * v(x)
    assert layout_copies() - c0 == 1
    g = torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32))
    out.backward(g)
    x2 = leaf.detach().double().requires_grad_(True)

    def ref(layer):
        return x2 @ layer.to_dense().double().T + layer.bias.detach().double()

    ((ref(q) + ref(k) * ref(v)) * g.double()).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), x2.grad, rtol=1e-4, atol=1e-5)
    # an in-place change of the input between the layers: a fresh copy
    y = torch.from_numpy(rng.standard_normal((6, 24)).astype(np.float32)).requires_grad_(True)
    h = y * 1.0
    a = q(h)
    with torch.no_grad():
        h.mul_(2.0)
    b = q(h)
    torch.testing.assert_close(b, 2 * a - q.bias, rtol=1e-5, atol=1e-5)


def test_leaves_are_copied_at_every_call(rng):
    """A leaf may be refilled behind torch's back (a NumPy staging buffer) or gain
    requires_grad between two layers: no copy of it is reused."""
    q, k = (SparseLinear(8, 6, sparsity=0.5, seed=[1, i]) for i in range(2))
    arr = rng.standard_normal((5, 8)).astype(np.float32)
    buf = torch.from_numpy(arr)
    y1 = q(buf)
    arr[:] = 0.0  # (no version bump: torch cannot see this write)
    y2 = q(buf)
    torch.testing.assert_close(y2, q.bias.expand_as(y2))
    del y1
    x = torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32))
    q(x)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(k(x).sum(), x)
    torch.testing.assert_close(gx, k.to_dense().sum(0).expand_as(x), rtol=1e-5, atol=1e-6)


def test_a_sequential_subclass_with_its_own_forward_is_not_fused():
    class Res(nn.Sequential):
        def forward(self, x):
            h = self[0](x)
            return self[1](h) + h

    torch.manual_seed(0)
    m = nn.Sequential(Res(nn.Linear(6, 6), nn.ReLU()), nn.Linear(6, 2))
    sparsify(m, 0.5)
    assert type(m[0][1]) is nn.ReLU and m[0][0].activation is None


def test_dx_from_two_threads_at_once_keeps_each_threads_values(rng):
    """The transposed product's gather scratch is the Pattern's: a second thread in it at
    the same time works on its own (else it would read the other's gathered values)."""
    import sys
    import threading

    layer = SparseLinear(40, 30, sparsity=0.5, seed=3)
    P = layer.pattern()
    dy = torch.from_numpy(rng.standard_normal((30, 7)).astype(np.float32))
    va, vb = (torch.from_numpy(rng.standard_normal(layer.nnz).astype(np.float32)) for _ in "ab")
    want = {id(va): P.dx(va, dy), id(vb): P.dx(vb, dy)}
    wrong = []

    def run(v):
        for _ in range(300):
            if not torch.equal(P.dx(v, dy), want[id(v)]):
                wrong.append(1)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(v,)) for v in (va, vb)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not wrong, f"{len(wrong)} of 600 products read the other thread's values"
