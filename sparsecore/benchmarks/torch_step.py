"""The ``torch`` level of ``sparsecore bench``: the PyTorch bridge's training step, beside the
engine's own step and torch's ways of training the same model, all in one process.

One training step of the MLP 784-W-W-10 (ReLU, softmax cross-entropy, SGD lr 0.1, momentum 0.9,
weight decay 1e-4; RigL's drop |w| / grow |grad| every ΔT steps, no optimizer step on update
steps) in five implementations:

- ``engine``        the engine's NumPy loop (``Trainer.train_step``: CSR layers, ReLU fused into
                    the kernels, the fused top-k grow), built as the ``step`` level builds it;
- ``bridge``        ``nn.Sequential`` of ``sparsecore.torch.SparseLinear``/``nn.ReLU`` (from
                    ``sparsify(model, sparsity, seed=...)``), ``F.cross_entropy``,
                    ``torch.optim.SGD`` and ``sparsecore.torch.RigL``: ``if rigl.step():
                    opt.step()``;
- ``dense``         the same model with ``nn.Linear`` (no topology updates);
- ``masked``        masked-dense RigL in torch as masked ports do it: dense weights multiplied by
                    a 0/1 mask in every forward, autograd's dense gradient every step, drop by |w|
                    and grow by the dense |gradient| (``torch.topk``) every ΔT;
- ``torch-sparse``  a stand-in for a truly sparse PyTorch CPU peer (the published one cannot be
                    installed here): weights as torch's own sparse CSR tensors, a custom autograd
                    function of torch ops (``torch.sparse.mm`` forward and dX on a transposed
                    CSR, ``torch.sparse.sampled_addmm`` for dW at the stored entries) and the same
                    RigL updates done with torch ops (the dense dY·Xᵀ with ``torch.mm`` on update
                    steps only; ``peer_grow="random"``: SET's random grow instead).

The engine, the bridge, masked and torch-sparse start from the same weights (the engine's
``sparse_init`` of (seed, layer)), the dense model from torch's default init.

Correctness guard, before anything is timed: the engine's forward is checked against a float64
reference, and the losses of the first steps (same batches, same weights, same optimizer, the
same update schedule; by default through the first topology update and the step after it) of
the bridge, masked and torch-sparse must agree with the engine's; otherwise the level raises, so
a broken bridge cannot post a fast number.

Timing (same-run ratios): after a warm-up that includes one topology update, ``rounds`` rounds
each run one block of every implementation, in an order that rotates from round to round, so the
drift of a shared machine falls on all of them alike. A block is one update period of ``every``
steps (``every_slow`` for masked, ``dense_block`` for dense): an untimed first step (it pays for
the caches and thread pools the previous implementation left), normal steps, the update step
and the step after it. Updates happen every ``every`` steps at the full α (T_end far away); the
figures amortise them over the nominal ΔT (``delta_t``, 100):

- median: the median of the normal steps;
- mean: the mean step over a ΔT period, mean(normal) + (update + after - 2·mean(normal))/ΔT;
- amortised: as the step level, median(normal) + (update + after - 2·median(normal))/ΔT.

Standalone, one JSON object on the last line of stdout::

    python -m sparsecore.benchmarks.torch_step '{"arch": [784, 1024, 1024, 10], "rounds": 2}'
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time

import numpy as np

from sparsecore.benchmarks.step import (
    _classify,
    _summary,
    check_forward,
    data_for,
)
from sparsecore.layers import INIT_TAG, sparse_init
from sparsecore.rigl.distributions import layer_densities
from sparsecore.rigl.schedule import UpdateSchedule
from sparsecore.train import TrainConfig, Trainer

IMPLS = ("engine", "bridge", "dense", "masked", "torch-sparse")
PEER_GROWS = ("gradient", "random")
BRIDGE_INPUTS = ("batch-major", "feature-major")
T_END = int(0.75 * 10**7)  # as the engine's max_steps=10**7 gives: updates at the full α

DEFAULTS = dict(
    arch=[784, 4096, 4096, 10],
    sparsity=0.99,
    distribution="uniform",
    batch=128,
    delta_t=100,  # nominal ΔT the update cost is amortised over
    alpha=0.3,
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    every=20,  # steps per block of engine, bridge and torch-sparse (one update each)
    every_slow=6,  # steps per block of masked (one update each)
    dense_block=4,  # steps per block of dense (no updates)
    rounds=5,
    impls=list(IMPLS),
    peer_grow="gradient",  # torch-sparse's grow: the dense |dY·Xᵀ| (RigL) or random (SET)
    bridge_input="batch-major",  # as a DataLoader gives it (one layout copy in the first
    # layer), or "feature-major": the (B, n) transpose view of a (n, B) tensor (no copy)
    torch_threads=None,  # None: as many as Numba's
    check_steps=None,  # losses compared before timing (None: through the first update, every + 2)
    samples=2048,
    n_batches=8,  # distinct batches, cycled
    data=None,  # prefix written by step.prepare_data (None: a temporary copy)
    seed=0,
)
PRESETS = {
    "quick": dict(arch=[784, 1024, 1024, 10], rounds=2, every=10, every_slow=5, dense_block=3),
    "full": dict(),
}

# what the level is for (the targets), each a ratio to the bridge
TARGET_CONFIG = dict(arch=[784, 4096, 4096, 10], sparsity=0.99, batch=128, delta_t=100)
TARGETS = (
    # (impl, figure, rule, bound, what it says)
    ("engine", "amortised", "overhead<=", 0.10, "the bridge adds ≤ 10% to the engine's step"),
    ("dense", "amortised", ">=", 15.0, "the bridge ≥ 15× faster than dense torch"),
    ("masked", "amortised", ">=", 30.0, "the bridge ≥ 30× faster than masked-dense RigL"),
    ("torch-sparse", "mean", ">=", 4.5, "the bridge ≥ 4.5× faster on the mean step"),
)
# published figures on this kind of machine (other runs, for context only)
REFERENCE = (
    "published, same model on this kind of machine (not this run): truly sparse PyTorch CPU "
    "peer 21 ms median / 40 ms mean; the engine 7.1 ms median / 8.0 ms amortised; a masked "
    "RigL port 309 ms median"
)


def available() -> bool:
    """Whether torch is installed (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def _torch():
    import torch

    return torch


def shapes_and_densities(c: dict):
    arch = c["arch"]
    shapes = [(o, i) for i, o in zip(arch[:-1], arch[1:], strict=True)]
    return shapes, layer_densities(c["sparsity"], shapes, c["distribution"])


_WEIGHTS: dict = {}  # the last configuration's engine_weights (drawn once per run)


def engine_weights(c: dict):
    """The engine's initial sparse weights, a CSR per layer: what ``sparsecore.layers.mlp`` and
    ``sparsify`` draw for the seed."""
    key = (tuple(c["arch"]), c["sparsity"], c["distribution"], c["seed"])
    if key not in _WEIGHTS:
        shapes, dens = shapes_and_densities(c)
        _WEIGHTS.clear()
        _WEIGHTS[key] = [
            sparse_init(n, m, d, [c["seed"], INIT_TAG, l], fan_in="sparse")
            for l, ((m, n), d) in enumerate(zip(shapes, dens, strict=True))
        ]
    return _WEIGHTS[key]


# ------------------------------------------------------------------------------ implementations
class Engine:
    """(a) the engine's NumPy training step, configured as the step level's run_engine."""

    name = "engine"

    def __init__(self, c: dict, data):
        self.every = c["every"]
        self.cfg = TrainConfig(
            arch=list(c["arch"]),
            sparsity=c["sparsity"],
            distribution=c["distribution"],
            method="rigl",
            delta_t=self.every,
            alpha=c["alpha"],
            lr=c["lr"],
            lr_schedule="constant",  # as torch.optim.SGD (the loss check compares steps)
            momentum=c["momentum"],
            weight_decay=c["weight_decay"],
            batch_size=c["batch"],
            epochs=10**6,
            max_steps=10**7,  # T_end far away: every `every`-th step updates, at the full α
            progress=False,
            seed=c["seed"],
        )
        self.tr = Trainer(self.cfg, data)
        for l, (W, layer) in enumerate(
            zip(engine_weights(c), self.tr.model.weighted(), strict=True)
        ):
            if not np.array_equal(W.indices, layer.W.indices):
                raise AssertionError(f"engine layer {l}: not the pattern of sparse_init(seed)")

    def fp_mode(self):
        return self.tr.fp_mode()

    def will_update(self) -> bool:
        return self.tr.updater.is_update_step(self.tr.step)

    def step(self, b) -> float:
        loss, _, _ = self.tr.train_step(b["xT"], b["y_np"])
        return loss

    def loss_value(self, loss) -> float:
        return float(loss)


class _TorchImpl:
    """What the torch implementations share: the optimizer, the step counter, the schedule."""

    every = None

    def __init__(self, c: dict):
        self.torch = _torch()
        self.c = c
        self.t = 0
        self.schedule = (
            UpdateSchedule(t_end=T_END, delta_t=self.every, alpha=c["alpha"])
            if self.every
            else None
        )

    def _sgd(self, params):
        c = self.c
        return self.torch.optim.SGD(
            params, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"]
        )

    def will_update(self) -> bool:
        return self.schedule is not None and self.schedule.is_update_step(self.t)

    def loss_value(self, loss) -> float:
        return float(loss.detach())


def torch_mlp(arch, torch, init: bool = True):
    """nn.Sequential of nn.Linear/nn.ReLU; ``init=False`` skips the dense init (the layers are
    to be replaced by sparsify) and zeroes the biases (the engine's start)."""
    nn = torch.nn
    layers = []
    for l, (i, o) in enumerate(zip(arch[:-1], arch[1:], strict=True)):
        lin = nn.Linear(i, o) if init else torch.nn.utils.skip_init(nn.Linear, i, o)
        if not init:
            with torch.no_grad():
                lin.bias.zero_()
        layers.append(lin)
        if l < len(arch) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Bridge(_TorchImpl):
    """(b) the bridge as a user writes it: sparsify, torch's SGD, sparsecore.torch.RigL."""

    name = "bridge"

    def __init__(self, c: dict):
        from sparsecore.torch import RigL, sparsify

        self.every = c["every"]
        super().__init__(c)
        torch = self.torch
        model = torch_mlp(c["arch"], torch, init=False)
        self.model = sparsify(model, c["sparsity"], c["distribution"], seed=c["seed"])
        self.opt = self._sgd(self.model.parameters())
        self.rigl = RigL(self.model, self.opt, delta_t=self.every, alpha=c["alpha"], t_end=T_END)
        if c["bridge_input"] not in BRIDGE_INPUTS:
            raise ValueError(
                f"bridge_input must be one of {BRIDGE_INPUTS}, got {c['bridge_input']!r}"
            )
        self.x = "x" if c["bridge_input"] == "batch-major" else "x_fm"

    def will_update(self) -> bool:
        return self.rigl.is_update_step()

    def step(self, b):
        F = self.torch.nn.functional
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(b[self.x]), b["y"])
        loss.backward()
        if self.rigl.step():
            self.opt.step()
        return loss


class Dense(_TorchImpl):
    """(c) the same model, dense nn.Linear layers, torch's SGD; no topology updates."""

    name = "dense"

    def __init__(self, c: dict):
        super().__init__(c)
        torch = self.torch
        torch.manual_seed(c["seed"])
        self.model = torch_mlp(c["arch"], torch)
        self.opt = self._sgd(self.model.parameters())

    def step(self, b):
        F = self.torch.nn.functional
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(b["x"]), b["y"])
        loss.backward()
        self.opt.step()
        self.t += 1
        return loss


class Masked(_TorchImpl):
    """(d) masked-dense RigL: W (dense) ∘ M (0/1) in each forward, so autograd computes the dense
    gradient of W∘M every step (and W.grad = that gradient ∘ M); every ΔT the K smallest |w| of
    the mask are dropped and the K largest dense |gradient| outside it grown (torch.topk over the
    m·n entries), new weights and their momentum zero (a dropped and regrown one keeps its
    state, as in the engine's merge), no optimizer step on the update step."""

    name = "masked"

    def __init__(self, c: dict):
        self.every = c["every_slow"]
        super().__init__(c)
        torch = self.torch
        self.W, self.b, self.M = [], [], []
        for w, mask in _engine_dense(c, torch):
            self.W.append(w.requires_grad_())
            self.b.append(torch.zeros(w.shape[0], requires_grad=True))
            self.M.append(mask)
        self.opt = self._sgd([*self.W, *self.b])

    def step(self, b):
        torch = self.torch
        F = torch.nn.functional
        update = self.will_update()
        self.opt.zero_grad()
        h, weffs = b["x"], []
        last = len(self.W) - 1
        for l, (W, bias, M) in enumerate(zip(self.W, self.b, self.M, strict=True)):
            w = W * M
            if update:
                w.retain_grad()
                weffs.append(w)
            h = F.linear(h, w, bias)
            if l < last:
                h = torch.relu(h)
        loss = F.cross_entropy(h, b["y"])
        loss.backward()
        if update:
            self._update([w.grad for w in weffs])
        else:
            self.opt.step()
        self.t += 1
        return loss

    def _update(self, grads):
        torch = self.torch
        f = self.schedule.drop_fraction(self.t)
        with torch.no_grad():
            for W, M, G in zip(self.W, self.M, grads, strict=True):
                mask = M.view(-1)
                before = mask.bool()
                k = int(f * int(before.sum()))
                if k == 0:
                    continue
                inf = float("inf")
                drop = torch.topk(
                    torch.where(before, W.abs().view(-1), inf), k, largest=False
                ).indices
                mask[drop] = 0
                grow = torch.topk(torch.where(mask.bool(), -inf, G.abs().view(-1)), k).indices
                mask[grow] = 1
                new = grow[~before[grow]]  # (dropped and regrown: keeps its state, as the
                W.view(-1)[new] = 0  # engine's merge does)
                W.mul_(M)
                buf = self.opt.state.get(W, {}).get("momentum_buffer")
                if buf is not None:
                    buf.view(-1)[new] = 0
                    buf.mul_(M)


def _engine_dense(c, torch):
    """Per layer (dense weight tensor, 0/1 mask) holding the engine's initial sparse weights."""
    shapes, _ = shapes_and_densities(c)
    out = []
    for (m, n), W in zip(shapes, engine_weights(c), strict=True):
        w, mask = torch.zeros(m, n), torch.zeros(m, n)
        rows = torch.from_numpy(np.repeat(np.arange(m), np.diff(W.indptr)))
        cols = torch.from_numpy(W.indices.astype(np.int64))
        w[rows, cols] = torch.from_numpy(np.array(W.data))
        mask[rows, cols] = 1.0
        out.append((w, mask))
    return out


_FUNCTIONS: dict = {}


def _csr_function(torch):
    """The torch.sparse stand-in's autograd function (made once torch is there)."""
    if "csr" in _FUNCTIONS:
        return _FUNCTIONS["csr"]

    class CSRLinear(torch.autograd.Function):
        """y = x·Wᵀ + b for W a torch sparse CSR: forward torch.sparse.mm(W, xᵀ); backward dW
        = torch.sparse.sampled_addmm at W's entries, dX = torch.sparse.mm(Wᵀ, dYᵀ) on the CSR of
        Wᵀ (its structure kept, its values gathered each step), db = sum of dY."""

        @staticmethod
        def forward(ctx, values, bias, x, layer):
            W = torch.sparse_csr_tensor(layer.crow, layer.col, values, layer.shape)
            yT = torch.sparse.mm(W, x.t())
            yT.add_(bias[:, None])
            ctx.layer = layer
            ctx.save_for_backward(values, x)
            return yT.t()

        @staticmethod
        def backward(ctx, gy):
            values, x = ctx.saved_tensors
            layer = ctx.layer
            gyT = gy.t().contiguous()
            if layer.record:
                layer.recorded = (gyT, x)
            W = torch.sparse_csr_tensor(layer.crow, layer.col, values, layer.shape)
            d_values = torch.sparse.sampled_addmm(W, gyT, x, beta=0.0).values()
            d_x = None
            if ctx.needs_input_grad[2]:
                WT = torch.sparse_csr_tensor(
                    layer.t_crow, layer.t_col, values[layer.t_perm], layer.shape[::-1]
                )
                d_x = torch.sparse.mm(WT, gyT).t()
            return d_values, gyT.sum(dim=1), d_x, None

    _FUNCTIONS["csr"] = CSRLinear
    return CSRLinear


class _CSRLayer:
    """A torch.sparse CSR layer: int64 crow/col, the values and bias Parameters, the CSR of Wᵀ."""

    def __init__(self, torch, W, m, n):
        self.torch = torch
        self.shape = (m, n)
        self.crow = torch.from_numpy(W.indptr.astype(np.int64))
        self.col = torch.from_numpy(W.indices.astype(np.int64))
        self.values = torch.nn.Parameter(torch.from_numpy(np.array(W.data)))
        self.bias = torch.nn.Parameter(torch.zeros(m))
        self.record, self.recorded = False, None
        self._derive()

    def rows(self):
        torch = self.torch
        return torch.repeat_interleave(torch.arange(self.shape[0]), self.crow.diff())

    def _derive(self):
        torch = self.torch
        m, n = self.shape
        rows = self.rows()
        self.t_perm = torch.argsort(self.col * m + rows)
        self.t_col = rows[self.t_perm]
        self.t_crow = torch.zeros(n + 1, dtype=torch.int64)
        self.t_crow[1:] = torch.bincount(self.col, minlength=n).cumsum(0)

    def set_pattern(self, flat):
        """Install the sorted flat positions i·n + j as the pattern (values set by the caller)."""
        torch = self.torch
        m, n = self.shape
        rows = flat // n
        self.col = flat - rows * n
        self.crow = torch.zeros(m + 1, dtype=torch.int64)
        self.crow[1:] = torch.bincount(rows, minlength=m).cumsum(0)
        self._derive()


class TorchSparse(_TorchImpl):
    """(e) a truly sparse PyTorch CPU peer, stand-in: torch.sparse CSR layers (see
    _csr_function), torch's SGD, and RigL's updates with torch ops every ΔT: drop the K smallest
    |w| (torch.topk over the nnz values), grow the K largest |dY·Xᵀ| outside the kept pattern
    (the dense m × n product with torch.mm, on update steps only; ``peer_grow="random"``: K
    uniformly random absent positions, SET), rebuild the CSR and its transpose, carry the values
    and momentum of kept entries and of dropped-and-regrown ones (as in the engine's merge; new
    ones 0); no optimizer step on the update step."""

    name = "torch-sparse"

    def __init__(self, c: dict):
        self.every = c["every"]
        super().__init__(c)
        torch = self.torch
        if c["peer_grow"] not in PEER_GROWS:
            raise ValueError(f"peer_grow must be one of {PEER_GROWS}, got {c['peer_grow']!r}")
        self.fn = _csr_function(torch)
        self.gen = torch.Generator().manual_seed(c["seed"])
        shapes, _ = shapes_and_densities(c)
        self.layers = []
        for (m, n), W in zip(shapes, engine_weights(c), strict=True):
            self.layers.append(_CSRLayer(torch, W, m, n))
        self.opt = self._sgd([p for L in self.layers for p in (L.values, L.bias)])

    def step(self, b):
        torch = self.torch
        F = torch.nn.functional
        update = self.will_update()
        self.opt.zero_grad()
        h = b["x"]
        last = len(self.layers) - 1
        for l, L in enumerate(self.layers):
            L.record = update and self.c["peer_grow"] == "gradient"
            h = self.fn.apply(L.values, L.bias, h, L)
            if l < last:
                h = torch.relu(h)
        loss = F.cross_entropy(h, b["y"])
        loss.backward()
        if update:
            self._update()
        else:
            self.opt.step()
        self.t += 1
        return loss

    def _update(self):
        torch = self.torch
        f = self.schedule.drop_fraction(self.t)
        with torch.no_grad():
            for L in self.layers:
                m, n = L.shape
                nnz = L.values.shape[0]
                k = int(f * nnz)
                if k == 0:
                    continue
                flat = L.rows() * n + L.col
                drop = torch.topk(L.values.abs(), k, largest=False).indices
                keep = torch.ones(nnz, dtype=torch.bool)
                keep[drop] = False
                kept = flat[keep]
                if self.c["peer_grow"] == "gradient":
                    gyT, x = L.recorded
                    score = torch.mm(gyT, x).abs_().view(-1)  # the dense dY·Xᵀ
                    score[kept] = -float("inf")
                    grow = torch.topk(score, k).indices
                else:
                    grow = self._random_absent(kept, m * n, k)
                L.recorded, L.record = None, False
                new_flat = torch.sort(torch.cat([kept, grow])).values
                # where each entry was (flat is sorted: CSR order), -1 for a new connection; a
                # dropped and regrown one keeps its value and momentum, as the engine's merge
                src = torch.searchsorted(flat, new_flat).clamp_(max=nnz - 1)
                src[flat[src] != new_flat] = -1
                old = src >= 0
                for t in (L.values, self.opt.state.get(L.values, {}).get("momentum_buffer")):
                    if t is not None:
                        t.copy_(torch.where(old, t[src.clamp(min=0)], 0.0))
                L.set_pattern(new_flat)

    def _random_absent(self, kept, size, k):
        torch = self.torch
        got = torch.empty(0, dtype=torch.int64)
        while got.shape[0] < k:
            cand = torch.randint(0, size, (2 * k + 16,), generator=self.gen)
            cand = torch.unique(torch.cat([got, cand]))
            got = cand[~torch.isin(cand, kept)]
        return got[torch.randperm(got.shape[0], generator=self.gen)[:k]]


BUILDERS = {"bridge": Bridge, "dense": Dense, "masked": Masked, "torch-sparse": TorchSparse}


# ------------------------------------------------------------------------------ the level
def _batches(c, data, torch):
    """``n_batches`` distinct batches, each feature-major for the engine and batch-major for torch
    (gathered before timing, as the step level gathers them outside the timed region)."""
    rng = np.random.default_rng([c["seed"], 7])
    n = data.x_train.shape[0]
    out = []
    for _ in range(c["n_batches"]):
        idx = np.sort(rng.choice(n, c["batch"], replace=False))
        x = np.ascontiguousarray(data.x_train[idx], dtype=np.float32)
        y = np.asarray(data.y_train[idx], dtype=np.int64)
        xT = np.ascontiguousarray(x.T)
        out.append(dict(xT=xT, y_np=y, x=torch.from_numpy(x), x_fm=torch.from_numpy(xT).T,
                        y=torch.from_numpy(y)))  # fmt: skip
    return out


class _Runner:
    """One implementation and its timed steps (``flags``: update step or not)."""

    def __init__(self, impl, batches):
        self.impl, self.batches = impl, batches
        self.i = 0
        self.flags: list[bool] = []
        self.times: list[float] = []

    def step(self, timed: bool):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        update = self.impl.will_update()
        t0 = time.perf_counter()
        loss = self.impl.step(b)
        dt = time.perf_counter() - t0
        if timed:
            self.flags.append(update)
            self.times.append(dt)
        return loss

    def block(self, n: int):
        """n steps, the first untimed; started 2 steps after an update, a block of an updating
        implementation ends with its update step and the step after it."""
        for j in range(n):
            self.step(timed=j > 0)


def _check(runners, c: dict) -> dict:
    """The first losses of every implementation (same batches; all but dense from the engine's
    weights, with the same optimizer and, for the bridge and torch-sparse, the same update
    schedule): through the first topology update and the step after it by default. Raises if
    the bridge's (or a stand-in's) differ from the engine's; masked is compared up to its own
    first update where its blocks are shorter (every_slow), dense only checked finite."""
    n = c["check_steps"] or c["every"] + 2
    losses = {}
    for name, r in runners.items():
        steps = min(n, 3) if name == "dense" else n
        if name == "masked" and c["every_slow"] != c["every"]:  # (its own update schedule)
            steps = min(n, c["every_slow"] + 1)
        losses[name] = [r.impl.loss_value(r.step(timed=False)) for _ in range(steps)]
    ref = losses.get("engine")
    bad = []
    for name, ls in losses.items():
        if not all(math.isfinite(v) for v in ls):
            bad.append(f"{name}: non-finite loss {ls}")
        if ref is None or name in ("engine", "dense"):
            continue
        for s, (v, e) in enumerate(zip(ls, ref, strict=False)):
            tol = (1e-4 if s == 0 else 1e-3) * (1.0 + abs(e))
            if abs(v - e) > tol:
                bad.append(f"{name}: step {s} loss {v:.6f}, the engine's {e:.6f}")
                break
    if bad:
        raise AssertionError(
            "the torch level's correctness guard failed (same weights, batches, optimizer and "
            "updates should give the engine's losses): " + "; ".join(bad)
        )
    return {"losses": losses, "ok": True, "steps": n}


def summarise(flags, times, delta_t: int) -> dict:
    """The step level's summary (median, amortised) plus the mean step over a ΔT period."""
    kinds = _classify(flags)
    out = _summary(kinds, times, delta_t)
    t, k = np.asarray(times), np.asarray(kinds)
    mean = float(np.mean(t[k == "normal"]))
    out["mean_normal_step_s"] = mean
    out["mean_step_s"] = mean
    if out["n_updates"]:
        out["mean_step_s"] = (
            mean + (out["update_step_s"] + out["after_update_step_s"] - 2 * mean) / delta_t
        )
    out["times_s"] = [float(x) for x in times]
    out["kinds"] = kinds
    return out


def _targets(impls: dict, c: dict) -> list[dict]:
    b = impls.get("bridge")
    at_target = all(c[k] == v for k, v in TARGET_CONFIG.items())
    out = []
    for impl, fig, rule, bound, what in TARGETS:
        r = impls.get(impl)
        if b is None or r is None:
            continue
        key = f"{fig}_step_s"
        if rule == "overhead<=":
            value = b[key] / r[key] - 1.0
            met = value <= bound
        else:
            value = r[key] / b[key]
            met = value >= bound
        out.append(dict(impl=impl, figure=fig, rule=rule, bound=bound, value=value, met=met,
                        what=what, at_target_config=at_target))  # fmt: skip
    return out


def run(config: dict, progress=None) -> dict:
    """The level for ``config`` (DEFAULTS overridden); returns the JSON-ready result."""
    c = {**DEFAULTS, **config}
    bad = [i for i in c["impls"] if i not in IMPLS]
    if bad:
        raise ValueError(f"impls must be a subset of {IMPLS}, got {bad}")
    if "bridge" not in c["impls"]:
        raise ValueError("the torch level measures the bridge: impls must include 'bridge'")
    for k in ("every", "every_slow"):
        if c[k] < 4:
            raise ValueError(f"{k} must be >= 4 (untimed, normal, update and after steps)")
    if c["dense_block"] < 2 or c["rounds"] < 1 or (c["check_steps"] or 1) < 1:
        raise ValueError("dense_block must be >= 2, rounds and check_steps >= 1")
    dens = shapes_and_densities(c)[1]
    if max(dens) >= 1.0:
        raise ValueError(
            f"the torch level compares sparse layers only, but {c['distribution']} at sparsity "
            f"{c['sparsity']} makes a layer dense (densities {[round(d, 4) for d in dens]}): "
            "use distribution 'uniform' or a higher sparsity"
        )
    import contextlib
    import warnings

    import numba

    from sparsecore.torch import layout_copies
    from sparsecore.torch import threads as torch_threads

    torch = _torch()
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # (torch.sparse is "beta")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(c["torch_threads"] or numba.get_num_threads()))
    data = data_for(c, "sparsecore-bench-torch-")
    say = progress or (lambda msg: None)
    batches = _batches(c, data, torch)
    order = [i for i in IMPLS if i in c["impls"]]
    engine = Engine(c, data) if "engine" in order else None
    if engine is not None:  # the engine's forward against float64, as the step level does
        check_forward(engine.tr.model, batches[0]["xT"])
    runners = {}
    t_build = {}
    for name in order:
        t0 = time.perf_counter()
        impl = engine if name == "engine" else BUILDERS[name](c)
        t_build[name] = time.perf_counter() - t0
        runners[name] = _Runner(impl, batches)
    blocks = {n: c["dense_block"] if n == "dense" else c["every_slow"] if n == "masked"
              else c["every"] for n in order}  # fmt: skip
    torch.set_flush_denormal(True)  # as the engine (TrainConfig.flush_denormals)
    fp = engine.fp_mode() if engine else contextlib.nullcontext()
    try:
        with fp:
            say("torch level: correctness guard")
            check = _check(runners, c)
            for name, r in runners.items():  # warm-up past the first update, then to where
                k = blocks[name]  # a block starts: 2 steps after an update (see _Runner.block)
                target = max(r.i, 2 if name == "dense" else k + 2)
                if name != "dense":
                    target += (2 - target) % k
                while r.i < target:
                    r.step(timed=False)
            copies = layout_copies()
            for rnd in range(c["rounds"]):
                say(f"torch level: round {rnd + 1}/{c['rounds']}")
                turn = order[rnd % len(order) :] + order[: rnd % len(order)]
                for name in turn:
                    runners[name].block(blocks[name])
            copies = layout_copies() - copies
        info = torch_threads.threading_info()
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads_before)
    impls = {}
    for name, r in runners.items():
        s = summarise(r.flags, r.times, c["delta_t"])
        s["build_s"] = t_build[name]
        impls[name] = s
    b = impls["bridge"]
    b["rigl_update_s"] = [u["seconds"] for u in runners["bridge"].impl.rigl.updates]
    b["layout_copies_per_step"] = copies / (c["rounds"] * blocks["bridge"])  # (only its layers)
    ratios = {
        n: {f: r[f"{f}_step_s"] / b[f"{f}_step_s"] for f in ("median", "mean", "amortised")}
        for n, r in impls.items()
    }
    return dict(
        config=c,
        threads=info,
        check=check,
        impls=impls,
        ratios=ratios,
        targets=_targets(impls, c),
        reference=REFERENCE,
    )


# ------------------------------------------------------------------------------ the report
def markdown(res: dict) -> str:
    """The level's table (reads the result dictionary only: no torch needed)."""
    c = res["config"]
    arch = "-".join(str(a) for a in c["arch"])
    th = res.get("threads", {})
    L = ["## PyTorch bridge: training step beside the engine and torch\n"]
    L.append(
        f"MLP {arch}, {c['sparsity']:.1%} sparsity ({c['distribution']}), batch {c['batch']}, "
        f"SGD with momentum; topology updates every ΔT = {c['delta_t']} (amortised; measured "
        f"every {c['every']} steps, masked every {c['every_slow']}), {c['rounds']} rounds in "
        f"one process, rotating order; torch threads {th.get('torch_threads', '?')}, Numba "
        f"threads {th.get('numba_threads', '?')}, GOMP_SPINCOUNT in torch's OpenMP pool: "
        f"{th.get('torch_gomp_spincount', '?')}. torch-sparse is a stand-in for a truly sparse "
        f"PyTorch CPU peer, written on torch.sparse CSR tensors (grow: {c['peer_grow']}). The "
        f"bridge's input is {c['bridge_input']} "
        f"({res['impls']['bridge'].get('layout_copies_per_step', 0):.1f} layout copies per step), "
        "the engine's feature-major.\n"
    )
    L.append(
        "Median: normal steps; mean: the mean step over a ΔT period; amortised: the median plus "
        "the update and after-update steps' extra over ΔT. × = how many times the bridge's "
        "figure the implementation's is.\n"
    )
    L.append(
        "| implementation | median ms | mean ms | amortised ms | update ms | × median | × mean "
        "| × amortised | target | met |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    targets = {t["impl"]: t for t in res.get("targets", [])}
    for name in IMPLS:
        r = res["impls"].get(name)
        if r is None:
            continue
        q = res["ratios"][name]
        t = targets.get(name)
        if t is None:
            tcell, met = "–", "–"
        elif t["rule"] == "overhead<=":
            tcell = f"bridge +{t['value']:.1%} (≤ +{t['bound']:.0%})"
            met = _met(t)
        else:
            tcell = f"≥ {t['bound']:g}× ({t['figure']})"
            met = _met(t)
        upd = f"{r['update_step_s'] * 1e3:.0f}" if r.get("update_step_s") else "–"
        L.append(
            f"| {name} | {r['median_step_s'] * 1e3:.2f} | {r['mean_step_s'] * 1e3:.2f} | "
            f"{r['amortised_step_s'] * 1e3:.2f} | {upd} | {q['median']:.2f} | {q['mean']:.2f} | "
            f"{q['amortised']:.2f} | {tcell} | {met} |"
        )
    ch = res.get("check")
    if ch:
        same = ", ".join(
            f"{n} {len(v)}" for n, v in ch["losses"].items() if n not in ("engine", "dense")
        )
        ls = ", ".join(f"{n} {v[0]:.4f}" for n, v in ch["losses"].items())
        L.append(
            f"\nCorrectness guard passed: the first losses equal the engine's (same weights, "
            f"batches, optimizer and update schedule; steps compared: {same}, the first update at "
            f"step {c['every']}); first-step losses: {ls}."
        )
    if any(not t["at_target_config"] for t in res.get("targets", [])):
        L.append(
            "\n(The targets are for 784-4096-4096-10 at 99%, batch 128, ΔT 100: this run's "
            "configuration differs, so 'met' is only indicative.)"
        )
    L.append(f"\nReference, {res.get('reference', REFERENCE)}.\n")
    return "\n".join(L) + "\n"


def _met(t) -> str:
    yes = "yes" if t["met"] else "**no**"
    return yes if t["at_target_config"] else f"({yes})"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    res = run(json.loads(argv[0]) if argv else {}, progress=lambda m: print(m, file=sys.stderr))
    print(markdown(res), file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
