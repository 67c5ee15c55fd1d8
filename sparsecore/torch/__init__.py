"""sparsecore inside PyTorch models: truly sparse layers and RigL for any torch model.

- ``SparseLinear``: a drop-in ``nn.Linear`` whose weight is CSR (nnz trainable values), run by
  the engine's kernels (sparsecore/torch/linear.py);
- ``sparsify(model, sparsity)``: swap a model's ``nn.Linear`` layers for SparseLinear, with ERK
  or uniform per-layer densities (sparsecore/torch/sparsify.py);
- ``RigL(model, optimizer, ...)``: the topology scheduler for any torch optimizer (``if
  rigl.step(): optimizer.step()``), dropping and growing with the engine's own updaters and the
  fused top-k grow (sparsecore/torch/rigl.py);
- the ops ``torch.ops.sparsecore.linear`` / ``linear_dx`` / ``linear_dw``, registered with
  ``torch.library`` (fake implementations for ``torch.compile``; sparsecore/torch/_ops.py).

Needs the optional extra: ``pip install "sparsecore-rigl[torch]"``. ``import sparsecore`` never
imports torch; this package does.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        'sparsecore.torch needs PyTorch: pip install "sparsecore-rigl[torch]" (or any torch >= 2.4)'
    ) from e

from sparsecore.torch import _ops, threads
from sparsecore.torch._ops import COUNTS as _COUNTS
from sparsecore.torch.linear import SparseLinear, SparseModule
from sparsecore.torch.rigl import RigL
from sparsecore.torch.sparsify import sparsify, summary

# torch imported before sparsecore leaves torch's OpenMP threads spinning at libgomp's default
# (measured 3.5-4x slower sparse steps on 2 cores): say so once, change nothing
threads.warn_if_spinning(stacklevel=2)

__all__ = [
    "RigL", "SparseLinear", "SparseModule", "layout_copies", "sparsify", "summary", "threads",
]  # fmt: skip


def layout_copies() -> int:
    """How many layout copies (transposes to or from feature-major) the layers have made so
    far in this process: a chain of sparse layers joined by elementwise ops makes none."""
    return _COUNTS["layout_copies"]


ops = _ops
