"""Optimizers whose state is nnz-sized for sparse weights, and learning-rate schedules.

State arrays (momentum, Adam moments) have the shape of their parameter: for a sparse layer's
weight that is the CSR's ``data`` (nnz,). After a topology update ``remap(name, src, new_value)``
carries each state array to the new pattern: kept connections keep their state bit for bit, new
connections (src = -1) start at zero.

On a device (the parameters' side, see sparsecore/device.py) the state lives there too and each
update is one fused elementwise kernel (kernels/cuda/elementwise.cu) per parameter.
"""

from __future__ import annotations

import math

import numpy as np

from sparsecore import device as _device


class Optimizer:
    state_names: tuple[str, ...] = ()

    def __init__(self, params, lr: float, weight_decay: float = 0.0, device=None):
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        params = list(params)
        names = [p.name for p in params]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"parameter name(s) {dup} appear more than once: give every layer a unique name"
            )
        self.params = {p.name: p for p in params}
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.t = 0
        self.dev = _device.get_device(device) if device is not None else _device.of(params)
        xp = self.dev.xp
        self.state = {p.name: {s: xp.zeros_like(p.value) for s in self.state_names} for p in params}

    def step(self, lr: float | None = None):
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        for name, p in self.params.items():
            self._update(p, self.state[name], lr)

    def _update(self, p, st, lr):
        raise NotImplementedError

    def rebind(self, params):
        """Point at the model's current arrays (after a topology update replaced some)."""
        for p in params:
            self.params[p.name] = p

    def remap(self, name: str, src: np.ndarray):
        """Carry the state of parameter ``name`` across a topology update (new entries: 0)."""
        st = self.state[name]
        for key, arr in st.items():
            st[key] = self.dev.remap(src, arr, 0.0)

    def state_bytes(self) -> int:
        return sum(a.nbytes for st in self.state.values() for a in st.values())

    def state_dict(self) -> dict:
        """The state as NumPy arrays (copied from a device)."""
        out = {"t": np.array(self.t)}
        for name, st in self.state.items():
            for key, arr in st.items():
                out[f"{name}/{key}"] = _device.to_host(arr)
        return out

    def load_state_dict(self, d: dict):
        self.t = int(d["t"])
        for name, st in self.state.items():
            for key in st:
                arr = d[f"{name}/{key}"]
                if arr.shape != self.params[name].value.shape:
                    raise ValueError(
                        f"optimizer state {name}/{key} has shape {arr.shape}, expected "
                        f"{self.params[name].value.shape}"
                    )
                # (C order: a checkpoint may hold Fortran-ordered members; the fused updates
                # work on flat views)
                st[key] = self.dev.asarray(np.array(arr, dtype=np.float32, order="C"))


def _flat(dev, arrays):
    """1-D views of the arrays for a fused update (a C-contiguous copy of any that is not; such
    copies are written back by _write_back: a reshape would silently copy and lose the update)."""
    return [a.reshape(-1) if a.flags.c_contiguous else dev.xp.ascontiguousarray(a).reshape(-1)
            for a in arrays]  # fmt: skip


def _write_back(arrays, flats):
    """The updated copies back into their non-contiguous arrays (the gradient, arrays[1], is
    only read by the updates: not copied back)."""
    for k, (a, f) in enumerate(zip(arrays, flats, strict=True)):
        if k != 1 and not a.flags.c_contiguous:
            a[...] = f.reshape(a.shape)


class SGD(Optimizer):
    """SGD with momentum (heavy ball or Nesterov) and L2 weight decay (added to the gradient)."""

    def __init__(self, params, lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, device=None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.state_names = ("momentum",) if momentum > 0 else ()
        super().__init__(params, lr, weight_decay, device)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def _update(self, p, st, lr):
        if self.momentum:  # one fused pass over the (flattened) arrays
            arrays = (p.value, p.grad, st["momentum"])
            flat = _flat(self.dev, arrays)
            self.dev.ew.sgd_momentum(
                *flat,
                np.float32(lr),
                np.float32(self.momentum),
                np.float32(self.weight_decay),
                self.nesterov,
            )
            _write_back(arrays, flat)
            return
        if self.dev.on_device:
            self.dev.ew.sgd(p.value, p.grad, lr, self.weight_decay)
            return
        g = p.grad
        if self.weight_decay:
            g = g + np.float32(self.weight_decay) * p.value
        p.value -= np.float32(lr) * g


class Adam(Optimizer):
    """Adam; decoupled=True gives AdamW (weight decay applied to the weights, not the gradient)."""

    state_names = ("m", "v")

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        decoupled=False,
        device=None,
    ):
        super().__init__(params, lr, weight_decay, device)
        self.b1, self.b2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.decoupled = bool(decoupled)

    def _update(self, p, st, lr):
        # one fused pass (CPU: kernels/cpu/elementwise.adam, NumPy's float32 evaluation order
        # bit for bit; a device: the CUDA kernel of the same arguments)
        c1 = 1 - self.b1**self.t
        c2 = 1 - self.b2**self.t
        f = np.float32
        arrays = (p.value, p.grad, st["m"], st["v"])
        flat = _flat(self.dev, arrays)
        self.dev.ew.adam(
            *flat,
            f(self.b1),
            f(1 - self.b1),
            f(self.b2),
            f(1 - self.b2),
            f(lr / c1),
            f(c2),
            f(self.eps),
            f(self.weight_decay) if not self.decoupled else f(0),
            self.decoupled,
            f(lr * self.weight_decay) if self.decoupled else f(0),
        )
        _write_back(arrays, flat)


def AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, device=None):
    return Adam(params, lr, betas, eps, weight_decay, decoupled=True, device=device)


# ------------------------------------------------------------------ learning-rate schedules
def lr_at(
    step: int,
    *,
    base: float,
    total: int,
    schedule: str = "cosine",
    warmup: int = 0,
    step_every: int = 0,
    gamma: float = 0.1,
    min_lr: float = 0.0,
) -> float:
    """Learning rate at a step: linear warm-up over ``warmup`` steps, then
    "constant", "cosine" (to min_lr at ``total``), or "step" (× gamma every step_every steps)."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    s = step - warmup
    span = max(1, total - warmup)
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span))
    if schedule == "step":
        if step_every <= 0:
            raise ValueError("the step schedule needs step_every > 0")
        return base * gamma ** (s // step_every)
    raise ValueError(f"schedule must be 'constant', 'cosine' or 'step', got {schedule!r}")
