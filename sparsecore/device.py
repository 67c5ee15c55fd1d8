"""Where training runs: the engine's name for a kernels Backend (kernels/backend.py).

A ``Device`` is a ``kernels.backend.Backend``: the array module ``xp`` (numpy or cupy) and the
trusted launchers of one side, chosen once. The engine (layers, optimizers, RigL, the trainer)
holds one as ``dev`` and calls its launchers directly, so the CPU path pays one attribute access
per call. ``get_device("cpu")`` is the CPU; ``get_device("cuda")`` needs CuPy and a CUDA device,
else it raises the one ``GPUUnavailableError`` saying how to install the ``[gpu]`` extra (when
the model or trainer is built; importing this module imports neither CuPy nor a CUDA kernel).

What stays on the GPU: weights (``DeviceCSR``), biases, gradients, activations, optimizer
moments, and the drop, exact grow, merge and remap of a topology update. What crosses: each
mini-batch (uploaded, or gathered on the device from a training set uploaded once), loss and
accuracy when they are logged, a topology update's counts, checkpoints (``to_host``), and the
random draws of SET and of RigL's sampled grow, which run on the host on a downloaded copy of
the pattern (and, for the sampled grow, of dY and X) and upload the k chosen connections:
O(nnz + (m + n)·B) bytes per update, none per step.
"""

from __future__ import annotations

from kernels.backend import BACKENDS as DEVICES
from kernels.backend import Backend as Device
from kernels.backend import _cache, to_host  # noqa: F401  (_cache: the tests' emulated "cuda")
from kernels.backend import cpu_backend as cpu_device
from kernels.backend import cuda_backend as cuda_device
from kernels.backend import get_backend as get_device
from kernels.validation import is_cupy_array

__all__ = ["CPU", "DEVICES", "Device", "cpu_device", "cuda_device", "get_device", "of", "to_host"]


def of(params) -> Device:
    """The Device of parameters (objects with ``.value``): "cuda" for CuPy arrays, else the
    CPU. A Device whose xp is NumPy (the tests' emulation) must be named explicitly."""
    return get_device("cuda") if any(is_cupy_array(p.value) for p in params) else CPU


CPU = get_device("cpu")  # the default of every layer and optimizer
