// sqil CUDA kernels: weight-only int4 GEMV / small-batch GEMM (W4A16), compiled at run time
// with NVRTC (crates/cuda embeds this file).
//
// Weights, pre-shuffled on the host (sqil_cuda::pack): row-major [n][k / 8] 32-bit words; word
// i of a row holds elements 8i..8i+7 as q + 8 (q in [-8, 7]), element 8i + 2s in bits 4s..4s+3
// and element 8i + 2s + 1 in bits 16 + 4s..16 + 4s + 3, so that `(word >> 4s) & 0x000F000F`
// OR 0x6400_6400 is the half2 (1024 + q0 + 8, 1024 + q1 + 8): one mask, one OR and one half2
// subtraction dequantize two weights exactly. Scales: fp16 [n][k / group], group = 32 << gshift
// (128 for the benchmark layouts; policies' groups of 32 or 64, and per-channel scales expanded
// to 32, use smaller shifts). `relu` applies max(0, .) after the bias.
// Activations: fp16 [batch][k]; outputs fp16 [batch][n] (+ optional fp16 bias [n]).
//
// One warp per output row; each lane loads 16 bytes (32 weights, one quarter of a group) per
// step, so a warp reads 512 contiguous bytes per step (coalesced, 128-bit loads). Products are
// summed per word in half2 (8 products: at most 64 * max|x| before fp16 overflow), each word's
// sum widened to fp32 and scaled, so accuracy holds for activations up to about 1000.
// k must be a multiple of 128 (the host pads).
//
// fp16 helpers: fp16.cuh, which the host prepends to every source.

// Eight weights (four half2) against eight activations (a uint4 of halves): products summed in
// half2, the two halves widened and added in fp32.
__device__ __forceinline__ float q4_dot8(const sqil_half2 *w, const uint4 xv)
{
    sqil_half2 a = h2_mul(w[0], xv.x);
    a = h2_fma(w[1], xv.y, a);
    a = h2_fma(w[2], xv.z, a);
    a = h2_fma(w[3], xv.w, a);
    return h_to_f((sqil_half)(a & 0xffffu)) + h_to_f((sqil_half)(a >> 16));
}

// The eight weights of one packed word as four half2 (see the layout above).
__device__ __forceinline__ void q4_unpack_word(unsigned int word, sqil_half2 *wv)
{
    const sqil_half2 magic = 0x64086408u; // (1032, 1032) = 1024 + 8
#pragma unroll
    for (int t = 0; t < 4; t++) {
        wv[t] = h2_sub(((word >> (4 * t)) & 0x000F000Fu) | 0x64006400u, magic);
    }
}

// A lane's partial sum of one output: reduced over the warp, then lane 0 adds the bias, applies
// the ReLU and stores it.
__device__ __forceinline__ void q4_store(float v, int lane, const sqil_half *__restrict__ bias, int relu,
                                         sqil_half *__restrict__ y, int row, size_t at)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    if (lane == 0) {
        if (bias != nullptr) {
            v += h_to_f(bias[row]);
        }
        if (relu && v < 0.0f) {
            v = 0.0f;
        }
        y[at] = f_to_h(v);
    }
}

// One 16-byte chunk (32 weights, scale s) of a row against the batch's activations.
template <int B>
__device__ __forceinline__ void q4_chunk(const uint4 q, const float s, const sqil_half *__restrict__ x, int k, int c,
                                         int batch, float (&acc)[B])
{
    const unsigned int words[4] = {q.x, q.y, q.z, q.w};
    sqil_half2 wv[16];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        q4_unpack_word(words[i], wv + i * 4);
    }
#pragma unroll
    for (int b = 0; b < B; b++) {
        if (b < batch) {
            const uint4 *xp = reinterpret_cast<const uint4 *>(x + (size_t)b * k + (size_t)c * 32);
            float part = 0.0f;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const uint4 xv = __ldg(xp + i);
                part += q4_dot8(wv + i * 4, xv);
            }
            acc[b] += part * s;
        }
    }
}

template <int B>
__device__ __forceinline__ void q4_gemv_impl(const uint4 *__restrict__ w, const sqil_half *__restrict__ scales,
                                             const sqil_half *__restrict__ x, const sqil_half *__restrict__ bias,
                                             sqil_half *__restrict__ y, int n, int k, int batch, int gshift, int relu)
{
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n) {
        return;
    }
    const int chunks = k >> 5; // 16-byte chunks (32 weights) per row
    const uint4 *wr = w + (size_t)row * chunks;
    const sqil_half *sr = scales + (size_t)row * (k >> (5 + gshift));
    float acc[B];
#pragma unroll
    for (int b = 0; b < B; b++) {
        acc[b] = 0.0f;
    }
    // One chunk per lane per step. (Issuing four chunks' loads before use was measured 5-15%
    // slower on an H200 at batch 1, so bytes in flight are not the limit; about 90 instructions
    // per 16 weight bytes suggest instruction issue is, unconfirmed by counters.)
    for (int c = lane; c < chunks; c += 32) {
        q4_chunk<B>(__ldg(wr + c), h_to_f(sr[c >> gshift]), x, k, c, batch, acc);
    }
#pragma unroll
    for (int b = 0; b < B; b++) {
        if (b < batch) {
            q4_store(acc[b], lane, bias, relu, y, row, (size_t)b * n + row);
        }
    }
}

// Batches up to 1, 2, 4, 8, 16: the host picks the smallest instance that holds the batch.
#define SQIL_Q4_GEMV(B)                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) sqil_q4_gemv_b##B(                                            \
        const uint4 *__restrict__ w, const sqil_half *__restrict__ scales, const sqil_half *__restrict__ x,            \
        const sqil_half *__restrict__ bias, sqil_half *__restrict__ y, int n, int k, int batch, int gshift,       \
        int relu)                                                                                                  \
    {                                                                                                              \
        q4_gemv_impl<B>(w, scales, x, bias, y, n, k, batch, gshift, relu);                                        \
    }

SQIL_Q4_GEMV(1)
SQIL_Q4_GEMV(2)
SQIL_Q4_GEMV(4)
SQIL_Q4_GEMV(8)
SQIL_Q4_GEMV(16)

// The small-batch variant (batches 2 to 4): each warp computes R rows, each lane keeps its slice
// of x in registers for all R rows and issues the R rows' 16-byte weight loads together, so the
// activations are loaded once per R rows (measured faster than q4_gemv_impl at batch 4 on an
// H200, slower at batch 1). Same arithmetic per (row, batch) as q4_gemv_impl, so the same results.
template <int B, int R>
__device__ __forceinline__ void q4_gemv_rows_impl(const uint4 *__restrict__ w, const sqil_half *__restrict__ scales,
                                                  const sqil_half *__restrict__ x, const sqil_half *__restrict__ bias,
                                                  sqil_half *__restrict__ y, int n, int k, int batch, int gshift,
                                                  int relu)
{
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const int row0 = warp * R;
    if (row0 >= n) {
        return;
    }
    const int chunks = k >> 5;
    float acc[R][B];
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int b = 0; b < B; b++) {
            acc[r][b] = 0.0f;
        }
    }
    for (int c = lane; c < chunks; c += 32) {
        uint4 q[R];
        float s[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int row = min(row0 + r, n - 1);
            q[r] = __ldg(w + (size_t)row * chunks + c);
            s[r] = h_to_f(scales[(size_t)row * (k >> (5 + gshift)) + (c >> gshift)]);
        }
        uint4 xv[B][4];
#pragma unroll
        for (int b = 0; b < B; b++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                xv[b][i] = b < batch ? __ldg(reinterpret_cast<const uint4 *>(x + (size_t)b * k + (size_t)c * 32) + i)
                                     : make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const unsigned int words[4] = {q[r].x, q[r].y, q[r].z, q[r].w};
#pragma unroll
            for (int b = 0; b < B; b++) {
                float part = 0.0f;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    sqil_half2 wv[4];
                    q4_unpack_word(words[i], wv);
                    part += q4_dot8(wv, xv[b][i]);
                }
                acc[r][b] += part * s[r];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int b = 0; b < B; b++) {
            const int row = row0 + r;
            if (b < batch && row < n) {
                q4_store(acc[r][b], lane, bias, relu, y, row, (size_t)b * n + row);
            }
        }
    }
}

// Rows per warp R = 4: batches up to 2 and 4 (the host uses these for batches 2-4).
#define SQIL_Q4_GEMV_ROWS(B)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128) sqil_q4_gemv_r4_b##B(                                         \
        const uint4 *__restrict__ w, const sqil_half *__restrict__ scales, const sqil_half *__restrict__ x,      \
        const sqil_half *__restrict__ bias, sqil_half *__restrict__ y, int n, int k, int batch, int gshift,      \
        int relu)                                                                                                  \
    {                                                                                                              \
        q4_gemv_rows_impl<B, 4>(w, scales, x, bias, y, n, k, batch, gshift, relu);                                 \
    }

SQIL_Q4_GEMV_ROWS(2)
SQIL_Q4_GEMV_ROWS(4)

// Split-K over the warps of a block: the block's S warps share R rows, warp s taking every S-th
// step of 32 chunks, so each lane keeps R weight loads in flight (one per row) and loads its
// activations once for the R rows, while the launch still has about one warp per row in total.
// Partial sums meet in shared memory and warp 0 adds them in warp order (a fixed order, so
// results repeat bit for bit; they differ from the one-row kernels' by summation order only).
template <int B, int R, int S>
__device__ __forceinline__ void q4_gemv_split_impl(const uint4 *__restrict__ w, const sqil_half *__restrict__ scales,
                                                   const sqil_half *__restrict__ x, const sqil_half *__restrict__ bias,
                                                   sqil_half *__restrict__ y, int n, int k, int batch, int gshift,
                                                   int relu)
{
    __shared__ float part[S][R][B];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * R;
    const int chunks = k >> 5;
    float acc[R][B];
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int b = 0; b < B; b++) {
            acc[r][b] = 0.0f;
        }
    }
    for (int c = lane + 32 * warp; c < chunks; c += 32 * S) {
        uint4 q[R];
        float sc[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int row = min(row0 + r, n - 1);
            q[r] = __ldg(w + (size_t)row * chunks + c);
            sc[r] = h_to_f(scales[(size_t)row * (k >> (5 + gshift)) + (c >> gshift)]);
        }
        uint4 xv[B][4];
#pragma unroll
        for (int b = 0; b < B; b++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                xv[b][i] = b < batch ? __ldg(reinterpret_cast<const uint4 *>(x + (size_t)b * k + (size_t)c * 32) + i)
                                     : make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const unsigned int words[4] = {q[r].x, q[r].y, q[r].z, q[r].w};
#pragma unroll
            for (int b = 0; b < B; b++) {
                float p = 0.0f;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    sqil_half2 wv[4];
                    q4_unpack_word(words[i], wv);
                    p += q4_dot8(wv, xv[b][i]);
                }
                acc[r][b] += p * sc[r];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int b = 0; b < B; b++) {
            float v = acc[r][b];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                v += __shfl_xor_sync(0xffffffffu, v, o);
            }
            if (lane == 0) {
                part[warp][r][b] = v;
            }
        }
    }
    __syncthreads();
    if (warp == 0 && lane < R * B) {
        const int r = lane / B, b = lane % B;
        const int row = row0 + r;
        if (row < n && b < batch) {
            float v = 0.0f;
#pragma unroll
            for (int s = 0; s < S; s++) {
                v += part[s][r][b];
            }
            if (bias != nullptr) {
                v += h_to_f(bias[row]);
            }
            if (relu && v < 0.0f) {
                v = 0.0f;
            }
            y[(size_t)b * n + row] = f_to_h(v);
        }
    }
}

// Instances sqil_q4_gemv_s{S}_r{R}_b{B}: S warps per block (32 * S threads) on R rows.
#define SQIL_Q4_GEMV_SPLIT(B, R, S)                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * S) sqil_q4_gemv_s##S##_r##R##_b##B(                          \
        const uint4 *__restrict__ w, const sqil_half *__restrict__ scales, const sqil_half *__restrict__ x,      \
        const sqil_half *__restrict__ bias, sqil_half *__restrict__ y, int n, int k, int batch, int gshift,      \
        int relu)                                                                                                  \
    {                                                                                                              \
        q4_gemv_split_impl<B, R, S>(w, scales, x, bias, y, n, k, batch, gshift, relu);                             \
    }

// The host's picks (four warps; four rows, or two for batch-1 rows longer than 4096), and the
// shapes `sqil-cuda-bench explore` compares them with.
SQIL_Q4_GEMV_SPLIT(1, 4, 4)
SQIL_Q4_GEMV_SPLIT(1, 2, 4)
SQIL_Q4_GEMV_SPLIT(2, 4, 4)
SQIL_Q4_GEMV_SPLIT(4, 4, 4)
SQIL_Q4_GEMV_SPLIT(1, 4, 2)
SQIL_Q4_GEMV_SPLIT(1, 8, 4)
SQIL_Q4_GEMV_SPLIT(1, 4, 8)
SQIL_Q4_GEMV_SPLIT(4, 2, 4)
