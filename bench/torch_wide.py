"""No dense tensor anywhere, proven: RigL on 784-30000-30000-10 at 99.9% sparsity in PyTorch.

    python bench/torch_wide.py                  # 300 steps, 2 topology updates (exact grow)
    python bench/torch_wide.py --quick          # 20 steps, 1 update: a smoke run
    python bench/torch_wide.py --grow sampled   # the sampled grow (cost ∝ nnz) instead

The network is built directly from ``sparsecore.torch.SparseLinear`` layers (never an
``nn.Linear`` of that size: one dense 30000 × 30000 float32 weight alone is 3.6 GB, and its
gradient and SGD momentum as much again), with ERK per-layer densities solved as the engine
solves them (``sparsecore.rigl.distributions.layer_densities``) and each layer's pattern and
values drawn as the engine's ``mlp`` draws them (seed (seed, INIT_TAG, l)). It trains with
``torch.optim.SGD`` (the engine's momentum 0.9, weight decay 1e-4 and cosine decay over the
run, but lr 1e-3: ERK gives the 10 × 30000 classifier density 0.77, a fan-in of about 23000,
and from the same start the engine's own Trainer, like this script, goes from loss 2.9 to about
500 within 4 steps at lr 0.1, about 60 at 0.01, and a spike to 7.5 at 0.003; 1e-3 decreases
steadily), batch 128, ``F.cross_entropy``, and ``sparsecore.torch.RigL`` (ΔT 100, α 0.3, T_end
at 75% of the steps; grow "exact" by default: the fused tiled top-k over all absent
connections, 2·m·n·B multiply-adds per layer per update without forming the gradient).

What "proven" means here:

- every tensor the model and the optimizer hold (parameters, buffers, gradients, momentum) is
  listed after training: the largest has nnz or a layer's width entries, none out × in (the
  bridge's private checked-pattern copies and transpose structure, nnz-sized as well, are not
  module tensors: the RSS counts them);
- the largest tensor any torch operation produces during a training step, an update step and
  the evaluation is recorded with a ``TorchDispatchMode`` (``--no-trace`` skips it): it is a
  batch of activations (30000 × 128), not a weight;
- the whole process's peak RSS (``sparsecore.rss.peak_rss_mib``: VmHWM, covering the Numba
  kernels' NumPy scratch too, which torch cannot see) must stay below 1 GiB; the script exits 1
  if it does not (``--max-rss-mib``).

MNIST is read from the bundled ``mnist.npz`` as uint8 and standardised batch by batch with the
training set's mean and standard deviation (as ``sparsecore.data`` standardises it; the batch
order is the engine's, (seed, EPOCH_TAG, epoch)): ``sparsecore.data.load`` builds three float32
copies of the training set on the way and peaks near 950 MiB with torch imported, which would
leave no room under the 1 GiB bar for the model. The dense twin's figures (weights, gradient,
momentum, FLOPs per step and per update) are computed, not run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecore  # noqa: E402,F401,I001  (before torch: torch's OpenMP then spins briefly)
import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kernels.cpu import fpmode  # noqa: E402
from sparsecore.config import TrainConfig  # noqa: E402
from sparsecore.data import BUNDLED  # noqa: E402
from sparsecore.layers import INIT_TAG  # noqa: E402
from sparsecore.optim import lr_at  # noqa: E402
from sparsecore.rigl.distributions import layer_densities  # noqa: E402
from sparsecore.rss import current_rss_mib, peak_rss_mib  # noqa: E402
from sparsecore.torch import RigL, SparseLinear, layout_copies  # noqa: E402
from sparsecore.train import EPOCH_TAG  # noqa: E402

ARCH = [784, 30000, 30000, 10]
MAX_RSS_MIB = 1024.0
LR = 1e-3  # the engine's 0.1 blows up at this width (docstring)
GIB = 2**30


# ---------------------------------------------------------------- data (uint8, per batch)
class Mnist:
    """The bundled MNIST kept as uint8; batches standardised on the fly (float32)."""

    def __init__(self):
        with np.load(BUNDLED["mnist"]) as d:
            self.x_train = d["x_train"].reshape(d["x_train"].shape[0], -1)
            self.y_train = d["y_train"].astype(np.int64)
            self.x_test = d["x_test"].reshape(d["x_test"].shape[0], -1)
            self.y_test = d["y_test"].astype(np.int64)
        s = s2 = 0.0
        for i in range(0, self.x_train.shape[0], 4096):  # float64 moments, 4096 rows at a time
            c = self.x_train[i : i + 4096].astype(np.float64)
            s += c.sum()
            s2 += (c * c).sum()
        n = self.x_train.size
        mean = s / n
        self.mean = np.float32(mean)
        self.std = np.float32(np.sqrt(max(s2 / n - mean * mean, 0.0)) or 1.0)

    def features(self, x_uint8) -> torch.Tensor:
        """(B, 784) float32, the transpose view of a feature-major (784, B) array."""
        xf = (x_uint8.T.astype(np.float32) - self.mean) / self.std  # (784, B), C-contiguous
        return torch.from_numpy(np.ascontiguousarray(xf)).T

    def batches(self, seed: int, batch: int, steps: int):
        n, t, epoch = self.x_train.shape[0], 0, 0
        while True:
            perm = np.random.default_rng([seed, EPOCH_TAG, epoch]).permutation(n)
            for s in range(n // batch):
                if t >= steps:
                    return
                idx = perm[s * batch : (s + 1) * batch]
                yield self.features(self.x_train[idx]), torch.from_numpy(self.y_train[idx])
                t += 1
            epoch += 1


# ---------------------------------------------------------------- proof: the largest tensor
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor output of any torch operation run inside the mode."""

    def __init__(self):
        super().__init__()
        self.numel, self.op, self.shape = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), str(func), tuple(t.shape)
        return out


def held_tensors(model, opt) -> list[tuple[str, torch.Tensor]]:
    out = [(f"param {n}", p) for n, p in model.named_parameters()]
    out += [(f"grad {n}", p.grad) for n, p in model.named_parameters() if p.grad is not None]
    out += [(f"buffer {n}", b) for n, b in model.named_buffers() if b is not None]
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, t in st.items():
            if isinstance(t, torch.Tensor):
                out.append((f"{k} {names.get(id(p), '?')}", t))
    return out


# ---------------------------------------------------------------- the dense twin, on paper
def dense_twin(batch: int) -> dict:
    mn = [o * i for i, o in zip(ARCH[:-1], ARCH[1:], strict=True)]
    w = 4 * sum(mn)
    b = 4 * sum(ARCH[1:])
    # forward 2·B·m·n per layer; backward dW 2·B·m·n per layer, dX 2·B·m·n for all but the first
    flops = 2 * batch * (sum(mn) + sum(mn) + sum(mn[1:]))
    return dict(weights=w + b, grads=w + b, momentum=w + b, flops_per_step=flops)


def sparse_flops(nnz: list[int], batch: int) -> int:
    return 2 * batch * (sum(nnz) + sum(nnz) + sum(nnz[1:]))


# ---------------------------------------------------------------- the run
def build(cfg: TrainConfig, distribution: str):
    shapes = [(o, i) for i, o in zip(ARCH[:-1], ARCH[1:], strict=True)]
    dens = layer_densities(cfg.sparsity, shapes, distribution)
    layers: list[nn.Module] = []
    for l, ((m, n), d) in enumerate(zip(shapes, dens, strict=True)):
        layers.append(SparseLinear(n, m, density=min(1.0, d), seed=[cfg.seed, INIT_TAG, l]))
        if l < len(shapes) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def evaluate(model, data: Mnist, batch: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, data.x_test.shape[0], batch):
        pred = model(data.features(data.x_test[i : i + batch])).argmax(dim=1).numpy()
        correct += int((pred == data.y_test[i : i + batch]).sum())
    model.train()
    return correct / data.x_test.shape[0]


def main(argv=None):
    d = TrainConfig()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--delta-t", type=int, default=d.delta_t)
    ap.add_argument("--quick", action="store_true", help="20 steps, ΔT 10 (one update)")
    ap.add_argument("--sparsity", type=float, default=0.999)
    ap.add_argument("--distribution", choices=("erk", "uniform"), default=d.distribution)
    ap.add_argument("--grow", choices=("exact", "sampled"), default="exact")
    ap.add_argument("--grow-candidates", type=float, default=d.grow_candidates)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=LR, help=f"default {LR} (see the docstring)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--max-rss-mib", type=float, default=MAX_RSS_MIB)
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch's intra-op threads (default: torch's)",
    )
    ap.add_argument("--no-trace", dest="trace", action="store_false")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.delta_t = min(args.steps, 20), min(args.delta_t, 10)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = TrainConfig(
        arch=ARCH,
        sparsity=args.sparsity,
        distribution=args.distribution,
        grow=args.grow,
        grow_candidates=args.grow_candidates,
        batch_size=args.batch_size,
        lr=args.lr,
        delta_t=args.delta_t,
        seed=args.seed,
        max_steps=args.steps,
        out=None,
    ).validate()
    rss = {"imports": current_rss_mib()}
    t_start = time.perf_counter()

    data = Mnist()
    rss["data"] = current_rss_mib()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)  # (the biases' draw; torch 2.13 seeds its generator randomly)
    model = build(cfg, args.distribution)
    build_s = time.perf_counter() - t0
    rss["model"] = current_rss_mib()
    sparse = [m for m in model if isinstance(m, SparseLinear)]
    nnz = [m.nnz for m in sparse]
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
    rigl = RigL.from_config(model, opt, cfg, args.steps)
    print(
        f"{'-'.join(map(str, ARCH))} at sparsity {cfg.sparsity} ({args.distribution}): "
        + ", ".join(
            f"layer {l} {m.out_features}x{m.in_features} nnz {m.nnz} (density {m.density:.3g})"
            for l, m in enumerate(sparse)
        )
        + f"; built in {build_s:.1f} s"
    )
    print(
        f"threads: torch {torch.get_num_threads()}, Numba {numba.get_num_threads()}; "
        f"{args.steps} steps, batch {cfg.batch_size}, SGD lr {cfg.lr} cosine, momentum "
        f"{cfg.momentum}, wd {cfg.weight_decay}; RigL ΔT {cfg.delta_t}, α {cfg.alpha}, t_end "
        f"{rigl.schedule.t_end}, grow {cfg.grow}"
        + (f" ({cfg.grow_candidates:g} candidates per grown)" if cfg.grow == "sampled" else "")
    )

    traced = {}
    times, upd_times, losses = [], [], []
    bar = tqdm(total=args.steps, desc="train", disable=not args.progress)
    torch.set_flush_denormal(True)  # (as the engine's Trainer.run; fpmode: Numba's threads)
    with fpmode.flush_denormals(True):
        for t, (xb, yb) in enumerate(data.batches(cfg.seed, cfg.batch_size, args.steps)):
            update = rigl.is_update_step()
            if update and not rigl.updates:
                rss["steps before the first update"] = peak_rss_mib()
            trace = args.trace and (t == 1 or (update and "update step" not in traced))
            mode = LargestTensor() if trace else None
            t0 = time.perf_counter()
            if mode is not None:
                mode.__enter__()
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            if rigl.step():
                for g in opt.param_groups:
                    g["lr"] = lr_at(t, base=cfg.lr, total=args.steps, schedule=cfg.lr_schedule)
                opt.step()
            if mode is not None:
                mode.__exit__(None, None, None)
                traced["update step" if update else "training step"] = mode
            dt = time.perf_counter() - t0
            (upd_times if update else times).append(dt)
            losses.append(float(loss.detach()))
            bar.update()
            if update and len(rigl.updates) == 1:
                rss["first update"] = peak_rss_mib()
            if update:
                bar.write(rigl.report_line() + f" (step {dt:.2f} s)")
        bar.close()
        rss["training"] = peak_rss_mib()
        t0 = time.perf_counter()
        if args.trace:
            mode = LargestTensor()
            with mode:
                acc = evaluate(model, data, args.eval_batch)
            traced["evaluation"] = mode
        else:
            acc = evaluate(model, data, args.eval_batch)
        eval_s = time.perf_counter() - t0
    torch.set_flush_denormal(False)
    peak = peak_rss_mib()

    # ------------------------------------------------------------ the report
    held = held_tensors(model, opt)
    name, big = max(held, key=lambda nt: nt[1].numel())
    held_bytes = sum(t.numel() * t.element_size() for _, t in held)
    biggest_dense = max(m.out_features * m.in_features for m in sparse)
    twin = dense_twin(cfg.batch_size)
    sflops = sparse_flops(nnz, cfg.batch_size)
    grow_flops = (
        sum(2 * cfg.batch_size * m.out_features * m.in_features for m in sparse)
        if cfg.grow == "exact"
        else None
    )
    all_t = np.asarray(times + upd_times)
    print()
    print("| measure | sparse (measured) | dense twin (computed) |")
    print("|---|---|---|")
    n_dense = sum(o * i for i, o in zip(ARCH[:-1], ARCH[1:], strict=True))
    print(f"| weights | {sum(nnz)} (nnz) | {n_dense} |")
    print(
        f"| weight + gradient + momentum bytes | {3 * 4 * sum(nnz) / 2**20:.1f} MiB (values) | "
        f"{(twin['weights'] + twin['grads'] + twin['momentum']) / GIB:.2f} GiB "
        f"({twin['weights'] / GIB:.2f} GiB each) |"
    )
    print(
        f"| all tensors the model and SGD hold | {held_bytes / 2**20:.1f} MiB (largest: {name}, "
        f"{big.numel()} entries) | ≥ {(twin['weights'] + twin['grads'] + twin['momentum']) / GIB:.2f} GiB |"
    )
    print(
        f"| FLOPs per training step | {sflops:.3g} | {twin['flops_per_step']:.3g} "
        f"({twin['flops_per_step'] / sflops:.0f}x) |"
    )
    if grow_flops is not None:
        print(
            f"| FLOPs per topology update (exact grow) | {grow_flops:.3g} (dense-sized, tiled) | – |"
        )
    print(f"| peak RSS, whole process | {peak:.0f} MiB | > {3 * twin['weights'] / GIB:.1f} GiB |")
    print()
    print(
        f"time per step: median {1e3 * np.median(times):.1f} ms (steps without an update), "
        f"mean {1e3 * all_t.mean():.1f} ms with the {len(upd_times)} update step(s) included"
    )
    for u, dt in zip(rigl.updates, upd_times, strict=False):
        grown = sum(x["grown"] for x in u["layers"])
        print(
            f"  update at step {u['step']}: {u['seconds']:.2f} s in RigL.update, {dt:.2f} s "
            f"for the step; drop fraction {u['drop_fraction']:.3f}, {grown} regrown"
        )
    print(
        f"loss {np.mean(losses[:10]):.3f} (first 10 steps) -> {np.mean(losses[-10:]):.3f} "
        f"(last 10); test accuracy {100 * acc:.2f}% (evaluated in batches of {args.eval_batch}, "
        f"{eval_s:.1f} s)"
    )
    for what, m in traced.items():
        print(
            f"largest tensor made by any torch op in the {what}: {m.shape} ({m.numel} entries, "
            f"{m.op}); the largest dense weight would have {biggest_dense}"
        )
    print(f"layout copies: {layout_copies()} (the logits' gradient, 10 x batch, once a step)")
    print(
        "RSS (MiB; now after imports, data and model, then peaks): "
        + ", ".join(f"{k} {v:.0f}" for k, v in rss.items())
        + f", peak {peak:.0f}; wall time {time.perf_counter() - t_start:.1f} s"
    )
    too_big = [n for n, t in held if t.numel() >= biggest_dense]
    ok = peak < args.max_rss_mib and not too_big
    if too_big:
        print(f"FAIL: a held tensor has a dense layer's size: {too_big}")
    print(
        f"peak RSS {peak:.0f} MiB {'<' if peak < args.max_rss_mib else '>='} {args.max_rss_mib:.0f} MiB: {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
