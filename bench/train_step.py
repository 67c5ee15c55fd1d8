"""One training step, sparse (RigL) vs the same MLP trained densely with NumPy BLAS, same run.

    python bench/train_step.py --arch 784-4096-4096-10 --sparsity 0.99 --batch-size 128

Both use the engine's own training step (forward, backward, optimizer, and for RigL the topology
update every ΔT steps, whose cost is amortised into the mean) on MNIST mini-batches. The dense
run is `--method dense`: the same layers with dense weights and NumPy matmuls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecore  # noqa: E402,F401,I001  (before NumPy: thread setup)
import numpy as np  # noqa: E402

from sparsecore.cost import model_cost  # noqa: E402
from sparsecore.train import TrainConfig, Trainer  # noqa: E402


def measure(method, args, data):
    cfg = TrainConfig(
        arch=args.arch,
        sparsity=args.sparsity,
        distribution=args.distribution,
        method=method,
        delta_t=args.delta_t,
        batch_size=args.batch_size,
        epochs=1000,
        max_steps=args.steps / 0.75 + 1,
        progress=False,
        seed=0,
    )
    cfg.max_steps = int(cfg.max_steps)  # T_end = 75% of it: every update step lies in the window
    tr = Trainer(cfg, data)
    times, upd = [], []
    batches = (i for e in range(1000) for i in tr.batches(e))
    for _ in range(args.steps + args.warmup):
        idx = next(batches)
        xb = np.ascontiguousarray(data.x_train[idx].T)
        t = time.perf_counter()
        _, _, report = tr.train_step(xb, data.y_train[idx])
        dt = time.perf_counter() - t
        if tr.step > args.warmup:
            times.append(dt)
            if report is not None:
                upd.append(dt)
    cost = model_cost(tr.model, args.batch_size, tr.opt, tr.schedule, tr.total_steps, method)
    return {
        "method": method,
        "mean_step_s": float(np.mean(times)),
        "median_step_s": float(np.median(times)),
        "n_steps": len(times),
        "n_updates": len(upd),
        "mean_update_step_s": float(np.mean(upd)) if upd else None,
        "state_bytes": cost["state_bytes"],
        "flops_per_step": cost["flops_per_step"],
        "params": cost["params"],
    }


def measure_torch_masked(args, data, torch):
    """Masked-dense RigL in PyTorch, as published implementations train: dense weights times a
    0/1 mask, autograd's dense gradient, SGD with momentum, and every ΔT steps a drop by |w| and
    a grow by torch.topk of the dense |gradient| over absent positions. Same MLP and batch size."""
    from sparsecore.rigl.distributions import layer_densities

    torch.manual_seed(0)
    shapes = [(o, i) for i, o in zip(args.arch[:-1], args.arch[1:], strict=True)]
    dens = layer_densities(args.sparsity, shapes, args.distribution)
    Ws, bs, masks = [], [], []
    for (m, n), d in zip(shapes, dens, strict=True):
        bound = (6.0 / max(1.0, d * n)) ** 0.5
        mask = (torch.rand(m, n) < d).float()
        Ws.append(((torch.rand(m, n) * 2 - 1) * bound * mask).requires_grad_())
        bs.append(torch.zeros(m, requires_grad=True))
        masks.append(mask)
    opt = torch.optim.SGD([*Ws, *bs], lr=0.1, momentum=0.9)
    xs, ys = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(xs.shape[0]))
    n_batches = xs.shape[0] // args.batch_size
    times, upd = [], []
    for step in range(args.steps + args.warmup):
        s0 = (step % n_batches) * args.batch_size
        idx = perm[s0 : s0 + args.batch_size]
        t = time.perf_counter()
        h = xs[idx]
        for l, (W, b, mk) in enumerate(zip(Ws, bs, masks, strict=True)):
            h = h @ (W * mk).t() + b
            if l < len(Ws) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, ys[idx])
        opt.zero_grad(set_to_none=False)
        loss.backward()
        is_update = step > 0 and step % args.delta_t == 0
        with torch.no_grad():
            if is_update:  # drop the 30% smallest |w|, grow as many by the dense |gradient|
                for W, mk in zip(Ws, masks, strict=True):
                    k = int(0.3 * mk.sum().item())
                    inf = torch.full_like(W, float("inf"))
                    drop = torch.topk(
                        torch.where(mk.bool(), W.abs(), inf).flatten(), k, largest=False
                    ).indices
                    mk.view(-1)[drop] = 0
                    grow = torch.topk(
                        torch.where(mk.bool(), -inf, W.grad.abs()).flatten(), k
                    ).indices
                    new = grow[mk.view(-1)[grow] == 0]
                    mk.view(-1)[grow] = 1
                    W.view(-1)[new] = 0
                    buf = opt.state.get(W, {}).get("momentum_buffer")
                    if buf is not None:
                        buf.view(-1)[new] = 0
                    W.mul_(mk)
            else:
                opt.step()
                for W, mk in zip(Ws, masks, strict=True):
                    W.mul_(mk)
        dt = time.perf_counter() - t
        if step >= args.warmup:
            times.append(dt)
            if is_update:
                upd.append(dt)
    n_dense = sum(m * n for m, n in shapes)
    return {
        "method": "torch masked-dense RigL",
        "mean_step_s": float(np.mean(times)),
        "median_step_s": float(np.median(times)),
        "n_steps": len(times),
        "n_updates": len(upd),
        "mean_update_step_s": float(np.mean(upd)) if upd else None,
        "state_bytes": 4 * 4 * n_dense,  # weights, mask, gradient, momentum: all dense
        "flops_per_step": 6.0 * n_dense * args.batch_size,
        "params": n_dense,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", default="784-4096-4096-10")
    ap.add_argument("--sparsity", type=float, default=0.99)
    ap.add_argument("--distribution", default="erk")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--delta-t", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300, help="timed steps (include steps/ΔT updates)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--torch",
        action="store_true",
        help="add masked-dense RigL in PyTorch (torch from the [bench] extra)",
    )
    args = ap.parse_args(argv)
    args.arch = [int(a) for a in args.arch.split("-")]
    from sparsecore import data as D

    data = D.load("mnist")
    rigl = measure("rigl", args, data)
    dense = measure("dense", args, data)
    masked = None
    if args.torch:
        import numba

        from bench.common import try_torch

        torch = try_torch(numba.get_num_threads())
        masked = measure_torch_masked(args, data, torch) if torch is not None else None
    speed = dense["mean_step_s"] / rigl["mean_step_s"]
    lines = [
        f"MLP {'-'.join(map(str, args.arch))}, sparsity {args.sparsity} ({args.distribution}), "
        f"batch {args.batch_size}, ΔT {args.delta_t}, {rigl['n_steps']} timed steps "
        f"({rigl['n_updates']} topology updates amortised)",
        "",
        "| method | mean step ms | median step ms | update step ms | training state MiB | FLOPs/step (M) |",
        "|---|---|---|---|---|---|",
    ]
    for r in (rigl, dense, *([masked] if masked else [])):
        us = f"{1e3 * r['mean_update_step_s']:.1f}" if r["mean_update_step_s"] else "–"
        lines.append(
            f"| {r['method']} | {1e3 * r['mean_step_s']:.2f} | {1e3 * r['median_step_s']:.2f} | "
            f"{us} | {r['state_bytes'] / 2**20:.1f} | {r['flops_per_step'] / 1e6:.0f} |"
        )
    lines.append("")
    lines.append(
        f"RigL step {speed:.1f}× faster than dense NumPy; training state "
        f"{dense['state_bytes'] / rigl['state_bytes']:.0f}× smaller."
    )
    if masked:
        lines.append(
            f"RigL step {masked['mean_step_s'] / rigl['mean_step_s']:.1f}× faster than masked-dense "
            f"RigL in PyTorch, whose training state is "
            f"{masked['state_bytes'] / rigl['state_bytes']:.0f}× larger."
        )
    print("\n".join(lines))
    if args.json:
        out = {"rigl": rigl, "dense": dense, "torch_masked": masked, "speedup": speed}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
