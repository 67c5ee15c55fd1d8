"""Dense float64 oracles for every kernel. Slow on purpose; no kernel code here.

Each takes the sparse matrix as (indptr, indices, data, shape) NumPy arrays and dense operands
feature-major, works in float64 on the dense m × n matrix, and returns float64 results (indices
as int64). Small shapes only.
"""

import numpy as np


def dense(indptr, indices, data, shape):
    m, n = shape
    W = np.zeros((m, n), dtype=np.float64)
    rows = np.repeat(np.arange(m), np.diff(indptr))
    np.add.at(W, (rows, np.asarray(indices, dtype=np.int64)), np.asarray(data, np.float64))
    return W


def pattern(indptr, indices, shape, keep=None):
    """Boolean m × n mask of the stored entries (those with keep=True when keep is given)."""
    m, n = shape
    P = np.zeros((m, n), dtype=bool)
    rows = np.repeat(np.arange(m), np.diff(indptr))
    sel = slice(None) if keep is None else np.asarray(keep, bool)
    P[rows[sel], np.asarray(indices, dtype=np.int64)[sel]] = True
    return P


def spmm(indptr, indices, data, shape, X):
    """Y = W·X, X (n, B)."""
    return dense(indptr, indices, data, shape) @ np.asarray(X, np.float64)


def spmm_t(indptr, indices, data, shape, dY):
    """dX = Wᵀ·dY, dY (m, B)."""
    return dense(indptr, indices, data, shape).T @ np.asarray(dY, np.float64)


def sddmm(indptr, indices, shape, dY, X):
    """(dY·Xᵀ)[i, j] at the stored entries, in CSR order."""
    G = np.asarray(dY, np.float64) @ np.asarray(X, np.float64).T
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
    return G[rows, np.asarray(indices, dtype=np.int64)]


def grow_scores(indptr, indices, shape, dY, X, keep=None):
    """|dY·Xᵀ| with present entries (keep=True) set to -inf: the full score matrix."""
    S = np.abs(np.asarray(dY, np.float64) @ np.asarray(X, np.float64).T)
    S[pattern(indptr, indices, shape, keep)] = -np.inf
    return S


def topk_grow(indptr, indices, shape, dY, X, k, keep=None):
    """The k absent (i, j) with the largest |dY·Xᵀ|, ties to the lower flat index.

    Returns (rows, cols, scores), listed in ascending flat order.
    """
    S = grow_scores(indptr, indices, shape, dY, X, keep).ravel()
    order = np.lexsort((np.arange(S.size), -S))[:k]  # by score desc, then flat asc
    flat = np.sort(order)
    n = shape[1]
    return flat // n, flat % n, S[flat]


def magnitude_drop(data, k):
    """Positions of the k smallest |w|, ties to the lower position, ascending."""
    a = np.abs(np.asarray(data, np.float64))
    order = np.lexsort((np.arange(a.size), a))[:k]
    return np.sort(order).astype(np.int64)


def merge(indptr, indices, data, shape, keep, grow_rows, grow_cols):
    """Dense model of a topology update: returns (new dense W, new pattern mask, was_present).

    Kept entries keep their value, grown entries that were present before (dropped and regrown)
    keep their old value, the others are 0.
    """
    W = dense(indptr, indices, data, shape)
    old = pattern(indptr, indices, shape)
    new = pattern(indptr, indices, shape, keep)
    new[np.asarray(grow_rows, np.int64), np.asarray(grow_cols, np.int64)] = True
    W_new = np.where(new & old, W, 0.0)
    return W_new, new
