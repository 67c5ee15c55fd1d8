"""Per-layer densities from one global sparsity S.

uniform: every sparse layer gets density 1 - S.

erk (Erdős–Rényi; for fully connected layers ERK and ER coincide): layer l (m_l outputs, n_l
inputs) gets density eps·(m_l + n_l)/(m_l·n_l). The scale is chosen so that the nonzeros add up to
the budget (1 - S)·Σ_l m_l·n_l:

    Σ_{l sparse} eps·(m_l + n_l) + Σ_{l dense} m_l·n_l = (1 - S)·Σ_l m_l·n_l
    =>  eps = ((1 - S)·Σ_l m_l·n_l - Σ_{l dense} m_l·n_l) / Σ_{l sparse} (m_l + n_l).

A layer whose density comes out above 1 is made dense, leaves the sparse set, and eps is solved
again; repeat until no density exceeds 1. Small layers (the classifier) end up denser, wide ones
sparser. Layers the user fixes (e.g. keeps dense) are counted in the budget but not solved for.
"""

from __future__ import annotations

import numpy as np


def _check(sparsity, shapes):
    if not (isinstance(sparsity, (int, float, np.floating)) and 0.0 < sparsity < 1.0):
        raise ValueError(f"sparsity must be a number in (0, 1), got {sparsity!r}")
    if not shapes or any(len(s) != 2 or s[0] < 1 or s[1] < 1 for s in shapes):
        raise ValueError(f"shapes must be (m, n) pairs of positive sizes, got {shapes!r}")


def uniform_densities(sparsity: float, shapes, fixed: dict[int, float] | None = None):
    _check(sparsity, shapes)
    fixed = fixed or {}
    return [float(fixed.get(l, 1.0 - sparsity)) for l in range(len(shapes))]


def erk_densities(sparsity: float, shapes, fixed: dict[int, float] | None = None):
    """Densities per layer (see the module docstring); fixed maps layer index -> density."""
    _check(sparsity, shapes)
    fixed = dict(fixed or {})
    sizes = [m * n for m, n in shapes]
    budget = (1.0 - sparsity) * sum(sizes)
    dense_set = {l for l, d in fixed.items() if d >= 1.0}
    while True:
        free = [l for l in range(len(shapes)) if l not in fixed and l not in dense_set]
        taken = sum(
            sizes[l] * (1.0 if l in dense_set else fixed[l]) for l in (set(fixed) | dense_set)
        )
        if not free:
            break
        denom = sum(shapes[l][0] + shapes[l][1] for l in free)
        eps = (budget - taken) / denom
        over = [l for l in free if eps * (shapes[l][0] + shapes[l][1]) / sizes[l] > 1.0]
        if not over:
            break
        dense_set.update(over)
    if budget - taken < -1e-9 * budget:
        raise ValueError(
            f"sparsity {sparsity} leaves {budget:.0f} nonzeros, fewer than the fixed/dense layers "
            f"need ({taken:.0f})"
        )
    out = []
    for l, (m, n) in enumerate(shapes):
        if l in fixed:
            out.append(float(fixed[l]))
        elif l in dense_set:
            out.append(1.0)
        else:
            out.append(float(min(1.0, eps * (m + n) / (m * n))))
    return out


def layer_densities(sparsity: float, shapes, distribution: str = "erk", fixed=None):
    if distribution == "uniform":
        return uniform_densities(sparsity, shapes, fixed)
    if distribution == "erk":
        return erk_densities(sparsity, shapes, fixed)
    raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}")
