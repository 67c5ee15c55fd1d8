"""The engine's kernels as PyTorch operators (``torch.library`` custom ops).

``sparsecore::linear`` is a sparse layer's forward, feature-major like the engine:
``yT = W·xT + b`` with W (m × n) in CSR, ``xT`` (n, N) and ``yT`` (m, N) float32 C-contiguous.
Its backward (registered with ``torch.library.register_autograd``) is two more ops:
``sparsecore::linear_dx`` (dxT = Wᵀ·dyT, the race-free transposed SpMM on W's cached transpose
structure; run only when the input needs a gradient) and ``sparsecore::linear_dw`` (the SDDMM at
the stored entries, dW (nnz,), and the bias gradient in the same pass). No dense m × n tensor is
made by any of them. (The eager path, ``LinearFunction``, computes dW and dX in one pass over the
nonzeros on the CPU where that pays: ``Pattern.dw_dx``.)

Each op takes the pattern as two tensors (``indptr``, ``indices``: ``SparseLinear``'s buffers),
so the ops are pure functions of their inputs, have fake (meta) implementations that give the
output shapes, and ``torch.compile`` and ``torch.jit.trace`` see them as single ops.

The pattern the launchers read (which do no bounds checks) is a ``Pattern``: checked in full
(canonical CSR, every index in range) the first time a pair of tensors is seen with their
current contents, then held as private copies beside the derived transpose structure and CPU
thread blocks. It is remembered on the indptr tensor and rebuilt whenever either tensor's
version counter (bumped by every in-place write), identity or storage changes; a write that
bypasses the counter (through ``.data``, a NumPy or a DLPack view) cannot reach the launchers,
since they read the private copies: it takes effect at the next counted change.

Where they run: CPU tensors (values, activations, outputs) are viewed as NumPy arrays
(``Tensor.numpy()``, no copy) and go to the Numba launchers; CUDA tensors are viewed as CuPy
arrays through DLPack (no copy) and go to the CUDA launchers on torch's current stream of the
tensor's device. Every call checks the operands' O(1) invariants (dtypes, shapes, layout,
device): a wrong call is a clear TypeError or ValueError naming the argument.

Float32 only. Under ``torch.autocast`` the ops' floating inputs are cast to float32
(``register_autocast``) and the result is float32: sparse products run in float32 here.
"""

import threading
import weakref

import numpy as np
import torch
from torch import Tensor

from kernels import backend as _kb
from kernels.cpu import backward as _cpu_backward
from kernels.cpu import fpmode as _fp
from kernels.cpu._common import row_blocks as _row_blocks
from kernels.cpu.structure import transpose as _cpu_transpose
from kernels.cuda import structure as _cuda_structure
from kernels.validation import require_gpu

INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------- tensors <-> arrays
def backend_of(t: Tensor):
    """The kernels' Backend for a tensor's device: the CPU launchers, or the CUDA ones (which
    need CuPy: else the one install error)."""
    kind = t.device.type
    if kind == "cpu":
        return _kb.get_backend("cpu")
    if kind == "cuda":
        require_gpu("a CUDA tensor", lead="sparsecore.torch on CUDA tensors needs CuPy")
        return _kb.get_backend("cuda")
    raise TypeError(f"sparsecore.torch runs on CPU and CUDA tensors, got a tensor on {t.device}")


def arrays(b, *tensors):
    """Zero-copy NumPy (CPU) or CuPy (CUDA, DLPack) views of tensors (None stays None)."""
    if not b.on_device:
        return [None if t is None else t.detach().numpy() for t in tensors]
    xp = b.xp
    return [None if t is None else xp.from_dlpack(t.detach()) for t in tensors]


FLUSH_DENORMALS = True  # the CPU products run with FTZ/DAZ, as the engine's training does


class _flushing:
    """FTZ/DAZ (subnormal floats computed as 0) on the calling thread while a CPU product runs,
    its own mode restored after: x86 computes on subnormals through a microcode assist 10-100×
    slower, and training makes them (kernels/cpu/fpmode.py; the engine's Trainer flushes for the
    whole run). Under Numba's tbb layer the kernel threads take the caller's mode at each call;
    under omp only the calling thread's share is flushed. ``FLUSH_DENORMALS = False`` keeps
    IEEE subnormals. About 1 µs per call; nothing on a device."""

    __slots__ = ("old",)

    def __init__(self, b):
        self.old = None if (b.on_device or not FLUSH_DENORMALS or not _fp.X86) else -1

    def __enter__(self):
        if self.old is not None:
            self.old = int(_fp._update_here(_fp.FTZ_DAZ, 0))

    def __exit__(self, *exc):
        if self.old is not None:
            keep = self.old & _fp.FTZ_DAZ
            _fp._update_here(keep, _fp.FTZ_DAZ & ~keep)


class _on_stream:
    """CuPy work on ``t``'s CUDA device and torch's current stream there (nothing on the
    CPU): kernels, CuPy allocations and the launchers' device choice all follow ``t``."""

    def __init__(self, b, t: Tensor):
        self.ctxs = []
        if b.on_device and t.device.type == "cuda":
            import cupy

            index = t.device.index if t.device.index is not None else torch.cuda.current_device()
            s = torch.cuda.current_stream(index)
            self.ctxs = [cupy.cuda.Device(index), cupy.cuda.ExternalStream(s.cuda_stream, index)]

    def __enter__(self):
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


# ---------------------------------------------------------------------------- O(1) checks
def _check_index(t: Tensor, name: str, length: int | None, dtype=None):
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise TypeError(f"{name} must be a 1-D integer tensor, got {_describe(t)}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of indptr ({dtype}), got {t.dtype}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} has length {t.shape[0]}, expected {length}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_float(t: Tensor, name: str, shape: tuple | None, device):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(
            f"{name} must be float32, got {t.dtype} (sparsecore's kernels compute in float32: "
            "convert with .float())"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the layer's weight is on {device}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be C-contiguous (feature-major: {name} is (features, N))")


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dim()}-D {t.dtype} tensor"
    return type(t).__name__


def _check_csr(indptr: Tensor, indices: Tensor, rows: int, cols: int, name: str, canonical: bool):
    """O(nnz), on the tensors' device: indptr runs from 0 to nnz without decreasing, every
    column index lies in [0, cols), and (canonical) they rise strictly within each row."""
    nnz = indices.shape[0]
    if indptr.shape[0] != rows + 1:
        raise ValueError(f"{name}indptr has length {indptr.shape[0]}, expected {rows + 1}")
    first, last = int(indptr[0]), int(indptr[rows])
    if first != 0 or last != nnz:
        raise ValueError(f"{name}indptr must run from 0 to nnz = {nnz}, got {first} .. {last}")
    counts = indptr.diff()
    if rows and bool((counts < 0).any()):
        raise ValueError(f"{name}indptr must be nondecreasing")
    if not nnz:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= cols:
        raise ValueError(f"{name}indices must lie in [0, {cols}), got values in [{lo}, {hi}]")
    if canonical and nnz > 1:
        row = torch.repeat_interleave(torch.arange(rows, device=indices.device), counts)
        same_row = row[1:] == row[:-1]
        if bool((same_row & (indices[1:] <= indices[:-1])).any()):
            raise ValueError(
                f"{name}indices must rise strictly within each row (sorted, no duplicates)"
            )


def _stamp(indptr: Tensor, indices: Tensor, cols: int):
    """What identifies a pattern's contents: both tensors' version counters (torch bumps them
    at every in-place write), storages and identities (the latter by weak reference, compared
    with ``is``). None for inference tensors, which count no versions: checked at every call."""
    if indptr.is_inference() or indices.is_inference():
        return None
    return (
        (cols, indptr._version, indices._version, indptr.data_ptr(), indices.data_ptr()),
        weakref.ref(indices),
    )


class _Cache:
    """A checked Pattern remembered on its indptr tensor (``indptr.__dict__``). A copy of the
    tensor (``copy.deepcopy``, pickling, ``torch.save``) gets an empty cache: the copy's
    pattern is checked again when first used. Holds no reference to the tensors (no cycle)."""

    def __init__(self, stamp=None, pattern=None):
        self.stamp, self.pattern = stamp, pattern

    def hit(self, indices, stamp) -> bool:
        return (
            stamp is not None
            and self.stamp is not None
            and self.stamp[0] == stamp[0]
            and self.stamp[1]() is indices
        )

    def __reduce__(self):
        return (_Cache, ())

    def __deepcopy__(self, memo):
        return _Cache()


class Pattern:
    """A checked sparsity pattern (m × n) as the launchers take it: private copies of indptr
    and indices, the transpose structure (t_indptr, t_indices, t_perm) and, on the CPU, the
    row and column thread blocks. Build through ``pattern(indptr, indices, n_cols)``."""

    def __init__(self, indptr: Tensor, indices: Tensor, cols: int):
        _check_index(indptr, "indptr", None)
        _check_index(indices, "indices", None, indptr.dtype)
        if indices.device != indptr.device:
            raise ValueError(f"indices is on {indices.device}, but indptr is on {indptr.device}")
        if not isinstance(cols, int) or cols < 0:
            raise ValueError(f"n_cols must be a non-negative int, got {cols!r}")
        self.rows, self.cols = indptr.shape[0] - 1, cols
        self.nnz = indices.shape[0]
        self.device = indptr.device
        self._scratch_lock = threading.Lock()
        if self.rows < 0:
            raise ValueError("indptr must hold n_rows + 1 >= 1 entries, got 0")
        b = self.b = backend_of(indptr)
        with _on_stream(b, indptr):
            # private copies first, then the check of what was copied: what the launchers
            # read is exactly what was checked, whatever later writes reach the tensors
            ip, ix = (a.copy() for a in arrays(b, indptr, indices))
            _check_csr(_back(ip, indptr), _back(ix, indices), self.rows, cols, "", canonical=True)
            self.indptr, self.indices = ip, ix
            if b.on_device:
                self.t_indptr, self.t_indices, self.t_perm = _cuda_structure.transpose(ip, ix, cols)
                self.row_blocks = self.col_blocks = None  # (ignored by the device launchers)
            else:
                self.t_indptr, self.t_indices, self.t_perm = _cpu_transpose(ip, ix, cols)
                self.row_blocks = _row_blocks(ip, self.rows)
                self.col_blocks = _row_blocks(self.t_indptr, cols)
            for a, name in ((self.t_perm, "t_perm"), (self.t_indices, "t_indices")):
                if a.dtype != ip.dtype:
                    raise RuntimeError(
                        f"the transpose's {name} has dtype {a.dtype}, not {ip.dtype}"
                    )

    _t_data = None  # (the CPU spmm_t's gathered values: nnz floats, allocated at first use)

    def csr_arrays(self):
        """(indptr, indices) the launchers read (private: never to be written)."""
        return self.indptr, self.indices

    # -- the products (tensors in, tensors out; checked shapes, dtypes and devices) ----------
    def forward(self, values: Tensor, bias, xT: Tensor, relu: bool = False) -> Tensor:
        """yT = W·xT + b (then max(·, 0) in the same pass with ``relu``)."""
        _check_float(values, "values", (self.nnz,), self.device)
        if bias is not None:
            _check_float(bias, "bias", (self.rows,), self.device)
        self._operand(xT, "xT", self.cols)
        yT = torch.empty((self.rows, xT.shape[1]), dtype=torch.float32, device=self.device)
        b = self.b
        with _on_stream(b, xT), _flushing(b):
            v, x, y, bb = arrays(b, values, xT, yT, bias)
            b.spmm(self.indptr, self.indices, v, x, y, self.row_blocks, bias=bb, relu=relu)
        return yT

    def relu_grad(self, dyT: Tensor, yT: Tensor) -> Tensor:
        """The gradient before a fused ReLU: dyT where yT > 0, else 0 (one pass)."""
        out = torch.empty_like(dyT)
        b = self.b
        with _on_stream(b, dyT), _flushing(b):
            dy, y, o = arrays(b, dyT, yT, out)
            b.ew.relu_backward(dy, y, o)
        return out

    def dx(self, values: Tensor, dyT: Tensor) -> Tensor:
        _check_float(values, "values", (self.nnz,), self.device)
        self._operand(dyT, "dyT", self.rows)
        dxT = torch.empty((self.cols, dyT.shape[1]), dtype=torch.float32, device=self.device)
        b = self.b
        # the CPU gather's scratch (nnz floats) is kept; a second thread in dx at the same
        # time gets its own (the GIL may switch between the gather and the product)
        mine = not b.on_device and self._scratch_lock.acquire(blocking=False)
        try:
            t_data = None
            if mine:
                if self._t_data is None:
                    self._t_data = np.empty(self.nnz, np.float32)
                t_data = self._t_data
            with _on_stream(b, dyT), _flushing(b):
                v, dy, dx = arrays(b, values, dyT, dxT)
                b.spmm_t(self.t_indptr, self.t_indices, self.t_perm, v, dy, dx, self.col_blocks,
                         t_data)  # fmt: skip
        finally:
            if mine:
                self._scratch_lock.release()
        return dxT

    def _dw_outputs(self, dyT: Tensor, xT: Tensor, with_bias: bool):
        """dyT and xT checked as dW's operands; dW (nnz,) and d bias ((m,) or (0,)) allocated."""
        self._operand(dyT, "dyT", self.rows)
        self._operand(xT, "xT", self.cols)
        if dyT.shape[1] != xT.shape[1]:
            raise ValueError(f"dyT and xT disagree on N: {dyT.shape[1]} vs {xT.shape[1]}")
        dw = torch.empty(self.nnz, dtype=torch.float32, device=self.device)
        db = torch.empty(self.rows if with_bias else 0, dtype=torch.float32, device=self.device)
        return dw, db

    def dw(self, dyT: Tensor, xT: Tensor, with_bias: bool):
        dw, db = self._dw_outputs(dyT, xT, with_bias)
        b = self.b
        with _on_stream(b, dyT), _flushing(b):
            dy, x, out, g = arrays(b, dyT, xT, dw, db)
            b.sddmm(self.indptr, self.indices, dy, x, out, self.row_blocks,
                    bias_grad=g if with_bias else None)  # fmt: skip
        return dw, db

    def fused_backward_pays(self) -> bool:
        """Whether dW and dX come faster from one pass over the nonzeros (the CPU's fused
        backward, kernels/cpu/backward.py: while dW's scattered writes stay in L2)."""
        return not self.b.on_device and _cpu_backward.fused_pays(self.nnz)

    def dw_dx(self, values: Tensor, dyT: Tensor, xT: Tensor, with_bias: bool):
        """(dW, d bias, dxT) in one pass over the nonzeros, column by column (CPU): each dY row
        is loaded once for both products. Used where fused_backward_pays()."""
        if self.b.on_device:
            raise RuntimeError(
                "Pattern.dw_dx is the CPU's fused pass; a device Pattern uses dw and dx"
            )
        _check_float(values, "values", (self.nnz,), self.device)
        dw, db = self._dw_outputs(dyT, xT, with_bias)
        dxT = torch.empty((self.cols, dyT.shape[1]), dtype=torch.float32, device=self.device)
        b = self.b
        with _flushing(b):
            v, dy, x, out, g, dx = arrays(b, values, dyT, xT, dw, db, dxT)
            _cpu_backward.backward(self.t_indptr, self.t_indices, self.t_perm, v, dy, x, out, dx,
                                   self.col_blocks, bias_grad=g if with_bias else None)  # fmt: skip
        return dw, db, dxT

    def _operand(self, t, name, rows):
        _check_float(t, name, None, self.device)
        if t.dim() != 2 or t.shape[0] != rows:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected ({rows}, N) (feature-major)"
            )


def _back(a, like: Tensor) -> Tensor:
    """A tensor over a launcher-side array (no copy), on ``like``'s device."""
    return torch.from_numpy(a) if like.device.type == "cpu" else torch.from_dlpack(a)


def pattern(indptr: Tensor, indices: Tensor, cols: int) -> Pattern:
    """The checked Pattern of (indptr, indices) with ``cols`` columns, from the cache when
    neither tensor changed (O(1)), else checked and built (O(nnz + cols))."""
    if not isinstance(indptr, Tensor) or not isinstance(indices, Tensor):
        raise TypeError(
            f"indptr and indices must be tensors, got {_describe(indptr)}, {_describe(indices)}"
        )
    stamp = _stamp(indptr, indices, cols)
    cache = indptr.__dict__.get("_sparsecore_pattern")
    if cache is not None and cache.hit(indices, stamp):
        return cache.pattern
    P = Pattern(indptr, indices, cols)
    indptr.__dict__["_sparsecore_pattern"] = _Cache(stamp, P)
    return P


# ---------------------------------------------------------------------------- the ops
def _n_cols(xT, name: str) -> int:
    """W's column count from a feature-major operand (n, N), checked 2-D first."""
    if not isinstance(xT, Tensor) or xT.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (features, N) tensor, got {_describe(xT)}")
    return xT.shape[0]


def _same_device(*tensors):
    """Every tensor on one device (the fake kernels' check: a meta pattern beside real
    operands would otherwise be dispatched to them and return an unwritten result)."""
    devices = {t.device for t in tensors if t is not None}
    torch._check(len(devices) == 1, lambda: f"the op's tensors are on several devices {devices}")


@torch.library.custom_op("sparsecore::linear", mutates_args=())
def linear(
    indptr: Tensor, indices: Tensor, values: Tensor, bias: Tensor | None, xT: Tensor,
    relu: bool = False,
) -> Tensor:  # fmt: skip
    """yT (m, N) = W·xT + b for W (m × n) the CSR (indptr, indices, values), n = xT's rows;
    ``relu``: max(W·xT + b, 0) in the same pass."""
    return pattern(indptr, indices, _n_cols(xT, "xT")).forward(values, bias, xT, relu)


@linear.register_fake
def _(indptr, indices, values, bias, xT, relu=False):
    _same_device(indptr, indices, values, bias, xT)
    torch._check(xT.dim() == 2, lambda: "xT must be 2-D (features, N)")
    torch._check(xT.dtype == torch.float32, lambda: f"xT must be float32, got {xT.dtype}")
    return xT.new_empty((indptr.shape[0] - 1, xT.shape[1]))


@torch.library.custom_op("sparsecore::linear_dx", mutates_args=())
def linear_dx(indptr: Tensor, indices: Tensor, values: Tensor, dyT: Tensor, n_cols: int) -> Tensor:
    """dxT (n_cols, N) = Wᵀ·dyT through the transpose structure (race-free, no atomics)."""
    return pattern(indptr, indices, n_cols).dx(values, dyT)


@linear_dx.register_fake
def _(indptr, indices, values, dyT, n_cols):
    _same_device(indptr, indices, values, dyT)
    return dyT.new_empty((n_cols, dyT.shape[1]))


@torch.library.custom_op("sparsecore::linear_dw", mutates_args=())
def linear_dw(
    indptr: Tensor, indices: Tensor, dyT: Tensor, xT: Tensor, with_bias: bool
) -> tuple[Tensor, Tensor]:
    """(dW (nnz,) at the stored entries in CSR order, db (m,) or empty): one SDDMM pass."""
    return pattern(indptr, indices, _n_cols(xT, "xT")).dw(dyT, xT, with_bias)


@linear_dw.register_fake
def _(indptr, indices, dyT, xT, with_bias):
    _same_device(indptr, indices, dyT, xT)
    m = indptr.shape[0] - 1
    return dyT.new_empty((indices.shape[0],)), dyT.new_empty((m if with_bias else 0,))


# ---------------------------------------------------------------------------- autograd
COUNTS = {"layout_copies": 0}  # contiguous copies made by the bridge (the tests read this)


def count_copy():
    """One layout copy more (not counted while torch.compile traces: a counter there would
    be a guard that fails at every call)."""
    if not torch.compiler.is_compiling():
        COUNTS["layout_copies"] += 1


def contiguous(t: Tensor) -> Tensor:
    """``t`` as it is when C-contiguous, else a contiguous copy (counted in COUNTS)."""
    if t.is_contiguous():
        return t
    count_copy()
    return t.contiguous()


def _grads(P, parts, values, xT, dyT, need_values, need_bias, need_x):
    """(d_values, d_bias, d_x) of one layer, each None where not needed: straight on the
    Pattern P (eager), or as the registered ops on the pattern tensors ``parts`` (what
    torch.compile traces) when P is None."""
    dyT = contiguous(dyT)
    d_values = d_bias = d_x = None
    if P is not None and need_values and need_x and P.fused_backward_pays():
        d_values, db, d_x = P.dw_dx(values, dyT, xT, need_bias)  # one pass for both
        return d_values, db if need_bias else None, d_x
    if need_values:
        if P is None:
            d_values, db = linear_dw(*parts, dyT, xT, need_bias)
        else:
            d_values, db = P.dw(dyT, xT, need_bias)
        d_bias = db if need_bias else None
    elif need_bias:
        d_bias = dyT.sum(dim=1)
    if need_x:
        n = xT.shape[0]
        d_x = linear_dx(*parts, values, dyT, n) if P is None else P.dx(values, dyT)
    return d_values, d_bias, d_x


def _setup(ctx, inputs, output):
    indptr, indices, values, bias, xT, relu = inputs
    ctx.has_bias, ctx.relu = bias is not None, relu
    ctx.save_for_backward(indptr, indices, values, xT, output if relu else None)


def _backward(ctx, dyT):
    indptr, indices, values, xT, yT = ctx.saved_tensors
    need = ctx.needs_input_grad
    if ctx.relu:  # (through the fused ReLU first)
        dyT = torch.where(yT > 0, dyT, torch.zeros((), dtype=dyT.dtype, device=dyT.device))
    d_values, d_bias, d_x = _grads(
        None, (indptr, indices), values, xT, dyT, need[2], ctx.has_bias and need[3], need[4]
    )
    return None, None, d_values, d_bias, d_x, None


linear.register_autograd(_backward, setup_context=_setup)

for _device in ("cpu", "cuda"):  # float32 under autocast (bf16/fp16 inputs are cast up)
    torch.library.register_autocast("sparsecore::linear", _device, torch.float32)


class LinearFunction(torch.autograd.Function):
    """The eager path of ``SparseLinear``: the same products as the ops, called on the layer's
    Pattern (a few µs per call instead of the dispatcher's ~100). Under ``torch.compile`` or
    ``torch.jit.trace`` the layer calls the registered ops instead."""

    @staticmethod
    def forward(ctx, P: Pattern, values, bias, xT, indptr, indices, relu=False):
        ctx.P = P
        ctx.has_bias, ctx.relu = bias is not None, relu
        yT = P.forward(values, bias, xT, relu)
        # the pattern's tensors are saved too: an in-place change of either between this
        # forward and its backward makes the backward raise torch's "modified by an inplace
        # operation" error instead of silently using the forward's pattern
        ctx.save_for_backward(values, xT, indptr, indices, yT if relu else None)
        return yT

    @staticmethod
    def backward(ctx, dyT):
        values, xT, _, _, yT = ctx.saved_tensors  # (torch checks the saved versions here)
        need = ctx.needs_input_grad
        if ctx.relu:  # (through the fused ReLU first: one pass)
            dyT = ctx.P.relu_grad(contiguous(dyT), yT)
        d_values, d_bias, d_x = _grads(
            ctx.P, None, values, xT, dyT, need[1], ctx.has_bias and need[2], need[3]
        )
        return None, d_values, d_bias, d_x, None, None, None
