"""A fuzzing layer for sparsecore's public boundary.

Four categories of cases, all generated in the parent as picklable descriptions and executed
in long-lived spawn-started worker processes (``pool.py``) with a per-case timeout, so that a
segfault or a hang is one failed case and never kills the caller:

- ``kernels``: the public kernel API (spmm, spmm_t, sddmm, topk_grow, magnitude_drop, merge,
  remap) and the CSR constructors, on every accepted form of W with corrupted arrays, odd
  dtypes and shapes, mutated CSRs, bad operands and ``out=``; results checked against float64
  references (``oracle.py``);
- ``checkpoint``: a valid checkpoint of a tiny run, with members transformed, removed, lied
  about, its meta JSON edited and the file truncated/garbled, loaded by
  ``Trainer.load_checkpoint`` and ``sparsecore train --resume``;
- ``dataset``: .npz / folder / broken datasets through ``sparsecore.data.load`` and
  ``sparsecore train --dataset``;
- ``cli``: nonsense values for every numeric option of train / plan / bench.

The property (``judge.py``): a correct result, or a clear error (ValueError, TypeError,
OverflowError, OSError with a message, not from inside Numba, not a raw KeyError/IndexError/
AttributeError/BadZipFile/JSONDecodeError/struct.error/UnicodeDecodeError/EOFError/MemoryError);
for the CLI exit 0, or 2 with a "sparsecore ...: error: ..." last stderr line and no traceback.

Two drivers of the same generators: seeded NumPy streams (the bulk of the CI campaign and the
hunt), and Hypothesis (``strategies.py``: the generators' choices drawn by Hypothesis, so a
failing recipe is shrunk to a minimal one).

CI: ``pytest tests/test_fuzz.py`` (fixed seeds and derandomized Hypothesis, the corpus in
tests/fuzz/corpus/ first; about a minute, within the 3-minute budget of the fuzz stage).
Hunt: ``python -m tests.fuzz --minutes N [--category ...] [--seed S]``.
"""
