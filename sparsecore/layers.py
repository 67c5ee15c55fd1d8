"""Layers with explicit forward/backward (no autograd tape), activations feature-major.

Every activation is a (features, batch) float32 C-contiguous array, so a sparse layer's kernels
touch one contiguous row of length batch per nonzero. A layer keeps what its backward pass needs
from its forward pass (its input; for RigL also the gradient at its output), by reference.

Shapes: ``SparseLinear(W: m × n)`` maps x (n, B) to y (m, B) = W·x + b. Its weight gradient is
nnz-sized (SDDMM at the stored entries), aligned with ``W.data``: no dense m × n array is formed
in forward, backward or the optimizer step. The one exception is explicit: a layer switched to
``compute="dense"`` (the dense fallback, sparsecore/fallback.py, for densities where BLAS wins)
runs its three products on BLAS through a dense copy of W and a dense gradient scratch; its
weights, gradient, optimizer state and topology stay nnz-sized and sparse.

Devices: every layer holds ``dev`` (sparsecore/device.py: the array module ``xp`` and the
kernel launchers of one side; the CPU unless moved) and calls its kernels through it, so one
body serves both sides. ``Sequential.to("cuda")`` moves the arrays once (a SparseLinear's W
becomes a ``DeviceCSR``); activations, gradients and the loss's outputs then stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import config
from kernels.cpu import backward as _backward
from kernels.cpu import densify as _densify
from kernels.cpu import skinny as _skinny
from kernels.cuda._csr import DeviceCSR
from kernels.formats import CSR, random_positions, split_count
from kernels.validation import index_dtype_for
from sparsecore import device as _device


@dataclass
class Param:
    """A trainable array, its gradient (same shape), and where it lives."""

    name: str
    value: np.ndarray
    grad: np.ndarray
    sparse: bool = False  # True: aligned with a CSR's data (remapped on topology changes)


class Layer:
    dev = _device.CPU  # where the layer's arrays live and its kernels run (see to())

    def to(self, dev) -> Layer:
        """Move the layer's arrays to ``dev`` ("cpu", "cuda" or a Device); returns self."""
        self.dev = _device.get_device(dev)
        self.clear()
        return self

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        raise NotImplementedError

    def params(self) -> list[Param]:
        return []

    def clear(self):
        """Drop references to the last batch (inputs, output gradients)."""


class SparseLinear(Layer):
    """y = W·x + b with W a canonical CSR (m × n) and b dense (m,)."""

    shard = None  # a block of rows of a layer split over MPI ranks: its RowShard (sparsecore/mpi)
    compute = "sparse"  # "dense": the products on BLAS through a dense copy of W (set_compute)
    _dense = _dense_grad = None  # that copy (m × n, zero off the pattern) and dW's scratch

    def __init__(self, W: CSR, bias: np.ndarray | None = None, name: str = "sparse"):
        if not isinstance(W, CSR):
            raise TypeError(f"W must be a sparsecore.CSR, got {type(W).__name__}")
        # (on a device W is a DeviceCSR: build on the CPU, then move with to())
        self.name = name
        m = W.shape[0]
        self.b = np.zeros(m, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        if self.b.shape != (m,):
            raise ValueError(f"bias has shape {self.b.shape}, expected ({m},)")
        self.gb = np.zeros_like(self.b)
        self.set_weight(W)
        self.x = None  # input of the last forward (n, B)
        self.dy = None  # gradient at the output of the last backward (m, B)

    def set_weight(self, W: CSR | DeviceCSR):
        """Install a (new) weight of this layer's side (CSR on the CPU, DeviceCSR on a device),
        e.g. after a topology update; resets its gradient."""
        if self._dense is not None and getattr(self, "W", None) is not None:
            self._pattern_op(self.W, "clear")  # the old pattern's entries back to zero
        self.W = W
        xp = self.dev.xp
        self.gW = xp.zeros(W.nnz, np.float32)
        # scratch of the CPU spmm_t, reused every step (the GPU one gathers in place: none)
        self._t_data = None if self.dev.on_device else np.empty(W.nnz, np.float32)

    def set_compute(self, compute: str):
        """ "sparse" (the kernels) or "dense": forward, dW and dX on BLAS through a dense copy of
        W (zero off the pattern, its values scattered in each forward, O(nnz)) and a dense dW
        scratch gathered at the pattern (2·m·n·4 bytes in all). The results are the same
        products up to float32 rounding; RigL, the optimizer and checkpoints see no
        difference."""
        if compute not in ("sparse", "dense"):
            raise ValueError(f"{self.name}: compute must be 'sparse' or 'dense', got {compute!r}")
        if compute == "dense" and self.shard is not None:
            raise ValueError(f"{self.name}: a layer split by rows over MPI ranks computes sparse")
        self.compute = compute
        self._dense = self._dense_grad = None

    def dense_bytes(self) -> int:
        """Bytes the dense compute holds (the copy of W and dW's scratch), or would hold."""
        m, n = self.W.shape
        return 2 * 4 * m * n

    def _pattern_op(self, W, op, data=None, out=None):
        """scatter W's values into self._dense, clear its pattern there, or gather self._dense
        (or dW's scratch) at the pattern: parallel O(nnz) kernels on the CPU, indexing on a
        device."""
        dense = self._dense_grad if op == "gather" else self._dense
        if not self.dev.on_device:
            blocks = W.row_blocks()
            if op == "scatter":
                return _densify.scatter(W.indptr, W.indices, data, dense, blocks)
            if op == "clear":
                return _densify.clear(W.indptr, W.indices, dense, blocks)
            return _densify.gather(W.indptr, W.indices, dense, out, blocks)
        rows = W.row_ids()
        if op == "scatter":
            dense[rows, W.indices] = data
        elif op == "clear":
            dense[rows, W.indices] = 0
        else:
            out[...] = dense[rows, W.indices]
        return dense

    def _dense_weight(self):
        W, xp = self.W, self.dev.xp
        if self._dense is None:
            self._dense = xp.zeros(W.shape, np.float32)
            self._dense_grad = xp.empty(W.shape, np.float32)
        return self._pattern_op(W, "scatter", data=W.data)

    def to(self, dev) -> SparseLinear:
        dev = _device.get_device(dev)
        if dev is not self.dev:
            self._dense = self._dense_grad = None  # rebuilt on the new side
            self.dev = dev
            self.b = dev.asarray(self.b)
            self.gb = dev.asarray(self.gb)
            self.set_weight(dev.csr(self.W))
        self.clear()
        return self

    @property
    def shape(self):
        return self.W.shape

    @property
    def full_shape(self) -> tuple[int, int]:
        """The whole layer's shape (a shard holds some of its rows)."""
        return self.W.shape

    def total_nnz(self) -> int:
        """The whole layer's nnz (of a shard: summed over the ranks, a collective)."""
        return self.W.nnz

    def forward(self, x, relu: bool = False):
        """y = W·x + b; with ``relu`` the following ReLU is applied in the same pass."""
        W = self.W
        dev = self.dev
        if x.ndim != 2 or x.shape[0] != W.shape[1]:  # the kernels trust their operands
            raise ValueError(
                f"{self.name}: x has shape {x.shape}, expected ({W.shape[1]}, batch) "
                "(feature-major)"
            )
        self.x = x
        y = dev.xp.empty((W.shape[0], x.shape[1]), np.float32)
        if self.compute == "dense":
            dev.xp.matmul(self._dense_weight(), x, out=y)
            y += self.b[:, None]
            if relu:
                dev.ew.relu(y, y)
            return y
        dev.spmm(W.indptr, W.indices, W.data, x, y, W.row_blocks(), bias=self.b, relu=relu)
        return y

    def backward(self, dy, need_dx=True, gate=None):
        """dW at the nonzeros, db, and dX; with ``gate`` (the output of a ReLU feeding this
        layer, i.e. its input) dX is returned already through that ReLU's backward."""
        W = self.W
        dev = self.dev
        if self.x is None or dy.shape != (W.shape[0], self.x.shape[1]):
            raise ValueError(
                f"{self.name}: dy has shape {dy.shape}, expected (outputs, batch of the last "
                f"forward) = ({W.shape[0]}, {None if self.x is None else self.x.shape[1]})"
            )
        self.dy = dy
        if self.compute == "dense":
            return self._dense_backward(dy, need_dx, gate)
        if need_dx and not dev.on_device and _backward.fused_pays(W.nnz):
            # one pass over the nonzeros for dX and dW (kernels/cpu/backward.py)
            dx = np.empty((W.shape[1], dy.shape[1]), np.float32)
            t_indptr, t_indices, t_perm = W.transpose_structure()
            return _backward.backward(
                t_indptr, t_indices, t_perm, W.data, dy, self.x, self.gW, dx,
                W.col_blocks(), bias_grad=self.gb, gate=gate,
            )  # fmt: skip
        dev.sddmm(W.indptr, W.indices, dy, self.x, self.gW, W.row_blocks(), bias_grad=self.gb)
        if not need_dx:
            return None
        dx = dev.xp.empty((W.shape[1], dy.shape[1]), np.float32)
        t_indptr, t_indices, t_perm = W.transpose_structure()
        dev.spmm_t(t_indptr, t_indices, t_perm, W.data, dy, dx, W.col_blocks(), self._t_data, gate)
        return dx

    def _dense_backward(self, dy, need_dx, gate):
        """dW, db, dX on BLAS (the forward left the dense copy of W current)."""
        dev, xp = self.dev, self.dev.xp
        if self._dense is None:  # a backward without this layer's dense forward
            self._dense_weight()
        xp.matmul(dy, self.x.T, out=self._dense_grad)
        self._pattern_op(self.W, "gather", out=self.gW)
        xp.sum(dy, axis=1, out=self.gb)
        if not need_dx:
            return None
        dx = xp.matmul(self._dense.T, dy)
        return dx if gate is None else dev.ew.relu_backward(dx, gate, dx)

    def params(self):
        return [
            Param(f"{self.name}.W", self.W.data, self.gW, sparse=True),
            Param(f"{self.name}.b", self.b, self.gb),
        ]

    def clear(self):
        self.x = self.dy = None


class Linear(Layer):
    """Dense y = W·x + b (for comparison, and for layers a user keeps dense)."""

    def __init__(self, W: np.ndarray, bias: np.ndarray | None = None, name: str = "dense"):
        self.name = name
        self.W = np.ascontiguousarray(W, np.float32)
        if self.W.ndim != 2:
            raise ValueError(f"W must be 2-D, got shape {self.W.shape}")
        m = self.W.shape[0]
        self.b = np.zeros(m, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        self.gW = np.zeros_like(self.W)
        self.gb = np.zeros_like(self.b)
        self.x = None

    @property
    def shape(self):
        return self.W.shape

    def _skinny(self) -> bool:
        """The CPU's skinny kernels (few outputs); a device uses cuBLAS for every shape."""
        return self.W.shape[0] <= config.SKINNY_MAX_ROWS and not self.dev.on_device

    def to(self, dev) -> Linear:
        dev = _device.get_device(dev)
        if dev is not self.dev:
            self.dev = dev
            for a in ("W", "b", "gW", "gb"):
                setattr(self, a, dev.asarray(getattr(self, a)))
        self.clear()
        return self

    def forward(self, x, relu: bool = False):
        if x.shape[0] != self.W.shape[1]:  # the skinny kernels trust their inputs
            raise ValueError(f"{self.name}: x has {x.shape[0]} rows, expected {self.W.shape[1]}")
        self.x = x
        if self._skinny():
            y = _skinny.forward(
                self.W, x, self.b, np.empty((self.W.shape[0], x.shape[1]), np.float32)
            )
        else:
            y = self.W @ x
            y += self.b[:, None]
        if relu:  # the following ReLU, in place (its layer keeps this output for backward)
            self.dev.ew.relu(y, y)
        return y

    def backward(self, dy, need_dx=True, gate=None):
        """gW, gb and dX (through the feeding ReLU's backward when ``gate`` is its output)."""
        if self.x is None or dy.shape != (self.W.shape[0], self.x.shape[1]):
            raise ValueError(
                f"{self.name}: dy has shape {dy.shape}, expected (outputs, batch of the last "
                f"forward) = ({self.W.shape[0]}, {None if self.x is None else self.x.shape[1]})"
            )
        if self._skinny():
            dx = np.empty((self.W.shape[1], dy.shape[1]), np.float32) if need_dx else None
            return _skinny.backward(self.W, self.x, dy, self.gW, self.gb, dx, gate)
        xp = self.dev.xp
        xp.matmul(dy, self.x.T, out=self.gW)
        xp.sum(dy, axis=1, out=self.gb)
        if not need_dx:
            return None
        dx = self.W.T @ dy
        return dx if gate is None else self.dev.ew.relu_backward(dx, gate, dx)

    def params(self):
        return [Param(f"{self.name}.W", self.W, self.gW), Param(f"{self.name}.b", self.b, self.gb)]

    def clear(self):
        self.x = None


class ReLU(Layer):
    def forward(self, x):
        dev = self.dev
        self.y = dev.ew.relu(x, dev.xp.empty_like(x))
        return self.y

    def backward(self, dy, need_dx=True):
        dev = self.dev
        return dev.ew.relu_backward(dy, self.y, dev.xp.empty_like(dy))

    def clear(self):
        self.y = None


class LeakyReLU(Layer):
    def __init__(self, slope: float = 0.01):
        self.slope = np.float32(slope)

    def forward(self, x):
        self.scale = self.dev.xp.where(x > 0, np.float32(1), self.slope).astype(np.float32)
        return x * self.scale

    def backward(self, dy, need_dx=True):
        return dy * self.scale

    def clear(self):
        self.scale = None


class Tanh(Layer):
    def forward(self, x):
        self.y = self.dev.xp.tanh(x)
        return self.y

    def backward(self, dy, need_dx=True):
        return dy * (1 - self.y * self.y)

    def clear(self):
        self.y = None


class Sigmoid(Layer):
    def forward(self, x):
        self.y = (1 / (1 + self.dev.xp.exp(-x))).astype(np.float32)
        return self.y

    def backward(self, dy, need_dx=True):
        return dy * self.y * (1 - self.y)

    def clear(self):
        self.y = None


ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh, "sigmoid": Sigmoid}


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels; logits (C, B)."""

    dev = _device.CPU

    def to(self, dev) -> SoftmaxCrossEntropy:
        self.dev = _device.get_device(dev)
        return self

    def __call__(self, logits: np.ndarray, labels: np.ndarray):
        """Returns (loss, dlogits, n_correct); a non-finite loss is the caller's to report.

        On a device loss and n_correct are 0-d device arrays (no sync: read them when logging)
        and labels must be a device array."""
        if self.dev.on_device:  # 0-d device arrays: no sync here
            return self._compute(logits, labels, self.dev.xp)
        with np.errstate(invalid="ignore", over="ignore"):
            loss, grad, correct = self._compute(logits, labels, np)
        return float(loss), grad, int(correct)

    @staticmethod
    def _compute(logits, labels, xp):
        z = logits - logits.max(axis=0, keepdims=True)
        e = xp.exp(z)
        s = e.sum(axis=0, keepdims=True)
        batch = logits.shape[1]
        cols = xp.arange(batch)
        logp_true = z[labels, cols] - xp.log(s[0])
        loss = -logp_true.mean(dtype=np.float64)
        grad = e / s
        grad[labels, cols] -= 1.0
        grad /= np.float32(batch)
        correct = xp.count_nonzero(xp.argmax(logits, axis=0) == labels)
        return loss, grad.astype(np.float32, copy=False), correct


class Sequential:
    """Layers applied in order; backward in reverse (the first layer needs no dX)."""

    def __init__(self, layers: list[Layer]):
        self.layers = list(layers)
        devs = {getattr(l, "dev", _device.CPU) for l in self.layers} or {_device.CPU}
        if len(devs) > 1:
            names = sorted(d.name for d in devs)
            raise ValueError(f"the layers live on different devices {names}: use .to()")
        self.dev = devs.pop()
        names = [l.name for l in self.weighted()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"layer name(s) {dup} appear more than once: optimizer state and topology "
                "updates are keyed by name, so give every weighted layer a unique name="
            )

    def forward(self, x):
        # a SparseLinear followed by a ReLU runs as one kernel (the ReLU keeps its output for
        # its backward); in backward, a SparseLinear fed by a ReLU applies that ReLU's backward
        # inside its dX kernel. Same results, two fewer passes over each hidden activation.
        layers = self.layers
        i = 0
        while i < len(layers):
            layer = layers[i]
            if self._fusable(i, i + 1):
                x = layer.forward(x, relu=True)
                layers[i + 1].y = x
                i += 2
                continue
            x = layer.forward(x)
            i += 1
        return x

    def backward(self, dy):
        layers = self.layers
        i = len(layers) - 1
        while i >= 0:
            if i >= 2 and self._fusable(i, i - 1):
                dy = layers[i].backward(dy, need_dx=True, gate=layers[i - 1].y)
                i -= 2  # the ReLU's backward is done
                continue
            dy = layers[i].backward(dy, need_dx=i > 0)
            i -= 1
        return dy

    def _fusable(self, i, j):
        """Layer i is a SparseLinear or Linear and layer j exactly a ReLU (subclasses may
        differ)."""
        layers = self.layers
        return (
            0 <= j < len(layers)
            and type(layers[j]) is ReLU
            and isinstance(layers[i], (SparseLinear, Linear))
        )

    def params(self) -> list[Param]:
        return [p for layer in self.layers for p in layer.params()]

    def to(self, dev) -> Sequential:
        """Move every layer to ``dev`` ("cpu", "cuda" or a Device), once; returns self. Build
        the optimizer afterwards (it holds the parameters' arrays)."""
        dev = _device.get_device(dev)
        for layer in self.layers:
            layer.to(dev)
        self.dev = dev
        return self

    @property
    def device(self) -> str:
        return self.dev.name

    def weighted(self) -> list[Layer]:
        """The layers that hold weights (SparseLinear or Linear), in order."""
        return [l for l in self.layers if isinstance(l, (SparseLinear, Linear))]

    def sparse_layers(self) -> list[SparseLinear]:
        return [l for l in self.layers if isinstance(l, SparseLinear)]

    def clear(self):
        for layer in self.layers:
            layer.clear()

    def to_scipy(self) -> list:
        """The weights as scipy.sparse csr_arrays (dense layers too), with the biases: [(W, b)].
        A layer sharded over MPI ranks is refused (its rows are spread: ``gather()`` it)."""
        import scipy.sparse as sp

        sharded = [l.name for l in self.sparse_layers() if l.shard is not None]
        if sharded:
            raise ValueError(
                f"layers {sharded} are sharded over MPI ranks: this rank holds some of their "
                "rows only; gather() them (every rank) to get the whole layers"
            )

        cpu, host = _device.CPU, _device.to_host
        return [
            (
                cpu.csr(l.W).to_scipy() if isinstance(l, SparseLinear) else sp.csr_array(host(l.W)),
                np.array(host(l.b)),
            )
            for l in self.weighted()
        ]

    @classmethod
    def from_matrices(cls, weights, biases=None, activation: str = "relu") -> Sequential:
        """An MLP from weight matrices (scipy.sparse -> SparseLinear, NumPy -> Linear), each
        (out × in), with ``activation`` between layers."""
        import scipy.sparse as sp

        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        biases = biases if biases is not None else [None] * len(weights)
        if len(biases) != len(weights):
            raise ValueError(f"{len(weights)} weights but {len(biases)} biases")
        layers: list[Layer] = []
        for l, (W, b) in enumerate(zip(weights, biases, strict=True)):
            if l and W.shape[1] != weights[l - 1].shape[0]:
                raise ValueError(
                    f"weight {l} has {W.shape[1]} inputs, but weight {l - 1} has "
                    f"{weights[l - 1].shape[0]} outputs"
                )
            if sp.issparse(W):
                layers.append(
                    SparseLinear(CSR.from_scipy(W, name=f"weights[{l}]"), b, name=f"fc{l}")
                )
            else:
                layers.append(Linear(np.asarray(W), b, name=f"fc{l}"))
            if l < len(weights) - 1:
                layers.append(ACTIVATIONS[activation]())
        return cls(layers)

    def predict(self, x, batch_size: int = 1024, *, to_host: bool = True) -> np.ndarray:
        """Logits for x given batch-major (N, features): evaluated in feature-major batches.

        On a device each batch is uploaded (x may also be a device array); the logits come back
        as a NumPy array, or stay on the device with ``to_host=False``."""
        dev = self.dev
        xp = dev.xp
        n_in = self.weighted()[0].W.shape[1] if self.weighted() else None
        if x.ndim != 2 or (n_in is not None and x.shape[1] != n_in):
            raise ValueError(f"x has shape {x.shape}, expected (N, {n_in}) (batch-major)")
        out = []
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].T
            xb = (
                dev.asarray(np.ascontiguousarray(xb, dtype=np.float32))
                if isinstance(xb, np.ndarray)
                else xp.ascontiguousarray(xb, dtype=np.float32)
            )
            out.append(self.forward(xb).T.copy())
        self.clear()
        if not out:  # no rows: (0, outputs of the last weighted layer)
            last = self.weighted()[-1:]
            n_out = getattr(last[0], "full_shape", last[0].shape)[0] if last else 0
            out = [xp.zeros((0, n_out), np.float32)]
        logits = xp.concatenate(out)
        return _device.to_host(logits) if to_host else logits


# Rows per block of a sparse layer's initial pattern: a fixed constant, so the pattern does not
# depend on how the layer is later split over MPI ranks (see sparse_init).
INIT_BLOCK_ROWS = 1024
INIT_TAG = 0x1A17  # a layer's initial weights are seeded by (seed, INIT_TAG, layer)


def sparse_init(
    n_in: int,
    n_out: int,
    density: float,
    seed,
    *,
    fan_in: str = "sparse",
    gain: float = float(np.sqrt(2.0)),
    rows: tuple[int, int] | None = None,
) -> CSR:
    """A random pattern at the density (uniform over positions), Kaiming-uniform values.

    fan_in="sparse" scales row i by its own number of inputs (its nonzeros), which keeps
    activations at the right scale in very sparse layers; "dense" uses n_in as a dense layer would.

    ``seed``: a sequence of ints (numpy's SeedSequence entropy). The pattern is drawn by blocks
    of INIT_BLOCK_ROWS rows: the number of nonzeros of every block (round(density·m·n) in all,
    split as a uniform draw without replacement would split them: formats.split_count), then
    each block's positions and values from a generator seeded by (seed, block). The whole is a
    uniform draw of nnz positions, and any block of rows can be built alone: ``rows=(r0, r1)``
    returns rows [r0, r1) only ((r1 - r0) × n_in, the same arrays as those rows of the whole
    layer's init) in O(nnz of those rows + m / 1024) memory,
    which is how an MPI rank builds its shard of a layer too large for one machine.
    """
    if fan_in not in ("sparse", "dense"):
        raise ValueError(f"fan_in must be 'sparse' or 'dense', got {fan_in!r}")
    m, n = int(n_out), int(n_in)
    r0, r1 = (0, m) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= r0 <= r1 <= m:
        raise ValueError(f"rows must be a range within [0, {m}], got {rows!r}")
    seed = np.atleast_1d(np.asarray(seed))
    if seed.ndim != 1 or seed.dtype.kind not in "iu" or (seed < 0).any():
        raise ValueError(f"seed must be non-negative int(s) (SeedSequence entropy), got {seed!r}")
    seed = [int(s) for s in seed]
    nnz = int(round(density * m * n))
    idx = index_dtype_for(m, n, nnz)
    if m == 0 or n == 0:  # no entries to draw (a layer with no outputs or no inputs)
        return CSR._trusted(np.zeros(r1 - r0 + 1, idx), np.zeros(0, idx), np.zeros(0, np.float32),
                            (r1 - r0, n))  # fmt: skip
    R = INIT_BLOCK_ROWS
    n_blocks = -(-m // R)
    sizes = np.full(n_blocks, R * n, dtype=np.int64)
    sizes[-1] = (m - (n_blocks - 1) * R) * n
    counts = split_count(sizes, nnz, np.random.default_rng([*seed, 2]))
    b0, b1 = r0 // R, -(-r1 // R)
    cap = int(counts[b0:b1].sum())  # the blocks' entries: the rows' own and at most 2 blocks more
    indices = np.empty(cap, idx)
    data = np.empty(cap, np.float32)
    row_nnz = np.zeros(r1 - r0, np.int64)
    used = 0
    for b in range(b0, b1):
        lo, hi = b * R, min(m, (b + 1) * R)
        rng = np.random.default_rng([*seed, 1, b])
        flat = random_positions(hi - lo, n, int(counts[b]), rng)
        block_rows = flat // n
        per_row = np.bincount(block_rows, minlength=hi - lo)
        if fan_in == "sparse":
            bound = gain * np.sqrt(3.0 / np.maximum(per_row, 1).astype(np.float32))
            scale = np.repeat(bound, per_row)
        else:
            scale = np.float32(gain * np.sqrt(3.0 / max(n, 1)))
        values = (rng.uniform(-1.0, 1.0, flat.shape[0]) * scale).astype(np.float32)
        s0, s1 = max(lo, r0), min(hi, r1)  # the block's rows that are wanted
        e0, e1 = np.searchsorted(block_rows, [s0 - lo, s1 - lo])
        k = int(e1 - e0)
        indices[used : used + k] = flat[e0:e1] - block_rows[e0:e1] * n
        data[used : used + k] = values[e0:e1]
        row_nnz[s0 - r0 : s1 - r0] = per_row[s0 - lo : s1 - lo]
        used += k
    if used < cap:  # rows cut from a block at either end: keep exactly the wanted entries
        indices, data = indices[:used].copy(), data[:used].copy()
    indptr = np.zeros(r1 - r0 + 1, idx)
    np.cumsum(row_nnz, out=indptr[1:])
    return CSR._trusted(indptr, indices, data, (r1 - r0, n))


def dense_init(n_in, n_out, rng, gain: float = float(np.sqrt(2.0))) -> np.ndarray:
    bound = gain * np.sqrt(3.0 / max(n_in, 1))
    return rng.uniform(-bound, bound, (n_out, n_in)).astype(np.float32)


def mlp(
    sizes: list[int],
    densities: list[float | None],
    *,
    activation: str = "relu",
    seed: int = 0,
    fan_in: str = "sparse",
    sparse_layer=None,
) -> Sequential:
    """An MLP from layer sizes, e.g. [784, 300, 100, 10]; densities[l] None (or 1.0) = dense.

    Layer l is named fc{l}; its weights are drawn from the seed (seed, INIT_TAG, l) alone
    (sparse_init), so a layer does not depend on the others (INIT_TAG keeps these streams apart
    from the data's and the epochs' generators, seeded by (seed, ...) too).
    ``sparse_layer(l, n_in, n_out, density)`` may build a sparse layer itself (an MPI rank's
    shard: sparsecore/mpi/sharded.py); None there falls back to a whole SparseLinear."""
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
    if len(densities) != len(sizes) - 1:
        raise ValueError(f"densities has {len(densities)} entries, expected {len(sizes) - 1}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[Layer] = []
    for l, (n_in, n_out, d) in enumerate(zip(sizes[:-1], sizes[1:], densities, strict=True)):
        if d is None or d >= 1.0:
            rng = np.random.default_rng([seed, INIT_TAG, l, 3])
            layers.append(Linear(dense_init(n_in, n_out, rng), name=f"fc{l}"))
        elif sparse_layer is not None and (built := sparse_layer(l, n_in, n_out, d)) is not None:
            layers.append(built)
        else:
            W = sparse_init(n_in, n_out, d, [seed, INIT_TAG, l], fan_in=fan_in)
            layers.append(SparseLinear(W, name=f"fc{l}"))
        if l < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return Sequential(layers)
