"""``RigL``: the engine's topology updates for a torch model and any torch optimizer.

Use::

    rigl = RigL(model, optimizer, delta_t=100, alpha=0.3, t_end=int(0.75 * total_steps))
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()      # (several backward passes accumulate: fine)
        if rigl.step():                      # a topology update on update steps
            optimizer.step()                 # official RigL: no optimizer step on those

What an update does, per sparse layer (``SparseModule``: SparseLinear today): the engine's own
updater (sparsecore/rigl/updater.py: ``RigL``, ``SET`` or ``Static``) drops the K = floor(f(t)·nnz)
smallest |w| and grows K absent connections, for RigL where |dL/dW| = |dY·Xᵀ| of the step's
batch is largest through the fused tiled top-k kernel (``grow="exact"``: the dense gradient is
never formed) or over a sample (``grow="sampled"``). New connections start at 0 and the
optimizer's per-parameter state is carried in place: every state tensor shaped like the values
(SGD's ``momentum_buffer``; Adam/AdamW's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; any
other optimizer's) keeps its kept entries bit for bit and is 0 at new ones; the values'
``.grad`` is carried the same way. nnz is constant and every Parameter keeps its identity, so
the optimizer's parameter list (and DDP's buckets) stay valid.

What it records: on update steps only, each sparse layer's feature-major input and the gradient
at its output (a forward hook and a tensor hook, armed for that step; other steps pay one
``is None`` test per layer). Several forward/backward passes before the step (gradient
accumulation) are concatenated along the batch, which is exactly the accumulated gradient's
dY·Xᵀ.

With a ``torch.amp.GradScaler``: ``scaler.scale(loss).backward()``, then
``if rigl.step(): scaler.step(optimizer); scaler.update()`` (the scaler's ``update`` only after
its ``step``). A recorded batch holding NaN or inf (an overflowing scaled step) is refused with a
clear error before anything changes; the ranking of |dY·Xᵀ| does not depend on the scale.

New connections start with every carried state entry at 0: right for SGD's momentum and Adam's
moments (RigL's rule); an optimizer whose neutral state is not 0 (Rprop's step sizes, Adagrad
with ``initial_accumulator_value``) gets 0 there too.

Several processes (``torch.distributed`` initialised, e.g. under DDP): at an update every rank
gathers every rank's recorded inputs and output gradients (``all_gather``, in rank order) and
runs the same update on the global batch, so the grow follows the global batch's gradient, not
one rank's, and every rank ends with the same topology; a checksum of each layer's pattern is
compared across ranks after the update (a drift raises at once). DDP: the patterns are equal
by construction, so its broadcast of every buffer before each forward (the default) is not
needed: ``broadcast_buffers=False`` (``forward_sync_buffers=False`` in newer torch) saves it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from kernels.backend import check_scores_fit_float32
from kernels.formats import CSR, DeviceCSR
from sparsecore.rigl.schedule import UpdateSchedule
from sparsecore.rigl.updater import UPDATERS
from sparsecore.rigl.updater import RigL as EngineRigL
from sparsecore.torch import _ops
from sparsecore.torch.linear import SparseModule

METHODS = tuple(UPDATERS)  # "rigl", "set", "static"


class _Layer:
    """A torch sparse layer as the engine's updater sees a SparseLinear: W (a CSR over the
    layer's own memory), its side ``dev``, the recorded batch ``x``/``dy`` (feature-major) and
    the values' gradient ``gW``; ``set_weight`` takes the new pattern."""

    shard = None

    def __init__(self, name: str, module: SparseModule, xT, dyT):
        self.name, self.module = name, module
        values = module.values
        self.dev = _ops.backend_of(values)
        P = module.pattern()
        v = _ops.arrays(self.dev, values)[0]
        shape = (P.rows, P.cols)
        ip, ix = P.csr_arrays()  # (the Pattern's private, checked copies: never written)
        if self.dev.on_device:
            self.W = DeviceCSR(ip, ix, v, shape)
        else:
            self.W = CSR._trusted(ip, ix, v, shape)
        self.x, self.dy = (None, None) if xT is None else _ops.arrays(self.dev, xT, dyT)
        g = values.grad
        xp = self.dev.xp
        self.gW = _ops.arrays(self.dev, g)[0] if g is not None else xp.zeros(P.nnz, np.float32)
        self.changed = False

    def set_weight(self, W):
        self.W = W
        self.gW = self.dev.xp.empty(W.nnz, np.float32)  # (the updater remaps the old into it)
        self.changed = True

    def params(self):
        return []


class _OptimizerState:
    """The engine updater's view of a torch optimizer: ``remap(name, src)`` notes how a
    layer's entries moved; ``commit()``, once every layer's update succeeded, carries every
    state tensor shaped like the layer's values in place (new entries 0)."""

    def __init__(self, optimizer, values_of: dict):
        self.optimizer = optimizer
        self.values_of = values_of  # "<layer>.W" -> the layer's values Parameter
        self.pending = []

    def remap(self, name: str, src):
        self.pending.append((name, src))

    def commit(self):
        if self.optimizer is None:
            return
        for name, src in self.pending:
            p = self.values_of[name]
            state = self.optimizer.state.get(p, {})
            if not state:
                continue
            where = _tensor(src, p.device).to(torch.int64)
            for t in state.values():
                if isinstance(t, torch.Tensor) and t.shape == p.shape and t.dtype.is_floating_point:
                    # (torch indexing: any dtype and layout the optimizer keeps, bf16 included)
                    carried = t[where.clamp(min=0)]
                    carried[where < 0] = 0
                    with torch.no_grad():
                        t.copy_(carried)

    def rebind(self, params):
        pass  # (the Parameters keep their identity: nothing to point at anew)


def _tensor(a, device):
    """A tensor over a launcher's result (a read-only NumPy array is copied first: torch
    views only writeable memory)."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a if a.flags.writeable else a.copy())
    return torch.from_dlpack(a).to(device)


class RigL:
    """The topology scheduler (see the module docstring).

    model: any ``nn.Module`` (DDP-wrapped too) holding SparseLinear layers (``sparsify``).
    optimizer: the torch optimizer whose per-parameter state is carried at updates (None: no
    state). delta_t, alpha, decay, t_end: the schedule (updates at 0 < t < t_end with
    t % delta_t == 0, dropping f(t) = alpha/2·(1 + cos(π t / t_end)) of each layer); give
    ``t_end`` or ``total_steps`` (then t_end = end_fraction·total_steps, RigL's 75%).
    method: "rigl" | "set" | "static"; grow (RigL): "exact" (the fused top-k over every absent
    connection) | "sampled" (the best of ``candidates``·K uniform candidates). seed: SET's and
    the sampled grow's draws, seeded by (seed, step, layer) as in the engine.
    step_on_update: take the optimizer step on update steps too (``step()`` returns True).
    process_group: the torch.distributed group whose ranks share one topology (None: the
    default group when torch.distributed is initialised with several ranks).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer=None,
        *,
        delta_t: int = 100,
        alpha: float = 0.3,
        t_end: int | None = None,
        total_steps: int | None = None,
        end_fraction: float = 0.75,
        decay: str = "cosine",
        method: str = "rigl",
        grow: str = "exact",
        candidates: float = 10,
        tile_bytes: int | None = None,
        seed: int = 0,
        step_on_update: bool = False,
        process_group=None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if (t_end is None) == (total_steps is None):
            raise ValueError("give t_end (the last step with updates) or total_steps, not both")
        if t_end is None:
            schedule = UpdateSchedule.for_training(
                int(total_steps), end_fraction=end_fraction, delta_t=delta_t, alpha=alpha,
                decay=decay,
            )  # fmt: skip
        else:
            schedule = UpdateSchedule(t_end=t_end, delta_t=delta_t, alpha=alpha, decay=decay)
        kw = {}
        if method == "rigl":
            kw = dict(grow=grow, candidates=candidates, tile_bytes=tile_bytes)
        self.updater = UPDATERS[method](schedule, seed, **kw)
        self.schedule = schedule
        self.method = method
        self.model = model
        self.optimizer = optimizer
        self.step_on_update = bool(step_on_update)
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseModule)]
        if not self.layers:
            raise ValueError(
                "the model holds no sparse layers: build it with SparseLinear, or call "
                "sparsecore.torch.sparsify(model, sparsity) first"
            )
        if optimizer is not None:
            self._check_optimizer(optimizer)
        self.process_group = process_group
        self.t = 0
        self.updates: list[dict] = []  # one entry per update, as the engine's trainer keeps
        self.last_report = None
        self._arm()

    @classmethod
    def from_config(cls, model: nn.Module, optimizer, cfg, total_steps: int) -> RigL:
        """The scheduler the engine's loop would run for ``cfg`` (a ``sparsecore.TrainConfig``:
        method, ΔT, α, T_end as a fraction of ``total_steps``, grow, candidates, tile, seed,
        step_on_update)."""
        if cfg.method == "dense":
            raise ValueError("cfg.method is 'dense': there is no topology to update")
        return cls(
            model, optimizer, delta_t=cfg.delta_t, alpha=cfg.alpha, total_steps=total_steps,
            end_fraction=cfg.t_end, method=cfg.method, grow=cfg.grow,
            candidates=cfg.grow_candidates, tile_bytes=cfg.grow_tile_bytes, seed=cfg.seed,
            step_on_update=cfg.step_on_update,
        )  # fmt: skip

    def _check_optimizer(self, optimizer):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, m in self.layers if id(m.values) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the values of sparse layer(s) {missing}: build it "
                "from model.parameters() after sparsify"
            )

    # ------------------------------------------------------------------ the schedule
    def is_update_step(self, t: int | None = None) -> bool:
        return self.updater.is_update_step(self.t if t is None else t)

    def _arm(self):
        # (only a gradient grow reads the batch: SET and static record nothing)
        on = self.is_update_step() and isinstance(self.updater, EngineRigL)
        for _, m in self.layers:
            m.arm(on)

    def step(self) -> bool:
        """Call once per iteration, after its backward pass(es). On update steps the topology
        is updated; returns whether to take the optimizer step (False on update steps unless
        step_on_update)."""
        take = True
        if self.is_update_step():
            self.last_report = self.update()
            take = self.step_on_update
        self.t += 1
        self._arm()
        return take

    # ------------------------------------------------------------------ the update
    def update(self):
        """The topology update of step ``t`` (the recorded batch's gradients); returns the
        engine's UpdateReport. Atomic: the recorded batch is checked first, and the new
        patterns, gradients and optimizer state are installed only once every layer's update
        is computed."""
        t0 = time.perf_counter()
        group = self._group()
        needs_batch = isinstance(self.updater, EngineRigL)
        batches = [m.recorded() if needs_batch else (None, None) for _, m in self.layers]
        if needs_batch:
            self._check_batches(batches, group)
        views = []
        for (name, m), (xT, dyT) in zip(self.layers, batches, strict=True):
            if group is not None and xT is not None:
                xT, dyT = _gather_batch(xT, group), _gather_batch(dyT, group)
            views.append(_Layer(name, m, xT, dyT))
            if needs_batch:  # |dY·Xᵀ| must fit float32 (else the top-k would rank infs)
                check_scores_fit_float32(views[-1].dev, views[-1].dy, views[-1].x)
        model = _Model(views)
        opt = _OptimizerState(self.optimizer, {f"{v.name}.W": v.module.values for v in views})
        with _ops._on_stream(views[0].dev, views[0].module.values):
            report = self.updater.update(self.t, model, opt)
            for v in views:  # (nothing above changed the layers or the optimizer)
                if v.changed:
                    self._install(v)
                v.module.arm(False)
            opt.commit()
        if group is not None:
            _check_same_topology(self.layers, group, self.t)
        self.updates.append(
            dict(
                step=report.step,
                drop_fraction=report.drop_fraction,
                layers=report.per_layer,
                seconds=time.perf_counter() - t0,
            )  # fmt: skip
        )
        return report

    def _check_batches(self, batches, group):
        """Every layer recorded a batch with finite values, on every rank (checked together:
        one rank raising alone would leave the others waiting in the gather)."""
        problems = []
        for (name, _), (xT, dyT) in zip(self.layers, batches, strict=True):
            if xT is None:
                problems.append(
                    f"RigL needs the input and output gradient of layer {name} at step {self.t}: "
                    "run forward and backward (with gradients) before rigl.step()"
                )
            elif not (bool(torch.isfinite(xT).all()) and bool(torch.isfinite(dyT).all())):
                problems.append(
                    f"layer {name}'s recorded input or output gradient at step {self.t} holds "
                    "NaN or inf, so the grow cannot rank |dY·Xᵀ| (with a GradScaler: call "
                    "rigl.step() only on steps the scaler did not skip)"
                )
        if group is not None:
            import torch.distributed as dist

            bad = torch.tensor([len(problems)], dtype=torch.int64, device=self._device())
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
            if int(bad) and not problems:
                problems.append(
                    f"another rank could not update at step {self.t} (it raised the reason)"
                )
        if problems:
            raise RuntimeError("; ".join(problems))

    def _device(self):
        import torch.distributed as dist

        backend = dist.get_backend(self._group())
        return self.layers[0][1].values.device if backend == "nccl" else torch.device("cpu")

    def _install(self, v: _Layer):
        m, W = v.module, v.W
        dev = m.values.device
        m.set_pattern(_tensor(W.indptr, dev), _tensor(W.indices, dev), _tensor(W.data, dev))
        if m.values.grad is not None:
            with torch.no_grad():
                m.values.grad.copy_(_tensor(v.gW, dev))

    def _group(self):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        g = dist.group.WORLD if self.process_group is None else self.process_group
        return g if dist.get_world_size(g) > 1 else None

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """What an exact resume needs beyond the model's and the optimizer's state_dicts (the
        patterns are in the model's): the step and the settings, checked on load."""
        return dict(t=self.t, updates=list(self.updates), **self._settings())

    def _settings(self) -> dict:
        """The settings that shape the run (a resume must not change them)."""
        s, u = self.schedule, self.updater
        return dict(
            method=self.method, delta_t=s.delta_t, alpha=s.alpha, t_end=s.t_end, decay=s.decay,
            seed=u.seed, step_on_update=self.step_on_update,
            grow=getattr(u, "grow_mode", None), candidates=getattr(u, "candidates", None),
        )  # fmt: skip

    def load_state_dict(self, d: dict):
        for k, v in self._settings().items():
            if k in d and d[k] != v:
                raise ValueError(f"the saved RigL state has {k}={d[k]!r}, this scheduler {v!r}")
        t = d.get("t")
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"the saved RigL state's t must be a non-negative int, got {t!r}")
        self.t = t
        self.updates = list(d.get("updates", []))
        self._arm()

    def report_line(self, report=None) -> str:
        """One line per update, as the engine prints it."""
        r = report or self.last_report
        if r is not None:
            step, f, layers = r.step, r.drop_fraction, r.per_layer
        elif self.updates:  # (after a resume: the saved entries)
            u = self.updates[-1]
            step, f, layers = u["step"], u["drop_fraction"], u["layers"]
        else:
            return "no topology update yet"
        grown = sum(d["grown"] for d in layers)
        secs = sum(d["seconds"] for d in layers)
        return (
            f"step {step}: topology update, drop fraction {f:.3f}, "
            f"{grown} connections regrown over {len(layers)} layers in {secs * 1e3:.1f} ms"
        )


class _Model:
    """The engine's view of the model: its sparse layers."""

    def __init__(self, layers):
        self._layers = layers

    def sparse_layers(self):
        return self._layers


def _gather_batch(a: torch.Tensor, group) -> torch.Tensor:
    """The (features, N_r) tensors of every rank, concatenated along N in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    n = torch.tensor([a.shape[1]], dtype=torch.int64, device=a.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    width = max(sizes)
    padded = a if a.shape[1] == width else torch.nn.functional.pad(a, (0, width - a.shape[1]))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:, :s] for p, s in zip(parts, sizes, strict=True)], dim=1).contiguous()


def _check_same_topology(layers, group, step: int):
    """Raise at once if the ranks' patterns differ after an update (a checksum per layer)."""
    import torch.distributed as dist

    sums = []
    for _, m in layers:
        ix = m.indices.to(torch.int64)
        pos = torch.arange(ix.shape[0], dtype=torch.int64, device=ix.device)
        sums.append(((ix + 1) * (pos % 65521 + 1)).sum() + m.indptr.to(torch.int64).sum())
    mine = torch.stack(sums)
    top, low = mine.clone(), mine.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    bad = [layers[i][0] for i in range(len(layers)) if int(top[i]) != int(low[i])]
    if bad:
        raise RuntimeError(
            f"after the topology update of step {step} the ranks hold different patterns in "
            f"layers {bad}: their inputs differ (same model, optimizer and seed on every rank?)"
        )
