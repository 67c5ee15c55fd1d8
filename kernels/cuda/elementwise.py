"""Elementwise passes of a training step on the GPU: launcher of kernels/cuda/elementwise.cu.

``relu``, ``relu_backward`` and ``sgd_momentum`` take the arguments of their CPU twins in
kernels/cpu/elementwise.py; ``sgd`` (no momentum) and ``adam`` are the fused GPU forms of what
sparsecore/optim.py does with NumPy expressions on the CPU. Trusts its inputs: float32
C-contiguous arrays of one size (2-D activations are passed flat), scalars as Python or NumPy
numbers (cast here to the C types). Asynchronous; each returns its output array.
"""

from __future__ import annotations

import numpy as np

from kernels import config
from kernels.cuda import _module
from kernels.cuda._module import Launch, cdiv


def grid(n: int) -> tuple:
    """Grid of the grid-stride loops: one thread per element, at most
    config.CUDA_ELEMENTWISE_MAX_BLOCKS blocks."""
    if n <= 0:
        return (0, 1, 1)
    threads = config.CUDA_ELEMENTWISE_THREADS
    return (min(config.CUDA_ELEMENTWISE_MAX_BLOCKS, cdiv(n, threads)), 1, 1)


def _plan(kernel: str, n: int, *args) -> Launch:
    block = (config.CUDA_ELEMENTWISE_THREADS, 1, 1)
    return Launch("elementwise.cu", kernel, grid(n), block, args)


def _flat(a):
    """The flat view of a C-contiguous array (never a copy: the kernel writes through it)."""
    _module.require_contiguous("elementwise", array=a)
    return a.reshape(-1)


def relu_plan(x, out) -> Launch:
    return _plan("sparsecore_relu", x.size, _flat(x), _flat(out), np.int64(x.size))


def relu_backward_plan(dy, y, out) -> Launch:
    n = dy.size
    return _plan("sparsecore_relu_backward", n, _flat(dy), _flat(y), _flat(out), np.int64(n))


def sgd_plan(p, g, lr, weight_decay) -> Launch:
    n = p.size
    args = (_flat(p), _flat(g), np.int64(n), np.float32(lr), np.float32(weight_decay))
    return _plan("sparsecore_sgd", n, *args)


def sgd_momentum_plan(p, g, v, lr, momentum, weight_decay, nesterov) -> Launch:
    n = p.size
    args = (
        _flat(p),
        _flat(g),
        _flat(v),
        np.int64(n),
        np.float32(lr),
        np.float32(momentum),
        np.float32(weight_decay),
        np.int32(bool(nesterov)),
    )
    return _plan("sparsecore_sgd_momentum", n, *args)


def adam_plan(p, g, m, v, b1, a1, b2, a2, lr_c1, c2, eps, weight_decay, decoupled, lr_wd):
    n = p.size
    args = (
        _flat(p),
        _flat(g),
        _flat(m),
        _flat(v),
        np.int64(n),
        *(np.float32(s) for s in (b1, a1, b2, a2, lr_c1, c2, eps, weight_decay)),
        np.int32(bool(decoupled)),
        np.float32(lr_wd),
    )
    return _plan("sparsecore_adam", n, *args)


def relu(x, out):
    """out = max(x, 0); out may be x."""
    _module.launch(relu_plan(x, out))
    return out


def relu_backward(dy, y, out):
    """out = dy where y > 0, else 0; out may be dy."""
    _module.launch(relu_backward_plan(dy, y, out))
    return out


def sgd(p, g, lr, weight_decay):
    """p -= lr·(g + wd·p), in place."""
    _module.launch(sgd_plan(p, g, lr, weight_decay))
    return p


def sgd_momentum(p, g, v, lr, momentum, weight_decay, nesterov):
    """One fused SGD-with-momentum pass (see elementwise.cu), p and v in place."""
    _module.launch(sgd_momentum_plan(p, g, v, lr, momentum, weight_decay, nesterov))
    return p


def adam(p, g, m, v, b1, a1, b2, a2, lr_c1, c2, eps, weight_decay, decoupled, lr_wd):
    """One fused Adam/AdamW pass (see elementwise.cu), p, m and v in place."""
    _module.launch(
        adam_plan(p, g, m, v, b1, a1, b2, a2, lr_c1, c2, eps, weight_decay, decoupled, lr_wd)
    )
    return p
