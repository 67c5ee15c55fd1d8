"""Loading the CUDA sources: one ``cupy.RawModule`` per (device, source, options), built lazily.

The ``.cu`` files sit beside their launchers. A source is read and compiled (NVRTC, through
CuPy) the first time a kernel of it is needed on a device, then kept for the process. CuPy is
imported here only inside functions: importing ``kernels`` never needs it.

Kernels take explicit NumPy scalars (``np.int32``, ``np.int64``, ``np.float32``, ``np.uint32``,
``np.uint64``) for every scalar parameter, so each argument's size matches the C signature
exactly; tests/test_cuda_build.py checks every launch plan against the PTX that nvcc emits.
"""

from __future__ import annotations

import os
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))

# NVRTC options of every module. The architecture is added by CuPy for the current device.
# No fast-math: the products are plain FMAs. CuPy appends CUPY_APPENDED_OPTIONS after these
# (cupy/cuda/compiler.py, for every RawModule; NVRTC keeps the last of conflicting options), so
# every kernel here runs with flush-to-zero: subnormal inputs and results of float instructions
# become 0. The grow and the drop rank scores by their bits (integer instructions only), so
# their selection does not depend on it; the products, sddmm and the elementwise passes flush,
# as the CPU training does under its default flush_denormals. tests/test_cuda_build.py compiles
# with OPTIONS + CUPY_APPENDED_OPTIONS and checks that grow.cu has no float instruction.
OPTIONS = ("--std=c++17",)
CUPY_APPENDED_OPTIONS = ("-ftz=true",)

_modules: dict = {}


class Launch(NamedTuple):
    """One kernel launch, fully described without a device (tested on the CPU)."""

    source: str  # file name in kernels/cuda, e.g. "spmm.cu"
    kernel: str  # extern "C" symbol, e.g. "sparsecore_spmm_i32"
    grid: tuple
    block: tuple
    args: tuple
    shared_mem: int = 0


def source_path(name: str) -> str:
    return os.path.join(HERE, name)


def read_source(name: str) -> str:
    with open(source_path(name), encoding="utf-8") as f:
        return f.read()


def get_module(name: str, options: tuple = OPTIONS):
    """The compiled RawModule of kernels/cuda/<name> on the current device (memoized)."""
    import cupy

    key = (cupy.cuda.Device().id, name, tuple(options))
    mod = _modules.get(key)
    if mod is None:
        mod = cupy.RawModule(code=read_source(name), options=tuple(options))
        _modules[key] = mod
    return mod


_functions: dict = {}


def get_function(name: str, kernel: str, options: tuple = OPTIONS):
    """The kernel ``kernel`` of kernels/cuda/<name> on the current device, cached per (device,
    source, options, kernel): RawModule.get_function builds a new Function object on every call
    (device queries, a memo lookup, cuModuleGetFunction), which would make a small layer's
    launches host-bound."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), name, tuple(options), kernel)
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = get_module(name, options).get_function(kernel)
    return fn


def launch(plan: Launch) -> None:
    """Run one planned launch on the current stream (asynchronous)."""
    if plan.grid[0] == 0:
        return
    get_function(plan.source, plan.kernel)(
        plan.grid, plan.block, plan.args, shared_mem=plan.shared_mem
    )


def require_contiguous(kernel: str, **arrays):
    """ValueError unless every given array (None skipped) is C-contiguous: the kernels index
    their buffers as dense rows, so a strided view would be read wrongly, and a flattened
    copy of one (reshape(-1) copies) would take the kernel's writes and lose them."""
    for name, a in arrays.items():
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(
                f"{kernel}: {name} must be C-contiguous, got shape {tuple(a.shape)} with strides "
                f"{tuple(a.strides)} (pass a contiguous array, e.g. ascontiguousarray)"
            )


def index_suffix(dtype) -> str:
    """'i32' or 'i64' from an index dtype (anything with ``.itemsize``, or a dtype)."""
    import numpy as np

    size = np.dtype(dtype).itemsize
    if size == 4:
        return "i32"
    if size == 8:
        return "i64"
    raise TypeError(f"index arrays must be int32 or int64, got {np.dtype(dtype)}")


def array_module(a):
    """numpy for NumPy arrays, else cupy: the array-op launchers (drop, merge, structure, the
    host side of grow) run unchanged on NumPy arrays, which is how they are tested without a
    device (tests/test_cuda_emulated.py)."""
    import numpy as np

    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


def free_device_bytes(cupy) -> tuple[int, int]:
    """(free, total) bytes of the current device: the driver's free memory plus what CuPy's
    pool holds unused (CuPy would hand that out first), and the device's total."""
    free, total = (int(v) for v in cupy.cuda.Device().mem_info)
    return free + int(cupy.get_default_memory_pool().free_bytes()), total


def to_host(a):
    """A NumPy copy of a CuPy array (a NumPy array is returned as is)."""
    return a.get() if hasattr(a, "get") and not hasattr(a, "__array_interface__") else a


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
