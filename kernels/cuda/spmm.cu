// Y = W·X on the GPU (also dX = Wᵀ·dY through the transpose structure): CSR times dense.
//
// Maths:    out[i, b] = bias[i] + Σ_{p in row i} val(p) · X[indices[p], b]        (bias optional)
//           then, iff relu, out = max(out, 0) (a following ReLU, fused; NaN becomes 0 as on
//           the CPU), and iff has_gate, out = 0 where !(gate[i, b] > 0) (the backward of a ReLU
//           whose output is gate, fused into dX = Wᵀ·dY)
//           val(p) = data[p], or data[perm[p]] when has_perm (spmm_t: the CSR is the transpose
//           structure (t_indptr, t_indices) of W and perm = t_perm maps it back to W's values,
//           so dX = Wᵀ·dY is a forward product: every output row is owned by one thread, no
//           atomics, and W's values are gathered in place instead of permuted into a copy).
// Buffers:  indptr  (m+1,)  IDX      row offsets                                          [in]
//           indices (nnz,)  IDX      column of each stored entry, in [0, n)              [in]
//           data    (nnz,)  float32  values (in W's CSR order)                           [in]
//           perm    (nnz,)  IDX      value position of each entry (read iff has_perm)    [in]
//           x       (n, B)  float32  C-contiguous, feature-major operand                 [in]
//           bias    (m,)    float32  added to every column of row i (read iff has_bias)  [in]
//           gate    (m, B)  float32  C-contiguous, read iff has_gate                      [in]
//           out     (m, B)  float32  C-contiguous, every element written once            [out]
//           m, B    int64            rows of out, batch (columns of x and out)
// Cost:     2·nnz·B flops; per nonzero one broadcast load of (index, value) shared by the
//           threads of a row and one coalesced load of an X row segment; m·B stores.
// Mapping:  block (BX, BY): threadIdx.x runs over the batch (coalesced along a row of X and
//           out), threadIdx.y picks one of BY rows; grid (ceil(m / BY), ceil(B / BX)).
//           A thread owns one output element and accumulates it in registers (four partial
//           sums for instruction-level parallelism, so float32 sums are reassociated; results
//           match a sequential sum up to rounding). The launch plan lives in spmm.py:plan().
//           sparsecore_spmm4_*: the same with float4 (B % 4 == 0 and x, out, gate 16-byte
//           aligned, checked by the plan): a thread owns 4 consecutive columns, so each
//           (index, value) load feeds 4 FMAs and X/out move in 16-byte vectors; threadIdx.x
//           runs over B / 4 column groups.
// Requires: indices in range (trusted; the public API validates). Rows in any column order.
// Index types: IDX = int (suffix _i32) or long long (suffix _i64).

template <typename IDX>
__device__ __forceinline__ void spmm_body(const IDX* __restrict__ indptr,
                                          const IDX* __restrict__ indices,
                                          const float* __restrict__ data,
                                          const IDX* __restrict__ perm, int has_perm,
                                          const float* __restrict__ x,
                                          const float* __restrict__ bias, int has_bias,
                                          int relu, const float* __restrict__ gate,
                                          int has_gate, float* __restrict__ out, long long m,
                                          long long B)
{
    const long long i = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    const long long b = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= m || b >= B) return;
    const long long start = (long long)indptr[i];
    const long long end = (long long)indptr[i + 1];
    float a0 = has_bias ? bias[i] : 0.0f;
    float a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    long long p = start;
    if (has_perm) {
        for (; p + 4 <= end; p += 4) {
            a0 += data[perm[p]] * x[(long long)indices[p] * B + b];
            a1 += data[perm[p + 1]] * x[(long long)indices[p + 1] * B + b];
            a2 += data[perm[p + 2]] * x[(long long)indices[p + 2] * B + b];
            a3 += data[perm[p + 3]] * x[(long long)indices[p + 3] * B + b];
        }
        for (; p < end; ++p) a0 += data[perm[p]] * x[(long long)indices[p] * B + b];
    } else {
        for (; p + 4 <= end; p += 4) {
            a0 += data[p] * x[(long long)indices[p] * B + b];
            a1 += data[p + 1] * x[(long long)indices[p + 1] * B + b];
            a2 += data[p + 2] * x[(long long)indices[p + 2] * B + b];
            a3 += data[p + 3] * x[(long long)indices[p + 3] * B + b];
        }
        for (; p < end; ++p) a0 += data[p] * x[(long long)indices[p] * B + b];
    }
    float v = (a0 + a1) + (a2 + a3);
    if (relu) v = v > 0.0f ? v : 0.0f;
    if (has_gate && !(gate[i * B + b] > 0.0f)) v = 0.0f;
    out[i * B + b] = v;
}

extern "C" __global__ void sparsecore_spmm_i32(const int* indptr, const int* indices,
                                               const float* data, const int* perm, int has_perm,
                                               const float* x, const float* bias, int has_bias,
                                               int relu, const float* gate, int has_gate,
                                               float* out, long long m, long long B)
{
    spmm_body<int>(indptr, indices, data, perm, has_perm, x, bias, has_bias, relu, gate,
                   has_gate, out, m, B);
}

extern "C" __global__ void sparsecore_spmm_i64(const long long* indptr, const long long* indices,
                                               const float* data, const long long* perm,
                                               int has_perm, const float* x, const float* bias,
                                               int has_bias, int relu, const float* gate,
                                               int has_gate, float* out, long long m, long long B)
{
    spmm_body<long long>(indptr, indices, data, perm, has_perm, x, bias, has_bias, relu, gate,
                         has_gate, out, m, B);
}

template <typename IDX>
__device__ __forceinline__ void spmm4_body(const IDX* __restrict__ indptr,
                                           const IDX* __restrict__ indices,
                                           const float* __restrict__ data,
                                           const IDX* __restrict__ perm, int has_perm,
                                           const float* __restrict__ x,
                                           const float* __restrict__ bias, int has_bias,
                                           int relu, const float* __restrict__ gate,
                                           int has_gate, float* __restrict__ out, long long m,
                                           long long B)
{
    const long long B4 = B >> 2;
    const long long i = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    const long long q = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= m || q >= B4) return;
    const float4* __restrict__ x4 = reinterpret_cast<const float4*>(x);
    const long long start = (long long)indptr[i];
    const long long end = (long long)indptr[i + 1];
    const float b0 = has_bias ? bias[i] : 0.0f;
    float4 acc = make_float4(b0, b0, b0, b0);
    for (long long p = start; p < end; ++p) {
        const float v = has_perm ? data[perm[p]] : data[p];
        const float4 xv = x4[(long long)indices[p] * B4 + q];
        acc.x += v * xv.x;
        acc.y += v * xv.y;
        acc.z += v * xv.z;
        acc.w += v * xv.w;
    }
    if (relu) {
        acc.x = acc.x > 0.0f ? acc.x : 0.0f;
        acc.y = acc.y > 0.0f ? acc.y : 0.0f;
        acc.z = acc.z > 0.0f ? acc.z : 0.0f;
        acc.w = acc.w > 0.0f ? acc.w : 0.0f;
    }
    if (has_gate) {
        const float4 g = reinterpret_cast<const float4*>(gate)[i * B4 + q];
        if (!(g.x > 0.0f)) acc.x = 0.0f;
        if (!(g.y > 0.0f)) acc.y = 0.0f;
        if (!(g.z > 0.0f)) acc.z = 0.0f;
        if (!(g.w > 0.0f)) acc.w = 0.0f;
    }
    reinterpret_cast<float4*>(out)[i * B4 + q] = acc;
}

extern "C" __global__ void sparsecore_spmm4_i32(const int* indptr, const int* indices,
                                                const float* data, const int* perm, int has_perm,
                                                const float* x, const float* bias, int has_bias,
                                                int relu, const float* gate, int has_gate,
                                                float* out, long long m, long long B)
{
    spmm4_body<int>(indptr, indices, data, perm, has_perm, x, bias, has_bias, relu, gate,
                    has_gate, out, m, B);
}

extern "C" __global__ void sparsecore_spmm4_i64(const long long* indptr,
                                                const long long* indices, const float* data,
                                                const long long* perm, int has_perm,
                                                const float* x, const float* bias, int has_bias,
                                                int relu, const float* gate, int has_gate,
                                                float* out, long long m, long long B)
{
    spmm4_body<long long>(indptr, indices, data, perm, has_perm, x, bias, has_bias, relu, gate,
                          has_gate, out, m, B);
}
