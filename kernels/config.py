"""Tunables of the kernels, in one place.

Launchers read these at call time (not at import), so tests can shrink tiles to force the
multi-tile paths on small inputs, e.g.
``monkeypatch.setattr(kernels.config, "TOPK_TILE_BYTES", 64)``.
"""

# Numba compile flags shared by every CPU kernel. fastmath lets LLVM reassociate the float32
# sums (vectorised reductions, fused multiply-adds): results differ from a sequential sum by
# rounding only, and are checked against float64 references with a tolerance.
FASTMATH = True
CACHE = True

# Row blocks handed to the threads, per thread. Blocks hold about equal numbers of nonzeros
# (not of rows), so rows of very different lengths after topology updates stay balanced.
BLOCKS_PER_THREAD = 4

# Bytes of the gradient tile that topk_grow computes at a time (dY[rows] @ X.T, float32).
# Peak extra memory of topk_grow is this tile plus the candidate buffer (see kernels/cpu/grow.py).
TOPK_TILE_BYTES = 2 << 20

# ... but never fewer rows than this in a tile (sgemm with few rows runs far below its peak:
# at m = n = 16384, 32-row tiles made the grow 45% slower than 128-row ones), as long as the
# tile stays within 1/16 of the dense gradient. Applies when the tile size is not given per call.
TOPK_MIN_TILE_ROWS = 128

# Candidate buffer of topk_grow, in multiples of k: when full it is cut back to the best k and
# the acceptance threshold rises. Larger means fewer cuts and more memory; must be > 1. It
# exceeds grow.ESTIMATE_MARGIN (1.5) so that the usual pass, from a sampled threshold, needs no
# cut before the last one. Peak extra memory at m = n = 4096, k = 1%: tile 2 MiB + buffer
# 2.6 MiB + the last cut's partition copy (about 1 MiB) = 9% of the dense gradient.
TOPK_BUFFER_FACTOR = 2.0

# spmm (and spmm_t, through it) at a batch of at most this many columns runs the small-batch
# kernel (kernels/cpu/spmm.py: the output row in registers); the batch-vector loop above it.
# At most 4 (the small kernel's registers). Measured on AMD EPYC (2 cores), m = k = 4096:
# 1.1-1.4x the batch-vector loop at B = 1..4, 0.9x at B = 8.
SMALL_BATCH_MAX = 4

# Width of the batch panels of kernels/cpu/panels.py (8, 16 or 32 floats), the kernel of
# batch-major operands. None: one cache line of floats (kernels/machine.py reads its size).
PANEL_WIDTH = None

# A sparse layer's backward runs as one pass over its nonzeros (kernels/cpu/backward.py: dX
# and dW together, each dY row loaded once for both) when nnz <= this, else as spmm_t + sddmm.
# The fused pass writes dW at scattered positions, which pays while dW stays in cache. None:
# the machine's L2 (over all cores) / 6 bytes (kernels/cpu/backward.FUSED_L2_BYTES_PER_NNZ: dW's
# 4 bytes and room for the dY rows), read by kernels/machine.py; 0: never fused.
FUSED_BACKWARD_MAX_NNZ = None

# Dense layers with at most this many outputs (a classifier) run on kernels/cpu/skinny.py instead
# of BLAS: with one tiny dimension OpenBLAS's packing dominates (10 × 4096 layer at batch 128:
# backward with the ReLU gate 0.42 ms against 0.85 ms).
SKINNY_MAX_ROWS = 32

# ------------------------------------------------------------------ CUDA (kernels/cuda)
# Threads per block of the products (spmm, spmm_t): 128 across the batch × 2 rows at B >= 128.
CUDA_THREADS_PER_BLOCK = 256

# spmm/spmm_t use the float4 kernel (4 batch columns per thread) when the batch is a multiple
# of 4 and the operands are 16-byte aligned; False forces the scalar kernel (tests cover both).
CUDA_SPMM_FLOAT4 = True

# sddmm runs a block per row with up to this many warps (one per nonzero of a mean row), at most
# CUDA_SDDMM_MAX_BLOCKS blocks striding over the rows (the grid's x limit is 2**31 - 1; 65535
# blocks are hundreds of waves on any current GPU).
CUDA_SDDMM_MAX_WARPS = 8
CUDA_SDDMM_MAX_BLOCKS = 65535

# Gradient tile of the GPU topk_grow (one cuBLAS sgemm per tile). Without a tile_bytes argument
# the launcher takes CUDA_TOPK_TILE_FREE_FRACTION of the device's total memory, within
# [CUDA_TOPK_TILE_BYTES, CUDA_TOPK_TILE_MAX_BYTES], when that much is free (else the floor):
# fewer, larger tiles mean fewer sgemm calls and host syncs, and a tile fixed by the GPU model
# keeps the scores' bits the same from run to run and rank to rank. CUDA_TOPK_TILE_BYTES
# (16 MiB: 256 full rows at n = 16384, 1.6% of that layer's 1 GiB dense gradient) is also the
# tile the memory plan counts, and the one a training run on the device passes when it has a
# memory budget (sparsecore/train.py), so that the plan holds.
CUDA_TOPK_TILE_BYTES = 16 << 20
CUDA_TOPK_TILE_FREE_FRACTION = 0.25
CUDA_TOPK_TILE_MAX_BYTES = 1 << 30

# The GPU topk_grow streams this many tiles at most between two host syncs: the candidate
# counter stays on the device, and a tile is recomputed only when the buffer overflowed in it.
CUDA_TOPK_MAX_TILES_PER_SYNC = 32

# Candidate buffer of the GPU topk_grow, in multiples of k (> 1). A full buffer is cut back to
# the best k by an exact radix select; cuts are cheap on the GPU, so the buffer is kept small.
# Peak scratch: tile + (factor + 1)·k·(4 + flat index bytes) during a cut.
CUDA_TOPK_BUFFER_FACTOR = 1.5

# Threads per block and the most blocks of the grid-stride grow kernels (histogram, select).
CUDA_GROW_THREADS = 256
CUDA_GROW_MAX_BLOCKS = 4096

# Threads per block and the most blocks of the elementwise kernels (ReLU, fused optimizer
# updates: kernels/cuda/elementwise.cu), grid-stride loops over the flattened arrays.
CUDA_ELEMENTWISE_THREADS = 256
CUDA_ELEMENTWISE_MAX_BLOCKS = 4096

# random_positions (kernels/formats.py) draws with NumPy's choice up to this many entries of
# m·n (or at density <= 1/50), and with the rejection sampler above. Part of the stream that
# fixes a seeded run's initial patterns: changing it changes those patterns.
RANDOM_POSITIONS_CHOICE_MAX = 1 << 24

# ---------------------------------------------------------------- several MPI ranks
# (read by sparsecore/mpi and by the memory plan; kept here so that every tunable has one home)

# A sharded layer's drop and exact grow first ask each rank for ceil(MPI_OFFER_SHARE·k/N) +
# MPI_OFFER_SLACK candidates (sparsecore/mpi/select.py, RowShard.offered): its share of the k
# if they spread evenly, with room. A saturated rank (its whole offer was taken while it had
# more) offers MPI_OFFER_GROWTH times more and the selection is repeated.
MPI_OFFER_SHARE = 1.5
MPI_OFFER_SLACK = 64
MPI_OFFER_GROWTH = 4

# The data-parallel sampled grow scores its candidates in chunks of about this many floats of
# dY and X rows (sparsecore/mpi/data_parallel.py).
MPI_SCORE_CHUNK_FLOATS = 1 << 22

# The watchdog of hung ranks looks this many times per rank_timeout, at least every
# MPI_WATCHDOG_MAX_TICK_S and at most every MPI_WATCHDOG_MIN_TICK_S seconds.
MPI_WATCHDOG_TICKS = 10
MPI_WATCHDOG_MIN_TICK_S = 0.1
MPI_WATCHDOG_MAX_TICK_S = 5.0

# Seconds a rank waits between writing why it stops and calling MPI_Abort: the ranks' stderr
# reaches the terminal through mpiexec's forwarding, and an immediate abort could kill the
# forwarder before it relayed the message (seen: a hung-rank job that ended with exit status 3
# and an empty stderr, about one run in three).
MPI_ABORT_GRACE_S = 1.0
