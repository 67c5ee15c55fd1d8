"""The PyTorch bridge on the device side: CUDA tensors through the CUDA launchers.

Three sides, as for the kernels (tests/cases.py): "cpu"; "cuda-emulated", where the bridge's
tensors stay on the host but every op goes through the CUDA launchers' host code (the CUDA
Backend over NumPy, DLPack views, the device branches of Pattern and of the RigL update) with
kernels/cuda/_module.launch replaced by the kernels' NumPy models; and "cuda", a real device
(skipped without CuPy and a GPU). Each side must give the CPU's results.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kernels import backend as kb  # noqa: E402
from sparsecore.torch import RigL, SparseLinear, _ops  # noqa: E402
from tests import cases  # noqa: E402

SIDES = ["cpu", "cuda-emulated", "cuda"]


class Side:
    """Where the tested layers' tensors live (``device``) and ``enter()``, which puts the
    side in force (the emulation: from then on every op takes the CUDA launchers' path)."""

    def __init__(self, name, monkeypatch, rng):
        self.name, self.mp, self.rng = name, monkeypatch, rng
        self.device = "cuda" if name == "cuda" else "cpu"
        self.launched = None  # the emulated device launches, in order

    def kernels(self) -> set:
        """The CUDA kernels launched since enter() (emulated side; None elsewhere)."""
        return None if self.launched is None else {p.kernel.split("_f")[0] for p in self.launched}

    def enter(self):
        if self.name == "cuda-emulated":
            from tests.test_cuda_emulated import install

            self.launched = install(self.mp, self.rng)
            emu = kb.cuda_backend(np)
            self.mp.setattr(_ops, "backend_of", lambda t: emu)


@pytest.fixture(params=SIDES)
def side(request, monkeypatch, rng):
    if request.param == "cuda":
        reason = cases.gpu_skip_reason()
        if reason is None and not torch.cuda.is_available():
            reason = "torch sees no CUDA device"
        if reason is not None:
            pytest.skip(f"CUDA unavailable: {reason}")
    return Side(request.param, monkeypatch, rng)


def _pair(seed, m=37, n=29, sparsity=0.7):
    """Two identical layers: one on the host (the reference), one to move to the side."""
    torch.manual_seed(seed)  # (the biases)
    ref = SparseLinear(n, m, sparsity=sparsity, seed=seed)
    dev = SparseLinear(n, m, sparsity=sparsity, seed=seed)
    with torch.no_grad():
        dev.bias.copy_(ref.bias)
    return ref, dev


def test_forward_backward_match_the_cpu(side, rng):
    seed = int(rng.integers(2**31))
    ref, dev = _pair(seed)
    # the host reference runs before the side's patches matter: its Pattern is built on the CPU
    x = torch.from_numpy(rng.standard_normal((11, 29)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((11, 37)).astype(np.float32))
    with torch.no_grad():
        y_cpu = x @ ref.to_dense().T + ref.bias
    dense = ref.to_dense().double()
    side.enter()
    dev = dev.to(side.device)
    xd = x.to(side.device).requires_grad_(True)
    y = dev(xd)
    y.backward(g.to(side.device))
    np.testing.assert_allclose(y.detach().cpu().numpy(), y_cpu.numpy(), rtol=1e-5, atol=1e-5)
    dx_ref = (g.double() @ dense).numpy()
    np.testing.assert_allclose(xd.grad.cpu().numpy(), dx_ref, rtol=1e-5, atol=1e-5)
    rows = np.repeat(np.arange(37), np.diff(ref.indptr.numpy()))
    dw_ref = (g.double().T @ x.double()).detach().numpy()[rows, ref.indices.numpy()]
    np.testing.assert_allclose(dev.values.grad.cpu().numpy(), dw_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dev.bias.grad.cpu().numpy(), g.sum(0).numpy(), rtol=1e-5, atol=1e-5)
    if side.launched is not None:  # the products did run as device launches
        assert len(side.launched) >= 3, side.kernels()


def test_a_rigl_update_matches_the_cpu(side, rng):
    """The drop, the fused grow, the merge and the state remap of one update on the side."""
    seed = int(rng.integers(2**31))
    x = torch.from_numpy(rng.standard_normal((16, 29)).astype(np.float32))
    target = torch.from_numpy(rng.standard_normal((16, 37)).astype(np.float32))
    results = []
    for where in ("host", "side"):
        _, layer = _pair(seed)
        if where == "side":
            side.enter()
            layer = layer.to(side.device)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        rigl = RigL(layer, opt, delta_t=1, alpha=0.5, t_end=10)
        for _ in range(2):  # step 0: a normal step (momentum state); step 1: an update
            opt.zero_grad()
            xs = x.to(layer.values.device)
            ((layer(xs) - target.to(xs.device)) ** 2).mean().backward()
            if rigl.step():
                opt.step()
        mom = opt.state[layer.values]["momentum_buffer"]
        results.append(
            [
                a.detach().cpu().numpy().copy()
                for a in (layer.indptr, layer.indices, layer.values, mom)
            ]
        )
    if side.launched is not None:  # the grow ran through the device top-k's launches
        assert any("grow" in p.kernel for p in side.launched), side.kernels()
    host, dev = results
    for a, b in zip(host[:2], dev[:2], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(dev[2], host[2], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dev[3], host[3], rtol=1e-6, atol=1e-7)
