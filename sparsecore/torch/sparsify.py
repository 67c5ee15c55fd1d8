"""``sparsify(model, sparsity)``: swap an existing model's ``nn.Linear`` layers for SparseLinear.

Which layers: every ``nn.Linear`` (subclasses included) whose qualified name passes ``include``
and ``exclude`` (each a name, a glob such as ``"blocks.*.ffn.*"``, a list of those, or a
callable ``(name, module) -> bool``). Linear layers left out stay dense and are counted in the
budget: the swapped layers' densities are solved so that all the model's linear layers together
hold (1 - sparsity) of their dense weights (RIGL.md: fixed layers are excluded from the solve
but counted in the total). ``"erk"`` gives layer l a density ∝ (m_l + n_l)/(m_l·n_l) (layers that
come out above 1 are made dense); ``"uniform"`` gives every swapped layer the same density.

What it refuses, with what to do instead:
- ``nn.MultiheadAttention``: its q, k and v weights are packed into one ``in_proj_weight``
  parameter (not an ``nn.Linear``), so they cannot be swapped; write attention with separate
  q/k/v/out ``nn.Linear`` projections, or exclude the module to keep it dense;
- a Linear whose weight is tied to another module's parameter (e.g. an LM head sharing the
  embedding): a sparse layer cannot share a dense parameter; untie it or exclude it.

Speed: in every ``nn.Sequential``, a swapped layer followed by an ``nn.ReLU`` takes the ReLU
into its own kernel pass (``SparseLinear(activation="relu")``; the ReLU's slot then holds an
``nn.Identity``): the same results with one pass less over the activation in forward and in
backward. Only plain ``nn.Sequential`` containers are fused (a subclass may have a forward of
its own). One difference: the fused ReLU maps a NaN pre-activation to 0 where ``nn.ReLU`` keeps
the NaN (the gradient there is 0 in both). ``fuse_relu=False`` keeps the ReLU modules.

Values of the new layers (``init``): ``"sparse"`` (default) draws them as the engine does
(a uniform random pattern, Kaiming-uniform scaled by each row's sparse fan-in; layer l seeded by
(seed, l) exactly as ``sparsecore.layers.mlp`` seeds its layer l, so an ``nn.Sequential`` MLP
sparsified with seed s starts from the engine's weights for seed s); ``"dense"`` scales by the
dense fan-in; ``"keep"`` keeps the dense layer's own values at a uniformly random pattern;
``"magnitude"`` keeps its largest-|w| entries (pruning a trained model). Biases are copied.
"""

from __future__ import annotations

import fnmatch

import numpy as np
from torch import nn

from sparsecore.layers import INIT_TAG, sparse_init
from sparsecore.rigl.distributions import layer_densities
from sparsecore.torch.linear import SparseLinear, _csr_from_flat

INITS = ("sparse", "dense", "keep", "magnitude")
DISTRIBUTIONS = ("erk", "uniform")


def _matcher(spec, what: str):
    """A predicate (name, module) -> bool from a name, glob, list of them, or callable."""
    if spec is None:
        return None
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = [spec]
    try:
        pats = list(spec)
    except TypeError:
        raise TypeError(
            f"{what} must be a name, a glob, a list of them or a callable, got {spec!r}"
        ) from None
    for p in pats:
        if not isinstance(p, str):
            raise TypeError(f"{what} entries must be strings, got {p!r}")
    return lambda name, module: any(name == p or fnmatch.fnmatchcase(name, p) for p in pats)


def _linear_layers(model: nn.Module):
    """[(qualified name, nn.Linear)] in module order, refusing the packed MHA weights."""
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            continue
        if isinstance(mod, nn.Linear):
            found.append((name, mod))
    return found


def _tied(model: nn.Module) -> dict:
    """{id(parameter): [names]} of parameters reachable under more than one name."""
    names: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def sparsify(
    model: nn.Module,
    sparsity: float,
    distribution: str = "erk",
    *,
    include=None,
    exclude=None,
    init: str = "sparse",
    seed: int = 0,
    fuse_relu: bool = True,
) -> nn.Module:
    """Replace the chosen ``nn.Linear`` layers of ``model`` by SparseLinear, in place; returns
    the model. See the module docstring for the choice, the densities and the refusals."""
    if not (isinstance(sparsity, (int, float)) and 0.0 < sparsity < 1.0):
        raise ValueError(f"sparsity must be a number in (0, 1), got {sparsity!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    inc, exc = _matcher(include, "include"), _matcher(exclude, "exclude")

    def chosen(name, mod):
        return (inc is None or inc(name, mod)) and not (exc is not None and exc(name, mod))

    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention) and chosen(name, mod):
            raise ValueError(
                f"{name or 'the model'} is an nn.MultiheadAttention: its q, k and v weights are "
                "packed into one in_proj_weight parameter, which sparsify cannot make sparse. "
                "Write the attention with separate q/k/v/out nn.Linear projections (and "
                "torch.nn.functional.scaled_dot_product_attention), or keep it dense with "
                f"exclude={name!r}"
            )
    layers = _linear_layers(model)
    if not layers:
        raise ValueError("the model has no nn.Linear layers to sparsify")
    # an nn.MultiheadAttention left dense reads its out_proj.weight itself: that stays dense
    mha = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    swap = [chosen(name, mod) and not any(name.startswith(p) for p in mha) for name, mod in layers]
    if not any(swap):
        raise ValueError(
            f"include/exclude leave none of the model's {len(layers)} nn.Linear layers to sparsify"
        )
    tied = _tied(model)
    for (name, mod), s in zip(layers, swap, strict=True):
        if s and id(mod.weight) in tied:
            others = [n for n in tied[id(mod.weight)] if n != f"{name}.weight"]
            raise ValueError(
                f"{name}.weight is tied to {', '.join(others)} (one shared Parameter): a sparse "
                f"layer cannot share a dense weight. Untie it (give {name} its own weight) or "
                f"keep it dense with exclude={name!r}"
            )
    for (name, mod), s in zip(layers, swap, strict=True):
        if s and isinstance(mod.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{name} is an nn.LazyLinear whose shape is not known yet: run one forward "
                "pass before sparsify (or exclude it)"
            )
    shapes = [(mod.out_features, mod.in_features) for _, mod in layers]
    fixed = {l: 1.0 for l, s in enumerate(swap) if not s}
    densities = _densities(sparsity, shapes, distribution, fixed)
    swapped = set()
    for l, ((name, mod), s) in enumerate(zip(layers, swap, strict=True)):
        if not s:
            continue
        new = _build(mod, densities[l], init, [seed, INIT_TAG, l])
        _replace(model, name, new)
        swapped.add(id(new))
    if fuse_relu:
        _fuse_relus(model, swapped)
    return model


def _fuse_relus(model: nn.Module, swapped: set):
    """In every nn.Sequential, a swapped layer followed by an nn.ReLU computes the ReLU in its
    own kernel pass; the ReLU's place holds an nn.Identity (same results, one pass less over
    the activation each way)."""
    for seq in model.modules():
        if type(seq) is not nn.Sequential:  # (a subclass may have a forward of its own)
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:], strict=False):
            first, second = seq._modules[a], seq._modules[b]
            if id(first) in swapped and first.activation is None and type(second) is nn.ReLU:
                first.activation = "relu"
                seq._modules[b] = nn.Identity()


def _densities(sparsity, shapes, distribution, fixed):
    if distribution == "erk":
        out = layer_densities(sparsity, shapes, "erk", fixed)
        empty = [
            l for l, d in enumerate(out) if l not in fixed and d * shapes[l][0] * shapes[l][1] < 0.5
        ]
        if empty:
            raise ValueError(
                f"sparsity {sparsity} with the layers kept dense leaves no weights for the sparse "
                f"layer(s) at positions {empty} (ERK gives them density 0): lower the sparsity or "
                "keep fewer layers dense"
            )
        return out
    # uniform: one density for the swapped layers, the kept-dense ones counted in the budget
    sizes = [m * n for m, n in shapes]
    free = [l for l in range(len(shapes)) if l not in fixed]
    budget = (1.0 - sparsity) * sum(sizes) - sum(sizes[l] for l in fixed)
    d = budget / sum(sizes[l] for l in free)
    if d <= 0:
        raise ValueError(
            f"sparsity {sparsity} leaves {(1 - sparsity) * sum(sizes):.0f} weights, no more than "
            f"the {sum(sizes[l] for l in fixed)} of the layers kept dense: nothing is left for "
            "the sparse ones (lower the sparsity or keep fewer layers dense)"
        )
    return [1.0 if l in fixed else min(1.0, d) for l in range(len(shapes))]


def _build(mod: nn.Linear, density: float, init: str, seed) -> SparseLinear:
    m, n = mod.out_features, mod.in_features
    device = mod.weight.device
    bias = None if mod.bias is None else mod.bias.detach().float().cpu()
    if init in ("sparse", "dense"):
        W = sparse_init(n, m, density, seed, fan_in=init)
    else:
        w = mod.weight.detach().float().cpu().numpy().reshape(-1)
        k = int(round(density * m * n))
        if init == "magnitude":
            flat = np.sort(np.argsort(-np.abs(w), kind="stable")[:k])
        else:
            flat = np.sort(np.random.default_rng(seed).choice(m * n, size=k, replace=False))
        W = _csr_from_flat(flat, w[flat], (m, n))
    new = SparseLinear.from_csr(W, bias, device=device)
    new.values.requires_grad_(mod.weight.requires_grad)  # (a frozen layer stays frozen)
    if new.bias is not None:
        new.bias.requires_grad_(mod.bias.requires_grad)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module):
    if not name:
        raise ValueError("the model itself is an nn.Linear: use SparseLinear.from_dense")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def summary(model: nn.Module) -> list[dict]:
    """Each sparse layer's name, shape, nnz and density, and the linear layers' totals."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            rows.append(dict(layer=name, shape=(mod.out_features, mod.in_features),
                             nnz=mod.nnz, density=mod.density))  # fmt: skip
        elif isinstance(mod, nn.Linear):
            rows.append(dict(layer=name, shape=tuple(mod.weight.shape),
                             nnz=mod.weight.numel(), density=1.0))  # fmt: skip
    return rows
