"""The PyTorch bridge's RigL scheduler (sparsecore/torch/rigl.py) against the engine.

An ``nn.Sequential`` MLP sparsified with ``sparsify(model, S, "erk", seed=s)`` (biases zeroed)
starts from exactly the engine's ``mlp(sizes, densities, seed=s)``; trained on the same batches
with a torch optimizer and ``RigL`` (``if rigl.step(): optimizer.step()``) it must follow the
engine's own loop (``updater.update`` on update steps, else ``opt.step()``): the same losses,
the same topology after every update, the same weights up to float32 rounding. Besides: the
update's own criterion checked from scratch (drop the smallest |w|, grow the largest |dL/dW|),
gradient accumulation, the optimizer state carried in place, exact resume, what is recorded
when, the errors and the report. Shapes and data are drawn fresh each run (tests/conftest.py's
``rng``: replay with SPARSECORE_TEST_SEED).
"""

import gc
import io
import math
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from sparsecore import optim as eoptim  # noqa: E402
from sparsecore.layers import SoftmaxCrossEntropy, mlp  # noqa: E402
from sparsecore.rigl import updater as eupdater  # noqa: E402
from sparsecore.rigl.distributions import layer_densities  # noqa: E402
from sparsecore.rigl.schedule import UpdateSchedule  # noqa: E402
from sparsecore.torch import RigL, SparseLinear, sparsify  # noqa: E402

# ---------------------------------------------------------------------------- helpers


def draw_sizes(rng, sparsity):
    """Odd MLP sizes whose ERK densities all stay below 1 (every layer sparse on both sides)."""
    while True:
        sizes = [
            int(rng.integers(17, 41)),
            int(rng.integers(13, 33)),
            int(rng.integers(11, 27)),
            int(rng.integers(3, 9)),
        ]
        shapes = [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]
        dens = layer_densities(sparsity, shapes, "erk")
        if max(dens) < 0.95:
            return sizes, dens


def torch_mlp(sizes):
    mods = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def sparse_torch_mlp(sizes, sparsity, seed):
    tm = sparsify(torch_mlp(sizes), sparsity, "erk", seed=seed)
    for m in tm.modules():
        if isinstance(m, SparseLinear):
            nn.init.zeros_(m.bias)
    return tm


def sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def make_pair(sizes, dens, sparsity, seed):
    em = mlp(sizes, dens, seed=seed)
    tm = sparse_torch_mlp(sizes, sparsity, seed)
    for el, tl in zip(em.sparse_layers(), sparse_layers(tm), strict=True):
        assert np.array_equal(el.W.indptr, tl.indptr.numpy())
        assert np.array_equal(el.W.indices, tl.indices.numpy())
        assert np.array_equal(el.W.data, tl.values.detach().numpy())
    return em, tm


def batches(rng, n_in, n_out, steps, batch):
    out = []
    for _ in range(steps):
        x = rng.standard_normal((batch, n_in)).astype(np.float32)
        y = rng.integers(0, n_out, batch)
        out.append((x, y))
    return out


def topology(model):
    return [(m.indptr.clone(), m.indices.clone()) for m in sparse_layers(model)]


def weights(model):
    return [m.values.detach().clone() for m in sparse_layers(model)] + [
        m.bias.detach().clone() for m in sparse_layers(model)
    ]


def run_engine(em, eopt, eu, data, step_on_update=False):
    """The engine's loop: update on update steps (then a step only with step_on_update)."""
    lossf = SoftmaxCrossEntropy()
    losses, topo, ws = [], {}, {}
    for t, (x, y) in enumerate(data):
        logits = em.forward(np.ascontiguousarray(x.T))
        loss, dl, _ = lossf(logits, y)
        em.backward(dl)
        if eu.is_update_step(t):
            eu.update(t, em, eopt)
            topo[t] = [(l.W.indptr.copy(), l.W.indices.copy()) for l in em.sparse_layers()]
            if step_on_update:
                eopt.step()
            ws[t] = [l.W.data.copy() for l in em.sparse_layers()]
        else:
            eopt.step()
        losses.append(loss)
    final = [l.W.data.copy() for l in em.sparse_layers()] + [l.b.copy() for l in em.sparse_layers()]
    return np.array(losses), topo, ws, final


def torch_step(model, opt, rigl, x, y, parts=1):
    """One iteration by the usage convention; ``parts`` micro-batches accumulate the gradient
    (each loss weighted by its share of the batch). Returns (loss, whether it was an update)."""
    opt.zero_grad()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    total = 0.0
    for xs, ys in zip(torch.tensor_split(xt, parts), torch.tensor_split(yt, parts), strict=True):
        loss = F.cross_entropy(model(xs), ys) * (xs.shape[0] / xt.shape[0])
        loss.backward()
        total += loss.detach().item()
    update = rigl.is_update_step()
    took = rigl.step()
    assert took == (not update or rigl.step_on_update)
    if took:
        opt.step()
    return total, update


def run_torch(model, opt, rigl, data, parts=1):
    losses, topo, ws = [], {}, {}
    for t, (x, y) in enumerate(data):
        assert rigl.t == t
        loss, update = torch_step(model, opt, rigl, x, y, parts)
        if update:
            topo[t] = topology(model)
            ws[t] = [m.values.detach().clone() for m in sparse_layers(model)]
        losses.append(loss)
    return np.array(losses), topo, ws, weights(model)


def assert_same_topology(topo_a, topo_b):
    assert topo_a.keys() == topo_b.keys() and topo_a
    for t in topo_a:
        for (ip_a, ix_a), (ip_b, ix_b) in zip(topo_a[t], topo_b[t], strict=True):
            ip_a, ix_a = np.asarray(ip_a), np.asarray(ix_a)
            ip_b, ix_b = np.asarray(ip_b), np.asarray(ix_b)
            assert np.array_equal(ip_a, ip_b), f"indptr differs after the update of step {t}"
            assert np.array_equal(ix_a, ix_b), f"indices differ after the update of step {t}"


def assert_close_weights(a, b, rtol, atol):
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(wa), np.asarray(wb), rtol=rtol, atol=atol)


def dense(layer, what=None):
    """A layer's (out, in) dense matrix of ``what`` (its values by default) at its pattern."""
    v = layer.values.detach() if what is None else what
    m, n = layer.out_features, layer.in_features
    rows = torch.repeat_interleave(torch.arange(m), layer.indptr.diff().to(torch.int64))
    out = torch.zeros(m, n, dtype=v.dtype)
    out[rows, layer.indices.to(torch.int64)] = v
    return out


def coords(layer):
    """{(row, col): position in values} of a layer's pattern."""
    ip, ix = layer.indptr.numpy(), layer.indices.numpy()
    return {(i, int(ix[p])): p for i in range(layer.out_features) for p in range(ip[i], ip[i + 1])}


# ---------------------------------------------------------------------------- 1. the engine's RigL

SETTINGS = {
    # name: (torch optimizer, engine optimizer, RigL kwargs, engine updater kwargs)
    "sgd-momentum": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: eoptim.SGD(p, lr=0.05, momentum=0.9),
        {},
        {},
    ),
    "sgd-nesterov-wd": (
        lambda p: torch.optim.SGD(p, lr=0.04, momentum=0.8, nesterov=True, weight_decay=5e-3),
        lambda p: eoptim.SGD(p, lr=0.04, momentum=0.8, nesterov=True, weight_decay=5e-3),
        {},
        {},
    ),
    "adam": (
        lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-3),
        lambda p: eoptim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-3),
        {},
        {},
    ),
    "adamw": (
        lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05),
        lambda p: eoptim.AdamW(p, lr=3e-3, weight_decay=0.05),
        {},
        {},
    ),
    "set": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: eoptim.SGD(p, lr=0.05, momentum=0.9),
        {"method": "set"},
        {"method": "set"},
    ),
    "sampled": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: eoptim.SGD(p, lr=0.05, momentum=0.9),
        {"grow": "sampled", "candidates": 3},
        {"grow": "sampled", "candidates": 3},
    ),
    "exact-small-tiles-constant-decay": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: eoptim.SGD(p, lr=0.05, momentum=0.9),
        {"tile_bytes": 64, "decay": "constant"},
        {"tile_bytes": 64},
    ),
    "step-on-update-sgd": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: eoptim.SGD(p, lr=0.05, momentum=0.9),
        {"step_on_update": True},
        {"step_on_update": True},
    ),
    "step-on-update-adam": (
        lambda p: torch.optim.Adam(p, lr=3e-3),
        lambda p: eoptim.Adam(p, lr=3e-3),
        {"step_on_update": True},
        {"step_on_update": True},
    ),
}


def engine_updater(schedule, seed, kw):
    kw = dict(kw)
    kw.pop("step_on_update", None)
    method = kw.pop("method", "rigl")
    return eupdater.UPDATERS[method](schedule, seed, **kw)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_same_as_engine(setting, rng):
    topt_f, eopt_f, rkw, ekw = SETTINGS[setting]
    sparsity = 0.85
    sizes, dens = draw_sizes(rng, sparsity)
    seed = int(rng.integers(2**31))
    em, tm = make_pair(sizes, dens, sparsity, seed)
    delta_t, t_end, alpha = 5, 40, 0.5
    decay = rkw.get("decay", "cosine")
    schedule = UpdateSchedule(t_end=t_end, delta_t=delta_t, alpha=alpha, decay=decay)
    eu = engine_updater(schedule, seed, ekw)
    eopt = eopt_f(em.params())
    topt = topt_f(tm.parameters())
    rigl = RigL(tm, topt, delta_t=delta_t, alpha=alpha, t_end=t_end, seed=seed, **rkw)
    data = batches(rng, sizes[0], sizes[-1], 44, int(rng.integers(9, 24)))
    start = topology(tm)

    e_loss, e_topo, e_ws, e_final = run_engine(em, eopt, eu, data, ekw.get("step_on_update"))
    t_loss, t_topo, t_ws, t_final = run_torch(tm, topt, rigl, data)

    assert sorted(t_topo) == [5, 10, 15, 20, 25, 30, 35]
    np.testing.assert_allclose(t_loss, e_loss, rtol=1e-5)
    assert_same_topology(t_topo, e_topo)
    # the topology really moved: the first update replaced connections in every layer
    first = rigl.updates[0]
    assert all(d["grown"] > 0 for d in first["layers"])
    assert all(not torch.equal(a[1], b[1]) for a, b in zip(start, t_topo[5], strict=True))
    for t in t_ws:  # the weights right after each update (new connections at 0)
        assert_close_weights(t_ws[t], e_ws[t], rtol=1e-4, atol=2e-6)
    assert_close_weights(t_final, e_final, rtol=1e-4, atol=2e-6)


def test_static_never_updates(rng):
    sizes, _ = draw_sizes(rng, 0.8)
    tm = sparse_torch_mlp(sizes, 0.8, 1)
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    rigl = RigL(tm, opt, delta_t=2, t_end=20, method="static")
    before = topology(tm)
    for x, y in batches(rng, sizes[0], sizes[-1], 12, 8):
        opt.zero_grad()
        F.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        assert rigl.step()
        opt.step()
    assert rigl.updates == [] and rigl.t == 12
    assert_same_topology({0: before}, {0: topology(tm)})


def test_total_steps_sets_t_end():
    tm = sparse_torch_mlp([10, 8, 3], 0.7, 0)
    r = RigL(tm, None, delta_t=10, total_steps=200)
    assert r.schedule.t_end == 150
    r = RigL(tm, None, delta_t=10, total_steps=200, end_fraction=0.5)
    assert r.schedule.t_end == 100
    assert [t for t in range(200) if r.is_update_step(t)] == [10, 20, 30, 40, 50, 60, 70, 80, 90]


# ---------------------------------------------------------------------------- the criterion itself


class Residual(nn.Module):
    """Not a Sequential: a residual block over (batch, tokens, features) inputs."""

    def __init__(self, d, hidden, classes):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = x + self.down(torch.tanh(self.up(x)))
        return self.head(h).mean(dim=1)


class Reused(nn.Module):
    """One layer applied twice per forward: its gradient sums over both uses."""

    def __init__(self, d, hidden, classes):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.relu(self.up(x))
        h = torch.relu(self.down(h))
        return self.head(torch.relu(self.down(h)))


@pytest.mark.parametrize("kind", ["residual-3d", "reused-layer"])
def test_update_drops_smallest_and_grows_largest_gradient(kind, rng):
    """From scratch (no engine): at an update the dropped connections are among the k smallest
    |w|, the grown ones have |dL/dW| (of the step's batch: every token, every use of the layer)
    at least that of every connection left absent, kept connections keep their weights, new
    ones are 0."""
    d, hidden, classes = int(rng.integers(9, 17)), int(rng.integers(15, 31)), 5
    net = Residual if kind == "residual-3d" else Reused
    model = sparsify(net(d, hidden, classes), 0.8, seed=int(rng.integers(2**31)))
    layers = dict(model.named_modules())
    names = [n for n, m in layers.items() if isinstance(m, SparseLinear)]
    assert names == ["up", "down", "head"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, delta_t=3, t_end=30, alpha=0.4, seed=7)
    seen = {}

    def capture(name):
        def hook(mod, inp, out):
            x = inp[0].detach().reshape(-1, mod.in_features).double()
            if out.requires_grad:
                out.register_hook(lambda g: seen[name].append((x, g.detach())))

        return hook

    for n in names:
        layers[n].register_forward_hook(capture(n))
    checked = 0
    for t in range(10):
        seen.update({n: [] for n in names})
        if kind == "residual-3d":
            tokens = int(rng.integers(2, 6))
            x = torch.from_numpy(rng.standard_normal((7, tokens, d)).astype(np.float32))
            x = x.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous input too
        else:
            x = torch.from_numpy(rng.standard_normal((11, d)).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, classes, 7 if kind == "residual-3d" else 11))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if not rigl.is_update_step():
            assert rigl.step()
            opt.step()
            continue
        ones = {n: torch.ones(layers[n].nnz) for n in names}
        old = {n: (dense(layers[n]), dense(layers[n], ones[n]).bool()) for n in names}
        f = rigl.schedule.drop_fraction(t)
        assert not rigl.step()
        for n in names:
            m = layers[n]
            w_old, mask_old = old[n]
            mask_new = dense(m, ones[n]).bool()
            k = int(f * m.nnz)
            assert int(mask_new.sum()) == int(mask_old.sum()) == m.nnz
            dropped = mask_old & ~mask_new
            grown = mask_new & ~mask_old
            assert int(dropped.sum()) == int(grown.sum()) <= k
            # drop: every dropped connection is among the k smallest |w|
            kth = torch.sort(w_old[mask_old].abs()).values[k - 1]
            assert bool((w_old[dropped].abs() <= kth).all())
            # grow: by |Σ dY·Xᵀ| of this step's batch (every token a column, every use summed)
            assert len(seen[n]) == (2 if (kind, n) == ("reused-layer", "down") else 1)
            score = sum(g.reshape(-1, m.out_features).double().T @ xs for xs, g in seen[n])
            score = score.abs()
            if bool(grown.any()):
                tol = 1e-5 * float(score.max())
                assert float(score[grown].min()) >= float(score[~mask_new].max()) - tol
            w_new = dense(m)
            assert bool((w_new[grown] == 0).all())
            keep = mask_old & mask_new
            assert torch.equal(w_new[keep], w_old[keep])
            checked += int(grown.sum())
        assert rigl.report_line().startswith(f"step {t}:")
    assert checked > 0


# ---------------------------------------------------------------------------- 2. accumulation


@pytest.mark.parametrize("parts", [2, 3])
def test_gradient_accumulation_is_the_whole_batch(parts, rng):
    sizes, _ = draw_sizes(rng, 0.85)
    seed = int(rng.integers(2**31))
    data = batches(rng, sizes[0], sizes[-1], 32, 2 * 3 * int(rng.integers(2, 5)) + parts - 2)
    runs = []
    for p in (1, parts):
        tm = sparse_torch_mlp(sizes, 0.85, seed)
        opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
        rigl = RigL(tm, opt, delta_t=4, t_end=30, alpha=0.5, seed=seed)
        runs.append(run_torch(tm, opt, rigl, data, parts=p))
    (l1, topo1, ws1, w1), (lp, topop, wsp, wp) = runs
    assert sorted(topo1) == [4, 8, 12, 16, 20, 24, 28]
    assert_same_topology(topo1, topop)
    np.testing.assert_allclose(lp, l1, rtol=1e-5)
    assert_close_weights(wp, w1, rtol=1e-4, atol=1e-6)


def test_forward_without_backward_is_not_recorded(rng):
    """On an update step, an extra forward with gradients but no backward (and one under
    no_grad) add nothing to what the grow sees."""
    sizes, _ = draw_sizes(rng, 0.85)
    seed = int(rng.integers(2**31))
    data = batches(rng, sizes[0], sizes[-1], 12, 10)
    noise = torch.from_numpy(rng.standard_normal((5, sizes[0])).astype(np.float32))
    topo = []
    for extra in (False, True):
        tm = sparse_torch_mlp(sizes, 0.85, seed)
        opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
        rigl = RigL(tm, opt, delta_t=5, t_end=12, alpha=0.5, seed=seed)
        for x, y in data:
            opt.zero_grad()
            if extra:
                tm(noise * 10)  # graph built, never backpropagated
                with torch.no_grad():
                    tm(noise)
            F.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            if rigl.step():
                opt.step()
        topo.append({0: topology(tm)})
    assert_same_topology(*topo)


def test_inplace_relu_and_activation_checkpointing(rng):
    """What autograd sees through nn.ReLU(inplace=True) or torch.utils.checkpoint (either
    mode; the non-reentrant one runs each forward twice) is what RigL records: the same run."""
    from torch.utils.checkpoint import checkpoint

    sizes, _ = draw_sizes(rng, 0.85)
    seed = int(rng.integers(2**31))
    data = batches(rng, sizes[0], sizes[-1], 20, 9)
    results = {}
    for mode in ("plain", "inplace", "checkpoint", "checkpoint-reentrant"):
        tm = sparse_torch_mlp(sizes, 0.85, seed)
        if mode == "inplace":
            for i, mod in enumerate(tm):
                if isinstance(mod, nn.ReLU):
                    tm[i] = nn.ReLU(inplace=True)
        opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
        rigl = RigL(tm, opt, delta_t=4, t_end=20, alpha=0.5, seed=seed)
        losses, topo = [], {}
        for x, y in data:
            opt.zero_grad()
            xt = torch.from_numpy(x)
            if mode == "checkpoint":
                out = checkpoint(tm, xt, use_reentrant=False)
            elif mode == "checkpoint-reentrant":
                out = checkpoint(tm, xt.requires_grad_(), use_reentrant=True)
            else:
                out = tm(xt)
            loss = F.cross_entropy(out, torch.from_numpy(y))
            loss.backward()
            losses.append(loss.item())
            update = rigl.is_update_step()
            if rigl.step():
                opt.step()
            if update:
                topo[rigl.t - 1] = topology(tm)
        results[mode] = (np.array(losses), topo, weights(tm))
    l0, topo0, w0 = results.pop("plain")
    for mode, (l, topo, w) in results.items():
        assert_same_topology(topo, topo0)
        np.testing.assert_allclose(l, l0, rtol=1e-6, err_msg=mode)
        assert_close_weights(w, w0, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- 3. state in place


def train_until_update(model, opt, rigl, rng, n_in, n_out, batch=9):
    """Train by the convention until the next step is an update step; then run that step's
    forward and backward (not rigl.step())."""
    while True:
        x = torch.from_numpy(rng.standard_normal((batch, n_in)).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, n_out, batch))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if rigl.is_update_step():
            return
        assert rigl.step()
        opt.step()


def test_optimizer_state_remapped_in_place(rng):
    sizes, _ = draw_sizes(rng, 0.8)
    tm = sparse_torch_mlp(sizes, 0.8, int(rng.integers(2**31)))
    opt = torch.optim.Adam(tm.parameters(), lr=1e-2, amsgrad=True)
    rigl = RigL(tm, opt, delta_t=4, t_end=40, alpha=0.5, seed=3)
    layers = sparse_layers(tm)
    groups_before = [list(g["params"]) for g in opt.param_groups]
    x = torch.from_numpy(rng.standard_normal((9, sizes[0])).astype(np.float32))
    F.cross_entropy(tm(x), torch.from_numpy(rng.integers(0, sizes[-1], 9))).backward()
    assert rigl.step()
    opt.step()  # (the state exists from the first step on)
    for m in layers:  # a custom state tensor shaped like the values, and two that are not
        st = opt.state[m.values]
        st["custom"] = torch.from_numpy(rng.standard_normal(m.nnz).astype(np.float32))
        st["strided"] = torch.from_numpy(rng.standard_normal(2 * m.nnz).astype(np.float32))[::2]
        st["double"] = torch.from_numpy(rng.standard_normal(m.nnz))
        st["other_shape"] = torch.arange(m.nnz + 1, dtype=torch.float32)
        st["int_counts"] = torch.arange(m.nnz, dtype=torch.int64)
    for _ in range(2):  # two updates in a row
        train_until_update(tm, opt, rigl, rng, sizes[0], sizes[-1])
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "custom", "strided", "double")
        before = []
        for m in layers:
            st = opt.state[m.values]
            before.append(
                dict(
                    coords=coords(m),
                    values=m.values,
                    values_ptr=m.values.data_ptr(),
                    w=m.values.detach().clone(),
                    grad=m.values.grad.clone(),
                    grad_obj=m.values.grad,
                    step=st["step"],
                    step_val=st["step"].clone(),
                    state={k: st[k] for k in keys},
                    state_val={k: st[k].clone() for k in keys},
                    other=st["other_shape"].clone(),
                    ints=st["int_counts"].clone(),
                )
            )
        assert not rigl.step()
        report = rigl.updates[-1]["layers"]
        for m, b, rep in zip(layers, before, report, strict=True):
            st = opt.state[m.values]
            assert m.values is b["values"] and m.values.data_ptr() == b["values_ptr"]
            assert m.values.grad is b["grad_obj"]
            assert m.nnz == b["w"].shape[0]
            new = coords(m)
            kept = [(new[c], p) for c, p in b["coords"].items() if c in new]
            fresh = [q for c, q in new.items() if c not in b["coords"]]
            assert fresh and len(kept) + len(fresh) == m.nnz
            assert rep["new"] == len(fresh) and rep["nnz"] == m.nnz
            nk, ok = (torch.tensor(a, dtype=torch.int64) for a in zip(*kept, strict=True))
            fr = torch.tensor(fresh, dtype=torch.int64)
            for k in keys:
                assert st[k] is b["state"][k], f"{k} is a new tensor"
                assert torch.equal(st[k][nk], b["state_val"][k][ok]), k
                assert bool((st[k][fr] == 0).all()), k
            assert torch.equal(m.values.detach()[nk], b["w"][ok])
            assert bool((m.values.detach()[fr] == 0).all())
            assert torch.equal(m.values.grad[nk], b["grad"][ok])
            assert bool((m.values.grad[fr] == 0).all())
            assert st["step"] is b["step"] and torch.equal(st["step"], b["step_val"])
            assert torch.equal(st["other_shape"], b["other"])
            assert torch.equal(st["int_counts"], b["ints"])
        assert [list(g["params"]) for g in opt.param_groups] == groups_before
        assert all(
            a is b
            for ga, gb in zip(opt.param_groups, groups_before, strict=True)
            for a, b in zip(ga["params"], gb, strict=True)
        )
    opt.step()  # the optimizer still runs over the carried state


def test_bfloat16_state_remapped(rng):
    tm = sparse_torch_mlp([13, 11, 9, 4], 0.7, 1)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(tm, opt, delta_t=3, t_end=20, alpha=0.5)
    train_until_update(tm, opt, rigl, rng, 13, 4)
    last = sparse_layers(tm)[-1]
    st = opt.state[last.values]
    st["low"] = torch.from_numpy(rng.standard_normal(last.nnz).astype(np.float32)).bfloat16()
    old, val = coords(last), st["low"].clone()
    rigl.step()
    for c, q in coords(last).items():
        assert st["low"][q] == (val[old[c]] if c in old else 0)


def test_sgd_momentum_buffer_remapped_in_place(rng):
    sizes, _ = draw_sizes(rng, 0.8)
    tm = sparse_torch_mlp(sizes, 0.8, int(rng.integers(2**31)))
    opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(tm, opt, delta_t=3, t_end=20, alpha=0.5)
    train_until_update(tm, opt, rigl, rng, sizes[0], sizes[-1])
    layers = sparse_layers(tm)
    before = [(coords(m), opt.state[m.values]["momentum_buffer"]) for m in layers]
    vals = [b.clone() for _, b in before]
    rigl.step()
    for m, (old, buf), val in zip(layers, before, vals, strict=True):
        assert opt.state[m.values]["momentum_buffer"] is buf
        for c, q in coords(m).items():
            assert buf[q] == (val[old[c]] if c in old else 0)


def test_without_optimizer(rng):
    sizes, _ = draw_sizes(rng, 0.8)
    tm = sparse_torch_mlp(sizes, 0.8, 5)
    rigl = RigL(tm, None, delta_t=1, t_end=5, alpha=0.5)
    for t in range(3):
        x = torch.from_numpy(rng.standard_normal((6, sizes[0])).astype(np.float32))
        tm.zero_grad()
        tm(x).square().sum().backward()
        assert rigl.step() == (t == 0)
    assert len(rigl.updates) == 2


# ---------------------------------------------------------------------------- 4. exact resume


def blob(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def build_run(sizes, seed, opt_kind):
    tm = sparse_torch_mlp(sizes, 0.85, seed)
    if opt_kind == "adam":
        opt = torch.optim.Adam(tm.parameters(), lr=5e-3, amsgrad=True)
    else:
        opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    rigl = RigL(tm, opt, delta_t=5, t_end=30, alpha=0.5, seed=11)
    return tm, opt, rigl


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("stop", [7, 10])
def test_exact_resume(stop, opt_kind, rng):
    sizes, _ = draw_sizes(rng, 0.85)
    seed = int(rng.integers(2**31))
    data = batches(rng, sizes[0], sizes[-1], 32, 11)
    ref = build_run(sizes, seed, opt_kind)
    l_ref, topo_ref, _, w_ref = run_torch(*ref, data)

    tm, opt, rigl = build_run(sizes, seed, opt_kind)
    l_a, topo_a, _, _ = run_torch(tm, opt, rigl, data[:stop])
    saved = blob(dict(model=tm.state_dict(), opt=opt.state_dict(), rigl=rigl.state_dict()))
    del tm, opt, rigl
    # a fresh model with another pattern (same nnz): everything comes from the checkpoint
    tm, opt, rigl = build_run(sizes, seed + 1, opt_kind)
    ck = torch.load(saved)
    tm.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    rigl.load_state_dict(ck["rigl"])
    assert rigl.t == stop
    l_b = []
    topo_b = {}
    for t in range(stop, len(data)):
        loss, update = torch_step(tm, opt, rigl, *data[t])
        l_b.append(loss)
        if update:
            topo_b[t] = topology(tm)
    assert np.array_equal(np.concatenate([l_a, l_b]), l_ref)
    assert_same_topology({**topo_a, **topo_b}, topo_ref)
    for a, b in zip(weights(tm), w_ref, strict=True):
        assert torch.equal(a, b)
    strip = [{k: v for k, v in u.items() if k != "seconds"} for u in ref[2].updates]
    mine = [{k: v for k, v in u.items() if k != "seconds"} for u in rigl.updates]
    for u in strip + mine:
        u["layers"] = [{k: v for k, v in d.items() if "seconds" not in k} for d in u["layers"]]
    assert mine == strip


@pytest.mark.parametrize(
    "other, key",
    [
        (dict(delta_t=4), "delta_t"),
        (dict(alpha=0.3), "alpha"),
        (dict(t_end=31), "t_end"),
        (dict(decay="constant"), "decay"),
        (dict(method="set"), "method"),
        (dict(seed=12), "seed"),
    ],
)
def test_resume_refuses_other_settings(other, key):
    tm = sparse_torch_mlp([12, 10, 4], 0.8, 0)
    base = dict(delta_t=5, alpha=0.5, t_end=30, seed=11)
    saved = RigL(tm, None, **base).state_dict()
    r = RigL(tm, None, **{**base, **other})
    with pytest.raises(ValueError, match=key):
        r.load_state_dict(saved)
    assert r.t == 0


@pytest.mark.parametrize(
    "other",
    [dict(grow="sampled"), dict(candidates=3, grow="sampled"), dict(step_on_update=True)],
    ids=["grow", "candidates", "step_on_update"],
)
def test_resume_refuses_other_grow_settings(other):
    tm = sparse_torch_mlp([12, 10, 4], 0.8, 0)
    base = dict(delta_t=5, alpha=0.5, t_end=30, seed=11)
    saved = RigL(tm, None, **base).state_dict()
    with pytest.raises(ValueError):
        RigL(tm, None, **{**base, **other}).load_state_dict(saved)


@pytest.mark.parametrize("t", [-1, True, 2.0, None, "3"])
def test_resume_refuses_bad_step(t):
    tm = sparse_torch_mlp([12, 10, 4], 0.8, 0)
    r = RigL(tm, None, delta_t=5, t_end=30)
    d = r.state_dict()
    d["t"] = t
    with pytest.raises(ValueError, match="non-negative int"):
        r.load_state_dict(d)


def test_rigl_state_survives_weights_only_load(rng):
    """A checkpoint holding rigl.state_dict() after updates loads with torch.load's default
    (weights_only=True): the report entries are plain Python values."""
    sizes, _ = draw_sizes(rng, 0.85)
    tm, opt, rigl = build_run(sizes, 3, "sgd")
    run_torch(tm, opt, rigl, batches(rng, sizes[0], sizes[-1], 12, 8))
    assert len(rigl.updates) == 2
    d = torch.load(blob(rigl.state_dict()), weights_only=True)
    assert d["t"] == 12 and len(d["updates"]) == 2


# ---------------------------------------------------------------------------- 5. recording


def test_records_only_on_update_steps(rng):
    sizes, _ = draw_sizes(rng, 0.8)
    tm = sparse_torch_mlp(sizes, 0.8, 2)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)
    rigl = RigL(tm, opt, delta_t=3, t_end=10, alpha=0.5)
    layers = sparse_layers(tm)
    outputs = []
    seen_record = []

    def hook(mod, inp, out):
        seen_record.append(mod._record is None)
        outputs.append(out)

    for m in layers:
        m.register_forward_hook(hook)
    for t in range(14):
        update = t in (3, 6, 9)
        assert rigl.is_update_step() == update
        outputs.clear()
        seen_record.clear()
        for m in layers:
            assert (m._record is None) == (not update)
            if update:
                assert m._record == []
        x = torch.from_numpy(rng.standard_normal((5, sizes[0])).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, sizes[-1], 5))
        opt.zero_grad()
        F.cross_entropy(tm(x), y).backward()
        assert seen_record == [not update] * len(layers)
        for out in outputs:  # no tensor hook on the layer's (feature-major) output
            base = out._base if out._base is not None else out
            hooks = base._backward_hooks
            assert (not hooks) == (not update)
        del out, base, hooks
        refs = []
        if update:
            for m in layers:
                assert len(m._record) == 1
                xT, dyT = m.recorded()
                assert xT.shape == (m.in_features, 5) and dyT.shape == (m.out_features, 5)
                refs.append(weakref.ref(dyT))
            del xT, dyT
        outputs.clear()
        if rigl.step():
            opt.step()
        for m in layers:  # released, and armed again only for the next update step
            assert m._record == ([] if rigl.is_update_step() else None)
            assert m.recorded() == (None, None)
        if refs:
            gc.collect()
            assert all(r() is None for r in refs), "recorded gradients kept alive after the update"
    assert len(rigl.updates) == 3


@pytest.mark.parametrize(
    "update",
    [
        False,
        True,
    ],
)
def test_recorded_tensors_released_while_output_is_kept(update, rng):
    """The hidden activations of a step are freed after its backward and rigl.step() even
    while the caller still holds the logits: on normal steps (the control) and on update steps
    (where RigL recorded them)."""
    tm = sparse_torch_mlp([13, 11, 9, 4], 0.7, 1)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)
    rigl = RigL(tm, opt, delta_t=1 if update else 100, t_end=5)
    assert rigl.step()  # step 0
    refs = []
    layers = sparse_layers(tm)
    for m in layers[1:]:  # their inputs: hidden activations (the ReLUs' outputs)
        m.register_forward_hook(lambda mod, inp, out: refs.append(weakref.ref(inp[0])))
    x = torch.from_numpy(rng.standard_normal((6, 13)).astype(np.float32))
    logits = tm(x)
    F.cross_entropy(logits, torch.from_numpy(rng.integers(0, 4, 6))).backward()
    assert rigl.step() == (not update)
    gc.collect()
    assert len(refs) == 2
    assert all(r() is None for r in refs), "a step's activations outlive it"
    assert logits.shape == (6, 4)


# ---------------------------------------------------------------------------- 6. errors


def test_error_no_sparse_layers():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no sparse layers"):
        RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), t_end=10)


def test_error_optimizer_without_values():
    tm = sparse_torch_mlp([9, 7, 3], 0.7, 0)
    opt = torch.optim.SGD([m.bias for m in sparse_layers(tm)], lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold the values.*'0'.*'2'"):
        RigL(tm, opt, t_end=10)
    other = sparse_torch_mlp([9, 7, 3], 0.7, 0)  # the values of another model
    with pytest.raises(ValueError, match="does not hold the values"):
        RigL(tm, torch.optim.SGD(other.parameters(), lr=0.1), t_end=10)


@pytest.mark.parametrize("how", ["nothing", "forward only", "no_grad forward"])
def test_error_update_without_backward(how, rng):
    tm = sparse_torch_mlp([9, 7, 3], 0.7, 0)
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    rigl = RigL(tm, opt, delta_t=1, t_end=5)
    assert rigl.step()  # step 0: never an update
    before = topology(tm)
    x = torch.from_numpy(rng.standard_normal((4, 9)).astype(np.float32))
    if how == "forward only":
        tm(x).sum()
    elif how == "no_grad forward":
        with torch.no_grad():
            tm(x).sum().item()
    with pytest.raises(RuntimeError, match=r"(?s)layer 0 at step 1.*forward and backward"):
        rigl.step()
    assert rigl.t == 1
    assert_same_topology({0: before}, {0: topology(tm)})
    # recovering: a forward and backward, then the same step goes through
    tm.zero_grad()
    tm(x).sum().backward()
    assert not rigl.step() and rigl.t == 2 and len(rigl.updates) == 1


def test_set_needs_no_backward(rng):
    tm = sparse_torch_mlp([9, 7, 3], 0.7, 0)
    rigl = RigL(tm, None, delta_t=1, t_end=5, method="set", alpha=0.5)
    before = topology(tm)
    rigl.step()
    assert not rigl.step()
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(before, topology(tm), strict=True))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(), "t_end.*total_steps"),
        (dict(t_end=10, total_steps=20), "t_end.*total_steps"),
        (dict(t_end=10, method="rigl2"), "method must be one of"),
        (dict(t_end=10, method="RigL"), "method must be one of"),
        (dict(t_end=10, grow="best"), "grow must be one of"),
        (dict(t_end=10, candidates=0.5, grow="sampled"), "candidates"),
        (dict(t_end=10, delta_t=0), "delta_t"),
        (dict(t_end=10, alpha=1.5), "alpha"),
        (dict(t_end=10, decay="linear"), "decay"),
        (dict(total_steps=10, end_fraction=2.0), "end_fraction"),
    ],
)
def test_error_bad_settings(kw, match):
    tm = sparse_torch_mlp([9, 7, 3], 0.7, 0)
    with pytest.raises(ValueError, match=match):
        RigL(tm, None, **kw)


# ---------------------------------------------------------------------------- 7. the report


def test_report(rng):
    sizes, _ = draw_sizes(rng, 0.85)
    tm = sparse_torch_mlp(sizes, 0.85, 4)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(tm, opt, delta_t=5, t_end=17, alpha=0.4, seed=2)
    assert rigl.report_line() == "no topology update yet"
    run_torch(tm, opt, rigl, batches(rng, sizes[0], sizes[-1], 18, 8))
    assert [u["step"] for u in rigl.updates] == [5, 10, 15]
    layers = sparse_layers(tm)
    for u in rigl.updates:
        f = 0.2 * (1 + math.cos(math.pi * u["step"] / 17))
        assert u["drop_fraction"] == pytest.approx(f)
        assert u["seconds"] >= 0
        assert len(u["layers"]) == len(layers)
        for d, m in zip(u["layers"], layers, strict=True):
            assert d["nnz"] == m.nnz
            assert d["dropped"] == d["grown"] == int(f * m.nnz)
            assert 0 <= d["new"] <= d["grown"]
    assert rigl.last_report.step == 15
    line = rigl.report_line()
    assert line.startswith("step 15: topology update")
    grown = sum(d["grown"] for d in rigl.updates[-1]["layers"])
    assert f"{grown} connections regrown over {len(layers)} layers" in line
    other = eupdater.UpdateReport(step=5, drop_fraction=0.1, per_layer=[])
    assert rigl.report_line(other).startswith("step 5: topology update, drop fraction 0.100")


def test_from_config_mirrors_the_engines_settings():
    from sparsecore.config import TrainConfig

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3))
    sparsify(m, 0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    cfg = TrainConfig(arch=[10, 12, 3], delta_t=7, alpha=0.4, t_end=0.5, grow="sampled",
                      grow_candidates=3, seed=5, step_on_update=True)  # fmt: skip
    r = RigL.from_config(m, opt, cfg, total_steps=100)
    s = r.state_dict()
    assert (s["delta_t"], s["alpha"], s["t_end"], s["grow"], s["candidates"], s["seed"]) == (
        7,
        0.4,
        50,
        "sampled",
        3.0,
        5,
    )
    assert s["step_on_update"] is True and s["method"] == "rigl"
    with pytest.raises(ValueError, match="dense"):
        RigL.from_config(m, opt, TrainConfig(arch=[10, 12, 3], method="dense"), 100)
