// sqil CUDA: a policy plan's steps other than the one-row int4 layers (q4_gemv.cu) and the
// element-wise chains (kernels generated per policy, crates/cuda/src/policy.rs), on fp16
// activations with fp32 arithmetic.

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
// kernel steps): fp16 buffers, fp32 arithmetic, fp32 constants. Simple one-thread-per-output (or
// one-warp-per-row) kernels: these policies are small, and their time is launch-bound.

// y[pairs[2i]] = x[pairs[2i + 1]]: one source's part of a data-movement op's output.
extern "C" __global__ void sqil_copy_pairs(const sqil_half *__restrict__ x, sqil_half *__restrict__ y,
                                           const int *__restrict__ pairs, int m)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < m) {
        y[pairs[2 * i]] = x[pairs[2 * i + 1]];
    }
}

// y[idx[i]] = v[i]: a movement op's elements that come from constants.
extern "C" __global__ void sqil_set_consts(sqil_half *__restrict__ y, const int *__restrict__ idx,
                                           const float *__restrict__ v, int m)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < m) {
        y[idx[i]] = f_to_h(v[i]);
    }
}

// y[i] = a op b, each operand fp16 (ah) or fp32 (af, a constant), read at ia[i] (or i when ia is
// null): numpy broadcasting as index tables. op 0 add, 1 sub, 2 mul, 3 div, 4 PRelu (a < 0 ? a * b : a).
extern "C" __global__ void sqil_binary_bcast(const sqil_half *__restrict__ ah, const float *__restrict__ af,
                                             const int *__restrict__ ia, const sqil_half *__restrict__ bh,
                                             const float *__restrict__ bf, const int *__restrict__ ib,
                                             sqil_half *__restrict__ y, int n, int op)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    const int ja = ia ? ia[i] : i, jb = ib ? ib[i] : i;
    const float a = ah ? h_to_f(ah[ja]) : af[ja];
    const float b = bh ? h_to_f(bh[jb]) : bf[jb];
    y[i] = f_to_h(op == 4 ? (a < 0.0f ? a * b : a) : sqil_binop(a, b, op));
}

// Softmax over rows of `dim`: one warp per row, fp32.
extern "C" __global__ void sqil_softmax_rows(const sqil_half *__restrict__ x, sqil_half *__restrict__ y, int rows,
                                             int dim)
{
    const int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) {
        return;
    }
    const sqil_half *xr = x + (long)r * dim;
    float m = -3.0e38f, s = 0.0f;
    for (int j = lane; j < dim; j += 32) {
        m = fmaxf(m, h_to_f(xr[j]));
    }
    for (int o = 16; o > 0; o /= 2) {
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    for (int j = lane; j < dim; j += 32) {
        s += expf(h_to_f(xr[j]) - m);
    }
    for (int o = 16; o > 0; o /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    for (int j = lane; j < dim; j += 32) {
        y[(long)r * dim + j] = f_to_h(expf(h_to_f(xr[j]) - m) / s);
    }
}

// LayerNormalization over rows of `dim` (scale, and bias unless null, fp32 per column): one warp
// per row, two passes in fp32.
extern "C" __global__ void sqil_layernorm_rows(const sqil_half *__restrict__ x, sqil_half *__restrict__ y,
                                               const float *__restrict__ scale, const float *__restrict__ bias,
                                               int rows, int dim, float eps)
{
    const int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) {
        return;
    }
    const sqil_half *xr = x + (long)r * dim;
    float s = 0.0f, v = 0.0f;
    for (int j = lane; j < dim; j += 32) {
        s += h_to_f(xr[j]);
    }
    for (int o = 16; o > 0; o /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    const float mean = s / (float)dim;
    for (int j = lane; j < dim; j += 32) {
        const float d = h_to_f(xr[j]) - mean;
        v += d * d;
    }
    for (int o = 16; o > 0; o /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    const float inv = rsqrtf(v / (float)dim + eps);
    for (int j = lane; j < dim; j += 32) {
        y[(long)r * dim + j] = f_to_h((h_to_f(xr[j]) - mean) * inv * scale[j] + (bias ? bias[j] : 0.0f));
    }
}

// Batched MatMul of two computed operands (attention): y[q] = a[offs[2q]] @ b[offs[2q + 1]],
// [m, k] @ [k, n] per batch; one thread per output, fp32 sums.
extern "C" __global__ void sqil_bmm(const sqil_half *__restrict__ a, const sqil_half *__restrict__ b,
                                    sqil_half *__restrict__ y, const int *__restrict__ offs, int batches, int m, int k,
                                    int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= batches * m * n) {
        return;
    }
    const int q = i / (m * n), r = (i / n) % m, c = i % n;
    const sqil_half *qa = a + offs[2 * q] + r * k, *qb = b + offs[2 * q + 1] + c;
    float s = 0.0f;
    for (int t = 0; t < k; t++) {
        s += h_to_f(qa[t]) * h_to_f(qb[t * n]);
    }
    y[i] = f_to_h(s);
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

// A float layer with constant fp32 weights w[k][n]: y[r, c] = x[r] . w[:, c] + bias[c] (bias may
// be null); one warp per output (the lanes split k: a spatial softmax's keypoint MatMul has
// thousands of terms and a handful of outputs).
extern "C" __global__ void sqil_linear_f32w(const sqil_half *__restrict__ x, const float *__restrict__ w,
                                            const float *__restrict__ bias, sqil_half *__restrict__ y, int rows, int k,
                                            int n, float qs, float qz, float qlo, float qhi)
{
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (i >= rows * n) {
        return;
    }
    const int r = i / n, c = i % n;
    float s = 0.0f;
    for (int t = lane; t < k; t += 32) {
        s += sqil_fq(h_to_f(x[(long)r * k + t]), qs, qz, qlo, qhi) * w[(long)t * n + c];
    }
    for (int o = 16; o > 0; o /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    if (lane == 0) {
        y[i] = f_to_h(s + (bias ? bias[c] : 0.0f));
    }
}


// Where element e of a packed int4 word sits (q4_gemv.cu's interleaved layout: element 2s at bits
// 4s, 2s + 1 at 16 + 4s) and its signed value.
__device__ __forceinline__ int sqil_q4_at(const unsigned *__restrict__ words, int kp, int r, int e)
{
    const int i = e % 8, sh = (i % 2 == 0) ? 2 * i : 16 + 2 * (i - 1);
    return (int)((words[r * (kp / 8) + e / 8] >> sh) & 15u) - 8;
}

// Row `r` of x ([*, k], row stride k) against output channel `c` of an int4 layer in the GEMV
// layout (rows of kp packed weights, fp16 scales per `group`), x read through the activation
// quantizer fq (s = 0: none): fp32 sums per group, eight weights per word load.
__device__ __forceinline__ float sqil_q4_row_dot(const unsigned *__restrict__ words,
                                                 const sqil_half *__restrict__ scales, const sqil_half *__restrict__ x,
                                                 int r, int c, int k, int kp, int group, float qs, float qz, float qlo,
                                                 float qhi)
{
    const sqil_half *xr = x + (long)r * k;
    const unsigned *wr = words + (long)c * (kp / 8);
    float s = 0.0f;
    for (int g0 = 0; g0 < k; g0 += group) {
        float part = 0.0f;
        const int g1 = g0 + group < k ? g0 + group : k;
        int e = g0;
        for (; e + 8 <= g1; e += 8) {
            const unsigned wd = wr[e / 8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int sh = (j % 2 == 0) ? 2 * j : 16 + 2 * (j - 1);
                part += (float)((int)((wd >> sh) & 15u) - 8) * sqil_fq(h_to_f(xr[e + j]), qs, qz, qlo, qhi);
            }
        }
        for (; e < g1; e++) {
            part += (float)sqil_q4_at(words, kp, c, e) * sqil_fq(h_to_f(xr[e]), qs, qz, qlo, qhi);
        }
        s += part * h_to_f(scales[c * (kp / group) + g0 / group]);
    }
    return s;
}

// The epilogue of the many-row int4 kernels: bias (fp32, may be null), then ReLU if asked.
__device__ __forceinline__ float sqil_rows_epilogue(float s, const float *__restrict__ bias, int c, int relu)
{
    if (bias) {
        s += bias[c];
    }
    return relu && s < 0.0f ? 0.0f : s;
}

// An int4 layer over many rows (a transformer's tokens): y = fq(x) w^T (+ bias), y [rows, n]. One
// thread per output, consecutive threads on consecutive channels of one row (x read once per
// warp, the channels' weights from L1).
extern "C" __global__ void sqil_q4_rows(const unsigned *__restrict__ words, const sqil_half *__restrict__ scales,
                                        const sqil_half *__restrict__ x, const float *__restrict__ bias,
                                        sqil_half *__restrict__ y, int rows, int n, int k, int kp, int group,
                                        int relu, float qs, float qz, float qlo, float qhi)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * n) {
        const int r = i / n, c = i % n;
        const float s = sqil_q4_row_dot(words, scales, x, r, c, k, kp, group, qs, qz, qlo, qhi);
        y[(long)r * n + c] = f_to_h(sqil_rows_epilogue(s, bias, c, relu));
    }
}

// A float 2-D convolution of one image (groups allowed): geo as the C back end's (channels, in h,
// w, kernel h, w, strides, dilations, pads at the start, out h, w, groups); w fp32
// [n][c / groups][kh][kw]; one thread per output.
extern "C" __global__ void sqil_conv2d_f32(const sqil_half *__restrict__ x, const int *__restrict__ geo,
                                           const float *__restrict__ w, const float *__restrict__ bias,
                                           sqil_half *__restrict__ y, int n)
{
    const int c = geo[0], h = geo[1], wd = geo[2], kh = geo[3], kw = geo[4], oh = geo[11], ow = geo[12];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * oh * ow) {
        return;
    }
    const int o = i / (oh * ow), oy = (i / ow) % oh, ox = i % ow;
    const int cg = c / geo[13], ng = n / geo[13], c0 = (o / ng) * cg;
    float s = bias ? bias[o] : 0.0f;
    for (int ch = 0; ch < cg; ch++) {
        for (int ty = 0; ty < kh; ty++) {
            const int iy = oy * geo[5] + ty * geo[7] - geo[9];
            if (iy < 0 || iy >= h) {
                continue;
            }
            for (int tx = 0; tx < kw; tx++) {
                const int ix = ox * geo[6] + tx * geo[8] - geo[10];
                if (ix >= 0 && ix < wd) {
                    s += h_to_f(x[((c0 + ch) * h + iy) * wd + ix]) * w[((o * cg + ch) * kh + ty) * kw + tx];
                }
            }
        }
    }
    y[i] = f_to_h(s);
}

// 2-D max or average pooling of `planes` planes (geo as sqil_conv2d_f32's); average divides by
// div[position], or div0 when div is null; one thread per output.
extern "C" __global__ void sqil_pool2d(const sqil_half *__restrict__ x, const int *__restrict__ geo,
                                       sqil_half *__restrict__ y, int planes, int is_max, const int *__restrict__ div,
                                       int div0)
{
    const int h = geo[1], wd = geo[2], kh = geo[3], kw = geo[4], oh = geo[11], ow = geo[12];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * oh * ow) {
        return;
    }
    const int p = i / (oh * ow), o = i % (oh * ow), oy = o / ow, ox = o % ow;
    float s = 0.0f, best = __int_as_float(0xff800000);
    for (int ty = 0; ty < kh; ty++) {
        for (int tx = 0; tx < kw; tx++) {
            const int iy = oy * geo[5] + ty * geo[7] - geo[9], ix = ox * geo[6] + tx * geo[8] - geo[10];
            if (iy >= 0 && iy < h && ix >= 0 && ix < wd) {
                const float v = h_to_f(x[((long)p * h + iy) * wd + ix]);
                s += v;
                best = fmaxf(best, v);
            }
        }
    }
    y[i] = f_to_h(is_max ? best : s / (float)(div ? div[o] : div0));
}

// y[r] = mean of x[r, 0..inner) (GlobalAveragePool); one warp per row.
extern "C" __global__ void sqil_mean_rows(const sqil_half *__restrict__ x, sqil_half *__restrict__ y, int rows,
                                          int inner)
{
    const int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (r >= rows) {
        return;
    }
    float s = 0.0f;
    for (int j = lane; j < inner; j += 32) {
        s += h_to_f(x[(long)r * inner + j]);
    }
    for (int o = 16; o > 0; o /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    if (lane == 0) {
        y[r] = f_to_h(s / (float)inner);
    }
}

// im2col for an int4 convolution: cols[p, t * C + ch] = fq(x[ch, table[p * taps + t]]) (0 where
// the table says padding, 0xffffffff): one row per output position in the packed rows' (tap,
// channel) order, the layer's activation quantizer fq applied on the way (s = 0: none; the
// padding is the zero point, 0).
extern "C" __global__ void sqil_im2col(const sqil_half *__restrict__ x, const unsigned *__restrict__ table,
                                       sqil_half *__restrict__ cols, int positions, int taps, int channels,
                                       int plane, float qs, float qz, float qlo, float qhi)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= positions * taps * channels) {
        return;
    }
    const int ch = i % channels, t = (i / channels) % taps, p = i / (channels * taps);
    const unsigned src = table[p * taps + t];
    cols[i] = src == 0xffffffffu ? (sqil_half)0 : f_to_h(sqil_fq(h_to_f(x[(long)ch * plane + src]), qs, qz, qlo, qhi));
}

// An int4 convolution over im2col rows (`sqil_im2col`, which applied the quantizer): y[c, p] =
// sum_k w[c, k] cols[p, k] (+ bias, ReLU), y channel-major (the plan's layout); the same thread
// mapping as sqil_q4_rows, channels innermost (on an H200, 20 us per 32 x 288 convolution over
// 1681 positions against 27 us with positions innermost, whose columns every channel re-reads
// from L2).
extern "C" __global__ void sqil_q4_conv(const unsigned *__restrict__ words, const sqil_half *__restrict__ scales,
                                        const sqil_half *__restrict__ cols, const float *__restrict__ bias,
                                        sqil_half *__restrict__ y, int positions, int n, int k, int kp, int group,
                                        int relu)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < positions * n) {
        const int p = i / n, c = i % n;
        const float s = sqil_q4_row_dot(words, scales, cols, p, c, k, kp, group, 0.0f, 0.0f, 0.0f, 0.0f);
        y[(long)c * positions + p] = f_to_h(sqil_rows_epilogue(s, bias, c, relu));
    }
}

// Softmax over long rows: one block of 256 threads per row (a spatial softmax over an image's
// positions), fp32, reductions through shared memory.
extern "C" __global__ void sqil_softmax_rows_block(const sqil_half *__restrict__ x, sqil_half *__restrict__ y,
                                                   int rows, int dim)
{
    __shared__ float red[32];
    const int r = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    if (r >= rows) {
        return;
    }
    const sqil_half *xr = x + (long)r * dim;
    float m = -3.0e38f, s = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        m = fmaxf(m, h_to_f(xr[j]));
    }
    for (int o = 16; o > 0; o /= 2) {
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    if (lane == 0) {
        red[warp] = m;
    }
    __syncthreads();
    m = red[0];
    for (int w = 1; w < nw; w++) {
        m = fmaxf(m, red[w]);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        s += expf(h_to_f(xr[j]) - m);
    }
    for (int o = 16; o > 0; o /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    if (lane == 0) {
        red[warp] = s;
    }
    __syncthreads();
    s = 0.0f;
    for (int w = 0; w < nw; w++) {
        s += red[w];
    }
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        y[(long)r * dim + j] = f_to_h(expf(h_to_f(xr[j]) - m) / s);
    }
}
