// dW = (dY·Xᵀ) sampled at W's nonzeros on the GPU: the weight gradient, nnz-sized.
//
// Maths:    out[p] = Σ_b dY[i, b] · X[indices[p], b]     for every p in row i of W
//           bias_grad[i] = Σ_b dY[i, b]                   (iff has_bias: the bias gradient)
// Buffers:  indptr    (m+1,)  IDX      row offsets                                        [in]
//           indices   (nnz,)  IDX      column of each stored entry, in [0, n)            [in]
//           dy        (m, B)  float32  C-contiguous, gradient at the layer's output      [in]
//           x         (n, B)  float32  C-contiguous, the layer's input                   [in]
//           out       (nnz,)  float32  in W's CSR order, every element written once     [out]
//           bias_grad (m,)    float32  written iff has_bias                              [out]
//           m, B      int64            rows of W, batch
// Cost:     2·nnz·B flops; per nonzero one coalesced pass over a dY row (cached in L1/L2:
//           every warp of the block reads the same row) and one X row; nnz stores.
// Mapping:  a grid-stride loop over rows: block b takes rows b, b + gridDim.x, ... (grid.x =
//           min(m, config.CUDA_SDDMM_MAX_BLOCKS): any m of the int64 variant fits the grid);
//           blockDim.x = 32·W threads (W warps, chosen by sddmm.py:plan() from the mean row
//           length). Warp w takes the row's nonzeros
//           p = start + w, start + w + W, ...; its 32 lanes stride over the batch and the dot
//           product is reduced with warp shuffles (float32, reassociated: equal to a
//           sequential sum up to rounding). Warp 0 also sums dY[i, :] for the bias gradient.
//           No atomics: every output element has exactly one writer.
// Requires: indices in range (trusted). Index types: IDX = int (_i32) or long long (_i64).

__device__ __forceinline__ float warp_sum(float s)
{
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s;
}

template <typename IDX>
__device__ __forceinline__ void sddmm_body(const IDX* __restrict__ indptr,
                                           const IDX* __restrict__ indices,
                                           const float* __restrict__ dy,
                                           const float* __restrict__ x, float* __restrict__ out,
                                           float* __restrict__ bias_grad, int has_bias,
                                           long long m, long long B)
{
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    // i is uniform over the block, p within a warp: every lane takes part in the shuffles
    for (long long i = blockIdx.x; i < m; i += gridDim.x) {
        const float* __restrict__ dyi = dy + i * B;
        const long long start = (long long)indptr[i];
        const long long end = (long long)indptr[i + 1];
        for (long long p = start + warp; p < end; p += n_warps) {
            const float* __restrict__ xj = x + (long long)indices[p] * B;
            float s0 = 0.0f, s1 = 0.0f;
            long long b = lane;
            for (; b + 32 < B; b += 64) {
                s0 += dyi[b] * xj[b];
                s1 += dyi[b + 32] * xj[b + 32];
            }
            if (b < B) s0 += dyi[b] * xj[b];
            const float s = warp_sum(s0 + s1);
            if (lane == 0) out[p] = s;
        }
        if (has_bias && warp == 0) {
            float s = 0.0f;
            for (long long b = lane; b < B; b += 32) s += dyi[b];
            s = warp_sum(s);
            if (lane == 0) bias_grad[i] = s;
        }
    }
}

extern "C" __global__ void sparsecore_sddmm_i32(const int* indptr, const int* indices,
                                                const float* dy, const float* x, float* out,
                                                float* bias_grad, int has_bias, long long m,
                                                long long B)
{
    sddmm_body<int>(indptr, indices, dy, x, out, bias_grad, has_bias, m, B);
}

extern "C" __global__ void sparsecore_sddmm_i64(const long long* indptr,
                                                const long long* indices, const float* dy,
                                                const float* x, float* out, float* bias_grad,
                                                int has_bias, long long m, long long B)
{
    sddmm_body<long long>(indptr, indices, dy, x, out, bias_grad, has_bias, m, B);
}
