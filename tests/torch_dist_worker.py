"""One rank of tests/test_torch_distributed.py's 2-process gloo runs (and the helpers the test
uses for its single-process references).

Run as ``python -m tests.torch_dist_worker CONFIG.json RANK`` from the repository root. Every
scenario of the config is trained with the model in DistributedDataParallel, this rank taking
its share of every batch (np.array_split order: rank 0 the first rows), each rank's loss
weighted by n_r·world/N so that DDP's gradient average is the whole batch's mean-loss gradient.
The rank's losses, topology after every update and final weights go to OUT/rank{r}.pt.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sparsecore.torch import RigL, SparseLinear, sparsify

SIZES = (20, 16, 12, 4)
SPARSITY = 0.8


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the dense layers' biases, which sparsify copies
    mods = []
    for i in range(len(SIZES) - 1):
        mods.append(nn.Linear(SIZES[i], SIZES[i + 1]))
        if i < len(SIZES) - 2:
            mods.append(nn.ReLU())
    return sparsify(nn.Sequential(*mods), SPARSITY, seed=seed)


def make_opt(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=5e-3)
    raise ValueError(kind)


def make_rigl(model, opt, scn, process_group=None):
    return RigL(
        model,
        opt,
        delta_t=scn["delta_t"],
        alpha=scn["alpha"],
        t_end=scn["t_end"],
        seed=scn["seed"],
        step_on_update=scn.get("step_on_update", False),
        process_group=process_group,
    )


def data(scn):
    rng = np.random.default_rng([scn["seed"], 99])
    out = []
    for _ in range(scn["steps"]):
        x = rng.standard_normal((scn["batch"], SIZES[0])).astype(np.float32)
        y = rng.integers(0, SIZES[-1], scn["batch"])
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    return out


def share(n: int, world: int, rank: int) -> slice:
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), world)])
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def topology(model):
    return [(m.indptr.clone(), m.indices.clone()) for m in sparse_layers(model)]


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def train(scn, rank=0, world=1, wrap=None, control=None, process_group=None, model_seed=None):
    """Train a scenario; this process takes share ``rank`` of ``world`` of every batch.
    wrap: model -> the module to call (DDP). control(t, model, rigl, x, y): called on update
    steps after the backward, before rigl.step() (the test's negative control)."""
    model = build(scn["seed"] if model_seed is None else model_seed)
    opt = make_opt(scn["opt"], model.parameters())
    net = model if wrap is None else wrap(model)
    rigl = make_rigl(net, opt, scn, process_group)
    losses, topo = [], {}
    for t, (x, y) in enumerate(data(scn)):
        s = share(x.shape[0], world, rank)
        xs, ys = x[s], y[s]
        opt.zero_grad()
        loss = F.cross_entropy(net(xs), ys) * (xs.shape[0] * world / x.shape[0])
        loss.backward()
        update = rigl.is_update_step()
        if update and control is not None:
            control(t, model, rigl, x, y)
        if rigl.step():
            opt.step()
        losses.append(loss.item())
        if update:
            topo[t] = topology(model)
    return dict(losses=losses, topo=topo, weights=weights(model), updates=len(rigl.updates))


def main(config_path: str, rank: int):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    with open(config_path) as f:
        cfg = json.load(f)
    world = cfg["world"]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{cfg['port']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=cfg["timeout"]),
    )
    try:
        results = {"started": time.perf_counter()}
        for name, scn in cfg["scenarios"].items():
            t0 = time.perf_counter()

            def wrap(model, scn=scn):
                return DDP(model, broadcast_buffers=scn["broadcast_buffers"])

            group = dist.group.WORLD if scn["group"] == "world" else None
            if scn.get("ddp", True):
                results[name] = train(scn, rank, world, wrap=wrap, process_group=group)
                results[name]["seconds"] = time.perf_counter() - t0
                continue
            # no DDP, another model on each rank: the topology guard must raise on every rank
            try:
                train(scn, rank, world, process_group=group, model_seed=scn["seed"] + rank)
                results[name] = dict(error=None)
            except RuntimeError as e:
                results[name] = dict(error=str(e))
            results[name]["seconds"] = time.perf_counter() - t0
        torch.save(results, f"{cfg['out']}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
