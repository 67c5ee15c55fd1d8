"""LeNet-300-100 on MNIST in plain PyTorch with sparsecore.torch, against the engine and dense.

    python bench/torch_mnist.py                       # 3 seeds, the engine's defaults (20 epochs)
    python bench/torch_mnist.py --quick               # CI smoke run: 1 seed, 300 steps, < 1 min
    python bench/torch_mnist.py --seeds 0 1 --epochs 5 --sparsity 0.95 --distribution uniform

For each seed, three runs, each in a fresh process (so each peak RSS is its own):

- bridge: ``nn.Sequential`` of ``nn.Linear`` (784-300-100-10, ReLU), ``sparsify(model, sparsity,
  distribution, seed=s)``, ``torch.optim.SGD`` and ``sparsecore.torch.RigL``
  (``if rigl.step(): optimizer.step()``), trained with ``F.cross_entropy``;
- engine: ``sparsecore.train.Trainer`` with the matching ``TrainConfig`` (same seed);
- dense: the same ``nn.Sequential`` left dense, the same SGD and lr schedule, no RigL.

Every setting comes from ``TrainConfig``'s defaults (sparsecore/config.py): SGD lr 0.1,
momentum 0.9 (heavy ball), L2 weight decay 1e-4 on every parameter (biases too), cosine lr
decay to 0 over the run without warm-up (set before each optimizer step with
``sparsecore.optim.lr_at``, as the engine does), batch 128, 20 epochs of 60000 // 128 = 468
steps (the last partial batch dropped), RigL with ΔT 100, α 0.3, cosine drop decay, T_end at
75% of the steps, the exact grow, no optimizer step on update steps; ERK densities.

What is matched so that the bridge and the engine train the same network:

- data: the bundled MNIST standardised as the engine does (``sparsecore.data.load``), and the
  engine's batch order: epoch e is the permutation seeded by (seed, EPOCH_TAG, e), i.e.
  ``Trainer.batches(e)`` (checked against the trainer's own at the start of each engine run);
  every run sees the same batches in the same order;
- initial weights: ``sparsify`` draws a sparse layer's pattern and values exactly as the
  engine's ``mlp`` does for the same seed. Two things differ and are aligned here
  (``--torch-init`` keeps the torch ones): the engine starts every bias at 0 (``nn.Linear``
  draws them), and a layer that ERK makes dense (784-300-100-10 at 90%: the 10 × 100
  classifier) is, in the engine, a dense layer drawn by ``dense_init`` from (seed, INIT_TAG, l,
  3) whereas ``sparsify`` makes it a SparseLinear of density 1 with the sparse init. Its values
  are set to the engine's draw. (RigL then updates that density-1 layer too, where the engine
  leaves its dense layer alone; with no absent connection it regrows exactly what it drops,
  which keeps weights and momentum, so the network is the same.) The dense twin gets the
  engine's dense init (``dense_init`` per layer, biases 0), i.e. the engine's ``--method dense``
  start;
- floating point: the engine's ``Trainer.run`` flushes subnormal floats to zero in the kernel
  threads (``kernels.cpu.fpmode``); the torch runs do the same around their loop (and
  ``torch.set_flush_denormal``), unless ``--keep-denormals``.

Timing: every step from ``zero_grad`` (engine: ``train_step``) to the optimizer step or the
topology update, batch gathering excluded in all three; mean (update steps included) and
median. Peak RSS: ``sparsecore.rss.peak_rss_mib`` of the run's own process, the whole process
(Python, torch, Numba, the MNIST arrays); "base" is the RSS after imports and data, before the
model. The accuracy gap is the bridge's test accuracy minus the engine's, in points; the target
is |mean over seeds| ≤ 0.2.

Runtime: the default (3 seeds × 3 runs × 20 epochs) took 17.7 min on a 2-core AMD EPYC shared
with other jobs (load 3-8); the epochs were kept at the engine's 20 all the same, since most of
that time was the dense twin's torch steps under the load (20-40 ms a step then, 2 ms when it
eased). ``--epochs`` shortens it. Threads: ``--threads N`` sets torch's and Numba's pools; on
few, shared cores torch's intra-op pool of 2 threads made each bridge step several times
slower than with one (torch's OpenMP pool and Numba's compete for the cores).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

ARCH = [784, 300, 100, 10]
QUICK_STEPS = 300
KINDS = ("bridge", "engine", "dense")
GAP_TARGET = 0.2  # points of test accuracy, mean over seeds


# ---------------------------------------------------------------- settings and data order
def make_config(args, seed: int):
    from sparsecore.train import TrainConfig

    return TrainConfig(
        arch=list(ARCH),
        dataset="mnist",
        sparsity=args.sparsity,
        distribution=args.distribution,
        method="rigl",
        epochs=args.epochs,
        seed=seed,
        max_steps=args.max_steps,
        progress=False,
        out=None,
    ).validate()


def step_counts(cfg, n_train: int) -> tuple[int, int]:
    """(steps per epoch, total steps), as the Trainer counts them."""
    per_epoch = n_train // cfg.batch_size
    total = cfg.epochs * per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return per_epoch, total


def epoch_order(seed: int, epoch: int, n_train: int) -> np.ndarray:
    """The engine's order of epoch ``epoch`` (Trainer.epoch_permutation)."""
    from sparsecore.train import EPOCH_TAG

    return np.random.default_rng([seed, EPOCH_TAG, epoch]).permutation(n_train)


def batch_indices(cfg, n_train: int):
    """Each step's row indices, in the engine's order, until the run's total steps."""
    per_epoch, total = step_counts(cfg, n_train)
    bs, step = cfg.batch_size, 0
    for epoch in range(cfg.epochs):
        perm = epoch_order(cfg.seed, epoch, n_train)
        for s in range(per_epoch):
            if step >= total:
                return
            yield perm[s * bs : (s + 1) * bs]
            step += 1


# ---------------------------------------------------------------- the torch models
def lenet():
    from torch import nn

    return nn.Sequential(
        nn.Linear(ARCH[0], ARCH[1]),
        nn.ReLU(),
        nn.Linear(ARCH[1], ARCH[2]),
        nn.ReLU(),
        nn.Linear(ARCH[2], ARCH[3]),
    )


def init_like_engine(model, seed: int):
    """Biases to 0, and every dense weight (an nn.Linear, or a SparseLinear of density 1) to the
    engine's dense_init draw for (seed, INIT_TAG, l, 3), l the weighted layer's index."""
    import torch
    from torch import nn

    from sparsecore.layers import INIT_TAG, dense_init
    from sparsecore.torch import SparseLinear

    weighted = [m for m in model if isinstance(m, (nn.Linear, SparseLinear))]
    with torch.no_grad():
        for l, m in enumerate(weighted):
            if m.bias is not None:
                m.bias.zero_()
            dense = isinstance(m, nn.Linear) or m.nnz == m.out_features * m.in_features
            if not dense:
                continue  # (sparsify drew it as the engine does)
            w = dense_init(
                m.in_features, m.out_features, np.random.default_rng([seed, INIT_TAG, l, 3])
            )
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.from_numpy(w))
            else:  # a full CSR holds its values row by row
                m.values.copy_(torch.from_numpy(w.reshape(-1)))


def evaluate(model, x, y, feature_major: bool) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x.T)).T if feature_major else torch.from_numpy(x)
        pred = model(xt).argmax(dim=1).numpy()
    model.train()
    return float(np.mean(pred == y))


def run_torch(kind: str, cfg, data, progress: bool, torch_init: bool, flush: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from kernels.cpu import fpmode
    from sparsecore.optim import lr_at
    from sparsecore.rss import current_rss_mib, peak_rss_mib
    from sparsecore.torch import RigL, sparsify

    base_rss = current_rss_mib()
    x, y = data.x_train, data.y_train
    per_epoch, total = step_counts(cfg, x.shape[0])
    torch.manual_seed(cfg.seed)
    model = lenet()
    bridge = kind == "bridge"
    if bridge:
        sparsify(model, cfg.sparsity, cfg.distribution, seed=cfg.seed)
    if not torch_init:
        init_like_engine(model, cfg.seed)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
    rigl = None
    if bridge:
        rigl = RigL.from_config(model, opt, cfg, total)

    def lr(t):
        return lr_at(
            t,
            base=cfg.lr,
            total=total,
            schedule=cfg.lr_schedule,
            warmup=cfg.warmup_steps,
            step_every=cfg.lr_step_every,
            gamma=cfg.lr_gamma,
        )

    times, losses = [], []
    bar = tqdm(total=total, desc=f"{kind} seed {cfg.seed}", disable=not progress, leave=False)
    torch.set_flush_denormal(flush)  # (torch's threads; fpmode below: Numba's)
    with fpmode.flush_denormals(flush):
        for t, idx in enumerate(batch_indices(cfg, x.shape[0])):
            # the bridge gets the batch feature-major (x.T a view: no layout copy at layer 1)
            xb = (
                torch.from_numpy(np.ascontiguousarray(x[idx].T)).T
                if bridge
                else torch.from_numpy(x[idx])
            )
            yb = torch.from_numpy(y[idx])
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            if rigl is None or rigl.step():
                for g in opt.param_groups:
                    g["lr"] = lr(t)
                opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise RuntimeError(
                    f"{kind} seed {cfg.seed}: the loss became {losses[-1]} at step {t}"
                )
            bar.update()
    bar.close()
    torch.set_flush_denormal(False)
    acc = evaluate(model, data.x_test, data.y_test, feature_major=bridge)
    from sparsecore.torch import layout_copies

    return dict(
        kind=kind,
        seed=cfg.seed,
        test_acc=acc,
        steps=len(times),
        times=times,
        losses=losses,
        peak_rss_mib=peak_rss_mib(),
        base_rss_mib=base_rss,
        update_s=[u["seconds"] for u in rigl.updates] if rigl else [],
        layout_copies=layout_copies() if bridge else None,
    )


def run_engine(cfg, data, progress: bool) -> dict:
    from tqdm import tqdm

    from sparsecore.callbacks import Callback
    from sparsecore.rss import current_rss_mib, peak_rss_mib
    from sparsecore.train import Trainer

    base_rss = current_rss_mib()
    losses = []

    class Bar(Callback):
        def on_run_start(self, trainer):
            self.bar = tqdm(
                total=trainer.total_steps,
                desc=f"engine seed {cfg.seed}",
                disable=not progress,
                leave=False,
            )

        def on_step_end(self, trainer, loss, report):
            losses.append(float(loss))
            self.bar.update()

        def on_run_exit(self, trainer, error):
            self.bar.close()

    tr = Trainer(cfg, data, callbacks=[Bar()])
    n = data.x_train.shape[0]
    first = next(iter(batch_indices(cfg, n)))
    same = np.array_equal(epoch_order(cfg.seed, 0, n), tr.epoch_permutation(0))
    if not (same and np.array_equal(first, next(iter(tr.batches(0))))):
        raise RuntimeError("this script's batch order differs from Trainer.batches(0)")
    summary = tr.run()
    return dict(
        kind="engine",
        seed=cfg.seed,
        test_acc=summary["test_acc"],
        steps=summary["steps"],
        times=list(tr._step_times),  # every step's seconds (train_step), as the summary's mean
        losses=losses,
        peak_rss_mib=peak_rss_mib(),
        base_rss_mib=base_rss,
        update_s=[sum(d["seconds"] for d in u["layers"]) for u in tr.updates],
        layout_copies=None,
    )


def one_run(kind: str, args, seed: int) -> dict:
    """One run in this process (the child of --isolate)."""
    from sparsecore import data as D

    if args.threads:
        import numba
        import torch

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    cfg = make_config(args, seed)
    data = D.load(cfg.dataset)
    if kind == "engine":
        return run_engine(cfg, data, args.progress)
    return run_torch(kind, cfg, data, args.progress, args.torch_init, not args.keep_denormals)


def _child(kind, args, seed, queue):
    try:
        queue.put(("ok", one_run(kind, args, seed)))
    except BaseException as e:  # (reported by the parent)
        import traceback

        queue.put(
            ("error", f"{kind} seed {seed}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        )


def run_isolated(kind: str, args, seed: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, args, seed, q))
    p.start()
    status, result = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(result)
    return result


# ---------------------------------------------------------------- the report
def fmt_row(r: dict) -> str:
    t = np.asarray(r["times"]) * 1e3
    upd = f"{1e3 * np.median(r['update_s']):.1f}" if r["update_s"] else "–"
    return (
        f"| {r['seed']} | {r['kind']} | {100 * r['test_acc']:.2f} | {t.mean():.3f} | "
        f"{np.median(t):.3f} | {len(r['update_s'])} | {upd} | {r['peak_rss_mib']:.0f} "
        f"({r['base_rss_mib']:.0f}) | {r['steps']} |"
    )


def report(results: list[dict], seeds) -> float | None:
    print()
    print(
        "| seed | run | test acc % | mean ms/step | median ms/step | updates | median ms/update "
        "| peak RSS MiB (base) | steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(fmt_row(r))
    for kind in KINDS:
        rs = [r for r in results if r["kind"] == kind]
        if not rs:
            continue
        acc = [100 * r["test_acc"] for r in rs]
        mean_t = [1e3 * np.mean(r["times"]) for r in rs]
        med_t = [1e3 * np.median(r["times"]) for r in rs]
        rss = [r["peak_rss_mib"] for r in rs]
        sd = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        print(
            f"| mean | {kind} | {np.mean(acc):.2f}{sd} | {np.mean(mean_t):.3f} | "
            f"{np.median(med_t):.3f} (median of seeds) | | | {np.mean(rss):.0f} | |"
        )
    print()
    gaps = []
    for s in seeds:
        b = next((r for r in results if r["kind"] == "bridge" and r["seed"] == s), None)
        e = next((r for r in results if r["kind"] == "engine" and r["seed"] == s), None)
        if b is None or e is None:
            continue
        gap = 100 * (b["test_acc"] - e["test_acc"])
        gaps.append(gap)
        n = min(len(b["losses"]), len(e["losses"]))
        dl = np.abs(np.asarray(b["losses"][:n]) - np.asarray(e["losses"][:n]))
        first = min(n, 100)
        print(
            f"seed {s}: bridge - engine test accuracy {gap:+.2f} points; |loss difference| "
            f"max {dl[:first].max():.2e} over the first {first} steps, {dl.max():.2e} over all {n}"
        )
    if not gaps:
        return None
    mean_gap = float(np.mean(gaps))
    ok = abs(mean_gap) <= GAP_TARGET
    print(
        f"bridge - engine, mean over {len(gaps)} seed(s): {mean_gap:+.2f} points "
        f"(target |gap| <= {GAP_TARGET}: {'met' if ok else 'NOT met'})"
    )
    b = [r for r in results if r["kind"] == "bridge"]
    if b and b[0]["layout_copies"] is not None:
        print(
            f"layout copies in a bridge run: {b[0]['layout_copies']} over {b[0]['steps']} steps "
            "(the loss gradient of the last layer arrives batch-major from F.cross_entropy: one "
            "10 x 128 copy per step; none between the sparse layers)"
        )
    return mean_gap


def main(argv=None):
    from sparsecore.config import TrainConfig

    defaults = TrainConfig()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--epochs", type=int, default=defaults.epochs)
    ap.add_argument("--sparsity", type=float, default=defaults.sparsity)
    ap.add_argument("--distribution", choices=("erk", "uniform"), default=defaults.distribution)
    ap.add_argument("--runs", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_STEPS} steps of one seed"
    )
    ap.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run everything in this process (faster start; peak RSS is then the process's max so far)",
    )
    ap.add_argument(
        "--torch-init",
        action="store_true",
        help="keep torch's biases and the sparse init of density-1 layers",
    )
    ap.add_argument(
        "--keep-denormals", action="store_true", help="do not flush subnormals in the torch runs"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch's and Numba's threads (default: theirs)"
    )
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    args.max_steps = QUICK_STEPS if args.quick else None
    if args.quick:
        args.epochs = min(args.epochs, 1)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])

    cfg = make_config(args, seeds[0])
    per_epoch, total = step_counts(cfg, 60000)
    print(
        f"LeNet-300-100, sparsity {cfg.sparsity} ({cfg.distribution}), {total} steps "
        f"({cfg.epochs} epoch(s) of {per_epoch}), batch {cfg.batch_size}; SGD lr {cfg.lr} "
        f"({cfg.lr_schedule}), momentum {cfg.momentum}, weight decay {cfg.weight_decay}; RigL "
        f"ΔT {cfg.delta_t}, α {cfg.alpha}, T_end {cfg.t_end} of the steps, grow {cfg.grow}; "
        f"seeds {seeds}; runs {args.runs}; {'one process each' if args.isolate else 'one process'}"
    )
    t0 = time.perf_counter()
    results = []
    for seed in seeds:
        for kind in args.runs:
            t1 = time.perf_counter()
            r = run_isolated(kind, args, seed) if args.isolate else one_run(kind, args, seed)
            r["wall_s"] = time.perf_counter() - t1
            results.append(r)
            print(
                f"seed {seed} {kind}: test accuracy {100 * r['test_acc']:.2f}%, "
                f"{1e3 * np.median(r['times']):.3f} ms/step (median), {r['wall_s']:.1f} s wall",
                flush=True,
            )
    report(results, seeds)
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
