// Elementwise passes of a training step on the GPU: ReLU forward/backward and the fused
// optimizer updates (the twins of kernels/cpu/elementwise.py, plus plain SGD and Adam).
//
// Maths:    relu            out[e] = x[e] > 0 ? x[e] : 0
//           relu_backward   out[e] = y[e] > 0 ? dy[e] : 0          (y: the ReLU's output)
//           sgd             g' = g + wd·p;  p -= lr·g'
//           sgd_momentum    g' = g + wd·p;  v = momentum·v + g';
//                           p -= lr·(nesterov ? g' + momentum·v : v)
//           adam            g' = g + wd·p (L2, iff !decoupled);  m = b1·m + a1·g';
//                           v = b2·v + a2·g'²;
//                           p -= lr_wd·p (iff decoupled: AdamW, lr_wd = lr·wd);
//                           p -= lr_c1·m / (sqrt(v / c2) + eps)
//                           (a1 = 1 - b1, a2 = 1 - b2, lr_c1 = lr / (1 - b1^t), c2 = 1 - b2^t:
//                           rounded to float32 on the host, as the CPU optimizer does)
// Buffers:  every array float32, n elements, contiguous (2-D activations are passed flat);
//           out may alias x or dy (each element is read once, then written by the same
//           thread): relu(y, y) runs in place, so the two ReLU kernels declare no pointer
//           __restrict__ (an aliased restrict pointer is undefined behaviour); p, v, m are
//           updated in place.                                                       [in/out]
//           n         int64    elements
// Cost:     one pass: 8 bytes (relu), 12 (relu_backward), 16 (sgd), 24 (momentum),
//           32 (adam) of memory traffic per element, a few flops.
// Mapping:  a 1-D grid-stride loop: blockDim.x = 256, gridDim.x = min(ceil(n / 256), 4096)
//           (config.CUDA_ELEMENTWISE_*, elementwise.py:grid); one thread per element per
//           pass, no atomics.
// Rounding: float32 throughout, the same operation order as the CPU twins (no fast-math), so
//           the updates agree with them to float32 rounding (FMA contraction may differ).
//           CuPy compiles every kernel with -ftz=true (appended after our options; NVRTC keeps
//           the last), so these kernels flush subnormal inputs and results to zero, as the CPU
//           training does under flush_denormals (its default); the CPU with
//           flush_denormals=False keeps them, and may then differ by subnormal amounts.

#define GRID_STRIDE(e, n) \
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (n); \
         e += (long long)blockDim.x * gridDim.x)

extern "C" __global__ void sparsecore_relu(const float* x, float* out, long long n)
{
    GRID_STRIDE(e, n)
    {
        const float v = x[e];
        out[e] = v > 0.0f ? v : 0.0f;
    }
}

extern "C" __global__ void sparsecore_relu_backward(const float* dy, const float* y, float* out,
                                                    long long n)
{
    GRID_STRIDE(e, n)
    {
        const float g = dy[e];
        out[e] = y[e] > 0.0f ? g : 0.0f;
    }
}

extern "C" __global__ void sparsecore_sgd(float* __restrict__ p, const float* __restrict__ g,
                                          long long n, float lr, float weight_decay)
{
    GRID_STRIDE(e, n)
    {
        const float gj = g[e] + weight_decay * p[e];
        p[e] -= lr * gj;
    }
}

extern "C" __global__ void sparsecore_sgd_momentum(float* __restrict__ p,
                                                   const float* __restrict__ g,
                                                   float* __restrict__ v, long long n, float lr,
                                                   float momentum, float weight_decay,
                                                   int nesterov)
{
    GRID_STRIDE(e, n)
    {
        const float gj = g[e] + weight_decay * p[e];
        const float vj = momentum * v[e] + gj;
        v[e] = vj;
        p[e] -= lr * (nesterov ? gj + momentum * vj : vj);
    }
}

extern "C" __global__ void sparsecore_adam(float* __restrict__ p, const float* __restrict__ g,
                                           float* __restrict__ m, float* __restrict__ v,
                                           long long n, float b1, float a1, float b2,
                                           float a2, float lr_c1, float c2, float eps,
                                           float weight_decay, int decoupled, float lr_wd)
{
    GRID_STRIDE(e, n)
    {
        float gj = g[e];
        float pj = p[e];
        if (!decoupled) gj += weight_decay * pj;
        const float mj = b1 * m[e] + a1 * gj;
        const float vj = b2 * v[e] + a2 * (gj * gj);
        m[e] = mj;
        v[e] = vj;
        if (decoupled) pj -= lr_wd * pj;
        p[e] = pj - lr_c1 * mj / (sqrtf(vj / c2) + eps);
    }
}
