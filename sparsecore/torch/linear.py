"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is a CSR of nnz trainable values.

What it holds (every tensor nnz- or dimension-sized, never out × in):

- ``values``: the one ``nn.Parameter``, shape (nnz,), the stored weights in CSR order;
- ``bias``: an ``nn.Parameter`` (out_features,) or None;
- buffers ``indptr`` (out + 1,) and ``indices`` (nnz,): the pattern (in the state_dict);
- the checked pattern the kernels read (``pattern()``, sparsecore/torch/_ops.py's Pattern):
  private copies of the two buffers with the transpose structure and the CPU thread blocks,
  built once per pattern (per change of the buffers, per device) and cached.

Layout: the kernels are feature-major (a (features, N) C-contiguous activation, so each nonzero
reads one contiguous row of the batch). ``forward`` takes ``(*, in_features)`` like
``nn.Linear`` and hands the kernel ``x.T`` without a copy when that is contiguous; it returns
the (N, out) result as the transpose *view* of the feature-major (out, N) output. Elementwise
ops between layers (ReLU, GELU, dropout, residual adds of such tensors) keep those strides, so a
chain of sparse layers makes no layout copy; a batch-major input (from an embedding, attention,
a dense layer) costs one transposed copy, counted in ``sparsecore.torch.layout_copies()``.
"""

from __future__ import annotations

import math
import warnings
import weakref

import numpy as np
import torch
from torch import Tensor, nn

from kernels.formats import CSR, as_csr
from kernels.validation import index_dtype_for
from sparsecore.layers import sparse_init
from sparsecore.torch import _ops

INITS = ("sparse", "dense")
_AUTOCAST_SAID = []


def _check_sparsity(sparsity, density):
    if density is None:
        if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        density = 1.0 - float(sparsity)
    elif not (isinstance(density, (int, float)) and 0.0 <= density <= 1.0):
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    return float(density)


def _seed_from_torch() -> list[int]:
    """A seed drawn from torch's default generator (so ``torch.manual_seed`` fixes it)."""
    return [int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))]


class SparseModule(nn.Module):
    """What the RigL scheduler needs of a sparse layer type (SparseLinear; convolutions later):
    a pattern it can read as a CSR (``csr()``), replace in place (``set_pattern``), and the
    feature-major input and output gradient of the batches it was armed to record."""

    values: nn.Parameter

    def _init_recording(self):
        self._record: list | None = None  # [[xT, dyT or None], ...] while armed

    def arm(self, on: bool):
        """Record (on) or stop recording (off) each forward's input and output gradient; off
        lets go of what was recorded (the hooks the graph keeps hold empty slots)."""
        for slot in self._record or ():
            slot[:] = [None, None, None]
        self._record = [] if on else None

    def recorded(self):
        """(xT, dyT) of the recorded batches, concatenated along N: the accumulated batch's
        input and output gradient, feature-major (copies only when several were recorded)."""
        rec = [(x, dy) for x, dy, _ in (self._record or []) if dy is not None]
        if not rec:
            return None, None
        if len(rec) == 1:
            return rec[0]
        return torch.cat([x for x, _ in rec], dim=1), torch.cat([dy for _, dy in rec], dim=1)

    def _remember(self, xT: Tensor, yT: Tensor, relu: bool = False):
        if self._record is None or not yT.requires_grad:
            return
        # [input, output gradient, the fused ReLU's output]: the hook, which the graph keeps,
        # reaches yT only through the slot, which arm(False) empties (no cycle through yT's
        # own hook, which Python's collector could not see)
        slot = [xT, None, yT if relu else None]
        self._record.append(slot)

        def hook(g, slot=slot):  # several backward passes through one forward: their sum
            if slot[2] is not None:  # (the gradient before a fused ReLU: what dL/dW is made of)
                g = torch.where(slot[2] > 0, g, torch.zeros((), dtype=g.dtype, device=g.device))
            slot[1] = _ops.contiguous(g) if slot[1] is None else slot[1] + g

        yT.register_hook(hook)

    def __getstate__(self):
        # (copies and pickles of the module carry no recorded batch: it holds graph tensors)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_record"] = None
        return state


class SparseLinear(SparseModule):
    """y = x·Wᵀ + b with W (out_features × in_features) stored as CSR.

    ``SparseLinear(in_features, out_features, bias=True, sparsity=0.9)`` draws a uniformly
    random pattern of round(density·out·in) entries and Kaiming-uniform values scaled by each
    row's own number of inputs (``init="sparse"``, the engine's init; ``"dense"`` scales by
    in_features as a dense layer would). The bias starts as ``nn.Linear``'s does. ``seed``
    (an int or ints) fixes the draw; None draws the seed from torch's generator.
    ``activation="relu"`` applies a ReLU in the same kernel pass (y = max(x·Wᵀ + b, 0); its
    backward masks the gradient in one pass): what ``sparsify`` makes of ``Linear`` + ``ReLU``.

    float32 only; CPU tensors run the Numba kernels, CUDA tensors the CUDA kernels (CuPy).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        sparsity: float = 0.9,
        *,
        density: float | None = None,
        init: str = "sparse",
        seed=None,
        activation: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if dtype not in (None, torch.float32):
            raise TypeError(f"SparseLinear computes in float32, got dtype={dtype}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.in_features, self.out_features = in_features, out_features
        density = _check_sparsity(sparsity, density)
        seed = _seed_from_torch() if seed is None else seed
        W = sparse_init(in_features, out_features, density, seed, fan_in=init)
        self._init_recording()
        self.activation = _check_activation(activation)
        self._install(W, device)
        if bias:
            bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
            b = torch.empty(out_features, dtype=torch.float32, device=device)
            self.bias = nn.Parameter(b.uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_csr(cls, W, bias=None, *, device=None, activation=None) -> SparseLinear:
        """A layer with the given weight: a ``sparsecore.CSR`` or a scipy.sparse matrix
        (out × in, checked) and an optional bias (array or tensor of out_features)."""
        W = as_csr(W, "W")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = W.shape
        self._init_recording()
        self.activation = _check_activation(activation)
        self._install(W, device)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            b = torch.as_tensor(np.asarray(bias, dtype=np.float32) if not isinstance(bias, Tensor)
                                else bias.detach(), dtype=torch.float32)  # fmt: skip
            if tuple(b.shape) != (W.shape[0],):
                raise ValueError(f"bias has shape {tuple(b.shape)}, expected ({W.shape[0]},)")
            self.bias = nn.Parameter(b.clone().to(device))
        return self

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, sparsity: float, *, init: str = "magnitude", seed=None
    ) -> SparseLinear:
        """A SparseLinear from an ``nn.Linear``: its round(density·out·in) largest-|w| entries
        (``init="magnitude"``, ties to the lower flat index), or a uniformly random pattern
        holding the dense layer's own values there (``init="random"``); the bias is copied.
        (The dense weight exists already: this converts a model, it does not avoid it.)"""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if init not in ("magnitude", "random"):
            raise ValueError(f"init must be 'magnitude' or 'random', got {init!r}")
        density = _check_sparsity(sparsity, None)
        w = linear.weight.detach().to("cpu", torch.float32).numpy()
        m, n = w.shape
        k = int(round(density * m * n))
        if init == "magnitude":
            flat = np.argsort(-np.abs(w).reshape(-1), kind="stable")[:k]
        else:
            rng = np.random.default_rng(_seed_from_torch() if seed is None else seed)
            flat = rng.choice(m * n, size=k, replace=False)
        flat = np.sort(flat)
        W = _csr_from_flat(flat, w.reshape(-1)[flat], (m, n))
        b = None if linear.bias is None else linear.bias.detach().cpu()
        return cls.from_csr(W, b, device=linear.weight.device)

    def _install(self, W: CSR, device=None):
        """Register the parameter and buffers of weight W (a host CSR)."""
        dev = torch.get_default_device() if device is None else torch.device(device)
        self.values = nn.Parameter(torch.from_numpy(np.array(W.data)).to(dev))
        self.register_buffer("indptr", torch.from_numpy(np.array(W.indptr)).to(dev))
        self.register_buffer("indices", torch.from_numpy(np.array(W.indices)).to(dev))

    # ------------------------------------------------------------------ views
    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        size = self.out_features * self.in_features
        return self.nnz / size if size else 0.0

    @property
    def weight(self) -> Tensor:
        """The weight as a ``torch.sparse_csr`` tensor (out × in) sharing the values' memory
        (detached: the trainable parameter is ``values``); its index tensors are copies of the
        checked pattern's (``pattern()``), not the buffers themselves."""
        P = self.pattern()
        dev = self.values.device
        ip, ix = (_ops._back(a.copy(), self.indptr) for a in P.csr_arrays())
        with warnings.catch_warnings():  # ("sparse CSR support is in beta")
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                ip.to(dev),
                ix.to(dev),
                self.values.detach(),
                (self.out_features, self.in_features),
                check_invariants=False,
            )  # fmt: skip  (checked: it is the Pattern's)

    def to_dense(self) -> Tensor:
        """The weight as a dense (out_features, in_features) tensor (a copy: out·in floats)."""
        return self.weight.to_dense()

    def parts(self) -> tuple:
        """The pattern tensors the ops take: (indptr, indices)."""
        b = self._buffers
        return b["indptr"], b["indices"]

    def pattern(self) -> _ops.Pattern:
        """The checked pattern the kernels read (O(1) while the buffers are unchanged)."""
        b = self._buffers
        return _ops.pattern(b["indptr"], b["indices"], self.in_features)

    def csr(self) -> CSR:
        """The weight as a ``sparsecore.CSR`` over the layer's own memory (CPU tensors only;
        the values are shared, writes to them are the layer's)."""
        if self.values.device.type != "cpu":
            raise ValueError("csr() views CPU tensors; this layer is on " + str(self.values.device))
        P = self.pattern()
        return CSR._trusted(
            P.indptr.copy(),
            P.indices.copy(),
            self.values.detach().numpy(),
            (self.out_features, self.in_features),
        )  # fmt: skip  (copies: the CSR marks its arrays read-only)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nnz={self.nnz}, density={self.density:.4g}"
            + (f", activation={self.activation!r}" if self.activation else "")
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        n = self.in_features
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != n:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (*, {n}) (in_features = {n})")
        if x.device != self.values.device:
            raise ValueError(
                f"x is on {x.device}, but this layer's weights are on {self.values.device}"
            )
        x = self._float32(x)
        lead = x.shape[:-1]
        xT = _shared_feature_major(x, n)
        indptr, indices = self.parts()
        relu = self.activation == "relu"
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            yT = torch.ops.sparsecore.linear(indptr, indices, self.values, self.bias, xT, relu)
        else:
            P = self.pattern()
            yT = _ops.LinearFunction.apply(P, self.values, self.bias, xT, indptr, indices, relu)
        self._remember(xT, yT, relu)
        y = yT.T
        return y if x.dim() == 2 else y.view(*lead, self.out_features)

    def _float32(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return x
        if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float16, torch.bfloat16):
            if not _AUTOCAST_SAID:
                _AUTOCAST_SAID.append(True)
                warnings.warn(
                    f"sparsecore.torch: SparseLinear computes in float32 under autocast (got "
                    f"{x.dtype} input; its output is float32)",
                    stacklevel=3,
                )
            return x.float()
        raise TypeError(
            f"SparseLinear takes float32 input, got {x.dtype} (convert with .float(); under "
            "torch.autocast half inputs are computed in float32)"
        )

    # ------------------------------------------------------------------ topology
    def set_pattern(self, indptr, indices, values):
        """Replace the pattern and values in place (same nnz: the Parameter object stays, and
        so does an optimizer's reference to it); the arrays must be canonical CSR (checked)."""
        ip = torch.as_tensor(indptr)
        ix = torch.as_tensor(indices)
        v = torch.as_tensor(values)
        for name, t in (("indptr", ip), ("indices", ix), ("values", v)):
            if t.dim() != 1:
                raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if ix.shape[0] != self.nnz or v.shape[0] != self.nnz:
            raise ValueError(f"the new pattern holds {ix.shape[0]} entries, this layer {self.nnz}")
        _ops._check_csr(
            ip.to("cpu"), ix.to("cpu"), self.out_features, self.in_features, "", canonical=True
        )
        with torch.no_grad():
            self.indptr.copy_(ip)
            self.indices.copy_(ix)
            self.values.copy_(v)

    # ------------------------------------------------------------------ state_dict
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        keys = {k: prefix + k for k in ("indptr", "indices", "values")}
        present = {k: state_dict[p] for k, p in keys.items() if p in state_dict}
        if not present:  # (torch reports the missing keys)
            problem = None
        elif len(present) < 3:
            problem = (
                f"{prefix}indptr, {prefix}indices and {prefix}values load together (a pattern "
                f"and its values), but only {sorted(keys[k] for k in present)} are given"
            )
        else:
            problem = self._check_loaded(present, prefix)
        if problem is None:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                error_msgs,
            )  # fmt: skip
        else:  # nothing of this layer's pattern is copied; the rest (bias) loads as usual
            rest = {k: v for k, v in state_dict.items() if k not in keys.values()}
            super()._load_from_state_dict(
                rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            for p in keys.values():
                if p in missing_keys and p in state_dict:
                    missing_keys.remove(p)
            error_msgs.append(problem)

    def _check_loaded(self, d: dict, prefix: str) -> str | None:
        """Why a loaded (untrusted) pattern cannot be this layer's, or None."""
        m, n = self.out_features, self.in_features
        ip, ix, v = d["indptr"], d["indices"], d["values"]
        for k, t in (("indptr", ip), ("indices", ix), ("values", v)):
            if not isinstance(t, Tensor) or t.dim() != 1:
                return f"{prefix}{k}: expected a 1-D tensor, got {_ops._describe(t)}"
        if v.shape[0] != self.nnz or ix.shape[0] != v.shape[0]:
            return (
                f"{prefix}values: the checkpoint's layer holds {v.shape[0]} nonzeros "
                f"({ix.shape[0]} indices), this layer {self.nnz}: nnz must match (build the "
                f"layer with the checkpoint's sparsity, or from its pattern with from_csr)"
            )
        if ip.dtype not in _ops.INDEX_DTYPES or ix.dtype not in _ops.INDEX_DTYPES:
            return f"{prefix}indptr/indices: expected int32 or int64, got {ip.dtype}, {ix.dtype}"
        if not v.dtype.is_floating_point:
            return f"{prefix}values: expected floating-point values, got {v.dtype}"
        try:
            _ops._check_csr(ip.to("cpu"), ix.to("cpu"), m, n, f"{prefix}", canonical=True)
        except ValueError as e:
            return f"{prefix}indptr/indices: not a valid ({m} × {n}) CSR pattern: {e}"
        if not bool(torch.isfinite(v).all()):
            return f"{prefix}values: must be finite, but they hold NaN or inf"
        return None


ACTIVATIONS = (None, "relu")


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


_LAST_COPY: list = [None]  # (weakref to x, x's stamp, weakref to its feature-major copy)


def _shared_feature_major(x: Tensor, n: int) -> Tensor:
    """x (*, n) as the contiguous (n, N) the kernels take. When a copy of an op's output (a
    tensor with a grad_fn, under grad mode) is needed it is kept (weakly) for the next layer
    given the very same tensor at the same version: attention's q, k and v projections of one
    LayerNorm output share one transposed copy (one made, one saved for backward) instead of
    three. Leaves (inputs, NumPy-backed buffers) are copied at every call; nothing is shared
    while torch.compile traces (it sees plain ops there)."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or x.grad_fn is None  # (only an op's output: a leaf may be refilled behind torch's
        or not torch.is_grad_enabled()  # back, e.g. through NumPy, and carries no graph)
    ):
        return _ops.contiguous(x.T) if x.dim() == 2 else _feature_major(x, n)
    stamp = (x.data_ptr(), tuple(x.shape), x.stride(), x.device, x.dtype, x._version)
    last = _LAST_COPY[0]
    if last is not None and last[0]() is x and last[1] == stamp:
        xT = last[2]()
        if xT is not None:
            return xT
    xT = _ops.contiguous(x.T) if x.dim() == 2 else _feature_major(x, n)
    if xT.data_ptr() != x.data_ptr():  # (a copy was made: worth sharing)
        _LAST_COPY[0] = (weakref.ref(x), stamp, weakref.ref(xT))
    return xT


def _feature_major(x: Tensor, n: int) -> Tensor:
    """x (*, n) as the contiguous (n, N) the kernels take: a view when the leading dims merge
    and the result's rows are contiguous, else one (counted) copy."""
    try:
        return _ops.contiguous(x.view(-1, n).T)
    except RuntimeError:  # the leading dims do not merge: one copy straight to (n, N)
        _ops.count_copy()
        return x.movedim(-1, 0).reshape(n, -1).contiguous()


def _csr_from_flat(flat: np.ndarray, vals: np.ndarray, shape) -> CSR:
    """A canonical CSR from sorted distinct flat positions i·n + j and their values."""
    m, n = shape
    idx = index_dtype_for(m, n, flat.shape[0])
    rows = flat // max(n, 1)
    indptr = np.zeros(m + 1, idx)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    indices = (flat - rows * n).astype(idx)
    return CSR(indptr, indices, np.ascontiguousarray(vals, np.float32), shape)
