"""A character-level transformer language model on the King James Bible, trained truly sparse
in PyTorch (sparsecore.torch: sparsify + RigL) and compared with dense nn.Linear models.

    python bench/torch_lm.py --show-refusal      # the full comparison (about 30 min, 2 cores)
    python bench/torch_lm.py --quick             # ~20 steps of every run: a smoke test (< 2 min)
    python bench/torch_lm.py --steps 600 --batch 16 --ctx 128    # other sizes

Data: sparsecore/datasets/kjv.txt.gz (see sparsecore/datasets/KJV.md), split by a fixed fraction
of lines: the last 5% of the lines (1,674 of 33,479: from 1 Thessalonians 2:10 to the end of
Revelation, 195,985 characters) are the validation text, the rest (3,956,031 characters) the
training text. The vocabulary is every character of the whole text (73, newline included).
Training batches are random windows of the training text from one seeded generator, so every
model sees the same batches; the validation loss is the mean next-character cross-entropy over
fixed, non-overlapping windows of the validation text (the same for every model: --eval-windows
of them, spread evenly over it).

Model (CharLM below): token + learned position embeddings, --layers pre-LayerNorm blocks of
causal self-attention (separate q, k, v and out nn.Linear projections and
F.scaled_dot_product_attention(is_causal=True)) and a feed-forward of two nn.Linear (d -> 4d ->
d, GELU), a final LayerNorm and an untied LM head. Every linear layer of the blocks starts from
Kaiming-uniform values with gain sqrt(2) on its fan-in (the rule sparsify's init="sparse" uses on
the sparse fan-in), so the sparse and dense models differ only in their sparsity.
--qkv-contiguous copies q, k and v to batch-major before attention: a SparseLinear returns a
feature-major view, whose head dimension is strided, and F.scaled_dot_product_attention's fused
CPU kernel wants it contiguous (else it takes its slower "math" path); off by default (the
plain drop-in).

Runs, each in its own subprocess (so each peak RSS is that run's own; a sparse run first
compiles or loads its Numba kernels on a tiny model, so that its step times and peak hold no JIT
compilation, and its "before" RSS holds the Numba runtime):
- sparse: d_model 256, sparsify(model, 0.9, "erk", exclude="head") (the attention projections and
  the feed-forward layers become SparseLinear; embeddings and head stay dense, and the head is
  counted in the 90% budget, so the sparse layers come out slightly sparser than 90%), AdamW +
  RigL (delta_t 50, alpha 0.3, t_end = 75% of the steps; no optimizer step on update steps);
- dense: the same architecture with nn.Linear, the same steps, batches and optimizer;
- dense-small: a dense model of equal parameter count: d_model is the multiple of --heads whose
  block linear weights 12·L·d² (q, k, v, out: 4d², feed-forward: 8d²) come closest to the sparse
  model's nnz in those layers (the embeddings, LayerNorms and biases are extra in both);
- timing: --timing-rounds interleaved rounds of --timing-steps steps each of the dense model and
  of the sparse one at 90% and at 99% (no topology updates: step time only), the order reversed
  every other round, so that a load drifting on the shared machine hits them alike.
For each run: step time (median of the non-update steps, and mean over all steps after the
warm-up, topology updates included), peak RSS, layout copies per step (the delta of
sparsecore.torch.layout_copies() over a step) and the validation loss in nats and bits per
character. --profile also breaks a few steps of the sparse and dense models down with
torch.profiler (where the time goes: sparse layers, dense layers, attention, copies, ...).
Timings on a shared machine are noisy: the step times are medians, and a rerun can differ.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecore  # noqa: E402,I001  (first: it sets the threading environment)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sparsecore.rss import current_rss_mib, peak_rss_mib, reset_peak_rss  # noqa: E402

DATA = Path(sparsecore.__file__).resolve().parent / "datasets" / "kjv.txt.gz"
VAL_FRACTION = 0.05
WARMUP_STEPS = 5  # steps left out of the mean step time (kernel compilation, allocator warm-up)


# ---------------------------------------------------------------------------- data
def load_text():
    """(train ids, val ids, vocabulary): the last VAL_FRACTION of the lines are validation."""
    text = gzip.decompress(DATA.read_bytes()).decode("ascii")
    lines = text.split("\n")
    if lines[-1] == "":
        lines = lines[:-1]
    n_val = int(round(VAL_FRACTION * len(lines)))
    train = "\n".join(lines[:-n_val]) + "\n"
    val = "\n".join(lines[-n_val:]) + "\n"
    vocab = sorted(set(text))
    table = np.zeros(128, dtype=np.uint8)
    table[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=np.uint8)

    def encode(s):
        return torch.from_numpy(table[np.frombuffer(s.encode("ascii"), dtype=np.uint8)].copy())

    return encode(train), encode(val), vocab, lines[-n_val]


class Batches:
    """Random (batch, ctx + 1) windows of the training ids, from one seeded generator."""

    def __init__(self, ids, batch, ctx, seed):
        self.ids, self.batch, self.ctx = ids, batch, ctx
        self.g = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(ctx + 1)

    def next(self):
        start = torch.randint(0, len(self.ids) - self.ctx - 1, (self.batch,), generator=self.g)
        w = self.ids[start[:, None] + self.offsets].long()
        return w[:, :-1], w[:, 1:]


def val_windows(ids, ctx, n):
    """n non-overlapping (ctx + 1) windows spread evenly over the validation ids."""
    total = (len(ids) - 1) // ctx
    pick = np.linspace(0, total - 1, num=min(n, total)).round().astype(np.int64)
    starts = torch.from_numpy(pick * ctx)
    return ids[starts[:, None] + torch.arange(ctx + 1)].long()


# ---------------------------------------------------------------------------- the model
class Attention(nn.Module):
    def __init__(self, d, heads, qkv_contiguous=False):
        super().__init__()
        self.heads, self.qkv_contiguous = heads, qkv_contiguous
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, d = x.shape
        h = self.heads

        def split(y):  # (B, T, d) -> (B, h, T, d / h)
            if self.qkv_contiguous:  # (a SparseLinear's output is a feature-major view)
                y = y.contiguous()
            return y.view(B, T, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d, heads, qkv_contiguous=False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, qkv_contiguous)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab, d, layers, heads, ctx, qkv_contiguous=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*(Block(d, heads, qkv_contiguous) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("blocks."):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")  # sparsify's rule

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        return self.head(self.ln_f(self.blocks(x)))


def block_linear_weights(d, layers):
    return layers * 12 * d * d


def equal_param_d(nnz, layers, heads):
    """The multiple of heads whose dense block linear weights come closest to nnz."""
    cands = range(heads, 4096, heads)
    return min(cands, key=lambda d: abs(block_linear_weights(d, layers) - nnz))


def build(spec, vocab):
    """The run's model (sparsified when spec["sparsity"]) and its AdamW optimizer."""
    from sparsecore.torch import sparsify

    torch.manual_seed(spec["seed"])
    model = CharLM(vocab, spec["d"], spec["layers"], spec["heads"], spec["ctx"],
                   spec["qkv_contiguous"])  # fmt: skip
    if spec["sparsity"]:
        sparsify(model, spec["sparsity"], "erk", exclude="head", seed=spec["seed"])
    decay, rest = [], []
    for name, p in model.named_parameters():
        is_weight = name.endswith(".values") or (name.endswith(".weight") and p.dim() == 2)
        (decay if is_weight and not name.startswith(("tok.", "pos.")) else rest).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec["wd"]}, {"params": rest, "weight_decay": 0.0}],
        lr=spec["lr"],
        betas=(0.9, 0.95),
    )
    return model, opt


def linear_counts(model):
    """(weights of the blocks' linear layers as stored: nnz for sparse, m·n for dense, their
    dense size, and the model's parameter count)."""
    from sparsecore.torch import SparseLinear

    stored = dense = 0
    for name, m in model.named_modules():
        if not name.startswith("blocks."):
            continue
        if isinstance(m, SparseLinear):
            stored += m.nnz
            dense += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            stored += m.weight.numel()
            dense += m.weight.numel()
    return stored, dense, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- one run
def lr_at(step, steps, lr):
    """Linear warm-up over the first 5% (at most 100 steps), then cosine decay to lr / 10."""
    warm = max(1, min(100, steps // 20))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, windows, batch):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                 reduction="sum").item()  # fmt: skip
        count += w[:, 1:].numel()
    model.train()
    return total / count


def warm_kernels():
    """Compile (or load from Numba's cache) every kernel a sparse run calls, on a tiny model, so
    that the measured peak RSS and step times hold no JIT compilation."""
    from sparsecore.torch import RigL, SparseLinear, sparsify

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    sparsify(net, 0.8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    rigl = RigL(net, opt, delta_t=1, alpha=0.3, t_end=3)
    x = torch.randn(2, 8, 32)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        if rigl.step():
            opt.step()
    with torch.no_grad():
        net(x)
    assert any(isinstance(m, SparseLinear) for m in net.modules())


def worker(spec):
    """One run: train spec["steps"] steps, time them, evaluate; returns a dict of results."""
    from sparsecore.torch import RigL, layout_copies

    train_ids, val_ids, vocab, _ = load_text()
    windows = val_windows(val_ids, spec["ctx"], spec["eval_windows"])
    if spec["sparsity"]:
        warm_kernels()
    rss0 = current_rss_mib()
    reset_peak_rss()
    model, opt = build(spec, len(vocab))
    stored, dense_size, n_params = linear_counts(model)
    rigl = None
    if spec["sparsity"] and spec["rigl"]:
        t_end = int(0.75 * spec["steps"])
        rigl = RigL(model, opt, delta_t=spec["delta_t"], alpha=spec["alpha"], t_end=t_end)
    data = Batches(train_ids, spec["batch"], spec["ctx"], spec["seed"] + 1)
    steps = spec["steps"]
    evals_at = sorted({max(1, round(steps * f / spec["eval_points"]))
                       for f in range(1, spec["eval_points"] + 1)}) if spec["eval"] else []  # fmt: skip
    times, updates, copies, losses, curve, peaks = [], [], [], [], [], []
    bar = tqdm(range(steps), desc=spec["name"], leave=False, mininterval=2)
    for step in bar:
        x, y = data.next()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, spec["lr"])
        reset_peak_rss()  # (each step's own peak: steps with and without a topology update)
        c0 = layout_copies()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        is_update = rigl is not None and rigl.is_update_step()
        if rigl is None or rigl.step():
            opt.step()
        times.append(time.perf_counter() - t0)
        copies.append(layout_copies() - c0)
        peaks.append(peak_rss_mib())
        updates.append(is_update)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", s=f"{times[-1]:.2f}")
        if step + 1 in evals_at:
            curve.append((step + 1, evaluate(model, windows, spec["batch"])))
    t = np.array(times)
    upd = np.array(updates)
    peaks = np.array(peaks)
    after = np.arange(len(t)) >= min(WARMUP_STEPS, max(0, len(t) - 1))
    plain = t[after & ~upd] if (after & ~upd).any() else t
    breakdown = profile(model, opt, data, rigl, spec) if spec["profile"] else None
    return dict(
        name=spec["name"],
        d=spec["d"],
        sparsity=spec["sparsity"],
        steps=steps,
        tokens_per_step=spec["batch"] * spec["ctx"],
        stored_weights=stored,
        dense_weights=dense_size,
        params=n_params,
        median_step_s=float(np.median(plain)),
        mean_step_s=float(t[after].mean()),
        n_updates=int(upd.sum()),
        update_s=[u["seconds"] for u in rigl.updates] if rigl is not None else [],
        update_step_s=t[upd].tolist(),
        copies_per_step=int(np.median(np.array(copies)[~upd])) if (~upd).any() else None,
        copies_update_step=int(np.median(np.array(copies)[upd])) if upd.any() else None,
        train_loss_last=float(np.mean(losses[-max(1, min(50, steps // 10)) :])),
        curve=curve,
        val_loss=curve[-1][1] if curve else None,
        rss_before_mib=rss0,
        peak_rss_mib=float(peaks[~upd].max()) if (~upd).any() else float(peaks.max()),
        peak_rss_update_mib=float(peaks[upd].max()) if upd.any() else None,
        train_s=float(t.sum()),
        plain_step_s=plain.tolist(),
        step_peak_rss_mib=peaks.tolist(),
        step_s=t.tolist(),
        losses=losses,
        breakdown=breakdown,
        torch_threads=torch.get_num_threads(),
        load_avg=os.getloadavg()[0],
    )


# ---------------------------------------------------------------------------- the profile
CATEGORIES = [  # (category, does an event's name say so): the first that matches wins
    ("sparse linear (SparseLinear)", lambda n: "LinearFunction" in n),
    (
        "dense linear (nn.Linear)",
        lambda n: (
            n in ("aten::linear", "aten::addmm", "aten::mm")
            or any(k in n for k in ("AddmmBackward", "MmBackward"))
        ),
    ),  # fmt: skip
    (
        "attention (SDPA fwd+bwd)",
        lambda n: (
            "scaled_dot_product" in n.lower()
            or n in ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data")
            or n.endswith((": BmmBackward0", ": SoftmaxBackward0"))
        ),
    ),  # (SDPA's math fallback)
    (
        "copies (contiguous/clone/copy_)",
        lambda n: n in ("aten::contiguous", "aten::clone", "aten::copy_") or "CloneBackward" in n,
    ),  # fmt: skip
    ("LayerNorm", lambda n: "layer_norm" in n or "NativeLayerNormBackward" in n),
    ("GELU", lambda n: "gelu" in n.lower()),
    ("optimizer (AdamW, clip)", lambda n: n.startswith("Optimizer.") or n == "clip_grad"),
    ("RigL topology update", lambda n: n == "rigl.step"),
]


def _category(name):
    for cat, test in CATEGORIES:
        if test(name):
            return cat
    return None


def profile(model, opt, data, rigl, spec):
    """A few steps under torch.profiler: each event's self CPU time goes to its own category or
    its nearest categorised ancestor's ("other" when none); per step, in ms."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    n = spec["profile_steps"]
    for _ in range(2):  # (warm)
        x, y = data.next()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), y.reshape(-1)).backward()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            x, y = data.next()
            with record_function("step"):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.reshape(-1))
                loss.backward()
                with record_function("clip_grad"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
    wall = (time.perf_counter() - t0) / n
    evs = prof.events()
    sums: dict = {}
    ops: dict = {}
    step_total = 0.0
    for e in evs:
        if e.name == "step":
            step_total += e.cpu_time_total
        cat, a = None, e
        while a is not None and cat is None:
            cat = _category(a.name)
            a = a.cpu_parent
        if e.name == "step":
            continue
        key = cat or "other"
        sums[key] = sums.get(key, 0.0) + e.self_cpu_time_total
        ops[key, e.name] = ops.get((key, e.name), 0.0) + e.self_cpu_time_total
    inside = sum(sums.values())
    sums["other"] = sums.get("other", 0.0) + max(0.0, step_total - inside)
    ms = {k: v / 1e3 / n for k, v in sums.items()}
    top = sorted(((v / 1e3 / n, c, name) for (c, name), v in ops.items()), reverse=True)[:40]
    return dict(wall_ms=wall * 1e3, profiled_ms=step_total / 1e3 / n, ms=ms, steps=n, top=top)


# ---------------------------------------------------------------------------- the driver
def run_sub(spec, python=sys.executable):
    """Run one spec in a fresh subprocess; its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python, str(Path(__file__).resolve()), "--_worker", json.dumps(spec), "--_out",
               str(out)]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        r = json.loads(out.read_text())
        r["wall_s"] = time.perf_counter() - t0
        return r


def show_refusal():
    from sparsecore.torch import sparsify

    class MHAModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.ff = nn.Linear(64, 64)

    try:
        sparsify(MHAModel(), 0.9)
        print("sparsify accepted nn.MultiheadAttention: NOT EXPECTED")
    except ValueError as e:
        print(f"sparsify refuses nn.MultiheadAttention:\n  ValueError: {e}\n")


def fmt_loss(v):
    return "–" if v is None else f"{v:.4f} ({v / math.log(2):.4f})"


def sparsity_of(r):
    """The blocks' linear layers' sparsity (sparsify counts the dense head in its budget, so
    this is a little above the sparsity asked for)."""
    return f"{1 - r['stored_weights'] / r['dense_weights']:.2%}" if r["sparsity"] else "dense"


def report(rows, timing, args, first_val_line):
    print(f"\nValidation split: the last {VAL_FRACTION:.0%} of the lines (first: "
          f"{first_val_line!r}); {args.eval_windows} windows of {args.ctx} characters.")  # fmt: skip
    print(f"Training: {args.steps} steps of {args.batch}×{args.ctx} characters, AdamW lr "
          f"{args.lr:g} (warm-up, cosine to lr/10), wd {args.wd:g}, clip 1.0; RigL delta_t "
          f"{args.delta_t}, alpha {args.alpha:g}, t_end 75% of the steps.\n")  # fmt: skip
    print("| run | d_model | block linear weights (stored / dense) | params | val loss nats/char "
          "(bits/char) | train loss (last) | train time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['d']} | {r['stored_weights']:,} / {r['dense_weights']:,} "
              f"({sparsity_of(r)}) | "
              f"{r['params']:,} | {fmt_loss(r['val_loss'])} | {r['train_loss_last']:.4f} | "
              f"{r['train_s'] / 60:.1f} min |")  # fmt: skip
    curves = [r for r in rows if len(r["curve"]) > 1]
    if curves:
        print("\nValidation loss (nats/char) during training:\n")
        print("| run | " + " | ".join(f"step {s}" for s, _ in curves[0]["curve"]) + " |")
        print("|---|" + "---|" * len(curves[0]["curve"]))
        for r in curves:
            print(f"| {r['name']} | " + " | ".join(f"{v:.4f}" for _, v in r["curve"]) + " |")
    if rows:
        print("\nThe training runs: step time (median of the non-update steps; mean over all "
              f"steps after the first {WARMUP_STEPS}, topology updates included), peak RSS of "
              "the steps (absolute, and above the RSS before the model was built), layout copies "
              "per step, the 1-min load average at the run's end (2 cores):\n")  # fmt: skip
        print("| run | median step | mean step (with updates) | RigL update (mean) | peak RSS, "
              "steps without / with an update | layout copies / step (update step) | load |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            upd = (f"{1e3 * np.mean(r['update_s']):.0f} ms ×{r['n_updates']}"
                   if r["update_s"] else "–")  # fmt: skip
            cp = "–" if r["copies_per_step"] is None else str(r["copies_per_step"])
            if r["copies_update_step"] is not None:
                cp += f" ({r['copies_update_step']})"
            mem = f"{r['peak_rss_mib']:.0f} MiB (+{r['peak_rss_mib'] - r['rss_before_mib']:.0f})"
            if r["peak_rss_update_mib"] is not None:
                mem += (f" / {r['peak_rss_update_mib']:.0f} MiB "
                        f"(+{r['peak_rss_update_mib'] - r['rss_before_mib']:.0f})")  # fmt: skip
            print(f"| {r['name']} | {1e3 * r['median_step_s']:.0f} ms | "
                  f"{1e3 * r['mean_step_s']:.0f} ms | {upd} | {mem} | {cp} | "
                  f"{r['load_avg']:.1f} |")  # fmt: skip
    if timing:
        names = list(dict.fromkeys(r["name"] for r in timing))
        pooled = {
            n: [t for r in timing if r["name"] == n for t in r["plain_step_s"]] for n in names
        }
        med = {n: float(np.median(v)) for n, v in pooled.items()}
        dense = next((n for n in names if n.startswith("dense")), None)
        rounds = len(timing) // max(1, len(names))
        print(f"\nStep time, {rounds} interleaved rounds of {args.timing_steps} steps per model "
              f"(median of the pooled steps after the first {WARMUP_STEPS} of each run; no "
              "topology updates):\n")  # fmt: skip
        print("| model | block linear weights (sparsity) | median step | per-round medians | vs dense | "
              "chars/s | layout copies / step | peak RSS (+ above before) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for n in names:
            rs = [r for r in timing if r["name"] == n]
            per = ", ".join(f"{1e3 * r['median_step_s']:.0f}" for r in rs)
            rel = f"{med[n] / med[dense]:.2f}×" if dense else "–"
            r = rs[0]
            print(f"| {n} | {r['stored_weights']:,} ({sparsity_of(r)}) | {1e3 * med[n]:.0f} ms | {per} ms | {rel} | "
                  f"{r['tokens_per_step'] / med[n]:,.0f} | {r['copies_per_step']} | "
                  f"{max(x['peak_rss_mib'] for x in rs):.0f} MiB "
                  f"(+{max(x['peak_rss_mib'] - x['rss_before_mib'] for x in rs):.0f}) |")  # fmt: skip
    prof = [r for r in rows if r.get("breakdown")]
    if prof:
        cats = [c for c, _ in CATEGORIES] + ["other"]
        print("\nWhere a step's time goes (torch.profiler over "
              f"{prof[0]['breakdown']['steps']} steps, self CPU time by category, ms per step; "
              "the profiler adds overhead):\n")  # fmt: skip
        print("| category | " + " | ".join(r["name"] for r in prof) + " |")
        print("|---|" + "---|" * len(prof))
        for c in cats:
            vals = [r["breakdown"]["ms"].get(c, 0.0) for r in prof]
            if not any(v > 0.05 for v in vals):
                continue
            print(f"| {c} | " + " | ".join(f"{v:.0f}" for v in vals) + " |")
        print("| total profiled / wall | " + " | ".join(
            f"{r['breakdown']['profiled_ms']:.0f} / {r['breakdown']['wall_ms']:.0f}" for r in prof
        ) + " |")  # fmt: skip
        for r in prof:
            top = ", ".join(f"{name} {ms:.0f}" for ms, cat, name in r["breakdown"]["top"][:12])
            print(f"\n{r['name']}, the largest ops (self ms per step): {top}")


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--timing-sparsity", type=float, default=0.99)
    ap.add_argument("--timing-steps", type=int, default=30)
    ap.add_argument("--timing-rounds", type=int, default=2)
    ap.add_argument("--qkv-contiguous", action="store_true",
                    help="copy q, k, v to batch-major before SDPA (its fused CPU kernel needs "
                    "the head dimension contiguous)")  # fmt: skip
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--delta-t", type=int, default=50)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--eval-windows", type=int, default=512)
    ap.add_argument("--eval-points", type=int, default=4, help="validation evaluations per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=["sparse", "dense", "dense-small", "timing"],
                    choices=["sparse", "dense", "dense-small", "timing"])  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="break steps down (torch.profiler)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="~20 steps of each run (smoke test)")
    ap.add_argument("--show-refusal", action="store_true",
                    help="show that sparsify refuses nn.MultiheadAttention")  # fmt: skip
    ap.add_argument(
        "--out",
        default=None,
        help="write the results as JSON here after every run (and resume from it)",
    )
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        r = worker(json.loads(args._worker))
        Path(args._out).write_text(json.dumps(r))
        return 0

    if args.quick:
        args.steps, args.timing_steps, args.delta_t, args.timing_rounds = 20, 10, 5, 1
        args.eval_windows, args.eval_points, args.profile_steps = 32, 1, 2
    if args.show_refusal:
        show_refusal()
    _, _, vocab, first_val_line = load_text()
    print(f"KJV: {len(vocab)} characters in the vocabulary; torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; os.cpu_count() {os.cpu_count()}")  # fmt: skip

    base = dict(d=args.d_model, layers=args.layers, heads=args.heads, ctx=args.ctx,
                batch=args.batch, steps=args.steps, lr=args.lr, wd=args.wd, seed=args.seed,
                delta_t=args.delta_t, alpha=args.alpha, eval_windows=args.eval_windows,
                eval_points=args.eval_points, eval=True, rigl=True, sparsity=None,
                profile=False, profile_steps=args.profile_steps,
                qkv_contiguous=args.qkv_contiguous)  # fmt: skip
    # the sparse model's nnz, for the equal-parameter dense model (built here, not trained)
    probe, _ = build({**base, "sparsity": args.sparsity}, len(vocab))
    nnz, dense_size, _ = linear_counts(probe)
    d_small = equal_param_d(nnz, args.layers, args.heads)
    del probe
    print(f"sparse model ({args.sparsity:.0%}, ERK, head kept dense): {nnz:,} of {dense_size:,} "
          f"block linear weights ({1 - nnz / dense_size:.2%} sparse); equal-parameter dense "
          f"model: d_model {d_small} ({block_linear_weights(d_small, args.layers):,} block "
          "linear weights)\n")  # fmt: skip

    specs, timing_specs = [], []
    if "sparse" in args.runs:
        specs.append({**base, "name": f"sparse {args.sparsity:.0%} + RigL",
                      "sparsity": args.sparsity, "profile": args.profile})  # fmt: skip
    if "dense" in args.runs:
        specs.append({**base, "name": "dense", "profile": args.profile})
    if "dense-small" in args.runs:
        specs.append({**base, "name": f"dense-small (d={d_small})", "d": d_small})
    if "timing" in args.runs:
        timing = {**base, "steps": args.timing_steps, "eval": False, "rigl": False}
        models = [{**timing, "name": "dense (nn.Linear)"}]
        for sp in (args.sparsity, args.timing_sparsity):
            models.append({**timing, "name": f"sparse {sp:.0%}", "sparsity": sp})
        for k in range(args.timing_rounds):  # (alternate the order: drifting load cancels)
            timing_specs += models if k % 2 == 0 else models[::-1]
    # --out is written after every run; a rerun with the same --out (and settings) skips the
    # runs already there, so an interrupted comparison resumes
    out = Path(args.out) if args.out else None
    saved = json.loads(out.read_text()) if out and out.exists() else {"runs": [], "timing": []}
    rows, timing_rows = [], []

    def save():
        if out:
            out.write_text(json.dumps(dict(runs=rows, timing=timing_rows), indent=1))

    t0 = time.perf_counter()
    for spec in specs:
        r = next((x for x in saved["runs"] if x["name"] == spec["name"]), None)
        r = r or run_sub(spec)
        print(f"{r['name']}: val {fmt_loss(r['val_loss'])}, median step "
              f"{1e3 * r['median_step_s']:.0f} ms, {r['wall_s'] / 60:.1f} min wall", flush=True)  # fmt: skip
        rows.append(r)
        save()
    for k, spec in enumerate(timing_specs):
        r = saved["timing"][k] if k < len(saved["timing"]) else run_sub(spec)
        print(f"{r['name']} (timing): median step {1e3 * r['median_step_s']:.0f} ms, "
              f"load {r['load_avg']:.1f}", flush=True)  # fmt: skip
        timing_rows.append(r)
        save()
    report(rows, timing_rows, args, first_val_line)
    print(f"\nTotal wall time: {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
