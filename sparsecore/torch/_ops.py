"""The engine's kernels as PyTorch operators (``torch.library`` custom ops).

``sparsecore::linear`` is a sparse layer's forward, feature-major like the engine:
``yT = W·xT + b`` with W (m × n) in CSR, ``xT`` (n, N) and ``yT`` (m, N) float32 C-contiguous.
Its backward (registered with ``torch.library.register_autograd``) is two more ops:
``sparsecore::linear_dx`` (dxT = Wᵀ·dyT, the race-free transposed SpMM on W's cached transpose
structure; run only when the input needs a gradient) and ``sparsecore::linear_dw`` (the SDDMM at
the stored entries, dW (nnz,), and the bias gradient in the same pass). No dense m × n tensor is
made by any of them.

Each op takes the pattern and its derived structures as tensors (``SparseLinear`` holds them as
buffers), so the ops are pure functions of their inputs, have fake (meta) implementations that
give the output shapes, and ``torch.compile`` and ``torch.jit.trace`` see them as single ops.

Where they run: CPU tensors are viewed as NumPy arrays (``Tensor.numpy()``, no copy) and go to
the Numba launchers; CUDA tensors are viewed as CuPy arrays through DLPack (no copy) and go to
the CUDA launchers on torch's current stream. The launchers trust their operands, so every op
first checks the O(1) invariants (dtypes, lengths, layout, device): a wrong call is a clear
TypeError or ValueError naming the argument, never a read out of bounds.

Float32 only. Under ``torch.autocast`` the ops' floating inputs are cast to float32
(``register_autocast``) and the result is float32: sparse products run in float32 here.
"""

import weakref

import torch
from torch import Tensor

from kernels import backend as _kb
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


class _on_stream:
    """CuPy work on torch's current CUDA stream of ``t``'s device (nothing on the CPU)."""

    def __init__(self, b, t: Tensor):
        self.ctx = None
        if b.on_device and t.device.type == "cuda":
            import cupy

            s = torch.cuda.current_stream(t.device)
            self.ctx = cupy.cuda.ExternalStream(s.cuda_stream, t.device.index)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


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
            "convert with .float(), or run under torch.autocast, which casts for you)"
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


def _check_perm(perm: Tensor, name: str, nnz: int):
    _check_index(perm, name, nnz)
    if nnz and (int(perm.min()) < 0 or int(perm.max()) >= nnz):
        raise ValueError(f"{name} must hold positions in [0, {nnz})")


def _check_blocks(blocks: Tensor, name: str, rows: int):
    """The CPU launchers' thread partition: int64 boundaries from 0 to rows, nondecreasing."""
    _check_index(blocks, name, None)
    if blocks.dtype != torch.int64 or blocks.shape[0] < 2:
        raise ValueError(f"{name} must be int64 boundaries of length >= 2")
    if int(blocks[0]) != 0 or int(blocks[-1]) != rows or bool((blocks.diff() < 0).any()):
        raise ValueError(f"{name} must run from 0 to {rows} without decreasing")


def _stamp(tensors) -> tuple | None:
    """What identifies the contents of some tensors: each one's version counter (torch bumps
    it at every in-place write) and identity (a weak reference: compared with ``is``). None
    for inference tensors, which count no versions: their patterns are checked at every call."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple(t._version for t in tensors), tuple(map(weakref.ref, tensors))


def _same(stamp, new) -> bool:
    return (
        stamp is not None
        and new is not None
        and stamp[0] == new[0]
        and all(r() is t() for r, t in zip(stamp[1], new[1], strict=True))
    )


class _Cache:
    """The checked Pattern remembered on an indptr tensor (``indptr.__dict__``). A copy of the
    tensor (``copy.deepcopy``, pickling, ``torch.save``) gets an empty cache: the copy's
    pattern is checked again when it is first used."""

    def __init__(self, stamp=None, pattern=None):
        self.stamp, self.pattern = stamp, pattern

    def __reduce__(self):
        return (_Cache, ())

    def __deepcopy__(self, memo):
        return _Cache()


PATTERN_PARTS = ("indptr", "indices", "row_blocks", "t_indptr", "t_indices", "t_perm", "col_blocks")


class Pattern:
    """A checked sparsity pattern and its derived structures, as the launchers take them.

    ``pattern(*tensors)`` builds one the first time these tensors are seen with these
    contents, after checking them in full (O(nnz)); later calls cost O(1). The launchers read the
    index tensors without bounds checks, so what they read must have been checked: the Pattern
    is remembered on the indptr tensor, stamped with the identity and version counter of every
    part. An in-place write to any part (``copy_``, ``load_state_dict``) bumps its version, and
    the next call checks again. (Writes through a NumPy or DLPack view bypass the counter, as
    they would bypass a CSR's read-only flag: that is deliberate, and then on the caller.)
    """

    def __init__(self, tensors):
        parts = dict(zip(PATTERN_PARTS, tensors, strict=True))
        indptr, indices = parts["indptr"], parts["indices"]
        t_indptr, t_indices, t_perm = parts["t_indptr"], parts["t_indices"], parts["t_perm"]
        _check_index(indptr, "indptr", None)
        _check_index(indices, "indices", None, indptr.dtype)
        _check_index(t_indptr, "t_indptr", None, indptr.dtype)
        for k, t in parts.items():
            if not isinstance(t, Tensor) or t.device != indptr.device:
                raise ValueError(f"{k} must be a tensor on {indptr.device}, got {_describe(t)}")
        self.rows, self.cols = indptr.shape[0] - 1, t_indptr.shape[0] - 1
        self.nnz = nnz = indices.shape[0]
        self.device = indptr.device
        if self.rows < 0 or self.cols < 0:
            raise ValueError("indptr and t_indptr must hold n_rows + 1 and n_cols + 1 entries")
        _check_csr(indptr, indices, self.rows, self.cols, "", canonical=True)
        _check_index(t_indices, "t_indices", nnz, indptr.dtype)
        _check_csr(t_indptr, t_indices, self.cols, self.rows, "t_", canonical=False)
        _check_perm(t_perm, "t_perm", nnz)
        self.b = backend_of(indptr)
        if not self.b.on_device:  # (a device's launchers ignore the thread partition)
            _check_blocks(parts["row_blocks"], "row_blocks", self.rows)
            _check_blocks(parts["col_blocks"], "col_blocks", self.cols)
        (self.indptr, self.indices, self.t_indptr, self.t_indices, self.t_perm) = arrays(
            self.b, indptr, indices, t_indptr, t_indices, t_perm
        )
        blocks = (parts["row_blocks"], parts["col_blocks"])
        self.row_blocks, self.col_blocks = (
            (None, None) if self.b.on_device else arrays(self.b, *blocks)
        )

    # -- the products (tensors in, tensors out; checked shapes, dtypes and devices) ----------
    def forward(self, values: Tensor, bias, xT: Tensor) -> Tensor:
        _check_float(values, "values", (self.nnz,), self.device)
        if bias is not None:
            _check_float(bias, "bias", (self.rows,), self.device)
        self._operand(xT, "xT", self.cols)
        yT = torch.empty((self.rows, xT.shape[1]), dtype=torch.float32, device=self.device)
        b = self.b
        v, x, y, bb = arrays(b, values, xT, yT, bias)
        with _on_stream(b, xT):
            b.spmm(self.indptr, self.indices, v, x, y, self.row_blocks, bias=bb)
        return yT

    def dx(self, values: Tensor, dyT: Tensor) -> Tensor:
        _check_float(values, "values", (self.nnz,), self.device)
        self._operand(dyT, "dyT", self.rows)
        dxT = torch.empty((self.cols, dyT.shape[1]), dtype=torch.float32, device=self.device)
        b = self.b
        v, dy, dx = arrays(b, values, dyT, dxT)
        with _on_stream(b, dyT):
            b.spmm_t(self.t_indptr, self.t_indices, self.t_perm, v, dy, dx, self.col_blocks)
        return dxT

    def dw(self, dyT: Tensor, xT: Tensor, with_bias: bool):
        self._operand(dyT, "dyT", self.rows)
        self._operand(xT, "xT", self.cols)
        if dyT.shape[1] != xT.shape[1]:
            raise ValueError(f"dyT and xT disagree on N: {dyT.shape[1]} vs {xT.shape[1]}")
        dw = torch.empty(self.nnz, dtype=torch.float32, device=self.device)
        db = torch.empty(self.rows if with_bias else 0, dtype=torch.float32, device=self.device)
        b = self.b
        dy, x, out, g = arrays(b, dyT, xT, dw, db)
        with _on_stream(b, dyT):
            b.sddmm(self.indptr, self.indices, dy, x, out, self.row_blocks,
                    bias_grad=g if with_bias else None)  # fmt: skip
        return dw, db

    def _operand(self, t, name, rows):
        _check_float(t, name, None, self.device)
        if t.dim() != 2 or t.shape[0] != rows:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected ({rows}, N) (feature-major)"
            )


def pattern(*tensors) -> Pattern:
    """The checked Pattern of these tensors (see Pattern), from the cache when unchanged."""
    if len(tensors) != len(PATTERN_PARTS):
        raise TypeError(f"a pattern is {len(PATTERN_PARTS)} tensors {PATTERN_PARTS}")
    indptr = tensors[0]
    if not isinstance(indptr, Tensor):
        raise TypeError(f"indptr must be a tensor, got {type(indptr).__name__}")
    key = _stamp(tensors)
    cached = indptr.__dict__.get("_sparsecore_pattern")
    if cached is not None and _same(cached.stamp, key):
        return cached.pattern
    P = Pattern(tensors)
    P.tensors = tuple(tensors)  # (strong references: what the backward saves)
    indptr.__dict__["_sparsecore_pattern"] = _Cache(key, P)
    return P


# ---------------------------------------------------------------------------- the ops
P_ARGS = "indptr, indices, row_blocks, t_indptr, t_indices, t_perm, col_blocks"


@torch.library.custom_op("sparsecore::linear", mutates_args=())
def linear(
    indptr: Tensor, indices: Tensor, row_blocks: Tensor, t_indptr: Tensor, t_indices: Tensor,
    t_perm: Tensor, col_blocks: Tensor, values: Tensor, bias: Tensor | None, xT: Tensor,
) -> Tensor:  # fmt: skip
    """yT (m, N) = W·xT + b for W (m × n) the CSR (indptr, indices, values); the transpose
    structure (t_*) and thread blocks are those of the pattern (``SparseLinear`` holds them)."""
    P = pattern(indptr, indices, row_blocks, t_indptr, t_indices, t_perm, col_blocks)
    return P.forward(values, bias, xT)


@linear.register_fake
def _(indptr, indices, row_blocks, t_indptr, t_indices, t_perm, col_blocks, values, bias, xT):
    torch._check(xT.dim() == 2, lambda: "xT must be 2-D (features, N)")
    torch._check(xT.dtype == torch.float32, lambda: f"xT must be float32, got {xT.dtype}")
    return xT.new_empty((indptr.shape[0] - 1, xT.shape[1]))


@torch.library.custom_op("sparsecore::linear_dx", mutates_args=())
def linear_dx(
    indptr: Tensor, indices: Tensor, row_blocks: Tensor, t_indptr: Tensor, t_indices: Tensor,
    t_perm: Tensor, col_blocks: Tensor, values: Tensor, dyT: Tensor,
) -> Tensor:  # fmt: skip
    """dxT (n, N) = Wᵀ·dyT through the transpose structure (race-free, no atomics)."""
    P = pattern(indptr, indices, row_blocks, t_indptr, t_indices, t_perm, col_blocks)
    return P.dx(values, dyT)


@linear_dx.register_fake
def _(indptr, indices, row_blocks, t_indptr, t_indices, t_perm, col_blocks, values, dyT):
    return dyT.new_empty((t_indptr.shape[0] - 1, dyT.shape[1]))


@torch.library.custom_op("sparsecore::linear_dw", mutates_args=())
def linear_dw(
    indptr: Tensor, indices: Tensor, row_blocks: Tensor, t_indptr: Tensor, t_indices: Tensor,
    t_perm: Tensor, col_blocks: Tensor, dyT: Tensor, xT: Tensor, with_bias: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dW (nnz,) at the stored entries in CSR order, db (m,) or empty): one SDDMM pass."""
    P = pattern(indptr, indices, row_blocks, t_indptr, t_indices, t_perm, col_blocks)
    return P.dw(dyT, xT, with_bias)


@linear_dw.register_fake
def _(indptr, indices, row_blocks, t_indptr, t_indices, t_perm, col_blocks, dyT, xT, with_bias):
    m = indptr.shape[0] - 1
    return dyT.new_empty((indices.shape[0],)), dyT.new_empty((m if with_bias else 0,))


# ---------------------------------------------------------------------------- autograd
COUNTS = {"layout_copies": 0}  # contiguous copies made by the bridge (the tests read this)


def contiguous(t: Tensor) -> Tensor:
    """``t`` as it is when C-contiguous, else a contiguous copy (counted in COUNTS)."""
    if t.is_contiguous():
        return t
    COUNTS["layout_copies"] += 1
    return t.contiguous()


def _grads(P_or_parts, values, xT, dyT, need_values, need_bias, need_x, ops: bool):
    """(d_values, d_bias, d_x) of one layer, each None where not needed; ``ops`` runs them as
    the registered ops (what torch.compile traces), else straight on the Pattern."""
    dyT = contiguous(dyT)
    d_values = d_bias = d_x = None
    if need_values:
        if ops:
            d_values, db = linear_dw(*P_or_parts, dyT, xT, need_bias)
        else:
            d_values, db = P_or_parts.dw(dyT, xT, need_bias)
        d_bias = db if need_bias else None
    elif need_bias:
        d_bias = dyT.sum(dim=1)
    if need_x:
        d_x = linear_dx(*P_or_parts, values, dyT) if ops else P_or_parts.dx(values, dyT)
    return d_values, d_bias, d_x


def _setup(ctx, inputs, output):
    *parts, values, bias, xT = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*parts, values, xT)


def _backward(ctx, dyT):
    *parts, values, xT = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_values, d_bias, d_x = _grads(
        parts, values, xT, dyT, need[7], ctx.has_bias and need[8], need[9], ops=True
    )
    return (None,) * 7 + (d_values, d_bias, d_x)


linear.register_autograd(_backward, setup_context=_setup)

for _device in ("cpu", "cuda"):  # float32 under autocast (bf16/fp16 inputs are cast up)
    torch.library.register_autocast("sparsecore::linear", _device, torch.float32)


class LinearFunction(torch.autograd.Function):
    """The eager path of ``SparseLinear``: the same products as the ops, called on a Pattern
    the layer keeps (about 10 µs per call instead of the dispatcher's ~100). Under
    ``torch.compile`` or ``torch.jit.trace`` the layer calls the registered ops instead."""

    @staticmethod
    def forward(ctx, P: Pattern, values, bias, xT):
        ctx.P = P
        ctx.has_bias = bias is not None
        # the pattern's tensors are saved too: an in-place change of any of them between this
        # forward and its backward makes the backward raise torch's "modified by an inplace
        # operation" error instead of reading a pattern that is no longer the one checked
        ctx.save_for_backward(values, xT, *P.tensors)
        return P.forward(values, bias, xT)

    @staticmethod
    def backward(ctx, dyT):
        values, xT, *_ = ctx.saved_tensors  # (torch checks the saved versions here)
        need = ctx.needs_input_grad
        d_values, d_bias, d_x = _grads(
            ctx.P, values, xT, dyT, need[1], ctx.has_bias and need[2], need[3], ops=False
        )
        return None, d_values, d_bias, d_x
