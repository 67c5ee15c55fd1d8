// Fused top-k gradient grow on the GPU: the pieces that grow.py drives tile by tile.
//
// Maths:    G = dY·Xᵀ (m × n) is computed one tile at a time by cuBLAS (cupy.matmul); a tile is
//           rows [r0, r0 + tr) × columns [c0, c0 + tc) of G, stored C-contiguous (tr × tc), and
//           element e of it has the flat index  flat0 + (e / tc)·n + e % tc,  flat0 = r0·n + c0.
//           A candidate's score is s = |G|, handled only as its key: the bits of G with the
//           sign cleared, read as an int (__float_as_int(g) & 0x7fffffff). For every float that
//           is not NaN, keys are ordered like |G| (subnormals included, +0 and -0 equal), and a
//           NaN's key is above that of +inf. No float instruction touches a score, so the
//           result does not depend on the flush-to-zero mode: CuPy compiles every kernel with
//           -ftz=true, under which fabsf and float compares would turn subnormal scores into
//           +0 and tie them with true zeros (the CPU and the reference keep them apart).
//           The launcher keeps a candidate buffer (bs score keys, bf flat indices) of cap
//           entries and a running threshold thr (a key, -1 below every score); see grow.py
//           for the algorithm and its exactness.
//
// sparsecore_grow_mask_{i32,i64}: present connections of the tile's rows become NaN
//   (a NaN's key is above SC_INF_KEY, and keys above it are never counted).
//   indptr (m+1,), indices (nnz,) IDX: W's canonical pattern                            [in]
//   keep (nnz,) uint8: entries with keep = 0 count as absent (read iff has_keep)        [in]
//   g (tr·tc,) float32: the tile                                                  [in/out]
//   r0, tr, c0, tc int64: the tile's position and shape
//   Mapping: one block per tile row (grid.x = tr); threads stride over the row's entries.
//   Cost: O(stored entries of the tile's rows).
//
// "Union" of the next two kernels: elements e in [0, n_tile) are tile elements (key of
//   g[e], counted only if thr < key <= SC_INF_KEY: above the stream threshold, not NaN) and
//   e in [n_tile, n_tile + n_buf) are buffer entries e - n_tile (key bs[.], flat bf[.],
//   always counted).
//   One launch covers both, so a cut selects over buffer ∪ new tile candidates at once.
//   Mapping: 1-D grid-stride loop (the launcher caps the grid); blockDim a multiple of 32.
//   Loop bounds are uniform per warp, so the warp intrinsics always see all 32 lanes.
//
// sparsecore_grow_hist_{flat32,flat64}: a 65536-bin histogram of a 16-bit digit.
//   Counted elements: in the union, with (key & smask) == sval and (flat & fmask) == fval.
//   Digit: (key >> shift) & 0xFFFF, or (flat >> shift) & 0xFFFF when key_is_flat.
//   bins (65536,) uint64, zeroed by the launcher                                      [out]
//   Used for an exact radix select: the k-th largest score (two 16-bit digits) and, among
//   the entries tied with it, the T-th smallest flat index (up to four digits).
//   Warp-aggregated atomics (__match_any_sync: lanes with the same digit add once), so
//   heavy ties (an all-zero gradient) do not serialise on one counter.
//   Cost: O(n_tile + n_buf) reads, at most one atomic per distinct digit per warp step.
//
// sparsecore_grow_select_{flat32,flat64}: append the chosen elements of the union to
//   (out_s, out_f) at slots taken from *counter (warp-aggregated atomicAdd), writing only
//   slots < out_cap; *counter ends at the number chosen (it may exceed out_cap: the launcher
//   then knows the buffer overflowed and discards what was written). Chosen: every counted
//   element if !use_tie (the stream: key > thr), else those with key > v or (key == v and
//   flat <= fstar) (a cut: exactly the best k, ties to the lower flat index). Order of the
//   output is unspecified; the launcher sorts the final k by flat index.
//   *counter is read as the first free slot: the launcher keeps it on the device across the
//   tiles of a stream (the buffer is out_s[0, out_cap)), and resets it only at a cut.
//   out_s (out_cap,) int32 keys, out_f (out_cap,) FLAT, counter (1,) uint64        [in/out]
//   Cost: O(n_tile + n_buf) reads, one atomic per warp step with a chosen lane.
//
// FLAT = int (flat32, when m·n < 2^31) or long long (flat64).

#define SC_NAN __int_as_float(0x7fffffff)
#define SC_INF_KEY 0x7f800000  // the key of +inf: every larger key is a NaN

// The key of a score: |g| as ordered bits, computed with integer instructions only.
__device__ __forceinline__ int score_key(float g) { return __float_as_int(g) & 0x7fffffff; }

template <typename IDX>
__device__ __forceinline__ void grow_mask_body(const IDX* __restrict__ indptr,
                                               const IDX* __restrict__ indices,
                                               const unsigned char* __restrict__ keep,
                                               int has_keep, float* __restrict__ g, long long r0,
                                               long long tr, long long c0, long long tc)
{
    const long long r = blockIdx.x;
    if (r >= tr) return;
    const long long i = r0 + r;
    const long long end = (long long)indptr[i + 1];
    for (long long p = (long long)indptr[i] + threadIdx.x; p < end; p += blockDim.x) {
        const long long col = (long long)indices[p] - c0;
        if (col >= 0 && col < tc && (!has_keep || keep[p])) g[r * tc + col] = SC_NAN;
    }
}

extern "C" __global__ void sparsecore_grow_mask_i32(const int* indptr, const int* indices,
                                                    const unsigned char* keep, int has_keep,
                                                    float* g, long long r0, long long tr,
                                                    long long c0, long long tc)
{
    grow_mask_body<int>(indptr, indices, keep, has_keep, g, r0, tr, c0, tc);
}

extern "C" __global__ void sparsecore_grow_mask_i64(const long long* indptr,
                                                    const long long* indices,
                                                    const unsigned char* keep, int has_keep,
                                                    float* g, long long r0, long long tr,
                                                    long long c0, long long tc)
{
    grow_mask_body<long long>(indptr, indices, keep, has_keep, g, r0, tr, c0, tc);
}

// Element e of the union: its score key, flat index, and whether it is counted at all.
template <typename FLAT>
__device__ __forceinline__ bool union_load(long long e, const float* __restrict__ g,
                                           long long n_tile, long long tc, long long n_cols,
                                           long long flat0, const int* __restrict__ bs,
                                           const FLAT* __restrict__ bf, int thr, int* s,
                                           unsigned long long* flat)
{
    if (e < n_tile) {
        *s = score_key(g[e]);
        *flat = (unsigned long long)(flat0 + (e / tc) * n_cols + e % tc);
        return *s > thr && *s <= SC_INF_KEY;  // false for NaN (present connections)
    }
    *s = bs[e - n_tile];
    *flat = (unsigned long long)bf[e - n_tile];
    return true;
}

template <typename FLAT>
__device__ __forceinline__ void grow_hist_body(
    const float* __restrict__ g, long long n_tile, long long tc, long long n_cols,
    long long flat0, const int* __restrict__ bs, const FLAT* __restrict__ bf, long long n_buf,
    int thr, unsigned int smask, unsigned int sval, unsigned long long fmask,
    unsigned long long fval, int key_is_flat, int shift, unsigned long long* bins)
{
    const long long total = n_tile + n_buf;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long base = (long long)blockIdx.x * blockDim.x; base < total; base += stride) {
        const long long e = base + threadIdx.x;
        unsigned int digit = 0xffffffffu;  // "not counted": never a 16-bit digit
        if (e < total) {
            int s;
            unsigned long long flat;
            if (union_load<FLAT>(e, g, n_tile, tc, n_cols, flat0, bs, bf, thr, &s, &flat)) {
                const unsigned int bits = (unsigned int)s;
                if ((bits & smask) == sval && (flat & fmask) == fval)
                    digit = key_is_flat ? (unsigned int)((flat >> shift) & 0xffffull)
                                        : ((bits >> shift) & 0xffffu);
            }
        }
        const unsigned int peers = __match_any_sync(0xffffffffu, digit);
        const int lane = threadIdx.x & 31;
        if (digit != 0xffffffffu && lane == __ffs(peers) - 1)
            atomicAdd(&bins[digit], (unsigned long long)__popc(peers));
    }
}

template <typename FLAT>
__device__ __forceinline__ void grow_select_body(
    const float* __restrict__ g, long long n_tile, long long tc, long long n_cols,
    long long flat0, const int* __restrict__ bs, const FLAT* __restrict__ bf, long long n_buf,
    int thr, int use_tie, int v, unsigned long long fstar, int* __restrict__ out_s,
    FLAT* __restrict__ out_f, unsigned long long* counter, long long out_cap)
{
    const long long total = n_tile + n_buf;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int lane = threadIdx.x & 31;
    for (long long base = (long long)blockIdx.x * blockDim.x; base < total; base += stride) {
        const long long e = base + threadIdx.x;
        int s = 0;
        unsigned long long flat = 0;
        bool chosen = false;
        if (e < total) {
            chosen = union_load<FLAT>(e, g, n_tile, tc, n_cols, flat0, bs, bf, thr, &s, &flat);
            if (chosen && use_tie) chosen = s > v || (s == v && flat <= fstar);
        }
        const unsigned int ballot = __ballot_sync(0xffffffffu, chosen);
        if (ballot == 0u) continue;  // uniform over the warp
        unsigned long long slot0 = 0;
        if (lane == __ffs(ballot) - 1) slot0 = atomicAdd(counter, (unsigned long long)__popc(ballot));
        slot0 = __shfl_sync(0xffffffffu, slot0, __ffs(ballot) - 1);
        if (chosen) {
            const unsigned long long slot = slot0 + __popc(ballot & ((1u << lane) - 1u));
            if (slot < (unsigned long long)out_cap) {
                out_s[slot] = s;
                out_f[slot] = (FLAT)flat;
            }
        }
    }
}

#define SC_GROW_FLAT(SUFFIX, FLAT)                                                            \
    extern "C" __global__ void sparsecore_grow_hist_##SUFFIX(                                 \
        const float* g, long long n_tile, long long tc, long long n_cols, long long flat0,    \
        const int* bs, const FLAT* bf, long long n_buf, int thr, unsigned int smask,          \
        unsigned int sval, unsigned long long fmask, unsigned long long fval, int key_is_flat, \
        int shift, unsigned long long* bins)                                                  \
    {                                                                                         \
        grow_hist_body<FLAT>(g, n_tile, tc, n_cols, flat0, bs, bf, n_buf, thr, smask, sval,   \
                             fmask, fval, key_is_flat, shift, bins);                          \
    }                                                                                         \
    extern "C" __global__ void sparsecore_grow_select_##SUFFIX(                               \
        const float* g, long long n_tile, long long tc, long long n_cols, long long flat0,    \
        const int* bs, const FLAT* bf, long long n_buf, int thr, int use_tie, int v,          \
        unsigned long long fstar, int* out_s, FLAT* out_f, unsigned long long* counter,       \
        long long out_cap)                                                                    \
    {                                                                                         \
        grow_select_body<FLAT>(g, n_tile, tc, n_cols, flat0, bs, bf, n_buf, thr, use_tie, v,  \
                               fstar, out_s, out_f, counter, out_cap);                        \
    }

SC_GROW_FLAT(flat32, int)
SC_GROW_FLAT(flat64, long long)
