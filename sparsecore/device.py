"""Where training runs: the array module and the kernel launchers of one side, chosen once.

A ``Device`` bundles what the engine needs to run a layer, an optimizer step or a topology
update on one side: the array module ``xp`` (numpy or cupy) and the trusted launchers, which
take the same arguments on both sides (kernels/cpu/*.py and kernels/cuda/*.py). The engine
(layers, optimizers, RigL, the trainer) is written against a Device held as an attribute, so
the CPU path calls its Numba launchers exactly as before and pays one attribute access per call.

``get_device("cpu")`` is the CPU; ``get_device("cuda")`` needs CuPy and a CUDA device, else it
raises the one ``GPUUnavailableError`` saying how to install the ``[gpu]`` extra (when the model
or trainer is built; importing this module imports neither CuPy nor the CUDA launchers).

What stays on the GPU: weights (``DeviceCSR``), biases, gradients, activations, optimizer
moments, and the drop, exact grow, merge and remap of a topology update. What crosses: each
mini-batch (uploaded, or gathered on the device from a training set uploaded once), loss and
accuracy when they are logged, a topology update's counts, checkpoints (``to_host``), and the
random draws of SET and of RigL's sampled grow, which run on the host on a downloaded copy of
the pattern (and, for the sampled grow, of dY and X) and upload the k chosen connections:
O(nnz + (m + n)·B) bytes per update, none per step.
"""

from __future__ import annotations

import numpy as np


class Device:
    """One side of the engine: ``xp`` and the launchers (module-like attributes)."""

    def __init__(self, name: str, xp, *, spmm, spmm_t, sddmm, elementwise, drop, grow, merge):
        self.name = name
        self.xp = xp
        self.on_device = name != "cpu"
        self.spmm = spmm  # spmm(indptr, indices, data, x, out, blocks, bias=, relu=)
        self.spmm_t = spmm_t  # spmm_t(t_indptr, t_indices, t_perm, data, dy, out, blocks, ...)
        self.sddmm = sddmm  # sddmm(indptr, indices, dy, x, out, blocks, bias_grad=)
        self.ew = elementwise  # relu, relu_backward, sgd_momentum (and on a device sgd, adam)
        self.drop = drop  # magnitude_drop(data, k)
        self.grow = grow  # topk_grow(indptr, indices, keep, dy, x, k, tile_bytes=)
        self.merge_kernels = merge  # merge(...), remap(src, values, fill, out=)

    def __repr__(self):
        return f"Device({self.name!r}, xp={self.xp.__name__})"

    # ------------------------------------------------------------------ arrays
    def asarray(self, a, dtype=None):
        """``a`` (host or device) as an array of this side; no copy when already there."""
        if not self.on_device:
            a = to_host(a)
        return self.xp.asarray(a, dtype=dtype)

    def csr(self, W):
        """A sparse weight (CSR or DeviceCSR) as this side's: CSR on the CPU, DeviceCSR on a
        device; no copy when already there."""
        from kernels.cuda._csr import DeviceCSR

        if not self.on_device:
            return W.to_host()  # a CSR returns itself
        if isinstance(W, DeviceCSR):
            return W
        xp = self.xp
        return DeviceCSR(xp.asarray(W.indptr), xp.asarray(W.indices), xp.asarray(W.data), W.shape)

    def sync(self):
        """Wait for the device's queued work (for timings); nothing on the CPU."""
        if self.on_device and hasattr(self.xp, "cuda"):
            self.xp.cuda.get_current_stream().synchronize()

    # ------------------------------------------------------------------ topology updates
    def merge(self, W, keep, rows, cols):
        """(new W, src) of a topology update. CPU: the public, validated kernels.merge. Device:
        the launcher on trusted input (the grow's sorted, distinct, absent coordinates)."""
        if not self.on_device:
            import kernels

            return kernels.merge(W, keep, rows, cols)
        return self.merge_kernels.merge_csr(W, keep, rows, cols)

    def remap(self, src, values, fill=0.0, out=None):
        return self.merge_kernels.remap(src, values, fill, out=out)


def to_host(a):
    """A NumPy array of ``a`` (a copy from the device; a NumPy array as it is)."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return a
    get = getattr(a, "get", None)
    return get() if get is not None else np.asarray(a)


def _launchers(name: str, xp) -> Device:
    """The launchers of kernels/<name>/ (the CPU and CUDA twins take the same arguments)."""
    import importlib

    mod = {op: importlib.import_module(f"kernels.{name}.{op}") for op in
           ("drop", "elementwise", "grow", "merge", "sddmm", "spmm", "spmm_t")}  # fmt: skip
    return Device(
        name,
        xp,
        spmm=mod["spmm"].spmm,
        spmm_t=mod["spmm_t"].spmm_t,
        sddmm=mod["sddmm"].sddmm,
        elementwise=mod["elementwise"],
        drop=mod["drop"].magnitude_drop,
        grow=mod["grow"].topk_grow,
        merge=mod["merge"],
    )


def cpu_device() -> Device:
    return _launchers("cpu", np)


def cuda_device(xp) -> Device:
    """The CUDA launchers with array module ``xp``: cupy, or numpy where the tests replace
    kernels/cuda/_module.launch by NumPy models of the kernels (tests/test_device_training.py)."""
    return _launchers("cuda", xp)


DEVICES = ("cpu", "cuda")
_cache: dict = {}


def _make_cuda() -> Device:
    from kernels import validation as V

    cupy = V.require_gpu("device", lead="device='cuda' asks for the GPU")
    return cuda_device(cupy)


def get_device(name="cpu") -> Device:
    """The Device called ``name`` ("cpu" or "cuda"; a Device is returned as it is)."""
    if isinstance(name, Device):
        return name
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name not in _cache:
        _cache[name] = cpu_device() if name == "cpu" else _make_cuda()
    return _cache[name]


def of(params) -> Device:
    """The Device of parameters (objects with ``.value``): "cuda" for CuPy arrays, else the
    CPU. A Device whose xp is NumPy (the tests' emulation) must be named explicitly."""
    from kernels.validation import is_cupy_array

    return get_device("cuda") if any(is_cupy_array(p.value) for p in params) else CPU


CPU = get_device("cpu")  # the default of every layer and optimizer
