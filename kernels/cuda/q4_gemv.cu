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
// Chunk c (32 weights) of R rows from row0 (clamped to n - 1) against the batch: the R rows'
// 16-byte loads issued together, the activations loaded once for all R rows.
template <int B, int R>
__device__ __forceinline__ void q4_rows_chunk(const uint4 *__restrict__ w, const sqil_half *__restrict__ scales,
                                              const sqil_half *__restrict__ x, int n, int k, int batch, int gshift,
                                              int row0, int c, float (&acc)[R][B])
{
    const int chunks = k >> 5;
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
        q4_rows_chunk<B, R>(w, scales, x, n, k, batch, gshift, row0, c, acc);
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
        q4_rows_chunk<B, R>(w, scales, x, n, k, batch, gshift, row0, c, acc);
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

// Batches 5 to 16 on the tensor cores: mma.sync m16n8k16, fp16 inputs, fp32 accumulation. The
// batch's tokens are the mma's M (rows past `batch` read as zero), eight weight rows its N.
// Weights come in a second layout made for the B fragments (`sqil_cuda::mma_words`): per row
// and group of 128, lane `tig` of a quad loads one uint4 whose word w holds the four fp16 pairs
// it feeds to the two k16 steps of the w-th 32 weights (pair p: b0 (p even) or b1 (p odd) of
// step 2w + p / 2, its elements at bits 4p and 16 + 4p: one shift, mask, OR and half2
// subtraction each, as in the GEMV layout). Each 32 weights' products are scaled by their
// group's scale into fp32 accumulators; the S warps of a block split the groups of a row and
// meet in shared memory (added in warp order), T tiles of eight rows per warp share the
// activation fragments.
// (mma.sync m16n8k16 / m16n8k32 need sm_80; compiled for older targets, e.g. nvcc's default
// for a standalone build, they trap, and the host never launches them there.)
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

__device__ __forceinline__ sqil_half2 q4_pair(unsigned int word, int p)
{
    return h2_sub(((word >> (4 * p)) & 0x000F000Fu) | 0x64006400u, 0x64086408u);
}

// The end of the tensor-core kernels: each warp's fp32 accumulators of T tiles (the mma C
// layout: tokens g and g + 8, rows 2 tig and 2 tig + 1 of each tile of eight) through shared
// memory, summed in warp order by warp 0, times the token's activation scale (xs, if given), plus
// the bias, ReLU if asked, stored as fp16.
template <int T, int S>
__device__ __forceinline__ void mma_reduce_store(float (&part)[S][T][4][32], const float (&acc)[T][4],
                                                 const float *__restrict__ xs, const sqil_half *__restrict__ bias,
                                                 sqil_half *__restrict__ y, int n, int batch, int relu, int row0)
{
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int t = 0; t < T; t++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            part[warp][t][i][lane] = acc[t][i];
        }
    }
    __syncthreads();
    if (warp != 0) {
        return;
    }
#pragma unroll
    for (int t = 0; t < T; t++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int token = g + (i >= 2 ? 8 : 0);
            const int row = row0 + t * 8 + tig * 2 + (i & 1);
            if (token < batch && row < n) {
                float v = 0.0f;
#pragma unroll
                for (int s = 0; s < S; s++) {
                    v += part[s][t][i][lane];
                }
                if (xs != nullptr) {
                    v *= xs[token];
                }
                if (bias != nullptr) {
                    v += h_to_f(bias[row]);
                }
                if (relu && v < 0.0f) {
                    v = 0.0f;
                }
                y[(size_t)token * n + row] = f_to_h(v);
            }
        }
    }
}

template <int T, int S, int P>
__device__ __forceinline__ void q4_mma_impl(const uint4 *__restrict__ wm, const sqil_half *__restrict__ scales,
                                            const sqil_half *__restrict__ x, const sqil_half *__restrict__ bias,
                                            sqil_half *__restrict__ y, int n, int k, int batch, int gshift, int relu)
{
    __shared__ float part[S][T][4][32];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int row0 = blockIdx.x * 8 * T;
    const int groups = k >> 7;
    const int spr = k >> (5 + gshift);
    const unsigned int *x32 = reinterpret_cast<const unsigned int *>(x);
    const int k2 = k >> 1;
    const bool lo_ok = g < batch, hi_ok = g + 8 < batch;
    float acc[T][4];
#pragma unroll
    for (int t = 0; t < T; t++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            acc[t][i] = 0.0f;
        }
    }
    // P = 1: the next group's weights are loaded before this group's are used (two loads per
    // tile in flight).
    uint4 qn[T];
    if (P) {
#pragma unroll
        for (int t = 0; t < T; t++) {
            qn[t] = warp < groups ? __ldg(wm + ((size_t)min(row0 + t * 8 + g, n - 1) * groups + warp) * 4 + tig)
                                  : make_uint4(0, 0, 0, 0);
        }
    }
    for (int j = warp; j < groups; j += S) {
        uint4 q[T];
#pragma unroll
        for (int t = 0; t < T; t++) {
            if (P) {
                q[t] = qn[t];
                if (j + S < groups) {
                    qn[t] = __ldg(wm + ((size_t)min(row0 + t * 8 + g, n - 1) * groups + j + S) * 4 + tig);
                }
            } else {
                q[t] = __ldg(wm + ((size_t)min(row0 + t * 8 + g, n - 1) * groups + j) * 4 + tig);
            }
        }
#pragma unroll
        for (int w4 = 0; w4 < 4; w4++) {
            float cc[T][4];
#pragma unroll
            for (int t = 0; t < T; t++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    cc[t][i] = 0.0f;
                }
            }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int kk = ((j * 128 + w4 * 32 + h * 16) >> 1) + tig;
                unsigned int a[4];
                a[0] = lo_ok ? __ldg(x32 + (size_t)g * k2 + kk) : 0u;
                a[1] = hi_ok ? __ldg(x32 + (size_t)(g + 8) * k2 + kk) : 0u;
                a[2] = lo_ok ? __ldg(x32 + (size_t)g * k2 + kk + 4) : 0u;
                a[3] = hi_ok ? __ldg(x32 + (size_t)(g + 8) * k2 + kk + 4) : 0u;
#pragma unroll
                for (int t = 0; t < T; t++) {
                    const unsigned int word = w4 == 0 ? q[t].x : w4 == 1 ? q[t].y : w4 == 2 ? q[t].z : q[t].w;
                    mma_16816(cc[t], a, q4_pair(word, 2 * h), q4_pair(word, 2 * h + 1));
                }
            }
            const int gi = (j * 128 + w4 * 32) >> (5 + gshift);
#pragma unroll
            for (int t = 0; t < T; t++) {
                const int r0 = min(row0 + t * 8 + tig * 2, n - 1), r1 = min(row0 + t * 8 + tig * 2 + 1, n - 1);
                const float s0 = h_to_f(scales[(size_t)r0 * spr + gi]);
                const float s1 = h_to_f(scales[(size_t)r1 * spr + gi]);
                acc[t][0] += cc[t][0] * s0;
                acc[t][1] += cc[t][1] * s1;
                acc[t][2] += cc[t][2] * s0;
                acc[t][3] += cc[t][3] * s1;
            }
        }
    }
    mma_reduce_store<T, S>(part, acc, nullptr, bias, y, n, batch, relu, row0);
}

// Instances sqil_q4_mma_t{T}_s{S}[_p]: S warps per block (32 * S threads), 8 * T rows per block,
// `_p` with the next group's weights prefetched.
#define SQIL_Q4_MMA(T, S, P, SUFFIX)                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * S) sqil_q4_mma_t##T##_s##S##SUFFIX(                          \
        const uint4 *__restrict__ wm, const sqil_half *__restrict__ scales, const sqil_half *__restrict__ x,     \
        const sqil_half *__restrict__ bias, sqil_half *__restrict__ y, int n, int k, int batch, int gshift,      \
        int relu)                                                                                                  \
    {                                                                                                              \
        q4_mma_impl<T, S, P>(wm, scales, x, bias, y, n, k, batch, gshift, relu);                                   \
    }

// The host's pick (t2_s8_p) and the variants `explore` compares it with.
SQIL_Q4_MMA(2, 8, 1, _p)
SQIL_Q4_MMA(2, 8, 0, )
SQIL_Q4_MMA(4, 8, 1, _p)

// W4A8 on the int8 tensor cores (batches up to 16): activations quantized per token to int8
// (sqil_quant_tokens: symmetric, scale = max |x| / 127, round half to even), weights as unsigned
// nibbles q + 8 in a third layout (`sqil_cuda::mma8_words`): per row and group of 128, lane
// `tig`'s uint4 holds, in word w, the B fragments of the w-th 32 weights: byte i's low nibble is
// element 32w + 4tig + i, its high nibble element 32w + 16 + 4tig + i, so one AND gives b0 and one
// shift and AND b1. mma.sync m16n8k32 s8 x u8 sums (x, q + 8) exactly in int32; each 32
// weights' sum, less 8 x the tokens' sums of those 32 activations, is scaled by the weight group's
// scale into fp32, and the token's activation scale is applied at the end.
extern "C" __global__ void __launch_bounds__(256) sqil_quant_tokens(const sqil_half *__restrict__ x, int batch, int k,
                                                                    signed char *__restrict__ xq,
                                                                    float *__restrict__ xs, int *__restrict__ xsum)
{
    __shared__ float red[8];
    const int token = blockIdx.x;
    const int tid = threadIdx.x;
    const bool live = token < batch;
    float m = 0.0f;
    if (live) {
        for (int i = tid; i < k; i += blockDim.x) {
            m = fmaxf(m, fabsf(h_to_f(x[(size_t)token * k + i])));
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    if ((tid & 31) == 0) {
        red[tid >> 5] = m;
    }
    __syncthreads();
    m = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
        m = fmaxf(m, red[w]);
    }
    const float scale = m > 0.0f ? m / 127.0f : 1.0f;
    if (tid == 0) {
        xs[token] = scale;
    }
    // One warp per 32 activations: quantize, store, and sum them.
    for (int c = tid >> 5; c < (k >> 5); c += blockDim.x >> 5) {
        const int i = c * 32 + (tid & 31);
        int q = 0;
        if (live) {
            q = __float2int_rn(h_to_f(x[(size_t)token * k + i]) / scale);
            q = max(-127, min(127, q));
        }
        xq[(size_t)token * k + i] = (signed char)q;
        int s = q;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            s += __shfl_xor_sync(0xffffffffu, s, o);
        }
        if ((tid & 31) == 0) {
            xsum[token * (k >> 5) + c] = s;
        }
    }
}

__device__ __forceinline__ void mma_16832_s8u8(int (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

template <int T, int S>
__device__ __forceinline__ void q4_mma8_impl(const uint4 *__restrict__ wm, const sqil_half *__restrict__ scales,
                                             const signed char *__restrict__ xq, const float *__restrict__ xs,
                                             const int *__restrict__ xsum, const sqil_half *__restrict__ bias,
                                             sqil_half *__restrict__ y, int n, int k, int batch, int gshift, int relu)
{
    __shared__ float part[S][T][4][32];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int row0 = blockIdx.x * 8 * T;
    const int groups = k >> 7;
    const int spr = k >> (5 + gshift);
    const int k32 = k >> 5;
    const unsigned int *x32 = reinterpret_cast<const unsigned int *>(xq);
    const int kw = k >> 2; // 32-bit words per token row
    float acc[T][4];
#pragma unroll
    for (int t = 0; t < T; t++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            acc[t][i] = 0.0f;
        }
    }
    for (int j = warp; j < groups; j += S) {
        uint4 q[T];
#pragma unroll
        for (int t = 0; t < T; t++) {
            q[t] = __ldg(wm + ((size_t)min(row0 + t * 8 + g, n - 1) * groups + j) * 4 + tig);
        }
#pragma unroll
        for (int w4 = 0; w4 < 4; w4++) {
            const int kk = ((j * 128 + w4 * 32) >> 2) + tig;
            unsigned int a[4];
            a[0] = __ldg(x32 + (size_t)g * kw + kk);
            a[1] = __ldg(x32 + (size_t)(g + 8) * kw + kk);
            a[2] = __ldg(x32 + (size_t)g * kw + kk + 4);
            a[3] = __ldg(x32 + (size_t)(g + 8) * kw + kk + 4);
            const int c32 = j * 4 + w4;
            const int corr_lo = 8 * __ldg(xsum + g * k32 + c32), corr_hi = 8 * __ldg(xsum + (g + 8) * k32 + c32);
            const int gi = (j * 128 + w4 * 32) >> (5 + gshift);
#pragma unroll
            for (int t = 0; t < T; t++) {
                const unsigned int word = w4 == 0 ? q[t].x : w4 == 1 ? q[t].y : w4 == 2 ? q[t].z : q[t].w;
                int cc[4] = {0, 0, 0, 0};
                mma_16832_s8u8(cc, a, word & 0x0F0F0F0Fu, (word >> 4) & 0x0F0F0F0Fu);
                const int r0 = min(row0 + t * 8 + tig * 2, n - 1), r1 = min(row0 + t * 8 + tig * 2 + 1, n - 1);
                const float s0 = h_to_f(scales[(size_t)r0 * spr + gi]);
                const float s1 = h_to_f(scales[(size_t)r1 * spr + gi]);
                acc[t][0] += (float)(cc[0] - corr_lo) * s0;
                acc[t][1] += (float)(cc[1] - corr_lo) * s1;
                acc[t][2] += (float)(cc[2] - corr_hi) * s0;
                acc[t][3] += (float)(cc[3] - corr_hi) * s1;
            }
        }
    }
    mma_reduce_store<T, S>(part, acc, xs, bias, y, n, batch, relu, row0);
}

// Instances sqil_q4_mma8_t{T}_s{S}: S warps per block (32 * S threads), 8 * T rows per block.
#define SQIL_Q4_MMA8(T, S)                                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * S) sqil_q4_mma8_t##T##_s##S(                                 \
        const uint4 *__restrict__ wm, const sqil_half *__restrict__ scales, const signed char *__restrict__ xq,  \
        const float *__restrict__ xs, const int *__restrict__ xsum, const sqil_half *__restrict__ bias,          \
        sqil_half *__restrict__ y, int n, int k, int batch, int gshift, int relu)                                  \
    {                                                                                                              \
        q4_mma8_impl<T, S>(wm, scales, xq, xs, xsum, bias, y, n, k, batch, gshift, relu);                          \
    }

SQIL_Q4_MMA8(2, 8)
SQIL_Q4_MMA8(4, 8)

// ---------------------------------------------------------------------------------------------
// Exact W4A8 GEMM for batches of up to 16 rows on the int8 tensor cores, with the CPU runtime's
// arithmetic (the same as sqil_q4_int in policy_ops.cu): each input quantized by the layer's
// static quantizer (level = clamp(rint(x / qs) + qz, qlo, qhi) - qz), per weight group the exact
// integer sum of weight x level, then acc += float(sum) * scale (each rounded) in group order,
// then acc * xscale, + bias, ReLU; a NaN anywhere in a row makes that row's outputs NaN.
//
// sqil_w4a8_levels writes the batch's levels as the mma's A fragments (`[k / 32][32 lanes][4
// words]`, one uint4 per lane per 32 terms: rows g and g + 8, terms 4 tig.. and 16 + 4 tig..),
// each byte `q - qlo` (0..255), and flags a row holding a NaN with the call's epoch (so the flags
// need no clearing). sqil_w4a8_mma: a block owns 8 T rows; its S warps split the terms, Q
// blocks of 128 terms each per chunk, all loads of a chunk issued before the first mma.
// mma.sync m16n8k32 u8 x s8 on (q - qlo, 16 w): the weights' nibbles (`mma8_words`, q + 8) xor 8
// are two's-complement nibbles, so one shift and AND (or one AND) places each at the top of its
// byte as 16 w; the int32 sums are exact and shifted back. The zero's part, (qz - qlo) sum w, comes
// from a second mma on a fragment of ones (skipped when qz = qlo). The warps write their groups'
// exact sums to shared memory; after each chunk one thread per (row, output) scales them and adds
// them to its accumulator in group order, with the chunk's scales staged in shared memory.
extern "C" __global__ void __launch_bounds__(256) sqil_w4a8_levels(const float *__restrict__ x, int batch, int k,
                                                                   int kp, float qs, float qz, float qlo,
                                                                   float qhi, int epoch, unsigned *__restrict__ frag,
                                                                   int *__restrict__ nanflag, int half)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The GEMM after it may start (programmatic dependent launch); it waits for these writes.
    asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    // half (batches up to 8): only rows g of the fragment, two words per lane per 32 terms
    // (`[k / 32][32 lanes][2 words]`); the GEMM puts ones in rows g + 8.
    if (i >= (long)(kp >> 5) * (half ? 64 : 128)) {
        return;
    }
    const int r = half ? (int)(i & 1) << 1 : (int)(i & 3);
    const int lane = half ? (int)((i >> 1) & 31) : (int)((i >> 2) & 31);
    const int step = half ? (int)(i >> 6) : (int)(i >> 7);
    const int token = (lane >> 2) + 8 * (r & 1);
    const int kk = step * 32 + 4 * (lane & 3) + 16 * (r >> 1);
    unsigned word = 0;
    bool nan = false;
    if (token < batch) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (kk + j < k) {
                const float v = x[(long)token * k + kk + j];
                if (v != v) {
                    nan = true;
                } else {
                    float q = rintf(__fdiv_rn(v, qs)) + qz;
                    q = q < qlo ? qlo : (q > qhi ? qhi : q);
                    word |= ((unsigned)(int)(q - qlo) & 255u) << (8 * j);
                }
            }
        }
    }
    frag[i] = word;
    if (nan) {
        nanflag[token] = epoch;
    }
}

__device__ __forceinline__ void mma_16832_u8s8(int (&c)[4], const uint4 &a, unsigned b0, unsigned b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

__device__ __forceinline__ unsigned w4a8_word(const uint4 &v, int s)
{
    return s == 0 ? v.x : s == 1 ? v.y : s == 2 ? v.z : v.w;
}

// One warp's share of a chunk's weights: Q blocks of 128 terms from quad quad0, T tiles (the
// `w4a8_words` layout: per tile of 8 rows and block of 128 terms, the 32 lanes' uint4 B fragments
// contiguous, 512 bytes per warp), copied asynchronously into this thread's slots of one stage of
// the ring (`ring[stage][qi][t][thread]`; a block past kq is written as zero weights). Each thread
// reads back only its own slots, so they need no barrier, only cp.async.wait_group.
template <int T, int Q>
__device__ __forceinline__ void w4a8_weights_async(const uint4 *__restrict__ wm, uint4 *stage, int n, int kq, int row0,
                                                   int quad0, int lane, int nthreads)
{
#pragma unroll
    for (int qi = 0; qi < Q; qi++) {
        const int quad = quad0 + qi;
#pragma unroll
        for (int t = 0; t < T; t++) {
            uint4 *dst = stage + (qi * T + t) * nthreads + threadIdx.x;
            const int tile = min((row0 >> 3) + t, ((n + 7) >> 3) - 1);
            if (quad < kq) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
                const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d),
                             "l"(wm + ((long)tile * kq + quad) * 32 + lane));
#else
                *dst = wm[((long)tile * kq + quad) * 32 + lane];
#endif
            } else {
                *dst = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    }
}

// One warp's A fragments for a chunk (Q blocks of 128 terms from quad0; zero past kq; lanes whose
// rows g and g + 8 are both past the batch load nothing).
template <int Q>
__device__ __forceinline__ void w4a8_levels_load(const uint4 *__restrict__ frag, int kq, int quad0, int lane,
                                                 bool rows_live, uint4 (&av)[Q][4])
{
#pragma unroll
    for (int qi = 0; qi < Q; qi++) {
        const int quad = quad0 + qi;
#pragma unroll
        for (int s = 0; s < 4; s++) {
            av[qi][s] = quad < kq && rows_live ? __ldg(frag + ((long)quad * 4 + s) * 32 + lane) : make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

// The scales of a chunk's groups g0.. for the block's rows, copied into shared memory
// asynchronously (no commit: the caller commits them with the chunk's weights; `sc[rows][cg + 1]`,
// rows past n read row n - 1, groups past the layer's not copied).
__device__ __forceinline__ void w4a8_scales_async(const float *__restrict__ scales, float *sc, int rows, int cgshift,
                                                  int row0, int n, int g0, int groups, int nthreads)
{
    for (int e = threadIdx.x; e < rows << cgshift; e += nthreads) {
        const int rr = e >> cgshift, gg = e & ((1 << cgshift) - 1);
        if (g0 + gg < groups) {
            const float *src = scales + (long)min(row0 + rr, n - 1) * groups + g0 + gg;
            // Rows cg + 1 apart: the adding threads of one warp read different rows' scales from
            // different banks.
            float *d = sc + rr * ((1 << cgshift) + 1) + gg;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
            const unsigned dst = (unsigned)__cvta_generic_to_shared(d);
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
#else
            *d = *src;
#endif
        }
    }
}

__device__ __forceinline__ void cp_async_commit()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// The (row, output) pair adding thread p takes: with at most 8 rows in the batch, token-major
// (p = token * 8 T + row in the block), so the live pairs fill the first warps and the rest skip;
// with more, in the mma output layout (p = t * 128 + i * 32 + lane), whose shared-memory reads do
// not collide. Returns the mma output's tile t, element i and lane l, the row rr in the block and
// the token (16 or more for a thread past the block's pairs).
template <int T>
__device__ __forceinline__ void w4a8_pair(int p, int batch, int &t, int &i, int &l, int &rr, int &token)
{
    if (batch <= 8) {
        token = p / (8 * T);
        rr = p - token * 8 * T;
        t = rr >> 3;
        l = 4 * (token & 7) + ((rr & 7) >> 1);
        i = 2 * (token >> 3) + (rr & 1);
    } else {
        t = p >> 7;
        i = (p >> 5) & 3;
        l = p & 31;
        rr = t * 8 + 2 * (l & 3) + (i & 1);
        token = p < T * 128 ? (l >> 2) + 8 * (i >> 1) : 16; // past the pairs: no token
    }
}

// T row tiles of 8 per warp (8 T rows per block), S warps, Q blocks of 128 terms per warp per
// chunk, D chunks in flight: chunk c + D - 1's weights are copied into the ring and its scales
// into shared memory (one commit group) while chunk c is multiplied, so no registers wait on
// them; the next chunk's levels are loaded into registers. The group sums go to one of two
// buffers, so one barrier per chunk separates a chunk's sums from their adding. Dynamic shared
// memory: part[2][cg][T * 128] ints, sc[D + 1][8 T][cg + 1] floats, then (16-byte aligned) the ring
// [D][Q][T][32 S] uint4; cg = S Q 128 / group groups per chunk.
template <int T, int S, int Q, int D>
__device__ __forceinline__ void w4a8_mma_impl(const uint4 *__restrict__ wm, const float *__restrict__ scales,
                                              const uint4 *__restrict__ frag, const int *__restrict__ nanflag,
                                              const float *__restrict__ bias, float *__restrict__ y, int n, int kq,
                                              int gshift, int groups, int batch, int zp, float xscale, int relu,
                                              int epoch)
{
    extern __shared__ int w4a8_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int row0 = blockIdx.x * 8 * T;
    // Groups of 32 << gshift terms (gshift 0-4); the chunk's S Q 128 terms hold cg = 2^cgshift.
    const int gmask = (1 << gshift) - 1;
    const int cgshift = __ffs(S * Q * 4) - 1 - gshift;
    const int cg = 1 << cgshift;
    constexpr int PAIRS = T * 128, PER = (PAIRS + 32 * S - 1) / (32 * S), NT = 32 * S;
    int *part = w4a8_smem;                                              // [2][cg][PAIRS]
    float *scs = reinterpret_cast<float *>(w4a8_smem + 2 * cg * PAIRS); // [D + 1][8 T][cg + 1]
    uint4 *ring = reinterpret_cast<uint4 *>(w4a8_smem + ((2 * cg * PAIRS + (D + 1) * 8 * T * (cg + 1) + 3) & ~3));
    const int sstage = 8 * T * (cg + 1);
    const uint4 ones = make_uint4(0x01010101u, 0x01010101u, 0x01010101u, 0x01010101u);
    const bool rows_live = g < batch;
    float acc[PER];
#pragma unroll
    for (int j = 0; j < PER; j++) {
        acc[j] = 0.0f;
    }
    const int nchunks = (kq + S * Q - 1) / (S * Q);
    // Prologue: the first D - 1 chunks' weights and scales, the first chunk's levels.
#pragma unroll
    for (int d = 0; d < D - 1; d++) {
        w4a8_weights_async<T, Q>(wm, ring + d * Q * T * NT, n, kq, row0, d * S * Q + warp * Q, lane, NT);
        w4a8_scales_async(scales, scs + d * sstage, 8 * T, cgshift, row0, n, d << cgshift, groups, NT);
        cp_async_commit();
    }
    uint4 av[Q][4], an[Q][4];
    w4a8_levels_load<Q>(frag, kq, warp * Q, lane, rows_live, av);
    int buf = 0;
    for (int ch = 0; ch < nchunks; ch++) {
        const int q0 = ch * S * Q;
        const bool more = ch + 1 < nchunks;
        // Chunk ch + D - 1's weights and scales (past the end: zero weights, no scales; still one
        // commit group, so chunk ch's is always the D-th newest).
        w4a8_weights_async<T, Q>(wm, ring + ((ch + D - 1) % D) * Q * T * NT, n, kq, row0, (ch + D - 1) * S * Q + warp * Q,
                                 lane, NT);
        w4a8_scales_async(scales, scs + ((ch + D - 1) % (D + 1)) * sstage, 8 * T, cgshift, row0, n,
                          (ch + D - 1) << cgshift, groups, NT);
        cp_async_commit();
        if (more) {
            w4a8_levels_load<Q>(frag, kq, q0 + S * Q + warp * Q, lane, rows_live, an);
        }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        asm volatile("cp.async.wait_group %0;\n" ::"n"(D - 1) : "memory");
#endif
        const uint4 *stage = ring + (ch % D) * Q * T * NT;
        int *pc = part + buf * cg * PAIRS;
        int c[T][4], cw[T][4];
#pragma unroll
        for (int t = 0; t < T; t++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                c[t][i] = 0;
                cw[t][i] = 0;
            }
        }
#pragma unroll
        for (int qi = 0; qi < Q; qi++) {
            uint4 wv[T];
#pragma unroll
            for (int t = 0; t < T; t++) {
                wv[t] = stage[(qi * T + t) * NT + threadIdx.x];
            }
#pragma unroll
            for (int s = 0; s < 4; s++) {
#pragma unroll
                for (int t = 0; t < T; t++) {
                    const unsigned wd = w4a8_word(wv[t], s);
                    const unsigned b0 = (wd << 4) & 0xF0F0F0F0u, b1 = wd & 0xF0F0F0F0u;
                    mma_16832_u8s8(c[t], av[qi][s], b0, b1);
                    if (zp != 0) {
                        mma_16832_u8s8(cw[t], ones, b0, b1);
                    }
                }
                const int step = (warp * Q + qi) * 4 + s; // 32-term step within the chunk
                if (((step + 1) & gmask) == 0) {
                    const int slot = step >> gshift;
#pragma unroll
                    for (int t = 0; t < T; t++) {
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            pc[slot * PAIRS + t * 128 + i * 32 + lane] = (c[t][i] >> 4) - zp * (cw[t][i] >> 4);
                            c[t][i] = 0;
                            cw[t][i] = 0;
                        }
                    }
                }
            }
        }
        __syncthreads(); // every thread's copies of this chunk's scales and sums
        const float *sc = scs + (ch % (D + 1)) * sstage;
        const int g0 = ch << cgshift; // first group of the chunk
        const int gend = min(cg, groups - g0);
#pragma unroll
        for (int j = 0; j < PER; j++) {
            int t, i, l, rr, token;
            w4a8_pair<T>(threadIdx.x + j * NT, batch, t, i, l, rr, token);
            if (token < batch) {
                const int q = t * 128 + i * 32 + l;
                float a = acc[j];
                for (int gg = 0; gg < gend; gg++) {
                    a = __fadd_rn(a, __fmul_rn((float)pc[gg * PAIRS + q], sc[rr * (cg + 1) + gg]));
                }
                acc[j] = a;
            }
        }
        buf ^= 1;
#pragma unroll
        for (int qi = 0; qi < Q; qi++) {
#pragma unroll
            for (int s = 0; s < 4; s++) {
                av[qi][s] = an[qi][s];
            }
        }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
#pragma unroll
    for (int j = 0; j < PER; j++) {
        int t, i, l, rr, token;
        w4a8_pair<T>(threadIdx.x + j * NT, batch, t, i, l, rr, token);
        const int row = row0 + rr;
        {
            if (row < n && token < batch) {
                float out = __fmul_rn(acc[j], xscale);
                if (bias) {
                    out = __fadd_rn(out, bias[row]);
                }
                if (relu && out < 0.0f) {
                    out = 0.0f;
                }
                y[(long)token * n + row] = nanflag[token] == epoch ? __int_as_float(0x7fc00000) : out;
            }
        }
    }
}

// sqil_w4a8_mma for layers whose every group's sums fit in shared memory at once (the common
// case; `sqil_w4a8_mma_*` below takes the rest): warp w walks its own contiguous range of 128-term
// blocks (whole groups) with D blocks of weights and two of levels in flight in registers (the
// loop unrolled by D so the ring's indices are constants, pointers stepped, no predicates but the
// lanes' live rows), and stores each group's raw mma sums (16 x the exact sum) with one 16-byte
// store per tile. After one barrier each (row, output) thread takes its groups in order: sum / 16
// less zero x the group's weight sum (`wsum`, from the upload), times the scale, added. Weights
// in `w4a8_words` (two's-complement nibbles, rows padded to tiles, blocks to whole groups),
// levels padded likewise. Dynamic shared memory: part[groups][T][32] uint4, then sc[8 T][groups +
// 1] floats and ws[8 T][groups + 1] ints.
//
// H (batches up to 8): the levels in the half layout (rows g only, `uint2` per lane per 32 terms)
// and rows g + 8 of the A fragment all ones, so the mma's rows 8-15 are each output's weight sums
// (16 x sum w, exact) for the zero's part: half the level reads, no weight sums read.
template <int T, int S, int D, bool H>
__device__ __forceinline__ void w4a8_lean_impl(const uint4 *__restrict__ wm, const float *__restrict__ scales,
                                               const int *__restrict__ wsum, const uint4 *__restrict__ frag,
                                               const int *__restrict__ nanflag, const float *__restrict__ bias,
                                               float *__restrict__ y, int n, int kqg, int gshift, int groups,
                                               int batch, int zp, float xscale, int relu, int epoch)
{
    static_assert(D % 2 == 0, "the levels' two-deep ring follows the weights' ring parity");
    extern __shared__ uint4 w4a8_lean_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int row0 = blockIdx.x * 8 * T;
    constexpr int PAIRS = T * 128, PER = (PAIRS + 32 * S - 1) / (32 * S), NT = 32 * S;
    const int gmask = (1 << gshift) - 1;
    const int qpg = gshift > 2 ? 1 << (gshift - 2) : 1;
    const int per = ((kqg + S - 1) / S + qpg - 1) / qpg * qpg;
    const int qa = min(kqg, warp * per), nq = min(kqg, qa + per) - qa;
    // The scales and weight sums in rows gs = groups + 1 apart, so the adding threads of one warp
    // (different rows) read different banks.
    const int gs = groups + 1;
    uint4 *part = w4a8_lean_smem;                                          // [groups][T][32]
    float *sc = reinterpret_cast<float *>(w4a8_lean_smem + groups * T * 32); // [8 T][gs]
    int *ws = reinterpret_cast<int *>(sc + 8 * T * gs);                     // [8 T][gs]
    const int tiles = (n + 7) >> 3;
    // The block's scales and weight sums, copied while the walk runs.
    for (int e = threadIdx.x; e < 8 * T * groups; e += NT) {
        const int rr = e / groups, gg = e - rr * groups;
        const long src = (long)min(row0 + rr, n - 1) * groups + gg;
        const int dst = rr * gs + gg;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((unsigned)__cvta_generic_to_shared(sc + dst)),
                     "l"(scales + src));
        if (!H) {
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                             (unsigned)__cvta_generic_to_shared(ws + dst)),
                         "l"(wsum + src));
        }
#else
        sc[dst] = scales[src];
        if (!H) {
            ws[dst] = wsum[src];
        }
#endif
    }
    cp_async_commit();
    const uint4 *wp[T];
#pragma unroll
    for (int t = 0; t < T; t++) {
        wp[t] = wm + ((long)min((row0 >> 3) + t, tiles - 1) * kqg + qa) * 32 + lane;
    }
    // The levels: per 128 terms 4 x 32 uint4 (both rows) or, with H, 4 x 32 uint2 (rows g).
    const uint4 *ap = frag + (long)qa * 128 + lane;
    const uint2 *ap2 = reinterpret_cast<const uint2 *>(frag) + (long)qa * 128 + lane;
    const bool rows_live = g < batch;
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    constexpr unsigned ONES = 0x01010101u;
    uint4 w[D][T], a[2][4];
#pragma unroll
    for (int d = 0; d < D; d++) {
#pragma unroll
        for (int t = 0; t < T; t++) {
            w[d][t] = d < nq ? __ldg(wp[t] + d * 32) : zero4;
        }
    }
    // Without H, each (row, output) thread's bias and NaN flag are read now, so the adding after
    // the walk waits on no global load (with the L2 cold, one more round trip to memory at the
    // kernel's end): 0.3-1.1 us off every shape on the H100. The half kernels keep the late reads
    // (measured 0.5 us slower at 4096 x 4096 with the early ones, the same elsewhere).
    float bias_r[PER];
    bool nan_r[PER];
    if (!H) {
#pragma unroll
        for (int jj = 0; jj < PER; jj++) {
            int t, i, l, rr, token;
            w4a8_pair<T>(threadIdx.x + jj * NT, batch, t, i, l, rr, token);
            bias_r[jj] = bias && token < batch && row0 + rr < n ? bias[row0 + rr] : 0.0f;
        }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Launched as a programmatic dependent of the levels kernel: its writes are visible after this.
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    if (!H) {
#pragma unroll
        for (int jj = 0; jj < PER; jj++) {
            int t, i, l, rr, token;
            w4a8_pair<T>(threadIdx.x + jj * NT, batch, t, i, l, rr, token);
            nan_r[jj] = token < batch && nanflag[token] == epoch;
        }
    }
    // One fragment of levels for 32 terms: loaded (rows g and g + 8), or with H rows g loaded
    // and rows g + 8 ones.
    auto load_a = [&](int j, int s) -> uint4 {
        if (H) {
            const uint2 v = rows_live ? __ldg(ap2 + j * 128 + s * 32) : make_uint2(0u, 0u);
            return make_uint4(v.x, ONES, v.y, ONES);
        }
        return rows_live ? __ldg(ap + j * 128 + s * 32) : zero4;
    };
#pragma unroll
    for (int d = 0; d < 2; d++) {
#pragma unroll
        for (int s = 0; s < 4; s++) {
            a[d][s] = d < nq ? load_a(d, s) : (H ? make_uint4(0u, ONES, 0u, ONES) : zero4);
        }
    }
    int c[T][4];
#pragma unroll
    for (int t = 0; t < T; t++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            c[t][i] = 0;
        }
    }
    for (int j0 = 0; j0 < nq; j0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            const int j = j0 + d;
            if (j < nq) {
#pragma unroll
                for (int s = 0; s < 4; s++) {
#pragma unroll
                    for (int t = 0; t < T; t++) {
                        const unsigned wd = w4a8_word(w[d][t], s);
                        mma_16832_u8s8(c[t], a[d & 1][s], (wd << 4) & 0xF0F0F0F0u, wd & 0xF0F0F0F0u);
                    }
                    const int step = (qa + j) * 4 + s; // 32-term step in the row
                    const int gi = step >> gshift;
                    if (((step + 1) & gmask) == 0 && gi < groups) {
#pragma unroll
                        for (int t = 0; t < T; t++) {
                            part[(gi * T + t) * 32 + lane] = make_uint4(c[t][0], c[t][1], c[t][2], c[t][3]);
#pragma unroll
                            for (int i = 0; i < 4; i++) {
                                c[t][i] = 0;
                            }
                        }
                    }
                }
                if (j + D < nq) {
#pragma unroll
                    for (int t = 0; t < T; t++) {
                        w[d][t] = __ldg(wp[t] + (j + D) * 32);
                    }
                }
                if (j + 2 < nq && (H || rows_live)) {
#pragma unroll
                    for (int s = 0; s < 4; s++) {
                        a[d & 1][s] = load_a(j + 2, s);
                    }
                }
            }
        }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
    __syncthreads();
    const int *pi = reinterpret_cast<const int *>(part);
#pragma unroll
    for (int jj = 0; jj < PER; jj++) {
        int t, i, l, rr, token;
        w4a8_pair<T>(threadIdx.x + jj * NT, batch, t, i, l, rr, token);
        if (token < batch) {
            const int row = row0 + rr;
            if (row < n) {
                const float *scr = sc + rr * gs;
                const int *wsr = ws + rr * gs;
                float acc = 0.0f;
#pragma unroll 4
                for (int gg = 0; gg < groups; gg++) {
                    // With H the weight sums are the mma's rows 8-15: element i + 2 (i < 2 here).
                    const int *pg = pi + ((gg * T + t) * 32 + l) * 4;
                    const int ws_g = H ? pg[i + 2] >> 4 : wsr[gg];
                    const int sum = (pg[i] >> 4) - zp * ws_g;
                    acc = __fadd_rn(acc, __fmul_rn((float)sum, scr[gg]));
                }
                float out = __fmul_rn(acc, xscale);
                if (bias) {
                    out = __fadd_rn(out, H ? bias[row] : bias_r[jj]);
                }
                if (relu && out < 0.0f) {
                    out = 0.0f;
                }
                const bool nan = H ? nanflag[token] == epoch : nan_r[jj];
                y[(long)token * n + row] = nan ? __int_as_float(0x7fc00000) : out;
            }
        }
    }
}

// Instances sqil_w4a8_lean_t{T}_s{S}_d{D} and, for batches up to 8 on the half levels,
// sqil_w4a8_half_t{T}_s{S}_d{D}.
#define SQIL_W4A8_LEAN_AS(NAME, T, S, D, H)                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * S) NAME(                                                     \
        const uint4 *__restrict__ wm, const float *__restrict__ scales, const int *__restrict__ wsum,             \
        const uint4 *__restrict__ frag, const int *__restrict__ nanflag, const float *__restrict__ bias,         \
        float *__restrict__ y, int n, int kqg, int gshift, int groups, int batch, int zp, float xscale, int relu, \
        int epoch)                                                                                                 \
    {                                                                                                              \
        w4a8_lean_impl<T, S, D, H>(wm, scales, wsum, frag, nanflag, bias, y, n, kqg, gshift, groups, batch, zp,   \
                                   xscale, relu, epoch);                                                           \
    }
#define SQIL_W4A8_LEAN(T, S, D) SQIL_W4A8_LEAN_AS(sqil_w4a8_lean_t##T##_s##S##_d##D, T, S, D, false)
#define SQIL_W4A8_HALF(T, S, D) SQIL_W4A8_LEAN_AS(sqil_w4a8_half_t##T##_s##S##_d##D, T, S, D, true)

SQIL_W4A8_LEAN(2, 8, 4)
SQIL_W4A8_LEAN(2, 8, 8)
SQIL_W4A8_LEAN(4, 8, 4)
SQIL_W4A8_LEAN(1, 8, 8)
SQIL_W4A8_HALF(2, 8, 4)
SQIL_W4A8_HALF(4, 8, 2)

// Instances sqil_w4a8_mma_t{T}_s{S}_q{Q}_d{D}.
#define SQIL_W4A8_MMA(T, S, Q, D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * S) sqil_w4a8_mma_t##T##_s##S##_q##Q##_d##D(                  \
        const uint4 *__restrict__ wm, const float *__restrict__ scales, const uint4 *__restrict__ frag,          \
        const int *__restrict__ nanflag, const float *__restrict__ bias, float *__restrict__ y, int n, int kq,    \
        int gshift, int groups, int batch, int zp, float xscale, int relu, int epoch)                             \
    {                                                                                                              \
        w4a8_mma_impl<T, S, Q, D>(wm, scales, frag, nanflag, bias, y, n, kq, gshift, groups, batch, zp, xscale,   \
                                  relu, epoch);                                                                    \
    }

SQIL_W4A8_MMA(2, 8, 1, 4)
SQIL_W4A8_MMA(2, 8, 2, 4)
SQIL_W4A8_MMA(4, 8, 1, 4)
SQIL_W4A8_MMA(2, 4, 2, 6)
SQIL_W4A8_MMA(2, 8, 1, 8)

// ---------------------------------------------------------------------------------------------
// Dense 3- and 2-bit weight-only GEMV, batch 1 (the widths a bit allocation may choose; see
// sqil_cuda::pack_dense). Per row, chunks of 64 weights: `lo`, a uint4 of four words, word i
// holding elements 16i + 2t (bits 2t, 2t + 1) and 16i + 2t + 1 (bits 16 + 2t, 17 + 2t), t < 8, as
// the low two bits of q + 2^(bits-1); for 3 bits also `hi`, a uint2 of high bits, word i / 2 with
// element 16i + 2t at bit 8 (i % 2) + t and 16i + 2t + 1 at bit 16 + 8 (i % 2) + t. One shift and
// mask (and for 3 bits one more shift, mask and OR) place a pair at bits (0-2, 16-18): OR
// 0x6400_6400 and one half2 subtraction of 1024 + 2^(bits-1) give the two weights exactly.
// 3 bits: 24 bytes per 64 weights; 2 bits: 16. One warp per row, each lane one chunk per step
// (warp reads 768 or 512 contiguous bytes); fp16 scales per group of 32 << gshift; k a multiple
// of 128 (the host pads).
// Half `half32` (32 weights) of a dense chunk (low words q, high words h) against its activations
// xv (eight uint4 for the chunk's 64 fp16 values): the sum of products in fp32.
template <int BITS>
__device__ __forceinline__ float qd_half_dot(const uint4 q, const uint2 h, const uint4 (&xv)[8], int half32)
{
    const unsigned int words[4] = {q.x, q.y, q.z, q.w};
    const sqil_half2 magic = BITS == 3 ? 0x64046404u : 0x64026402u;
    float part = 0.0f;
#pragma unroll
    for (int i = 2 * half32; i < 2 * half32 + 2; i++) {
        const unsigned int hw = i < 2 ? h.x : h.y;
        sqil_half2 wv[8];
#pragma unroll
        for (int t = 0; t < 8; t++) {
            unsigned int pair = (words[i] >> (2 * t)) & 0x00030003u;
            if (BITS == 3) {
                pair |= ((hw >> (8 * (i % 2) + t)) & 0x00010001u) << 2;
            }
            wv[t] = h2_sub(pair | 0x64006400u, magic);
        }
        part += q4_dot8(wv, xv[2 * i]) + q4_dot8(wv + 4, xv[2 * i + 1]);
    }
    return part;
}

// Split-K over the S warps of a block, R rows per block: each lane loads a chunk's activations
// once for the R rows (the int4 split-K kernel's structure, sqil_q4_gemv_s*); partial sums meet
// in shared memory and are added in warp order.
template <int BITS, int R, int S>
__device__ __forceinline__ void qd_gemv_split_impl(const uint4 *__restrict__ lo, const uint2 *__restrict__ hi,
                                                   const sqil_half *__restrict__ scales,
                                                   const sqil_half *__restrict__ x, const sqil_half *__restrict__ bias,
                                                   sqil_half *__restrict__ y, int n, int k, int gshift, int relu)
{
    __shared__ float part[S][R];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * R;
    const int chunks = k >> 6;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        acc[r] = 0.0f;
    }
    for (int c = warp * 32 + lane; c < chunks; c += 32 * S) {
        uint4 xv[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            xv[i] = __ldg(reinterpret_cast<const uint4 *>(x + (size_t)c * 64) + i);
        }
        uint4 q[R];
        uint2 h[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int row = min(row0 + r, n - 1);
            q[r] = __ldg(lo + (size_t)row * chunks + c);
            h[r] = BITS == 3 ? __ldg(hi + (size_t)row * chunks + c) : make_uint2(0, 0);
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int row = min(row0 + r, n - 1);
#pragma unroll
            for (int half32 = 0; half32 < 2; half32++) {
                const int e = c * 64 + half32 * 32;
                acc[r] += qd_half_dot<BITS>(q[r], h[r], xv, half32) *
                          h_to_f(scales[(size_t)row * (k >> (5 + gshift)) + (e >> (5 + gshift))]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        float v = acc[r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            v += __shfl_xor_sync(0xffffffffu, v, o);
        }
        if (lane == 0) {
            part[warp][r] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x < R && row0 + (int)threadIdx.x < n) {
        const int r = threadIdx.x, row = row0 + r;
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < S; w++) {
            v += part[w][r];
        }
        if (bias != nullptr) {
            v += h_to_f(bias[row]);
        }
        if (relu && v < 0.0f) {
            v = 0.0f;
        }
        y[row] = f_to_h(v);
    }
}

extern "C" __global__ void __launch_bounds__(128)
    sqil_q3_gemv_s4_r4(const uint4 *__restrict__ lo, const uint2 *__restrict__ hi, const sqil_half *__restrict__ scales,
                       const sqil_half *__restrict__ x, const sqil_half *__restrict__ bias, sqil_half *__restrict__ y,
                       int n, int k, int gshift, int relu)
{
    qd_gemv_split_impl<3, 4, 4>(lo, hi, scales, x, bias, y, n, k, gshift, relu);
}

extern "C" __global__ void __launch_bounds__(128)
    sqil_q2_gemv_s4_r4(const uint4 *__restrict__ lo, const uint2 *__restrict__ hi, const sqil_half *__restrict__ scales,
                       const sqil_half *__restrict__ x, const sqil_half *__restrict__ bias, sqil_half *__restrict__ y,
                       int n, int k, int gshift, int relu)
{
    qd_gemv_split_impl<2, 4, 4>(lo, hi, scales, x, bias, y, n, k, gshift, relu);
}

template <int BITS>
__device__ __forceinline__ void qd_gemv_b1_impl(const uint4 *__restrict__ lo, const uint2 *__restrict__ hi,
                                                const sqil_half *__restrict__ scales, const sqil_half *__restrict__ x,
                                                const sqil_half *__restrict__ bias, sqil_half *__restrict__ y, int n,
                                                int k, int gshift, int relu)
{
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n) {
        return;
    }
    const int chunks = k >> 6;
    float acc = 0.0f;
    for (int c = lane; c < chunks; c += 32) {
        const uint4 q = __ldg(lo + (size_t)row * chunks + c);
        const uint2 h = BITS == 3 ? __ldg(hi + (size_t)row * chunks + c) : make_uint2(0, 0);
        uint4 xv[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            xv[i] = __ldg(reinterpret_cast<const uint4 *>(x + (size_t)c * 64) + i);
        }
#pragma unroll
        for (int half32 = 0; half32 < 2; half32++) {
            const int e = c * 64 + half32 * 32;
            acc += qd_half_dot<BITS>(q, h, xv, half32) * h_to_f(scales[(size_t)row * (k >> (5 + gshift)) + (e >> (5 + gshift))]);
        }
    }
    q4_store(acc, lane, bias, relu, y, row, row);
}

extern "C" __global__ void __launch_bounds__(128)
    sqil_q3_gemv_b1(const uint4 *__restrict__ lo, const uint2 *__restrict__ hi, const sqil_half *__restrict__ scales,
                    const sqil_half *__restrict__ x, const sqil_half *__restrict__ bias, sqil_half *__restrict__ y,
                    int n, int k, int gshift, int relu)
{
    qd_gemv_b1_impl<3>(lo, hi, scales, x, bias, y, n, k, gshift, relu);
}

extern "C" __global__ void __launch_bounds__(128)
    sqil_q2_gemv_b1(const uint4 *__restrict__ lo, const uint2 *__restrict__ hi, const sqil_half *__restrict__ scales,
                    const sqil_half *__restrict__ x, const sqil_half *__restrict__ bias, sqil_half *__restrict__ y,
                    int n, int k, int gshift, int relu)
{
    qd_gemv_b1_impl<2>(lo, hi, scales, x, bias, y, n, k, gshift, relu);
}
