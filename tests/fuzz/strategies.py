"""Hypothesis strategies over the fuzzers' recipes.

The generators of gen_kernels.py and gen_files.py draw every choice (the operation, the form
of W, shapes, dtypes including unsigned index dtypes, which arrays to corrupt and how) from an
``rng`` through three calls: ``integers(lo, hi)``, ``choice(options)`` and ``random()``.
``DrawRng`` answers those calls with Hypothesis draws (and bulk contents, ``bytes`` and
``standard_normal``, from a NumPy generator whose seed is drawn), so the same generators become
strategies: Hypothesis explores the choices, and shrinks a failing recipe towards small
shapes, few corruptions and the first options of each list, and replays it from its database
or its derandomized seed.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from tests.fuzz import engine as E


class DrawRng:
    """The subset of numpy.random.Generator the recipe generators use, drawn by Hypothesis."""

    def __init__(self, draw):
        self.draw = draw
        self._bulk = None

    def _contents(self):
        if self._bulk is None:
            self._bulk = np.random.default_rng(self.draw(st.integers(0, 2**32 - 1)))
        return self._bulk

    def bytes(self, n):
        return self._contents().bytes(int(n))

    def standard_normal(self, size=None):
        return self._contents().standard_normal(size)

    def integers(self, low, high=None, size=None):
        if high is None:
            low, high = 0, low
        if size is not None:
            return [self.integers(low, high) for _ in range(int(size))]
        return self.draw(st.integers(int(low), int(high) - 1))

    def choice(self, options, size=None, replace=True):
        opts = list(range(options)) if isinstance(options, int) else list(options)
        if size is not None:
            if replace:
                return [self.draw(st.sampled_from(opts)) for _ in range(int(size))]
            return self.draw(st.permutations(opts))[: int(size)]
        return self.draw(st.sampled_from(opts))

    def random(self):
        return self.draw(st.floats(0.0, 1.0, exclude_max=True))


@st.composite
def recipes(draw, category: str):
    """A recipe of the category's generator (kernels, checkpoint, dataset), drawn by Hypothesis."""
    gen = E.GEN[category][0]
    return gen(DrawRng(draw))
