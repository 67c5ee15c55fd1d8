"""Training that stays on the device (TrainConfig(device="cuda")): the same run as on the CPU.

Without a GPU the device path runs as far as it can: the Trainer is built with a Device whose
launchers are the CUDA ones (kernels/cuda/*.py: launch plans, argument lists, the GPU grow's
host algorithm, the device merge/remap/drop, the fused elementwise optimizer kernels) and whose
array module is NumPy, with kernels/cuda/_module.launch replaced by the NumPy models of every
CUDA kernel (tests/test_cuda_emulated.py). Everything above the launch (layers, loss, optimizer,
RigL/SET, the device data pipeline, evaluation, checkpoints) is the code a GPU run executes,
and must reproduce the CPU run: per-step losses, topology and weights. Also checked: the one
install error when the GPU is asked for without CuPy or a device, raised when the trainer or
model is built and never at import. On a GPU (skipped elsewhere) a few hundred RigL steps on
MNIST 784-64-10 at 90% equal the CPU run to float32 tolerance, and nothing leaves the device.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from kernels import validation as V
from sparsecore import data as D
from sparsecore import device as devmod
from sparsecore.layers import SparseLinear, mlp
from sparsecore.optim import SGD, Adam
from sparsecore.train import TrainConfig, Trainer
from tests.test_cuda_emulated import install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic(n_train=384, n_test=96, features=40, classes=5, seed=7):
    """Gaussian blobs: learnable, continuous (no exact ties in |dY·Xᵀ| beyond the zeros)."""
    r = np.random.default_rng(seed)
    centers = r.standard_normal((classes, features)).astype(np.float32)

    def draw(n):
        y = r.integers(0, classes, n)
        x = centers[y] + 0.8 * r.standard_normal((n, features)).astype(np.float32)
        return x.astype(np.float32), y.astype(np.int64)

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    e = np.zeros((0, features), np.float32)
    return D.Dataset("blobs", xtr, ytr, e, np.zeros(0, np.int64), xte, yte, classes)


@pytest.fixture
def emulated_cuda(monkeypatch, rng):
    """device="cuda" gives the CUDA launchers on NumPy arrays, kernels run by NumPy models."""
    launched = install(monkeypatch, rng)
    dev = devmod.cuda_device(np)
    monkeypatch.setitem(devmod._cache, "cuda", dev)
    return launched


def _recording(tr):
    """Per-step losses of a trainer (read back from the device in the test only)."""
    losses = []
    step = tr.train_step

    def wrapped(xb, yb):
        out = step(xb, yb)
        losses.append(float(out[0]))
        return out

    tr.train_step = wrapped
    return losses


def _host_state(tr):
    """[(indptr, indices, data, b) or (W, b)] of every weighted layer, as NumPy arrays."""
    h = devmod.to_host
    out = []
    for layer in tr.model.weighted():
        if isinstance(layer, SparseLinear):
            W = layer.W
            out.append((h(W.indptr), h(W.indices), h(W.data), h(layer.b)))
        else:
            out.append((h(layer.W), h(layer.b)))
    return out


def _compare_runs(cpu, dev, cpu_losses, dev_losses, *, rtol, min_overlap=1.0):
    np.testing.assert_allclose(dev_losses, cpu_losses, rtol=rtol, atol=rtol)
    for a, b in zip(_host_state(cpu), _host_state(dev), strict=True):
        if len(a) == 4:
            np.testing.assert_array_equal(a[0][[0, -1]], b[0][[0, -1]])  # nnz kept
            ka = set(zip(np.repeat(np.arange(a[0].size - 1), np.diff(a[0])), a[1], strict=True))
            kb = set(zip(np.repeat(np.arange(b[0].size - 1), np.diff(b[0])), b[1], strict=True))
            overlap = len(ka & kb) / max(len(ka), 1)
            assert overlap >= min_overlap, f"topologies agree on {overlap:.4f} of connections"
            if overlap == 1.0:
                np.testing.assert_array_equal(a[0], b[0])
                np.testing.assert_array_equal(a[1], b[1])
                np.testing.assert_allclose(a[2], b[2], rtol=50 * rtol, atol=rtol)
        else:
            np.testing.assert_allclose(a[0], b[0], rtol=50 * rtol, atol=rtol)
        np.testing.assert_allclose(a[-1], b[-1], rtol=50 * rtol, atol=rtol)


def _cfg(**kw):
    base = dict(
        arch=[40, 32, 24, 5],
        sparsity=0.8,
        batch_size=16,
        epochs=3,
        max_steps=60,
        delta_t=6,
        t_end=0.8,
        lr=0.05,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------ without a GPU: emulated


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="rigl"),  # exact grow: the GPU topk_grow's host algorithm
        dict(method="rigl", grow="sampled", grow_candidates=3, optimizer="adam", lr=0.01),
        dict(method="set", momentum=0.0, nesterov=False),
        # ERK makes both later layers dense: Linear (cuBLAS) -> ReLU (its own kernels)
        dict(method="rigl", optimizer="adamw", lr=0.01, arch=[40, 32, 6, 5], sparsity=0.6),
    ],
    ids=["rigl-sgd", "sampled-adam", "set-plain-sgd", "rigl-adamw-dense-relu"],
)
def test_device_path_reproduces_the_cpu_run(kw, emulated_cuda, tmp_path):
    data = _synthetic()
    cpu = Trainer(_cfg(**kw), data)
    cpu_losses = _recording(cpu)
    cpu_summary = cpu.run()
    dev = Trainer(_cfg(device="cuda", out=str(tmp_path), **kw), data)
    assert dev.device.on_device and dev.model.device == "cuda"
    dev_losses = _recording(dev)
    dev_summary = dev.run()
    assert len(dev_losses) == len(cpu_losses) == 60
    _compare_runs(cpu, dev, cpu_losses, dev_losses, rtol=1e-4)
    assert [u["step"] for u in dev.updates] == [u["step"] for u in cpu.updates]
    assert len(dev.updates) >= 5
    for a, b in zip(cpu.updates, dev.updates, strict=True):
        for la, lb in zip(a["layers"], b["layers"], strict=True):
            assert {k: la[k] for k in ("nnz", "dropped", "grown", "new")} == {
                k: lb[k] for k in ("nnz", "dropped", "grown", "new")
            }
    for ra, rb in zip(cpu.history, dev.history, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "nnz"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-4, err_msg=key)
    assert dev_summary["test_acc"] == pytest.approx(cpu_summary["test_acc"], abs=1e-9)
    # the launches were the CUDA kernels': products, fused updates (and the grow's)
    kernels_run = {p.kernel.rsplit("_i", 1)[0] for p in emulated_cuda}
    assert {"sparsecore_sddmm", "sparsecore_spmm4"} & kernels_run
    opt_kernel = {"sgd": "sparsecore_sgd_momentum", "adam": "sparsecore_adam"}.get(
        kw.get("optimizer", "sgd"), "sparsecore_adam"
    )
    if kw.get("momentum") == 0.0:
        opt_kernel = "sparsecore_sgd"
    assert opt_kernel in kernels_run
    if kw["method"] == "rigl" and kw.get("grow", "exact") == "exact":
        assert any(k.startswith("sparsecore_grow_select") for k in kernels_run)
    if kw.get("arch", [0, 0, 0])[2] == 6:
        assert {"sparsecore_relu", "sparsecore_relu_backward"} <= kernels_run
    # the device run's checkpoint resumes on the CPU with the same state
    ck = Trainer(_cfg(**kw), data)
    ck.load_checkpoint(dev.ckpt_path())
    for a, b in zip(_host_state(ck), _host_state(dev), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    for k, v in dev.opt.state_dict().items():
        np.testing.assert_array_equal(ck.opt.state_dict()[k], v)


def test_device_state_lives_on_the_device_side(emulated_cuda):
    """What a device model holds: DeviceCSR weights, device moments, no CPU scratch."""
    from kernels.cuda._csr import DeviceCSR

    tr = Trainer(_cfg(device="cuda", max_steps=8, method="rigl", delta_t=4), _synthetic())
    tr.run()
    for layer in tr.model.sparse_layers():
        assert isinstance(layer.W, DeviceCSR) and layer.dev is tr.device
        assert layer._t_data is None  # the GPU spmm_t gathers values in place
    assert tr.opt.dev is tr.device and tr.loss_fn.dev is tr.device
    # back to the CPU: the same weights in a CSR, usable by the CPU kernels
    before = _host_state(tr)
    tr.model.to("cpu")
    assert tr.model.device == "cpu"
    for a, b in zip(before, _host_state(tr), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    x = tr.data.x_test[:7]
    assert tr.model.predict(x).shape == (7, 5)
    from sparsecore.layers import ReLU, Sequential

    with pytest.raises(ValueError, match="different devices"):
        Sequential([tr.model.layers[0], ReLU().to("cuda")])


def test_a_cpu_checkpoint_resumes_on_the_device_into_the_same_run(emulated_cuda, tmp_path):
    """Stop a CPU run after 2 epochs, resume it with device="cuda": the third epoch equals the
    CPU run that never stopped."""
    data = _synthetic()
    kw = dict(method="rigl", max_steps=None, epochs=3, delta_t=10)
    whole = Trainer(_cfg(**kw), data)
    whole.run()
    first = Trainer(_cfg(**kw), data)
    first.cfg.epochs = 2  # stop after 2 of the 3 epochs it was built for
    first.run()
    first.cfg.epochs = 3
    first.save_checkpoint(tmp_path / "cpu.npz")
    resumed = Trainer(_cfg(device="cuda", **kw), data)
    resumed.load_checkpoint(tmp_path / "cpu.npz")
    assert resumed.step == first.step == 2 * whole.steps_per_epoch
    resumed.run()
    assert resumed.step == whole.step
    np.testing.assert_allclose(
        resumed.history[-1]["train_loss"], whole.history[-1]["train_loss"], rtol=1e-4
    )
    _compare_runs(whole, resumed, [0.0], [0.0], rtol=1e-4)


@pytest.mark.parametrize("opt", ["sgd", "nesterov", "plain", "adam", "adamw"])
def test_fused_device_optimizer_updates_equal_the_cpu_ones(opt, emulated_cuda, rng):
    from sparsecore.layers import Param

    def params():
        r = np.random.default_rng(3)
        return [
            Param(f"p{i}", r.standard_normal(s).astype(np.float32), np.zeros(s, np.float32))
            for i, s in enumerate([(17,), (3, 5)])
        ]

    make = {
        "sgd": lambda p, d: SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, device=d),
        "nesterov": lambda p, d: SGD(p, lr=0.1, momentum=0.9, nesterov=True, device=d),
        "plain": lambda p, d: SGD(p, lr=0.1, momentum=0.0, weight_decay=1e-2, device=d),
        "adam": lambda p, d: Adam(p, lr=1e-2, weight_decay=1e-2, device=d),
        "adamw": lambda p, d: Adam(p, lr=1e-2, weight_decay=1e-2, decoupled=True, device=d),
    }[opt]
    pc, pd = params(), params()
    oc, od = make(pc, None), make(pd, "cuda")
    assert oc.dev.name == "cpu" and od.dev.name == "cuda"
    for _ in range(5):
        for a, b in zip(pc, pd, strict=True):
            a.grad[...] = rng.standard_normal(a.grad.shape)
            b.grad[...] = a.grad
        oc.step(0.05)
        od.step(0.05)
    for a, b in zip(pc, pd, strict=True):
        np.testing.assert_allclose(b.value, a.value, rtol=2e-6, atol=2e-7)
    assert emulated_cuda, "the device optimizer launched its fused kernel"


# ------------------------------------------------------------------ the one error


@pytest.fixture
def no_cupy(monkeypatch):
    """As if CuPy were not installed (whatever this machine has)."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    monkeypatch.setattr(V, "_gpu_state", {})
    monkeypatch.delitem(devmod._cache, "cuda", raising=False)


def test_cuda_without_cupy_is_one_clear_error_when_built(no_cupy):
    from kernels import GPUUnavailableError

    cfg = _cfg(device="cuda", dataset="/nonexistent/data.npz")
    with pytest.raises(GPUUnavailableError, match=re.escape(V.GPU_INSTALL)) as e:
        Trainer(cfg)  # raised before the dataset is looked for
    assert str(e.value).startswith("device='cuda' asks for the GPU")
    assert "CuPy is not installed" in str(e.value)
    with pytest.raises(GPUUnavailableError, match="CuPy is not installed"):
        mlp([6, 4, 3], [0.5, None]).to("cuda")
    with pytest.raises(ValueError, match=r"device \(--device\) must be one of cpu, cuda; got"):
        _cfg(device="gpu").validate()


def test_cuda_without_a_device_is_the_same_error(monkeypatch):
    from kernels import GPUUnavailableError

    monkeypatch.setattr(V, "_gpu_state", {"reason": "no CUDA device is visible"})
    monkeypatch.delitem(devmod._cache, "cuda", raising=False)
    with pytest.raises(GPUUnavailableError, match="no CUDA device is visible") as e:
        Trainer(_cfg(device="cuda"), _synthetic())
    assert V.GPU_INSTALL in str(e.value)


def test_cli_device_flag_reports_the_error(no_cupy, capsys):
    from sparsecore import cli

    rc = cli.main(["train", "--device", "cuda", "--max-steps", "1", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "device='cuda' asks for the GPU" in err and V.GPU_INSTALL in err


def test_importing_the_engine_never_imports_cupy():
    code = (
        "import sys, sparsecore.train, sparsecore.device, sparsecore.cli; "
        "sys.exit('cupy' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ------------------------------------------------------------------ on a GPU


@pytest.fixture
def gpu():
    reason = V.gpu_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs CuPy and a CUDA device: {reason}")
    import cupy

    return cupy


def test_rigl_on_mnist_on_the_gpu_equals_the_cpu_run(gpu):
    """300 steps of RigL on MNIST 784-64-10 at 90% (5 topology updates): losses, topology."""
    from tests.cases import mnist_subset

    data = mnist_subset(12800, 1000)
    kw = dict(arch=[784, 64, 10], sparsity=0.9, epochs=3, max_steps=300, delta_t=50, t_end=0.9)
    kw.update(batch_size=128, lr=0.1, progress=False)
    cpu = Trainer(TrainConfig(**kw), data)
    cpu_losses = _recording(cpu)
    cpu.run()
    dev = Trainer(TrainConfig(device="cuda", **kw), data)
    dev_losses = _recording(dev)
    dev.run()
    assert len(dev.updates) == len(cpu.updates) == 5
    # float32 kernels with different summation orders: the topology may differ by a few
    # near-tied grown connections, and the losses by rounding that grows with the steps
    _compare_runs(cpu, dev, cpu_losses, dev_losses, rtol=2e-3, min_overlap=0.995)
    for layer in dev.model.weighted():
        assert isinstance(layer.b, gpu.ndarray)
    for st in dev.opt.state.values():
        assert all(isinstance(a, gpu.ndarray) for a in st.values())


def test_plan_counts_device_memory_apart():
    from sparsecore.plan import describe_plan, memory_plan

    arch = [784, 4096, 4096, 10]
    cpu = memory_plan(arch, 0.99)
    gpu = memory_plan(arch, 0.99, device="cuda")
    assert cpu["device"] == "cpu" and gpu["device"] == "cuda"
    # no dX values scratch on the GPU: one nnz-sized float array less per sparse layer
    nnz = sum(r["nnz"] for r in cpu["layers"] if r["density"] < 1)
    assert cpu["pieces"]["gradients"] - gpu["pieces"]["gradients"] == 4 * nnz
    assert "GPU memory" in describe_plan(gpu) and "GPU" not in describe_plan(cpu)
    sampled = memory_plan(arch, 0.99, device="cuda", grow="sampled")  # drawn on the host
    assert sampled["total_bytes"] < gpu["total_bytes"]
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        memory_plan(arch, 0.99, device="tpu")


def test_cli_device_run_reports_its_state(emulated_cuda, tmp_path, capsys):
    """A device run through the command line ends with its report (the training state held is
    summed from the device arrays)."""
    from sparsecore import cli
    from tests.cases import blobs_npz

    data = blobs_npz(tmp_path / "d.npz")
    argv = ["train", "--device", "cuda", "--dataset", str(data), "--arch", "20-16-3"]
    argv += ["--sparsity", "0.5", "--epochs", "1", "--delta-t", "3", "--no-progress"]
    rc = cli.main([*argv, "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "training state held:" in out and "test accuracy:" in out


def test_a_device_run_with_a_memory_budget_grows_with_the_planned_tile(emulated_cuda):
    """Without a tile the GPU grow sizes its tile from the device's memory; a run given
    max_memory passes the tile its memory plan counted instead, so the plan holds."""
    from kernels import config as kcfg

    data = _synthetic()
    free = Trainer(_cfg(device="cuda", max_steps=2, method="rigl", delta_t=4), data)
    assert free.updater.tile_bytes is None
    budget = Trainer(
        _cfg(device="cuda", max_steps=2, method="rigl", delta_t=4, max_memory=1 << 34), data
    )
    assert budget.updater.tile_bytes == kcfg.CUDA_TOPK_TILE_BYTES
    given = Trainer(
        _cfg(
            device="cuda",
            max_steps=2,
            method="rigl",
            delta_t=4,
            max_memory=1 << 34,
            grow_tile_bytes=4096,
        ),
        data,
    )
    assert given.updater.tile_bytes == 4096
