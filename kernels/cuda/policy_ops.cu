// sqil CUDA: a policy plan's steps (the GPU lowering, crates/cuda/src/lower.rs) other than the
// element-wise chains generated per policy, on f32 activations. The int4 layers, float linear
// maps and convolutions compute the CPU runtime's arithmetic operation for operation (exact
// integer sums, the epilogue's products and sums each rounded once with __fmul_rn / __fadd_rn,
// one __fmaf_rn chain per float output), so their outputs are the CPU's bits.

// a op b: op 0 add, 1 sub, 2 mul, 3 div.
__device__ __forceinline__ float sqil_binop(float a, float b, int op)
{
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    default: return a / b;
    }
}

// ---------------------------------------------------------------------------------------------
// The other ops of convolutional and transformer policies (`crates/cuda/src/policy.rs`, generic
// kernel steps): f32 buffers and constants. Simple one-thread-per-output (or
// one-warp-per-row) kernels: these policies are small, and their time is launch-bound.

// y[pairs[2i]] = x[pairs[2i + 1]]: one source's part of a data-movement op's output.
SQIL_KERNEL void sqil_copy_pairs(SQIL_VARGS const float *__restrict__ x, float *__restrict__ y,
                                           const int *__restrict__ pairs, int m)
{
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i < m) {
        y[pairs[2 * i]] = x[pairs[2 * i + 1]];
    }
}

// sqil_copy_pairs from two sources in one launch: pairs 0..m0 read x0, pairs m0..m read x1.
SQIL_KERNEL void sqil_copy_pairs2(SQIL_VARGS const float *__restrict__ x0, const float *__restrict__ x1,
                                            float *__restrict__ y, const int *__restrict__ pairs, int m0, int m)
{
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i < m) {
        y[pairs[2 * i]] = (i < m0 ? x0 : x1)[pairs[2 * i + 1]];
    }
}

// y[idx[i]] = v[i]: a movement op's elements that come from constants.
SQIL_KERNEL void sqil_set_consts(SQIL_VARGS float *__restrict__ y, const int *__restrict__ idx,
                                           const float *__restrict__ v, int m)
{
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i < m) {
        y[idx[i]] = (v[i]);
    }
}

// y[i] = a op b, each operand fp16 (ah) or fp32 (af, a constant), read at ia[i] (or i when ia is
// null): numpy broadcasting as index tables. op 0 add, 1 sub, 2 mul, 3 div, 4 PRelu (a < 0 ? a * b : a).
SQIL_KERNEL void sqil_binary_bcast(SQIL_VARGS const float *__restrict__ ah, const float *__restrict__ af,
                                             const int *__restrict__ ia, const float *__restrict__ bh,
                                             const float *__restrict__ bf, const int *__restrict__ ib,
                                             float *__restrict__ y, int n, int op)
{
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i >= n) {
        return;
    }
    const int ja = ia ? ia[i] : i, jb = ib ? ib[i] : i;
    const float a = ah ? (ah[ja]) : af[ja];
    const float b = bh ? (bh[jb]) : bf[jb];
    y[i] = (op == 4 ? (a < 0.0f ? a * b : a) : sqil_binop(a, b, op));
}

// The four partial sums lanes 0-3 of a warp hold (the others 0), added as (s0 + s1) + (s2 + s3)
// (the CPU's Softmax and LayerNorm row sums), on every lane.
__device__ __forceinline__ double sqil_sum4(double s)
{
    const double t = __dadd_rn(s, __shfl_down_sync(0xffffffffu, s, 1));
    return __shfl_sync(0xffffffffu, __dadd_rn(t, __shfl_down_sync(0xffffffffu, t, 2)), 0);
}

// Softmax over rows of `dim` as the CPU defines it (sqil_kernels_cpu::generic::softmax_rows), so
// the same bits: in double, the row maximum (NaN ignored), e_j = sqil_exp_nonpos(x_j - max),
// their sum as four partial sums (term j into sum j % 4, in order) added as (s0 + s1) + (s2 +
// s3), each e_j / sum rounded to f32. One warp per row: the lanes compute the e_j into `scratch`
// (dim doubles per row), lanes 0-3 add the partial sums, the lanes divide.
SQIL_KERNEL void sqil_softmax_rows(SQIL_VARGS const float *__restrict__ x, float *__restrict__ y,
                                             float *__restrict__ scratch, int rows, int dim)
{
    const int r = (SQIL_BX * SQIL_BDIM + SQIL_TX) / 32, lane = SQIL_TX % 32;
    if (r >= rows) {
        return;
    }
    const float *xr = x + (long)r * dim;
    double *er = reinterpret_cast<double *>(scratch) + (long)r * dim;
    double m = __longlong_as_double(0xfff0000000000000ull);
    for (int j = lane; j < dim; j += 32) {
        m = fmax(m, (double)xr[j]);
    }
    for (int o = 16; o > 0; o /= 2) {
        m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    for (int j = lane; j < dim; j += 32) {
        er[j] = sqil_exp_nonpos(__dsub_rn((double)xr[j], m));
    }
    __syncwarp();
    double s = 0.0;
    if (lane < 4) {
        for (int j = lane; j < dim; j += 4) {
            s = __dadd_rn(s, er[j]);
        }
    }
    s = sqil_sum4(s);
    for (int j = lane; j < dim; j += 32) {
        y[(long)r * dim + j] = __double2float_rn(__ddiv_rn(er[j], s));
    }
}

// x[j0], x[j0 + 4], ..., x[j0 + 60] into t (0 past n): sixteen loads issued together.
__device__ __forceinline__ void sqil_load16_by4(const float *__restrict__ x, int j0, int n, float *t)
{
#pragma unroll
    for (int i = 0; i < 16; i++) {
        t[i] = j0 + 4 * i < n ? x[j0 + 4 * i] : 0.0f;
    }
}

// LayerNormalization over rows of `dim` as the CPU defines it (layer_norm_rows), so the same
// bits: in double, the mean and then the variance as four partial sums (term j into sum j % 4,
// in order; of x, then of (x - mean)^2) added as (s0 + s1) + (s2 + s3) and divided by dim, r = 1 /
// sqrt(var + eps), each output ((x - mean) r) scale_j + bias_j (0 without a bias) rounded to f32.
// One warp per row, lanes 0-3 the partial sums.
SQIL_KERNEL void sqil_layernorm_rows(SQIL_VARGS const float *__restrict__ x, float *__restrict__ y,
                                               const float *__restrict__ scale, const float *__restrict__ bias,
                                               int rows, int dim, float eps)
{
    const int r = (SQIL_BX * SQIL_BDIM + SQIL_TX) / 32, lane = SQIL_TX % 32;
    if (r >= rows) {
        return;
    }
    const float *xr = x + (long)r * dim;
    const double n = (double)dim;
    // The lane's first four outputs' x, scale and bias (j = lane + 32 i) are loaded before the
    // sums, so their round trips overlap the mean's and the variance's arithmetic.
    float xv[4], sv[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int j = lane + 32 * i;
        xv[i] = j < dim ? xr[j] : 0.0f;
        sv[i] = j < dim ? scale[j] : 0.0f;
        bv[i] = j < dim && bias ? bias[j] : 0.0f;
    }
    // Each partial sum's terms sixteen at a time: the sixteen loads first, then the adds in order
    // (a plain loop waited on each term's load in turn).
    double s = 0.0;
    if (lane < 4) {
        for (int j0 = lane; j0 < dim; j0 += 64) {
            float t[16];
            sqil_load16_by4(xr, j0, dim, t);
#pragma unroll
            for (int i = 0; i < 16; i++) {
                if (j0 + 4 * i < dim) {
                    s = __dadd_rn(s, (double)t[i]);
                }
            }
        }
    }
    const double mean = __ddiv_rn(sqil_sum4(s), n);
    double v = 0.0;
    if (lane < 4) {
        for (int j0 = lane; j0 < dim; j0 += 64) {
            float t[16];
            sqil_load16_by4(xr, j0, dim, t);
#pragma unroll
            for (int i = 0; i < 16; i++) {
                if (j0 + 4 * i < dim) {
                    const double d = __dsub_rn((double)t[i], mean);
                    v = __dadd_rn(v, __dmul_rn(d, d));
                }
            }
        }
    }
    const double var = __ddiv_rn(sqil_sum4(v), n);
    const double inv = __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(var, (double)eps)));
    const auto out = [&](int j, float xj, float sj, float bj) {
        const double t = __dmul_rn(__dmul_rn(__dsub_rn((double)xj, mean), inv), (double)sj);
        y[(long)r * dim + j] = __double2float_rn(__dadd_rn(t, bias ? (double)bj : 0.0));
    };
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (lane + 32 * i < dim) {
            out(lane + 32 * i, xv[i], sv[i], bv[i]);
        }
    }
    for (int j = lane + 128; j < dim; j += 32) {
        out(j, xr[j], scale[j], bias ? bias[j] : 0.0f);
    }
}

// Batched MatMul of two computed operands (attention): y[q] = a[offs[2q]] @ b[offs[2q + 1]],
// [m, k] @ [k, n] per batch; one thread per output, one fma chain over k (the CPU's bits).
SQIL_KERNEL void sqil_bmm(SQIL_VARGS const float *__restrict__ a, const float *__restrict__ b,
                                    float *__restrict__ y, const int *__restrict__ offs, int batches, int m, int k,
                                    int n)
{
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i >= batches * m * n) {
        return;
    }
    const int q = i / (m * n), r = (i / n) % m, c = i % n;
    const float *qa = a + offs[2 * q] + r * k, *qb = b + offs[2 * q + 1] + c;
    float s = 0.0f;
    for (int t = 0; t < k; t++) {
        s = __fmaf_rn(qa[t], qb[t * n], s);
    }
    y[i] = (s);
}

// The per-tensor activation quantizer (FakeQuant) on one value, as sqil_fake_quant; s = 0: none.
__device__ __forceinline__ float sqil_fq(float v, float s, float z, float lo, float hi)
{
    if (s == 0.0f) {
        return v;
    }
    float q = rintf(v / s) + z;
    q = q < lo ? lo : (q > hi ? hi : q);
    return (q - z) * s;
}

// The epilogue of a layer that applies nothing after its bias and Relu.
struct sqil_epi_none {
    __device__ static __forceinline__ float f(float v)
    {
        return v;
    }
};

// A layer's output value v at index i, and with `lv` its int8 level too (sqil_level with the next
// int4 layer's quantizer, as sqil_levels would compute it from y[i]): the layer's levels epilogue,
// which saves that layer a sqil_levels step.
__device__ __forceinline__ void sqil_put(float *__restrict__ y, long i, float v, float *__restrict__ lv, float ls,
                                         float lz, float llo, float lhi)
{
    y[i] = v;
    if (lv) {
        lv[i] = sqil_level(v, ls, lz, llo, lhi);
    }
}

// The interpreter's Relu (`x < 0 ? 0 : x`: NaN and -0 pass) when `relu` is set: a float layer's
// epilogue where a Relu reads nothing else (the lowering folds it).
__device__ __forceinline__ float sqil_relu_if(float v, int relu)
{
    return relu && v < 0.0f ? 0.0f : v;
}

// A float layer with constant fp32 weights w[k][n]: y[r, c] = x[r] . w[:, c] (+ bias[c]) (then the
// Relu when `relu` is set), x read
// through the deferred activation quantizer fq (s = 0: none): the policy GEMM's arithmetic (one
// fused multiply-add chain over k from +0, then the bias added), the CPU's bits. One warp per
// `opw` outputs (1 or 2: outputs opw * warp and the next, in one row: the host passes 2 only for
// one row or an even n; 0: a thread per output, see sqil_linear_f32w_t), their chains interleaved over the same shuffled inputs: the lanes load
// 32 consecutive terms at a time (coalesced, four batches ahead, so a batch's loads are in flight
// while three others are summed; the quantizer is applied when a batch is taken up, so its
// division does not hold the next batch's loads back), and every lane runs the same chains over
// them through shuffles (a spatial softmax's keypoint MatMul has thousands of terms and a handful
// of outputs: the chain's latency is the cost). Terms past k are skipped, not added as zeros
// (fma(0, 0, -0) is +0), and batches past k not shuffled (a 15-input first layer has one partial
// batch).
#define SQIL_F32W_AHEAD 4
// Warps per block whose batches sqil_f32w_chains stages in shared memory (a program's blocks
// have 256 threads; a launch at most 1024).
#ifdef SQIL_MEGA
#define SQIL_F32W_WARPS 8
#else
#define SQIL_F32W_WARPS 32
#endif
// The chains of output c (and, with TWO, c1) of row xr: their sums s0 (s1). Each batch of 32
// terms is staged in the warp's shared memory and every lane reads it back four terms per 16-byte
// broadcast load: a quarter of the shared-memory pipe's instructions of two shuffles per term
// (that pipe issues one warp instruction per cycle per multiprocessor; eight warps of 376-term
// chains spent about 3.4 us on the shuffles alone). A humanoid-sized first layer (376 -> 400)
// 7.5 -> 5.9 us on the H100.
template <bool TWO>
__device__ __forceinline__ void sqil_f32w_chains(const float *__restrict__ xr, const float *__restrict__ w, int k, int n,
                                                 int c, int c1, int lane, float qs, float qz, float qlo, float qhi,
                                                 float &s0, float &s1)
{
    __shared__ __align__(16) float sx[SQIL_F32W_WARPS][32], sw0[SQIL_F32W_WARPS][32],
        sw1[SQIL_F32W_WARPS][TWO ? 32 : 4];
    const int wid = threadIdx.x >> 5;
    float xv[SQIL_F32W_AHEAD], wv0[SQIL_F32W_AHEAD], wv1[SQIL_F32W_AHEAD];
#pragma unroll
    for (int d = 0; d < SQIL_F32W_AHEAD; d++) {
        const int t = 32 * d + lane;
        xv[d] = t < k ? xr[t] : 0.0f;
        wv0[d] = t < k ? w[(long)t * n + c] : 0.0f;
        wv1[d] = TWO && t < k ? w[(long)t * n + c1] : 0.0f;
    }
    for (int t0 = 0; t0 < k; t0 += 32 * SQIL_F32W_AHEAD) {
#pragma unroll
        for (int d = 0; d < SQIL_F32W_AHEAD; d++) {
            const int tb = t0 + 32 * d, tn = tb + 32 * SQIL_F32W_AHEAD + lane;
            if (tb >= k) {
                break; // the same for the whole warp
            }
            const float xn = tn < k ? xr[tn] : 0.0f;
            const float wn0 = tn < k ? w[(long)tn * n + c] : 0.0f;
            const float wn1 = TWO && tn < k ? w[(long)tn * n + c1] : 0.0f;
            const float xq = tb + lane < k ? sqil_fq(xv[d], qs, qz, qlo, qhi) : 0.0f;
            const int cnt = k - tb;
            __syncwarp(); // every lane has read the previous batch
            sx[wid][lane] = xq;
            sw0[wid][lane] = wv0[d];
            if (TWO) {
                sw1[wid][lane] = wv1[d];
            }
            __syncwarp();
            if (cnt >= 32) {
                const float4 *x4 = reinterpret_cast<const float4 *>(sx[wid]);
                const float4 *w4 = reinterpret_cast<const float4 *>(sw0[wid]);
                const float4 *v4 = reinterpret_cast<const float4 *>(sw1[wid]);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const float4 a = x4[j], b = w4[j];
                    s0 = __fmaf_rn(a.x, b.x, s0);
                    s0 = __fmaf_rn(a.y, b.y, s0);
                    s0 = __fmaf_rn(a.z, b.z, s0);
                    s0 = __fmaf_rn(a.w, b.w, s0);
                    if (TWO) {
                        const float4 c = v4[j];
                        s1 = __fmaf_rn(a.x, c.x, s1);
                        s1 = __fmaf_rn(a.y, c.y, s1);
                        s1 = __fmaf_rn(a.z, c.z, s1);
                        s1 = __fmaf_rn(a.w, c.w, s1);
                    }
                }
            } else {
                // The last, partial batch (a short first layer's only one): its terms only.
                for (int j = 0; j < cnt; j++) {
                    const float xj = sx[wid][j];
                    s0 = __fmaf_rn(xj, sw0[wid][j], s0);
                    if (TWO) {
                        s1 = __fmaf_rn(xj, sw1[wid][j], s1);
                    }
                }
            }
            xv[d] = xn;
            wv0[d] = wn0;
            wv1[d] = wn1;
        }
    }
}

// The parameters of sqil_linear_f32w, and its body over an epilogue E (E::f of each output value
// after the bias and Relu, before it is stored: a generated element-wise chain that reads only
// this layer's output, `SQIL_F32W_EPI`; sqil_epi_none for the plain kernel).
#define SQIL_F32W_PARAMS                                                                                            \
    const float *__restrict__ x, const float *__restrict__ w, const float *__restrict__ bias, float *__restrict__ y,  \
        int rows, int k, int n, float qs, float qz, float qlo, float qhi, int relu, int opw, float *__restrict__ lvout, \
        float ls, float lz, float llo, float lhi
#define SQIL_F32W_ARGS x, w, bias, y, rows, k, n, qs, qz, qlo, qhi, relu, opw, lvout, ls, lz, llo, lhi
template <class E>
__device__ __forceinline__ void sqil_linear_f32w_t(const unsigned bx, const unsigned tx, SQIL_F32W_PARAMS)
{
    if (opw == 0) {
        // A thread per output (the lowering's choice for a short first layer too wide for a
        // cluster of 16 blocks at a warp per output, `fit_cluster`): the same chain, each thread
        // loading its terms itself (the row's inputs the same for every thread, the weights of
        // consecutive outputs consecutive), no shuffles.
        const long o = (long)bx * SQIL_BDIM + tx;
        if (o >= (long)rows * n) {
            return;
        }
        const int r = (int)(o / n), c = (int)(o % n);
        const float *xr = x + (long)r * k;
        const float bv = bias ? bias[c] : 0.0f;
        float s = 0.0f;
        for (int t = 0; t < k; t++) {
            s = __fmaf_rn(sqil_fq(xr[t], qs, qz, qlo, qhi), w[(long)t * n + c], s);
        }
        sqil_put(y, o, E::f(sqil_relu_if(bias ? __fadd_rn(s, bv) : s, relu)), lvout, ls, lz, llo, lhi);
        return;
    }
    const long o = ((long)bx * SQIL_BDIM + tx) / 32 * opw;
    const int lane = tx % 32;
    if (o >= (long)rows * n) {
        return; // the whole warp
    }
    const int r = (int)(o / n), c = (int)(o % n);
    const bool two = opw == 2 && c + 1 < n; // the same for the whole warp
    const int c1 = two ? c + 1 : c;
    const float *xr = x + (long)r * k;
    // Lane 0 stores output c, lane 1 output c1 (every lane holds both sums), through the same
    // instructions, so an epilogue's arithmetic runs for both at once; their biases are loaded
    // before the chains and used after them.
    const int cl = lane == 0 ? c : c1;
    const bool stores = lane == 0 || (two && lane == 1);
    const float bv = bias && stores ? bias[cl] : 0.0f;
    float s0 = 0.0f, s1 = 0.0f;
    if (two) {
        sqil_f32w_chains<true>(xr, w, k, n, c, c1, lane, qs, qz, qlo, qhi, s0, s1);
    } else {
        sqil_f32w_chains<false>(xr, w, k, n, c, c1, lane, qs, qz, qlo, qhi, s0, s1);
    }
    if (stores) {
        const float sl = lane == 0 ? s0 : s1;
        sqil_put(y, (long)r * n + cl, E::f(sqil_relu_if(bias ? __fadd_rn(sl, bv) : sl, relu)), lvout, ls, lz, llo,
                 lhi);
    }
}

SQIL_KERNEL void sqil_linear_f32w(SQIL_VARGS SQIL_F32W_PARAMS)
{
    sqil_linear_f32w_t<sqil_epi_none>(SQIL_BX, SQIL_TX, SQIL_F32W_ARGS);
}

// A layer body BODY<E> over PARAMS (passing ARGS) with the epilogue E, as kernel NAME.
#define SQIL_WITH_EPI(NAME, BODY, PARAMS, ARGS, E)                                                                  \
    SQIL_KERNEL void NAME(SQIL_VARGS PARAMS)                                                                        \
    {                                                                                                               \
        BODY<E>(SQIL_BX, SQIL_TX, ARGS);                                                                            \
    }

// sqil_linear_f32w with the epilogue E, as kernel NAME (the lowering names it
// sqil_linear_f32w__e<hash of E>).
#define SQIL_F32W_EPI(NAME, E) SQIL_WITH_EPI(NAME, sqil_linear_f32w_t, SQIL_F32W_PARAMS, SQIL_F32W_ARGS, E)

// sqil_linear_f32w for many rows (a transformer's projections of its tokens): the same chain per
// output (fma over k in order from +0, then the bias), one thread per output instead of a warp.
// A block of 256 threads computes 16 rows x 32 columns in stages of 64 terms: the rows' inputs
// (through fq) and the weights go to shared memory, and thread (w, l) runs the chains of rows w
// and w + 8 of column l (every lane of a warp reads the same input, each its own column's weight).
// The next stage's inputs and weights are loaded into registers before the current stage's
// chains run, so their latency overlaps the arithmetic.
#define SQIL_F32T_R 16
#define SQIL_F32T_K 64
SQIL_KERNEL void SQIL_LAUNCH_BOUNDS(256) sqil_linear_f32w_tile(SQIL_VARGS const float *__restrict__ x,
    const float *__restrict__ w, const float *__restrict__ bias, float *__restrict__ y, int rows, int k, int n,
    float qs, float qz, float qlo, float qhi, int relu)
{
    __shared__ float xs[SQIL_F32T_R][SQIL_F32T_K + 1];
    __shared__ float ws[SQIL_F32T_K][32];
    const int tiles_n = (n + 31) / 32;
    const int r0 = (SQIL_BX / tiles_n) * SQIL_F32T_R, c0 = (SQIL_BX % tiles_n) * 32;
    const int t = SQIL_TX, lane = t % 32, wy = t / 32, c = c0 + lane;
    // This thread's share of a stage: four inputs of row t / 16 (terms 4 (t % 16)..), and the
    // weights of column t % 32 for terms t / 32 + 8 j.
    const int xi = t / 16, xq = 4 * (t % 16);
    float xr[4], wr[8];
#define SQIL_F32T_LOAD(K0)                                                                                 \
    do {                                                                                                   \
        _Pragma("unroll") for (int b = 0; b < 4; b++)                                                      \
        {                                                                                                  \
            const int r = r0 + xi, kk = (K0) + xq + b;                                                     \
            xr[b] = r < rows && kk < k ? x[(long)r * k + kk] : 0.0f;                                       \
        }                                                                                                  \
        _Pragma("unroll") for (int j = 0; j < 8; j++)                                                      \
        {                                                                                                  \
            const int kk = (K0) + wy + 8 * j;                                                              \
            wr[j] = kk < k && c < n ? w[(long)kk * n + c] : 0.0f;                                          \
        }                                                                                                  \
    } while (0)
    SQIL_F32T_LOAD(0);
    float s[2] = {0.0f, 0.0f};
    for (int k0 = 0; k0 < k; k0 += SQIL_F32T_K) {
        __syncthreads();
#pragma unroll
        for (int b = 0; b < 4; b++) {
            xs[xi][xq + b] = r0 + xi < rows && k0 + xq + b < k ? sqil_fq(xr[b], qs, qz, qlo, qhi) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            ws[wy + 8 * j][lane] = wr[j];
        }
        __syncthreads();
        if (k0 + SQIL_F32T_K < k) {
            SQIL_F32T_LOAD(k0 + SQIL_F32T_K);
        }
        // Terms past k are skipped, not added as zeros (fma(0, 0, -0) is +0).
        const int cnt = k - k0 < SQIL_F32T_K ? k - k0 : SQIL_F32T_K;
        if (cnt == SQIL_F32T_K) {
#pragma unroll 16
            for (int q = 0; q < SQIL_F32T_K; q++) {
                const float wv = ws[q][lane];
                s[0] = __fmaf_rn(xs[wy][q], wv, s[0]);
                s[1] = __fmaf_rn(xs[wy + 8][q], wv, s[1]);
            }
        } else {
            for (int q = 0; q < cnt; q++) {
                const float wv = ws[q][lane];
                s[0] = __fmaf_rn(xs[wy][q], wv, s[0]);
                s[1] = __fmaf_rn(xs[wy + 8][q], wv, s[1]);
            }
        }
    }
#undef SQIL_F32T_LOAD
    if (c < n) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int r = r0 + wy + 8 * i;
            if (r < rows) {
                y[(long)r * n + c] = sqil_relu_if(bias ? __fadd_rn(s[i], bias[c]) : s[i], relu);
            }
        }
    }
}

// x quantized by sqil_level, or x itself (already a level) when s is 0.
__device__ __forceinline__ float sqil_level_or(float x, float s, float z, float lo, float hi)
{
    return s == 0.0f ? x : sqil_level(x, s, z, lo, hi);
}

SQIL_KERNEL void sqil_levels(SQIL_VARGS const float *__restrict__ x, float *__restrict__ lv, int n, float s, float z,
                                       float lo, float hi)
{
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i < n) {
        lv[i] = sqil_level(x[i], s, z, lo, hi);
    }
}

// Signed int8 weight (c, kk) of an int4 layer: rows of k bytes per output channel, four to a word
// (k4 words per row).
// Weight kk of a row from its word (four signed bytes, kk % 4 the byte).
__device__ __forceinline__ int sqil_w8_of(unsigned word, int kk)
{
    return (int)(signed char)((word >> (8 * (kk % 4))) & 255u);
}

__device__ __forceinline__ int sqil_w8(const unsigned *__restrict__ wq, int k4, int c, int kk)
{
    return sqil_w8_of(wq[(long)c * k4 + kk / 4], kk);
}

// sqil_q4_span (below) for C output channels ch[0..C-1] of the same row, B terms a batch: each
// term's input is loaded once for all C channels, and a batch's inputs and weight words are all
// loaded before any is used (sqil_q4_span: one channel, eight terms; sqil_q4_int's two outputs per
// warp: two, eight; its four: four, four).
template <int C, int B>
__device__ __forceinline__ void sqil_q4_span_n(const float *__restrict__ xr, const unsigned *__restrict__ wq, int k4,
                                               const int (&ch)[C], int from, int end, int step, float qs, float qz,
                                               float qlo, float qhi, int *nan, int (&s)[C])
{
    // Local sums, stored once at the end (summing into the caller's array compiled to a
    // different, longer loop).
    int a[C];
#pragma unroll
    for (int i = 0; i < C; i++) {
        a[i] = 0;
    }
    for (int kk0 = from; kk0 < end; kk0 += B * step) {
        float v[B];
        unsigned w[C][B];
#pragma unroll
        for (int t = 0; t < B; t++) {
            const int kk = kk0 + t * step;
            v[t] = kk < end ? xr[kk] : 0.0f;
#pragma unroll
            for (int i = 0; i < C; i++) {
                w[i][t] = kk < end ? wq[(long)ch[i] * k4 + kk / 4] : 0u;
            }
        }
#pragma unroll
        for (int t = 0; t < B; t++) {
            const int kk = kk0 + t * step;
            if (kk < end) {
                const float l = sqil_level_or(v[t], qs, qz, qlo, qhi);
                if (l != l) {
                    *nan = 1;
                } else {
#pragma unroll
                    for (int i = 0; i < C; i++) {
                        a[i] += sqil_w8_of(w[i][t], kk) * (int)l;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < C; i++) {
        s[i] = a[i];
    }
}

// The exact integer sum over terms from, from + step, ... (< end) of weight x level for output
// channel c, levels read through sqil_level_or (NaN sets nan and adds nothing). Eight terms'
// inputs and weight words are loaded before any is used, so eight loads are in flight rather than
// one per dependent step (a lane walking a group of a long row waited on each load in turn). Used
// by sqil_q4_int's group-per-lane and lanes-per-group forms and sqil_q4_int_groups.
__device__ __forceinline__ int sqil_q4_span(const float *__restrict__ xr, const unsigned *__restrict__ wq, int k4,
                                            int c, int from, int end, int step, float qs, float qz, float qlo,
                                            float qhi, int *nan)
{
    const int ch[1] = {c};
    int s[1];
    sqil_q4_span_n<1, 8>(xr, wq, k4, ch, from, end, step, qs, qz, qlo, qhi, nan, s);
    return s[0];
}

// The runtime's epilogue after the group sums: acc * xscale, + the bias value bv (where has_bias),
// ReLU, NaN when any input was. A warp-per-output kernel loads bv before its sums, so that round
// trip to memory overlaps theirs.
__device__ __forceinline__ float sqil_q4_epilogue_v(float acc, float xscale, int has_bias, float bv, int relu, int nan)
{
    float out = __fmul_rn(acc, xscale);
    if (has_bias) {
        out = __fadd_rn(out, bv);
    }
    if (relu && out < 0.0f) {
        out = 0.0f;
    }
    return nan ? __int_as_float(0x7fc00000) : out;
}

// sqil_q4_epilogue_v with output channel c's bias read from `bias` (null: none).
__device__ __forceinline__ float sqil_q4_epilogue(float acc, float xscale, const float *__restrict__ bias, int c,
                                                  int relu, int nan)
{
    return sqil_q4_epilogue_v(acc, xscale, bias != nullptr, bias ? bias[c] : 0.0f, relu, nan);
}

// sqil_q4_int's sum over groups of output channel c (every lane returns it) for 32 groups or more
// (fewer take the lanes-per-group form): each lane sums whole groups (lane j groups j, j + 32,
// ...), and the lanes' products are added in group order through shuffles.
__device__ __forceinline__ float sqil_q4_int_acc(const float *__restrict__ xr, const unsigned *__restrict__ wq,
                                                 const float *__restrict__ scales, int k4, int c, int k, int group,
                                                 int groups, int lane, float qs, float qz, float qlo, float qhi,
                                                 int *nan)
{
    float acc = 0.0f;
    for (int g0 = 0; g0 < groups; g0 += 32) {
        const int g = g0 + lane;
        float p = 0.0f;
        if (g < groups) {
            const float sc = scales[(long)c * groups + g];
            const int end = (g + 1) * group < k ? (g + 1) * group : k;
            const int s = sqil_q4_span(xr, wq, k4, c, g * group, end, 1, qs, qz, qlo, qhi, nan);
            p = __fmul_rn((float)s, sc);
        }
        const int cnt = groups - g0 < 32 ? groups - g0 : 32;
        for (int j = 0; j < cnt; j++) {
            acc = __fadd_rn(acc, __shfl_sync(0xffffffffu, p, j));
        }
    }
    return acc;
}

// An int4 linear map on integer activations over `rows` rows, y [rows, n], the input quantized as
// it is read (sqil_level: the CPU's int8 quantizer with scale qs, zero qz, range [qlo, qhi]; qs = 0:
// x holds the levels already, from sqil_levels),
// the CPU runtime's arithmetic: per group the exact integer sum of w * level, then
// acc += float(sum) * scale (each rounded) in group order, then sqil_q4_epilogue; NaN in the row
// makes every output NaN. One warp per `opw` outputs (1, 2 or 4, sqil_q4_int_four: outputs opw *
// warp and the next, in one row: the host passes 2 or 4 only for one row or n a multiple; the
// lanes-per-group form sums both at
// once over the same loaded levels, the group-per-lane form one after the other). With at least
// 32 groups each lane sums whole groups (lane j groups j, j + 32, ...) and the lanes' products are
// added in group order through shuffles; with fewer, each group gets the same power of two of
// lanes, as many as fit (integer sums: any order is exact). (Before, groups not dividing 32 had
// the whole warp split each group's terms in turn, one reduction per group: the 10 groups of a
// 300-term layer took 10 us at two outputs per warp.)
// Its parameters, and its body over an epilogue E (as sqil_linear_f32w's: `SQIL_Q4_INT_EPI`).
#define SQIL_Q4_INT_PARAMS                                                                                          \
    const unsigned *__restrict__ wq, const float *__restrict__ scales, const float *__restrict__ bias,              \
        const float *__restrict__ x, float *__restrict__ y, int rows, int n, int k, int group, int groups,          \
        float xscale, int relu, float qs, float qz, float qlo, float qhi, int opw, float *__restrict__ lvout,       \
        float ls, float lz, float llo, float lhi
#define SQIL_Q4_INT_ARGS                                                                                            \
    wq, scales, bias, x, y, rows, n, k, group, groups, xscale, relu, qs, qz, qlo, qhi, opw, lvout, ls, lz, llo, lhi
// sqil_q4_int's lanes-per-group form (fewer than 32 groups): lpg lanes per group, the most (a power
// of two) with lpg * groups <= 32, returned; this lane's group g (live: one of the row's), its
// place sub in the group's lanes, and the group's end (its terms g * group + sub, + lpg, ... < end).
__device__ __forceinline__ int sqil_lanes_per_group(int groups, int group, int k, int lane, int &g, int &sub,
                                                    int &end, bool &live)
{
    int lpg = 32;
    while (lpg * groups > 32) {
        lpg >>= 1;
    }
    g = lane / lpg;
    sub = lane % lpg;
    live = g < groups;
    end = (g + 1) * group < k ? (g + 1) * group : k;
    return lpg;
}

// sqil_q4_int with four outputs per warp (opw 4: outputs c..c + 3 of one row, `fit_cluster`'s
// choice where two per warp still leave a step over 16 blocks, e.g. a 512-wide hidden layer):
// with fewer than 32 groups the lanes-per-group form over the four channels at once (each term's
// level computed once), else the group-per-lane sums one channel after the other; lanes 0-3 store
// the outputs through the same instructions. The same arithmetic per output, so the same bits.
template <class E>
__device__ __forceinline__ void sqil_q4_int_four(const unsigned bx, const unsigned tx, SQIL_Q4_INT_PARAMS)
{
    const long o = ((long)bx * SQIL_BDIM + tx) / 32 * 4;
    const int lane = tx % 32;
    if (o >= (long)rows * n) {
        return; // the whole warp
    }
    const int r = (int)(o / n), c = (int)(o % n), k4 = (k + 3) / 4;
    const int m = n - c < 4 ? n - c : 4; // this warp's outputs (the last of a row may have fewer)
    int ch[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        ch[i] = c + (i < m ? i : 0);
    }
    const float *xr = x + (long)r * k;
    const bool stores = lane < m;
    const int cl = c + (stores ? lane : 0);
    const float bv = bias && stores ? bias[cl] : 0.0f;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int nan = 0;
    if (groups < 32) {
        int g, sub, end;
        bool live;
        const int lpg = sqil_lanes_per_group(groups, group, k, lane, g, sub, end, live);
        float sc[4], p[4];
        int sm[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            sc[i] = live ? scales[(long)ch[i] * groups + g] : 0.0f;
        }
        sqil_q4_span_n<4, 4>(xr, wq, k4, ch, g * group + sub, end, lpg, qs, qz, qlo, qhi, &nan, sm);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            for (int d = lpg / 2; d > 0; d /= 2) {
                sm[i] += __shfl_xor_sync(0xffffffffu, sm[i], d);
            }
            p[i] = __fmul_rn((float)sm[i], sc[i]);
        }
        for (int j = 0; j < groups; j++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                acc[i] = __fadd_rn(acc[i], __shfl_sync(0xffffffffu, p[i], j * lpg));
            }
        }
    } else {
        for (int i = 0; i < m; i++) {
            acc[i] = sqil_q4_int_acc(xr, wq, scales, k4, ch[i], k, group, groups, lane, qs, qz, qlo, qhi, &nan);
        }
    }
    nan = __any_sync(0xffffffffu, nan);
    if (stores) {
        const float al = lane == 0 ? acc[0] : lane == 1 ? acc[1] : lane == 2 ? acc[2] : acc[3];
        sqil_put(y, (long)r * n + cl, E::f(sqil_q4_epilogue_v(al, xscale, bias != nullptr, bv, relu, nan)), lvout, ls,
                 lz, llo, lhi);
    }
}

template <class E>
__device__ __forceinline__ void sqil_q4_int_t(const unsigned bx, const unsigned tx, SQIL_Q4_INT_PARAMS)
{
    if (opw == 4) {
        sqil_q4_int_four<E>(bx, tx, SQIL_Q4_INT_ARGS);
        return;
    }
    const long o = ((long)bx * SQIL_BDIM + tx) / 32 * opw;
    const int lane = tx % 32;
    if (o >= (long)rows * n) {
        return; // the whole warp
    }
    const int r = (int)(o / n), c = (int)(o % n), k4 = (k + 3) / 4;
    const bool two = opw == 2 && c + 1 < n; // the same for the whole warp
    const int c1 = two ? c + 1 : c;
    const float *xr = x + (long)r * k;
    // Lane 0 stores output c, lane 1 output c1 (every lane holds both sums), through the same
    // instructions (an epilogue's arithmetic for both at once). The biases and (below) the scales
    // are loaded before the sums, not after them.
    const int cl = lane == 0 ? c : c1;
    const bool stores = lane == 0 || (two && lane == 1);
    const float bv = bias && stores ? bias[cl] : 0.0f;
    float acc0 = 0.0f, acc1 = 0.0f;
    int nan = 0;
    if (groups < 32) {
        // lpg lanes per group (the most, a power of two, with lpg * groups <= 32), all groups at
        // once: each segment sums its group's terms and reduces within itself; the products are
        // then added in group order. Lanes past the groups (10 groups: lanes 20-31) sum nothing.
        // The lane's terms through sqil_q4_span_n: their loads are issued before any is quantized
        // (in a plain loop the division's slow-path call kept each load behind the previous
        // term's arithmetic: one round trip to L2 per term).
        int g, sub, end;
        bool live;
        const int lpg = sqil_lanes_per_group(groups, group, k, lane, g, sub, end, live);
        if (two) {
            const float sc0 = live ? scales[(long)c * groups + g] : 0.0f;
            const float sc1 = live ? scales[(long)c1 * groups + g] : 0.0f;
            const int ch[2] = {c, c1};
            int sp[2];
            sqil_q4_span_n<2, 8>(xr, wq, k4, ch, g * group + sub, end, lpg, qs, qz, qlo, qhi, &nan, sp);
            int s0 = sp[0], s1 = sp[1];
            for (int d = lpg / 2; d > 0; d /= 2) {
                s0 += __shfl_xor_sync(0xffffffffu, s0, d);
                s1 += __shfl_xor_sync(0xffffffffu, s1, d);
            }
            const float p0 = __fmul_rn((float)s0, sc0), p1 = __fmul_rn((float)s1, sc1);
            for (int j = 0; j < groups; j++) {
                acc0 = __fadd_rn(acc0, __shfl_sync(0xffffffffu, p0, j * lpg));
                acc1 = __fadd_rn(acc1, __shfl_sync(0xffffffffu, p1, j * lpg));
            }
        } else {
            // One output: the same without the second's loads and shuffles.
            const float sc = live ? scales[(long)c * groups + g] : 0.0f;
            int s0 = sqil_q4_span(xr, wq, k4, c, g * group + sub, end, lpg, qs, qz, qlo, qhi, &nan);
            for (int d = lpg / 2; d > 0; d /= 2) {
                s0 += __shfl_xor_sync(0xffffffffu, s0, d);
            }
            const float p0 = __fmul_rn((float)s0, sc);
            for (int j = 0; j < groups; j++) {
                acc0 = __fadd_rn(acc0, __shfl_sync(0xffffffffu, p0, j * lpg));
            }
        }
    } else {
        acc0 = sqil_q4_int_acc(xr, wq, scales, k4, c, k, group, groups, lane, qs, qz, qlo, qhi, &nan);
        if (two) {
            acc1 = sqil_q4_int_acc(xr, wq, scales, k4, c1, k, group, groups, lane, qs, qz, qlo, qhi, &nan);
        }
    }
    nan = __any_sync(0xffffffffu, nan);
    if (stores) {
        const float al = lane == 0 ? acc0 : acc1;
        sqil_put(y, (long)r * n + cl, E::f(sqil_q4_epilogue_v(al, xscale, bias != nullptr, bv, relu, nan)), lvout, ls,
                 lz, llo, lhi);
    }
}

SQIL_KERNEL void sqil_q4_int(SQIL_VARGS SQIL_Q4_INT_PARAMS)
{
    sqil_q4_int_t<sqil_epi_none>(SQIL_BX, SQIL_TX, SQIL_Q4_INT_ARGS);
}

// sqil_q4_int with the epilogue E, as kernel NAME (sqil_q4_int__e<hash of E>).
#define SQIL_Q4_INT_EPI(NAME, E) SQIL_WITH_EPI(NAME, sqil_q4_int_t, SQIL_Q4_INT_PARAMS, SQIL_Q4_INT_ARGS, E)

// dp4a on unsigned bytes a and signed bytes b: c + the four products, exact in int32.
__device__ __forceinline__ int sqil_dp4a_us(unsigned a, unsigned b, int c)
{
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// sqil_q4_int over many rows (a transformer's tokens, a batch): the same arithmetic (per group the
// exact integer sum of w x level, acc += float(sum) * scale in group order, sqil_q4_epilogue; a
// NaN in a row makes its outputs NaN), one thread per output instead of a warp, so each input is
// quantized once per 32 outputs rather than once per output's warp. A block of 256 threads
// computes 16 rows x 32 outputs in stages of 128 terms: the rows' levels (as bytes q - lo =
// level + (z - lo), four to a word), the 32 outputs' weight words and the scales of the groups
// the stage touches go to shared memory; thread (w, l) sums rows w and w + 8 of output l with
// dp4a (u8 x s8) and subtracts (z - lo) x the group's weight sum (also by dp4a) when a group
// ends. The next stage's inputs, weights and scales are loaded into registers before the current
// stage is summed, so their latency overlaps the arithmetic. Groups must be at least 32 terms and
// whole words of four (the host checks), so a stage touches at most five groups.
#define SQIL_QT_R 16
#define SQIL_QT_W 32
#define SQIL_QT_G 5
SQIL_KERNEL void SQIL_LAUNCH_BOUNDS(256) sqil_q4_int_tile(SQIL_VARGS const unsigned *__restrict__ wq,
    const float *__restrict__ scales, const float *__restrict__ bias, const float *__restrict__ x,
    float *__restrict__ y, int rows, int n, int k, int group, int groups, float xscale, int relu, float qs,
    float qz, float qlo, float qhi)
{
    __shared__ unsigned xs[SQIL_QT_R][SQIL_QT_W + 1];
    __shared__ unsigned ws[SQIL_QT_W][32 + 1];
    __shared__ float sc[SQIL_QT_G][32];
    __shared__ int nanrow[SQIL_QT_R];
    const int tiles_n = (n + 31) / 32;
    const int r0 = (SQIL_BX / tiles_n) * SQIL_QT_R, c0 = (SQIL_BX % tiles_n) * 32;
    const int t = SQIL_TX, lane = t % 32, wy = t / 32, c = c0 + lane;
    const int k4 = (k + 3) / 4, off = (int)(qz - qlo);
    // This thread's share of a stage: two words of levels (row t / 32 and 8 + t / 32, word t % 32),
    // four weight words (outputs t / 32 + 8 j, word t % 32), one scale (t < 160: group t / 32 of
    // the stage, output t % 32).
    float xr[2][4];
    unsigned wr[4];
    float sr = 0.0f;
    // (A persistent program calls this block after block: the last call's readers are done.)
    __syncthreads();
    if (t < SQIL_QT_R) {
        nanrow[t] = 0;
    }
    float acc[2] = {0.0f, 0.0f};
    int s[2] = {0, 0}, wsum = 0;
#define SQIL_QT_LOAD(W0)                                                                                   \
    do {                                                                                                   \
        _Pragma("unroll") for (int j = 0; j < 2; j++)                                                      \
        {                                                                                                  \
            const int r = r0 + wy + 8 * j, kw = (W0) + lane;                                               \
            _Pragma("unroll") for (int b = 0; b < 4; b++)                                                  \
            {                                                                                              \
                const int kk = 4 * kw + b;                                                                 \
                xr[j][b] = r < rows && kk < k ? x[(long)r * k + kk] : 0.0f;                                \
            }                                                                                              \
        }                                                                                                  \
        _Pragma("unroll") for (int j = 0; j < 4; j++)                                                      \
        {                                                                                                  \
            const int cc = c0 + wy + 8 * j;                                                                \
            wr[j] = cc < n && (W0) + lane < k4 ? wq[(long)cc * k4 + (W0) + lane] : 0u;                     \
        }                                                                                                  \
        if (t < SQIL_QT_G * 32) {                                                                          \
            const int g = (4 * (W0)) / group + wy, cc = c0 + lane;                                         \
            sr = cc < n && g < groups ? scales[(long)cc * groups + g] : 0.0f;                              \
        }                                                                                                  \
    } while (0)
    SQIL_QT_LOAD(0);
    for (int w0 = 0; w0 < k4; w0 += SQIL_QT_W) {
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int i = wy + 8 * j, r = r0 + i, kw = w0 + lane;
            unsigned word = 0;
#pragma unroll
            for (int b = 0; b < 4; b++) {
                if (r < rows && 4 * kw + b < k) {
                    const float v = sqil_level_or(xr[j][b], qs, qz, qlo, qhi);
                    if (v != v) {
                        nanrow[i] = 1;
                    } else {
                        word |= ((unsigned)((int)v + off) & 255u) << (8 * b);
                    }
                }
            }
            xs[i][lane] = word;
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            ws[lane][wy + 8 * j] = wr[j];
        }
        if (t < SQIL_QT_G * 32) {
            sc[wy][lane] = sr;
        }
        __syncthreads();
        if (w0 + SQIL_QT_W < k4) {
            SQIL_QT_LOAD(w0 + SQIL_QT_W);
        }
        const int cnt = k4 - w0 < SQIL_QT_W ? k4 - w0 : SQIL_QT_W, g0 = (4 * w0) / group;
        for (int q = 0; q < cnt; q++) {
            const unsigned wv = ws[q][lane];
            wsum = sqil_dp4a_us(0x01010101u, wv, wsum);
            s[0] = sqil_dp4a_us(xs[wy][q], wv, s[0]);
            s[1] = sqil_dp4a_us(xs[wy + 8][q], wv, s[1]);
            const int done = 4 * (w0 + q + 1);
            if (done % group == 0 || done >= k) {
                const float scale = sc[(done - 4) / group - g0][lane];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    acc[i] = __fadd_rn(acc[i], __fmul_rn((float)(s[i] - off * wsum), scale));
                    s[i] = 0;
                }
                wsum = 0;
            }
        }
    }
#undef SQIL_QT_LOAD
    __syncthreads();
    if (c < n) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int r = r0 + wy + 8 * i;
            if (r < rows) {
                y[(long)r * n + c] = sqil_q4_epilogue(acc[i], xscale, bias, c, relu, nanrow[wy + 8 * i]);
            }
        }
    }
}

// sqil_q4_int for a few outputs over long rows (a keypoint MatMul: 64 outputs of 1 225 terms,
// where one warp per output left the GPU idle and each lane walked a whole group): a block of 256
// threads per output (r, c); warp w sums groups w, w + 8, ... with its lanes on the group's terms
// (coalesced), the exact int sum reduced by shuffles, and stores the group's product
// float(sum) * scale; thread 0 then adds the products in group order (the CPU's order) and applies
// the epilogue. Rounds of 256 groups.
SQIL_KERNEL void SQIL_LAUNCH_BOUNDS(256) sqil_q4_int_groups(SQIL_VARGS
    const unsigned *__restrict__ wq, const float *__restrict__ scales, const float *__restrict__ bias,
    const float *__restrict__ x, float *__restrict__ y, int rows, int n, int k, int group, int groups, float xscale,
    int relu, float qs, float qz, float qlo, float qhi)
{
    __shared__ float prod[256];
    __shared__ int nanw[8];
    const long o = SQIL_BX;
    if (o >= (long)rows * n) {
        return; // the whole block
    }
    const int r = (int)(o / n), c = (int)(o % n), k4 = (k + 3) / 4, lane = SQIL_TX % 32, warp = SQIL_TX / 32;
    const float *xr = x + (long)r * k;
    // The bias and each group's scale are loaded before the sums (after them, each was one more
    // round trip to memory at the step's end).
    const float bv = bias && SQIL_TX == 0 ? bias[c] : 0.0f;
    float acc = 0.0f;
    int nan = 0;
    for (int g0 = 0; g0 < groups; g0 += 256) {
        const int cnt = groups - g0 < 256 ? groups - g0 : 256;
        for (int j = warp; j < cnt; j += 8) {
            const int g = g0 + j, end = (g + 1) * group < k ? (g + 1) * group : k;
            const float sc = lane == 0 ? scales[(long)c * groups + g] : 0.0f;
            int s = sqil_q4_span(xr, wq, k4, c, g * group + lane, end, 32, qs, qz, qlo, qhi, &nan);
            for (int d = 16; d > 0; d /= 2) {
                s += __shfl_xor_sync(0xffffffffu, s, d);
            }
            if (lane == 0) {
                prod[j] = __fmul_rn((float)s, sc);
            }
        }
        __syncthreads();
        if (SQIL_TX == 0) {
            for (int j = 0; j < cnt; j++) {
                acc = __fadd_rn(acc, prod[j]);
            }
        }
        __syncthreads();
    }
    nan = __any_sync(0xffffffffu, nan);
    if (lane == 0) {
        nanw[warp] = nan;
    }
    __syncthreads();
    if (SQIL_TX == 0) {
        int any = 0;
        for (int w = 0; w < 8; w++) {
            any |= nanw[w];
        }
        y[(long)r * n + c] = sqil_q4_epilogue_v(acc, xscale, bias != nullptr, bv, relu, any);
    }
}

// An int4 convolution of one image on integer activations (levels [channels, plane]): per output
// position p and channel c the linear map's arithmetic over the window, in the packed rows'
// (tap, channel) order: per group the exact integer sum of w * level, then
// acc += float(sum) * scale (each rounded) in group order, then sqil_q4_epilogue (NaN in the window
// makes the output NaN). table[p * taps + t] is tap t's input position, 0xffffffff in padding
// (which adds nothing). y channel-major [n, positions].
//
// Tiled: a block of 256 threads computes 32 positions x 16 channels (SQIL_CONV_TP x SQIL_CONV_TC;
// blocks = ceil(positions / 32) * ceil(n / 16), the launch's thread count is blocks * 256). Per
// chunk of SQIL_CONV_KC terms the window's levels (gathered through the table: each thread one
// position and every eighth term, all its table entries loaded, then all its levels; the term's
// tap and channel stepped, no division per term) and the weights go to shared memory (levels as
// int16: minus the zero point they span [-255, 255]; weights as int8, four to a word), with the
// scales of the groups ending in the chunk; each thread sums two channels of one position with
// dp2a, 32 terms at a time from 128-bit shared loads, in four independent chains (two per channel,
// added per group).
// Integer sums are exact in any order, and the groups (multiples of 32, or the whole row) end on
// 32-term boundaries, so the float epilogue runs in the same order as the CPU's.
#define SQIL_CONV_TP 32
#define SQIL_CONV_TC 16
#define SQIL_CONV_KC 128
#define SQIL_CONV_XS (SQIL_CONV_KC / 2 + 4)
#define SQIL_CONV_GS (SQIL_CONV_KC / 32 + 1)
SQIL_KERNEL void SQIL_LAUNCH_BOUNDS(256) sqil_q4_conv_int(SQIL_VARGS
    const unsigned *__restrict__ wq, const float *__restrict__ scales, const float *__restrict__ bias,
    const float *__restrict__ lv, float *__restrict__ y, const unsigned *__restrict__ table, int positions, int n,
    int k, int group, int groups, float xscale, int relu, int taps, int channels, int plane, int run, int gsplit,
    float *__restrict__ prod, float *__restrict__ flags, float *__restrict__ lvout, float ls, float lz, float llo,
    float lhi)
{
    // SQIL_CONV_KC int16 per position, rows of 68 words (16-byte aligned; 128-bit reads by eight
    // lanes at a time fall in distinct banks).
    __shared__ __align__(16) int xs[SQIL_CONV_TP][SQIL_CONV_XS];
    __shared__ __align__(16) int ws[SQIL_CONV_TC][SQIL_CONV_KC / 4];
    __shared__ int nanf[SQIL_CONV_TP];
    // The scales of the groups ending in this chunk (at most SQIL_CONV_GS), loaded with its
    // weights: a group's epilogue waits on shared memory, not on a global load.
    __shared__ float ss[SQIL_CONV_TC][SQIL_CONV_GS];
    const int tiles_p = (positions + SQIL_CONV_TP - 1) / SQIL_CONV_TP;
    const int tiles = tiles_p * ((n + SQIL_CONV_TC - 1) / SQIL_CONV_TC);
    // Split: block (split, tile) sums groups [split * gsplit, + gsplit) of its tile.
    const int split = gsplit > 0 ? SQIL_BX / tiles : 0, tile = gsplit > 0 ? SQIL_BX % tiles : SQIL_BX;
    const int p0 = (tile % tiles_p) * SQIL_CONV_TP, c0 = (tile / tiles_p) * SQIL_CONV_TC;
    const int gfirst = split * gsplit, glast = gsplit > 0 && gfirst + gsplit < groups ? gfirst + gsplit : groups;
    const int kbeg = gfirst * group, kend = glast * group < k ? glast * group : k;
    const long outs = (long)n * positions;
    const int t = SQIL_TX, pl = t % SQIL_CONV_TP, cl = t / SQIL_CONV_TP * 2, k4 = (k + 3) / 4;
    if (t < SQIL_CONV_TP) {
        nanf[t] = 0;
    }
    short *xb = (short *)&xs[0][0];
    const int p = p0 + pl, kl0 = t / SQIL_CONV_TP;
    const long prow = (long)(p < positions ? p : 0) * taps;
    int s0a = 0, s0b = 0, s1a = 0, s1b = 0, g = gfirst, gend = kbeg + group < k ? kbeg + group : k;
    float a0 = 0.0f, a1 = 0.0f;
    for (int k0 = kbeg; k0 < kend; k0 += SQIL_CONV_KC) {
        __syncthreads();
        // This thread's terms k0 + kl0 + 8 i: position p, tap and channel stepped by eight.
        const int per = SQIL_CONV_KC / 8;
        unsigned src[per];
        float v[per];
        // A tap's run of `run` terms holds its `channels` (run > channels: padded to whole groups,
        // the terms between zero).
        int tap = (k0 + kl0) / run, ch = (k0 + kl0) % run;
        int chs[per];
#pragma unroll
        for (int i = 0; i < per; i++) {
            const int kk = k0 + kl0 + 8 * i;
            src[i] = kk < k && p < positions && ch < channels ? table[prow + tap] : 0xffffffffu;
            chs[i] = ch;
            ch += 8;
            while (ch >= run) {
                ch -= run;
                tap++;
            }
        }
#pragma unroll
        for (int i = 0; i < per; i++) {
            v[i] = src[i] != 0xffffffffu ? lv[(long)chs[i] * plane + src[i]] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < per; i++) {
            int level = 0;
            if (v[i] != v[i]) {
                nanf[pl] = 1;
            } else {
                level = (int)v[i];
            }
            xb[pl * (2 * SQIL_CONV_XS) + kl0 + 8 * i] = (short)level;
        }
        for (int e = t; e < SQIL_CONV_TC * (SQIL_CONV_KC / 4); e += 256) {
            const int c = c0 + e / (SQIL_CONV_KC / 4), w = k0 / 4 + e % (SQIL_CONV_KC / 4);
            ws[e / (SQIL_CONV_KC / 4)][e % (SQIL_CONV_KC / 4)] = (c < n && w < k4) ? (int)wq[(long)c * k4 + w] : 0;
        }
        const int gs = g; // groups completed before this chunk
        if (t < SQIL_CONV_TC * SQIL_CONV_GS) {
            const int c = c0 + t / SQIL_CONV_GS, gi = gs + t % SQIL_CONV_GS;
            ss[t / SQIL_CONV_GS][t % SQIL_CONV_GS] = (c < n && gi < groups) ? scales[(long)c * groups + gi] : 0.0f;
        }
        __syncthreads();
        for (int k1 = 0; k1 < SQIL_CONV_KC && k0 + k1 < kend; k1 += 32) {
            const int4 *xr = (const int4 *)&xs[pl][k1 / 2];
            const int4 *w0 = (const int4 *)&ws[cl][k1 / 4], *w1 = (const int4 *)&ws[cl + 1][k1 / 4];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                // Terms k1 + 16 h .. + 15: levels in xa (eight) and xc (eight), words in wa / wb.
                const int4 xa = xr[2 * h], xc = xr[2 * h + 1], wa = w0[h], wb = w1[h];
                s0a = __dp2a_hi(xa.y, wa.x, __dp2a_lo(xa.x, wa.x, s0a));
                s0b = __dp2a_hi(xa.w, wa.y, __dp2a_lo(xa.z, wa.y, s0b));
                s1a = __dp2a_hi(xa.y, wb.x, __dp2a_lo(xa.x, wb.x, s1a));
                s1b = __dp2a_hi(xa.w, wb.y, __dp2a_lo(xa.z, wb.y, s1b));
                s0a = __dp2a_hi(xc.y, wa.z, __dp2a_lo(xc.x, wa.z, s0a));
                s0b = __dp2a_hi(xc.w, wa.w, __dp2a_lo(xc.z, wa.w, s0b));
                s1a = __dp2a_hi(xc.y, wb.z, __dp2a_lo(xc.x, wb.z, s1a));
                s1b = __dp2a_hi(xc.w, wb.w, __dp2a_lo(xc.z, wb.w, s1b));
            }
            const int end = k0 + k1 + 32 < k ? k0 + k1 + 32 : k;
            if (end == gend) {
                const float m0 = __fmul_rn((float)(s0a + s0b), ss[cl][g - gs]);
                const float m1 = __fmul_rn((float)(s1a + s1b), ss[cl + 1][g - gs]);
                if (gsplit > 0) {
                    // The group's products, added in group order by sqil_q4_conv_finish.
                    if (p < positions && c0 + cl < n) {
                        prod[g * outs + (long)(c0 + cl) * positions + p] = m0;
                    }
                    if (p < positions && c0 + cl + 1 < n) {
                        prod[g * outs + (long)(c0 + cl + 1) * positions + p] = m1;
                    }
                } else {
                    a0 = __fadd_rn(a0, m0);
                    a1 = __fadd_rn(a1, m1);
                }
                s0a = s0b = s1a = s1b = 0;
                g++;
                gend = gend + group < k ? gend + group : k;
            }
        }
    }
    __syncthreads();
    if (gsplit > 0) {
        // NaN in this split's part of the window, per position (the first channel tile's blocks).
        if (c0 == 0 && t < SQIL_CONV_TP && p < positions) {
            flags[(long)split * positions + p] = nanf[pl] ? 1.0f : 0.0f;
        }
        return;
    }
    if (p < positions) {
        if (c0 + cl < n) {
            sqil_put(y, (long)(c0 + cl) * positions + p, sqil_q4_epilogue(a0, xscale, bias, c0 + cl, relu, nanf[pl]),
                     lvout, ls, lz, llo, lhi);
        }
        if (c0 + cl + 1 < n) {
            sqil_put(y, (long)(c0 + cl + 1) * positions + p,
                     sqil_q4_epilogue(a1, xscale, bias, c0 + cl + 1, relu, nanf[pl]), lvout, ls, lz, llo, lhi);
        }
    }
}

// The end of a split sqil_q4_conv_int (few output tiles over long windows: its blocks split the
// groups): per output (c, p) the group products added from +0 in group order, as the unsplit
// kernel adds them, then sqil_q4_epilogue with the window's NaN flag from every split. prod
// [groups, n, positions], flags [splits, positions]; one thread per output.
SQIL_KERNEL void sqil_q4_conv_finish(SQIL_VARGS const float *__restrict__ prod, const float *__restrict__ flags,
                                     const float *__restrict__ bias, float *__restrict__ y, int positions, int n,
                                     int groups, int splits, float xscale, int relu, float *__restrict__ lvout,
                                     float ls, float lz, float llo, float lhi)
{
    const long o = (long)SQIL_BX * SQIL_BDIM + SQIL_TX, outs = (long)n * positions;
    if (o >= outs) {
        return;
    }
    const int c = (int)(o / positions), p = (int)(o % positions);
    float acc = 0.0f;
    for (int g = 0; g < groups; g++) {
        acc = __fadd_rn(acc, prod[g * outs + o]);
    }
    int nan = 0;
    for (int s = 0; s < splits; s++) {
        nan |= flags[(long)s * positions + p] != 0.0f;
    }
    sqil_put(y, o, sqil_q4_epilogue(acc, xscale, bias, c, relu, nan), lvout, ls, lz, llo, lhi);
}

// A weight-only int4 layer on float activations, the CPU kernels' arithmetic lane for lane
// (sqil_kernels_cpu::generic::generic_gemv_q4f32): eight lanes; per group lane l sums by fma from
// +0 the elements l, l + 8, l + 16, l + 24 of each block of 32; each lane's sum is fma'd with the
// group's scale into its total; the totals summed ((t0 + t4) + (t2 + t6)) + ((t1 + t5) + (t3 + t7));
// + bias, ReLU. A warp per output: thread l + 8 j is the CPU's lane l for groups j, j + 4, ...
// (the groups' sums are independent), and every thread of lane l folds the four groups of each
// round into its total in group order through shuffles; the totals are then combined by shuffles
// in the CPU's order.
SQIL_KERNEL void sqil_q4_w16(SQIL_VARGS const unsigned *__restrict__ wq, const float *__restrict__ scales,
                                       const float *__restrict__ bias, const float *__restrict__ x,
                                       float *__restrict__ y, int rows, int n, int k, int group, int groups, int relu)
{
    const long o = ((long)SQIL_BX * SQIL_BDIM + SQIL_TX) / 32;
    const int lane = SQIL_TX % 32, l = lane % 8, j = lane / 8;
    if (o >= (long)rows * n) {
        return; // the whole warp
    }
    const int r = (int)(o / n), c = (int)(o % n), k4 = (k + 3) / 4, bpg = group / 32;
    const float *xr = x + (long)r * k;
    const float bv = bias && lane == 0 ? bias[c] : 0.0f; // loaded before the sums, used after them
    float t = 0.0f;
    for (int g0 = 0; g0 < groups; g0 += 4) {
        const int g = g0 + j;
        float a = 0.0f;
        if (g < groups) {
            for (int b = g * bpg; b < (g + 1) * bpg; b++) {
#pragma unroll
                for (int e = 0; e < 32; e += 8) {
                    const int kk = b * 32 + e + l;
                    if (kk < k) {
                        a = __fmaf_rn((float)sqil_w8(wq, k4, c, kk), xr[kk], a);
                    }
                }
            }
        }
        const int cnt = groups - g0 < 4 ? groups - g0 : 4;
        for (int q = 0; q < cnt; q++) {
            t = __fmaf_rn(__shfl_sync(0xffffffffu, a, q * 8 + l), scales[(long)c * groups + g0 + q], t);
        }
    }
    const float u = __fadd_rn(t, __shfl_down_sync(0xffffffffu, t, 4)); // lanes 0-3: t_l + t_{l+4}
    const float v = __fadd_rn(u, __shfl_down_sync(0xffffffffu, u, 2)); // lanes 0-1: u_l + u_{l+2}
    float h = __fadd_rn(v, __shfl_down_sync(0xffffffffu, v, 1));       // lane 0: v_0 + v_1
    if (lane != 0) {
        return;
    }
    if (bias) {
        h = __fadd_rn(h, bv);
    }
    if (relu && h < 0.0f) {
        h = 0.0f;
    }
    y[(long)r * n + c] = h;
}

// A float 2-D convolution of one image (groups allowed): geo as the C back end's (channels, in h,
// w, kernel h, w, strides, dilations, pads at the start, out h, w, groups); w fp32
// [n][c / groups][kh][kw]; one thread per output: one fma chain in (channel, tap) order, padding
// skipped (an exact zero), then the bias: the CPU's bits.
SQIL_KERNEL void sqil_conv2d_f32(SQIL_VARGS const float *__restrict__ x, const int *__restrict__ geo,
                                           const float *__restrict__ w, const float *__restrict__ bias,
                                           float *__restrict__ y, int n, float *__restrict__ lvout, float ls,
                                           float lz, float llo, float lhi)
{
    const int c = geo[0], h = geo[1], wd = geo[2], kh = geo[3], kw = geo[4], oh = geo[11], ow = geo[12];
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i >= n * oh * ow) {
        return;
    }
    const int o = i / (oh * ow), oy = (i / ow) % oh, ox = i % ow;
    const int cg = c / geo[13], ng = n / geo[13], c0 = (o / ng) * cg;
    float s = 0.0f;
    const int khw = kh * kw;
    if (khw <= 16) {
        // Up to 16 taps (3 x 3, 4 x 4): each tap's offset in a channel plane and whether it lies
        // inside the image, once; then per input channel all its taps loaded (the next channel's
        // while this one's chain runs) and the chain over them in (row, column) order, taps
        // outside skipped, not added as zeros: the same fmas in the same order.
        int off[16];
        unsigned in = 0;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const int ty = j / kw, tx = j % kw;
            const int iy = oy * geo[5] + ty * geo[7] - geo[9], ix = ox * geo[6] + tx * geo[8] - geo[10];
            const bool ok = j < khw && iy >= 0 && iy < h && ix >= 0 && ix < wd;
            in |= ok ? 1u << j : 0u;
            off[j] = ok ? iy * wd + ix : 0;
        }
        const long plane = (long)h * wd;
        const float *xc = x + (long)c0 * plane, *wc = w + (long)o * cg * khw;
        float xv[16], wv[16];
#pragma unroll
        for (int j = 0; j < 16; j++) {
            xv[j] = in >> j & 1u ? xc[off[j]] : 0.0f;
            wv[j] = in >> j & 1u ? wc[j] : 0.0f;
        }
        for (int ch = 0; ch < cg; ch++) {
            float xn[16], wn[16];
            const bool more = ch + 1 < cg;
#pragma unroll
            for (int j = 0; j < 16; j++) {
                xn[j] = more && (in >> j & 1u) ? xc[(ch + 1) * plane + off[j]] : 0.0f;
                wn[j] = more && (in >> j & 1u) ? wc[(ch + 1) * khw + j] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < 16; j++) {
                if (in >> j & 1u) {
                    s = __fmaf_rn(xv[j], wv[j], s);
                }
            }
#pragma unroll
            for (int j = 0; j < 16; j++) {
                xv[j] = xn[j];
                wv[j] = wn[j];
            }
        }
        sqil_put(y, i, bias ? __fadd_rn(s, bias[o]) : s, lvout, ls, lz, llo, lhi);
        return;
    }
    for (int ch = 0; ch < cg; ch++) {
        for (int ty = 0; ty < kh; ty++) {
            const int iy = oy * geo[5] + ty * geo[7] - geo[9];
            if (iy < 0 || iy >= h) {
                continue;
            }
            const float *xrow = x + ((c0 + ch) * h + iy) * wd, *wrow = w + ((o * cg + ch) * kh + ty) * kw;
            if (kw <= 8) {
                // A kernel row's taps loaded together, then its chain (taps outside the image
                // skipped, not added as zeros): the same fmas in the same order.
                float xv[8], wv[8];
                unsigned in = 0;
#pragma unroll
                for (int tx = 0; tx < 8; tx++) {
                    const int ix = ox * geo[6] + tx * geo[8] - geo[10];
                    const bool ok = tx < kw && ix >= 0 && ix < wd;
                    in |= ok ? 1u << tx : 0u;
                    xv[tx] = ok ? xrow[ix] : 0.0f;
                    wv[tx] = ok ? wrow[tx] : 0.0f;
                }
#pragma unroll
                for (int tx = 0; tx < 8; tx++) {
                    if (in >> tx & 1u) {
                        s = __fmaf_rn(xv[tx], wv[tx], s);
                    }
                }
            } else {
                for (int tx = 0; tx < kw; tx++) {
                    const int ix = ox * geo[6] + tx * geo[8] - geo[10];
                    if (ix >= 0 && ix < wd) {
                        s = __fmaf_rn(xrow[ix], wrow[tx], s);
                    }
                }
            }
        }
    }
    sqil_put(y, i, bias ? __fadd_rn(s, bias[o]) : s, lvout, ls, lz, llo, lhi);
}


// 2-D max or average pooling of `planes` planes (geo as sqil_conv2d_f32's) as the interpreter
// defines them: max, the window's first value inside the input (kernel order: rows, then
// columns) then each later one taken where v > best (a NaN first value stays, later NaNs are
// passed over), -inf for a window wholly in the padding; average, the f64 sum from -0 of the
// taps inside the input in kernel order divided by div[position] (div0 when div is null), rounded
// once. One thread per output.
SQIL_KERNEL void sqil_pool2d(SQIL_VARGS const float *__restrict__ x, const int *__restrict__ geo,
                                       float *__restrict__ y, int planes, int is_max, const int *__restrict__ div,
                                       int div0)
{
    const int h = geo[1], wd = geo[2], kh = geo[3], kw = geo[4], oh = geo[11], ow = geo[12];
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i >= planes * oh * ow) {
        return;
    }
    const int p = i / (oh * ow), o = i % (oh * ow), oy = o / ow, ox = o % ow;
    double s = -0.0;
    float best = __int_as_float(0xff800000);
    bool any = false;
    for (int ty = 0; ty < kh; ty++) {
        for (int tx = 0; tx < kw; tx++) {
            const int iy = oy * geo[5] + ty * geo[7] - geo[9], ix = ox * geo[6] + tx * geo[8] - geo[10];
            if (iy >= 0 && iy < h && ix >= 0 && ix < wd) {
                const float v = x[((long)p * h + iy) * wd + ix];
                s = __dadd_rn(s, (double)v);
                if (!any || v > best) {
                    best = v;
                }
                any = true;
            }
        }
    }
    y[i] = is_max ? best : __double2float_rn(__ddiv_rn(s, (double)(div ? div[o] : div0)));
}

// ConvTranspose (2-D; 1-D lifted to one row) as the interpreter computes it: one thread per
// output (channel mo of m, position t of ol); per tap r in order whose input position j =
// inv[t kl + r] exists (-1: none), the fma chain over the group's cg input channels, added to
// the output (col2im's order), then the bias. Weights [c][mg][kl] (ONNX's [C, M / group, k...]).
SQIL_KERNEL void sqil_conv_transpose_f32(SQIL_VARGS const float *__restrict__ x, const int *__restrict__ inv,
                                                   const float *__restrict__ w, const float *__restrict__ bias,
                                                   float *__restrict__ y, int m, int cg, int mg, int kl, int il,
                                                   int ol)
{
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i >= m * ol) {
        return;
    }
    const int mo = i / ol, t = i % ol, g = mo / mg, mi = mo % mg;
    float acc = 0.0f;
    for (int r = 0; r < kl; r++) {
        const int j = inv[(long)t * kl + r];
        if (j < 0) {
            continue;
        }
        float s = 0.0f;
        for (int ci = 0; ci < cg; ci++) {
            const long c = (long)g * cg + ci;
            s = __fmaf_rn(w[(c * mg + mi) * kl + r], x[c * il + j], s);
        }
        acc = __fadd_rn(acc, s);
    }
    if (bias) {
        acc = __fadd_rn(acc, bias[mo]);
    }
    y[i] = acc;
}

// ReduceMean (op 0; op 3 from -0: GlobalAveragePool), ReduceSum (1), ReduceMax (2) as the
// interpreter computes them: per output i
// its `count` elements x[base[i] + off[j]] in flat order, accumulated in double (max: a NaN, once
// seen, stays), the mean divided by the count in double, rounded to f32 once. One thread per
// output.
SQIL_KERNEL void sqil_reduce_f64(SQIL_VARGS const float *__restrict__ x, const int *__restrict__ base,
                                           const int *__restrict__ off, float *__restrict__ y, int n, int count,
                                           int op)
{
    const int i = SQIL_BX * SQIL_BDIM + SQIL_TX;
    if (i >= n) {
        return;
    }
    const float *xb = x + base[i];
    // op 3: the mean from -0 (GlobalAveragePool's sums start where Rust's f64 `sum` does).
    double a = op == 2 ? __longlong_as_double(0xfff0000000000000ull) : (op == 3 ? -0.0 : 0.0);
    for (int j = 0; j < count; j++) {
        const double e = (double)xb[off[j]];
        if (op == 2) {
            a = (e > a || e != e) ? e : a;
        } else {
            a = __dadd_rn(a, e);
        }
    }
    if (op == 0 || op == 3) {
        a = __ddiv_rn(a, (double)count);
    }
    y[i] = __double2float_rn(a);
}


// Softmax over long rows (a spatial softmax over an image's positions), sqil_softmax_rows'
// arithmetic with one block per row: every thread computes e_j into `scratch`, the first warp's
// lanes 0-3 add the four partial sums, every thread divides.
SQIL_KERNEL void sqil_softmax_rows_block(SQIL_VARGS const float *__restrict__ x, float *__restrict__ y,
                                                   float *__restrict__ scratch, int rows, int dim)
{
    __shared__ double red[32];
    const int r = SQIL_BX, lane = SQIL_TX % 32, warp = SQIL_TX / 32, nw = SQIL_BDIM / 32;
    if (r >= rows) {
        return;
    }
    const float *xr = x + (long)r * dim;
    double *er = reinterpret_cast<double *>(scratch) + (long)r * dim;
    double m = __longlong_as_double(0xfff0000000000000ull);
    for (int j = SQIL_TX; j < dim; j += SQIL_BDIM) {
        m = fmax(m, (double)xr[j]);
    }
    for (int o = 16; o > 0; o /= 2) {
        m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    if (lane == 0) {
        red[warp] = m;
    }
    __syncthreads();
    m = red[0];
    for (int w = 1; w < nw; w++) {
        m = fmax(m, red[w]);
    }
    for (int j = SQIL_TX; j < dim; j += SQIL_BDIM) {
        er[j] = sqil_exp_nonpos(__dsub_rn((double)xr[j], m));
    }
    __syncthreads();
    if (warp == 0) {
        double s = 0.0;
        if (lane < 4) {
            for (int j = lane; j < dim; j += 4) {
                s = __dadd_rn(s, er[j]);
            }
        }
        s = sqil_sum4(s);
        if (lane == 0) {
            red[0] = s;
        }
    }
    __syncthreads();
    const double s = red[0];
    for (int j = SQIL_TX; j < dim; j += SQIL_BDIM) {
        y[(long)r * dim + j] = __double2float_rn(__ddiv_rn(er[j], s));
    }
}
