/* sqil portable C99 kernels for packed int4 layers: the firmware back end's kernels, copied
 * into every generated policy.c (`sqil build --target c`). Semantics mirror the Rust reference
 * kernels in kernels/cpu/src/generic.rs operation for operation, so that with IEEE single
 * precision, FLT_EVAL_METHOD 0 and no FMA contraction (GCC's default with -std=c99) the results
 * equal the CPU runtime's bit for bit. The block layout is sqil_block_q4 (sqil_packed.h).
 *
 * Integer parts (int8 x int4 dot products, int32 accumulation per group) have a NEON path
 * behind __ARM_NEON (and the dot-product instructions behind __ARM_FEATURE_DOTPROD); integer
 * sums are exact, so every path gives the same bits.
 *
 * Each kernel is compiled only when the including file defines its SQIL_USE_* macro, so that a
 * policy carries (and -Wunused-function sees) only what it calls. */

#if defined(SQIL_USE_Q4Q8) || defined(SQIL_USE_FAKEQUANT)

/* Round half to even for |x| < 2^22 (the add-magic trick, as the Rust kernels do); larger
 * values only reach a clamp. */
static float sqil_round_even(float x)
{
    float a = x < 0.0f ? -x : x;
    float r;
    if (!(a < 4194304.0f)) {
        return x;
    }
    r = (a + 12582912.0f) - 12582912.0f;
    return x < 0.0f ? -r : r;
}
#endif

#if defined(SQIL_USE_Q4Q8)

/* One value as FakeQuant's quantizer maps it: clamp(round_half_even(v / scale) + zero, lo, hi);
 * NaN gives 0 as Rust's saturating cast does. */
static int8_t sqil_quant1(float x, float scale, int32_t zero, int32_t lo, int32_t hi)
{
    float v = sqil_round_even(x / scale) + (float)zero;
    if (v != v) {
        return 0;
    } else if (v < (float)lo) {
        return (int8_t)lo;
    } else if (v > (float)hi) {
        return (int8_t)hi;
    }
    return (int8_t)v;
}

#if defined(SQIL_USE_Q4Q8_ROWS)
/* q[i] = sqil_quant1(x[i]) for i < k, 0 up to k_pad. */
static void sqil_quantize(const float *x, int32_t k, int32_t k_pad, float scale, int32_t zero, int32_t lo,
                          int32_t hi, int8_t *q)
{
    int32_t i;
    for (i = 0; i < k_pad; i++) {
        q[i] = i < k ? sqil_quant1(x[i], scale, zero, lo, hi) : (int8_t)0;
    }
}
#endif /* SQIL_USE_Q4Q8_ROWS */

#if defined(__ARM_NEON)
#include <arm_neon.h>
/* Sum over `nb` blocks of (w - 8) * x, w the stored nibbles. */
static int32_t sqil_dot_q4q8(const sqil_block_q4 *b, const int8_t *x, int32_t nb)
{
    const uint8x16_t m4 = vdupq_n_u8(15);
    const int8x16_t eight = vdupq_n_s8(8);
    int32x4_t acc = vdupq_n_s32(0);
    int32_t j;
    for (j = 0; j < nb; j++) {
        uint8x16_t v = vld1q_u8(b[j].qs);
        int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, m4)), eight);
        int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), eight);
        int8x16_t x0 = vld1q_s8(x + 32 * j);
        int8x16_t x1 = vld1q_s8(x + 32 * j + 16);
#if defined(__ARM_FEATURE_DOTPROD)
        acc = vdotq_s32(acc, lo, x0);
        acc = vdotq_s32(acc, hi, x1);
#else
        /* |w * x| <= 8 * 128, two products per int16 lane: no overflow. */
        int16x8_t p = vmull_s8(vget_low_s8(lo), vget_low_s8(x0));
        p = vmlal_s8(p, vget_high_s8(lo), vget_high_s8(x0));
        acc = vpadalq_s16(acc, p);
        p = vmull_s8(vget_low_s8(hi), vget_low_s8(x1));
        p = vmlal_s8(p, vget_high_s8(hi), vget_high_s8(x1));
        acc = vpadalq_s16(acc, p);
#endif
    }
#if defined(__aarch64__)
    return vaddvq_s32(acc);
#else
    {
        int32x2_t s = vadd_s32(vget_low_s32(acc), vget_high_s32(acc));
        return vget_lane_s32(vpadd_s32(s, s), 0);
    }
#endif
}
#else
/* Sum over `nb` blocks of (w - 8) * x, w the stored nibbles. */
static int32_t sqil_dot_q4q8(const sqil_block_q4 *b, const int8_t *x, int32_t nb)
{
    int32_t acc = 0, j, i;
    for (j = 0; j < nb; j++) {
        const uint8_t *qs = b[j].qs;
        const int8_t *xj = x + 32 * j;
        for (i = 0; i < 16; i++) {
            acc += ((int32_t)(qs[i] & 15) - 8) * xj[i] + ((int32_t)(qs[i] >> 4) - 8) * xj[i + 16];
        }
    }
    return acc;
}
#endif

#if defined(__ARM_NEON)
/* Runs s = 0..3 of eight consecutive weights (w - off, w = low two bits at 2s of the block's eight
 * bytes, plus for 3 bits the high bits of byte s of qh) against x: exact int32 sums, as the
 * scalar loops below. */
static int32_t sqil_dot_q23_neon(const uint8_t *lo, const uint8_t *qh, int32_t off, const int8_t *x)
{
    static const uint8_t bit_of[8] = {1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x8_t q = vld1_u8(lo), three = vdup_n_u8(3), bits = vld1_u8(bit_of);
    const int8x8_t o = vdup_n_s8((int8_t)off);
    int32x4_t acc = vdupq_n_s32(0);
    int32_t s;
    for (s = 0; s < 4; s++) {
        uint8x8_t v = vand_u8(vshl_u8(q, vdup_n_s8((int8_t)(-2 * s))), three);
        if (qh) {
            v = vorr_u8(v, vand_u8(vtst_u8(vdup_n_u8(qh[s]), bits), vdup_n_u8(4)));
        }
        acc = vpadalq_s16(acc, vmull_s8(vsub_s8(vreinterpret_s8_u8(v), o), vld1_s8(x + 8 * s)));
    }
#if defined(__aarch64__)
    return vaddvq_s32(acc);
#else
    {
        int32x2_t t = vadd_s32(vget_low_s32(acc), vget_high_s32(acc));
        return vget_lane_s32(vpadd_s32(t, t), 0);
    }
#endif
}

/* Sum over `nb` 2-bit blocks of w * x (w = stored - 2; byte j holds elements j + 8s at bits 2s). */
static int32_t sqil_dot_q2q8(const sqil_block_q2 *b, const int8_t *x, int32_t nb)
{
    int32_t acc = 0, j;
    for (j = 0; j < nb; j++) {
        acc += sqil_dot_q23_neon(b[j].qs, 0, 2, x + 32 * j);
    }
    return acc;
}

/* Sum over `nb` 3-bit blocks of w * x (w = stored - 4; high bit of element 8s + i: bit i of qh[s]). */
static int32_t sqil_dot_q3q8(const sqil_block_q3 *b, const int8_t *x, int32_t nb)
{
    int32_t acc = 0, j;
    for (j = 0; j < nb; j++) {
        acc += sqil_dot_q23_neon(b[j].ql, b[j].qh, 4, x + 32 * j);
    }
    return acc;
}
#else
/* Sum over `nb` 2-bit blocks of w * x (w = stored - 2; byte j holds elements j + 8s at bits 2s). */
static int32_t sqil_dot_q2q8(const sqil_block_q2 *b, const int8_t *x, int32_t nb)
{
    int32_t acc = 0, j, i, s;
    for (j = 0; j < nb; j++) {
        const int8_t *xj = x + 32 * j;
        for (s = 0; s < 4; s++) {
            for (i = 0; i < 8; i++) {
                acc += ((int32_t)((b[j].qs[i] >> (2 * s)) & 3) - 2) * xj[8 * s + i];
            }
        }
    }
    return acc;
}

/* Sum over `nb` 3-bit blocks of w * x (w = stored - 4: low bits as in sqil_block_q2, high bit i
 * of the little-endian word qh for element i). */
static int32_t sqil_dot_q3q8(const sqil_block_q3 *b, const int8_t *x, int32_t nb)
{
    int32_t acc = 0, j, i, s;
    for (j = 0; j < nb; j++) {
        const int8_t *xj = x + 32 * j;
        const uint32_t qh = (uint32_t)b[j].qh[0] | ((uint32_t)b[j].qh[1] << 8) | ((uint32_t)b[j].qh[2] << 16) |
                            ((uint32_t)b[j].qh[3] << 24);
        for (s = 0; s < 4; s++) {
            for (i = 0; i < 8; i++) {
                const int32_t v = (int32_t)((b[j].ql[i] >> (2 * s)) & 3) | (int32_t)(((qh >> (8 * s + i)) & 1u) << 2);
                acc += (v - 4) * xj[8 * s + i];
            }
        }
    }
    return acc;
}
#endif /* __ARM_NEON */

/* The dot product of `nb` blocks of `bits`-bit weights (bytes of sqil_block_q2, _q3 or _q4). */
static int32_t sqil_dot_qx(int32_t bits, const uint8_t *w, const int8_t *x, int32_t nb)
{
    switch (bits) {
    case 2:
        return sqil_dot_q2q8((const sqil_block_q2 *)(const void *)w, x, nb);
    case 3:
        return sqil_dot_q3q8((const sqil_block_q3 *)(const void *)w, x, nb);
    default:
        return sqil_dot_q4q8((const sqil_block_q4 *)(const void *)w, x, nb);
    }
}

/* W4A8 (and W3A8, W2A8 on dense blocks of `bits` bits: 4 * bits bytes per 32 weights): y[r] = sum
 * over groups g in order of (sum_k w[r,k] * q[k] - zero * wsum[r,g]) * scale[r,g] (product
 * rounded, then added), then * xscale + bias, then ReLU if asked: the runtime's epilogue,
 * operation for operation (the integer sums are exact whatever the packing). */
static void sqil_gemv_q4q8(const uint8_t *w, int32_t bits, const float *scales, const int32_t *wsums, int32_t n,
                           int32_t k_pad, int32_t group, const int8_t *q, int32_t zero, float xscale,
                           const float *bias, int relu, float *y)
{
    const int32_t groups = k_pad / group, bpg = group / 32, bpr = k_pad / 32, bb = 4 * bits;
    int32_t r, g;
    for (r = 0; r < n; r++) {
        float acc = 0.0f, v;
        for (g = 0; g < groups; g++) {
            int32_t s = sqil_dot_qx(bits, w + (r * bpr + g * bpg) * bb, q + g * group, bpg) - zero * wsums[r * groups + g];
            float p = (float)s * scales[r * groups + g];
            acc += p;
        }
        v = acc * xscale;
        v = v + (bias ? bias[r] : 0.0f);
        if (relu) {
            v = v < 0.0f ? 0.0f : v; /* the IR ReLU: NaN and -0 pass */
        }
        y[r] = v;
    }
}

#if defined(SQIL_USE_Q4Q8_ROWS)
/* Outputs of a layer whose input row x (k values) holds a NaN become that NaN, as in the
 * simulation (FakeQuant keeps a NaN and every output sums it), which int8 cannot hold. */
static void sqil_nan_rows(const float *x, int32_t k, float *y, int32_t n)
{
    int32_t i, r;
    for (i = 0; i < k; i++) {
        if (x[i] != x[i]) {
            for (r = 0; r < n; r++) {
                y[r] = x[i];
            }
            return;
        }
    }
}
#endif /* SQIL_USE_Q4Q8_ROWS */

#if defined(SQIL_USE_CONV_Q4Q8)
/* Int4 2-D convolution of one image x [c][h][w]: the image quantized once, channels innermost
 * (qimg), each output position's window gathered in (tap, channel) order into row, each tap's c
 * bytes at a multiple of geo[13] (>= c: runs padded to whole groups; padding: the zero point,
 * which adds nothing; bytes between runs and the k_pad tail: 0 against zero weights), the
 * position's W4A8 GEMV
 * into tmp, written channel-major to y [n][oh][ow]: the runtime's arithmetic per (channel,
 * position). */
static void sqil_conv_q4q8(const float *x, const int32_t *geo, const uint8_t *w, int32_t bits, const float *scales,
                           const int32_t *wsums, int32_t n, int32_t k_pad, int32_t group, float xscale, int32_t zero,
                           int32_t lo, int32_t hi, const float *bias, int relu, int8_t *qimg, int8_t *row,
                           float *tmp, float *y)
{
    /* geo: c, h, w, kh, kw, stride h, stride w, dilation h, dilation w, pad top, pad left, oh, ow,
     * run */
    const int32_t c = geo[0], h = geo[1], wd = geo[2], kh = geo[3], kw = geo[4], oh = geo[11], ow = geo[12];
    const int32_t run = geo[13];
    int32_t i, ch, oy, ox, ty, tx, o, at;
    int any_nan = 0;
    for (ch = 0; ch < c; ch++) {
        for (i = 0; i < h * wd; i++) {
            qimg[i * c + ch] = sqil_quant1(x[ch * h * wd + i], xscale, zero, lo, hi);
            any_nan |= x[ch * h * wd + i] != x[ch * h * wd + i];
        }
    }
    for (oy = 0; oy < oh; oy++) {
        for (ox = 0; ox < ow; ox++) {
            at = 0;
            for (ty = 0; ty < kh; ty++) {
                for (tx = 0; tx < kw; tx++) {
                    const int32_t iy = oy * geo[5] + ty * geo[7] - geo[9], ix = ox * geo[6] + tx * geo[8] - geo[10];
                    if (iy < 0 || iy >= h || ix < 0 || ix >= wd) {
                        for (i = 0; i < c; i++) {
                            row[at + i] = (int8_t)zero;
                        }
                    } else {
                        memcpy(row + at, qimg + (iy * wd + ix) * c, (size_t)c);
                    }
                    for (i = c; i < run; i++) {
                        row[at + i] = 0;
                    }
                    at += run;
                }
            }
            for (; at < k_pad; at++) {
                row[at] = 0;
            }
            sqil_gemv_q4q8(w, bits, scales, wsums, n, k_pad, group, row, zero, xscale, bias, relu, tmp);
            /* A NaN in the window (rare: only scanned for when the image has one) makes every
             * output at this position NaN, as in the simulation. */
            for (ty = 0; any_nan && ty < kh; ty++) {
                for (tx = 0; tx < kw; tx++) {
                    const int32_t iy = oy * geo[5] + ty * geo[7] - geo[9], ix = ox * geo[6] + tx * geo[8] - geo[10];
                    for (ch = 0; iy >= 0 && iy < h && ix >= 0 && ix < wd && ch < c; ch++) {
                        const float v = x[(ch * h + iy) * wd + ix];
                        if (v != v) {
                            for (o = 0; o < n; o++) {
                                tmp[o] = v;
                            }
                        }
                    }
                }
            }
            for (o = 0; o < n; o++) {
                y[(o * oh + oy) * ow + ox] = tmp[o];
            }
        }
    }
}
#endif /* SQIL_USE_CONV_Q4Q8 */

#endif /* SQIL_USE_Q4Q8 */

#if defined(SQIL_USE_Q4F32)
/* Weight-only W4 on float activations, the arithmetic of sqil_kernels_cpu's q4f32 kernels: eight
 * lanes, lane l summing by fmaf, per group from +0, elements l, l + 8, l + 16, l + 24 of each
 * block of 32 in order (elements past k add an exact zero: skipped); per group the lanes fmaf'd
 * into their totals with the group's scale; the totals summed (t0 + t4) + (t2 + t6) plus
 * (t1 + t5) + (t3 + t7); then the bias added, then ReLU if asked. */
static void sqil_gemv_q4f32(const sqil_block_q4 *w, const float *scales, int32_t n, int32_t k, int32_t k_pad,
                            int32_t group, const float *x, const float *bias, int relu, float *y)
{
    const int32_t groups = k_pad / group, bpr = k_pad / 32, bpg = group / 32;
    int32_t r, g, b, j, l, i;
    for (r = 0; r < n; r++) {
        float total[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, v;
        for (g = 0; g < groups; g++) {
            float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            for (b = g * bpg; b < (g + 1) * bpg; b++) {
                for (j = 0; j < 32; j += 8) {
                    for (l = 0; l < 8; l++) {
                        i = b * 32 + j + l;
                        if (i < k) {
                            uint8_t byte = w[r * bpr + b].qs[i % 16];
                            int32_t nib = (i % 32) < 16 ? (byte & 15) : (byte >> 4);
                            acc[l] = fmaf((float)(nib - 8), x[i], acc[l]);
                        }
                    }
                }
            }
            for (l = 0; l < 8; l++) {
                total[l] = fmaf(acc[l], scales[r * groups + g], total[l]);
            }
        }
        v = ((total[0] + total[4]) + (total[2] + total[6])) + ((total[1] + total[5]) + (total[3] + total[7]));
        if (bias) {
            v = v + bias[r];
        }
        if (relu) {
            v = v < 0.0f ? 0.0f : v; /* the IR ReLU: NaN and -0 pass */
        }
        y[r] = v;
    }
}

#endif /* SQIL_USE_Q4F32 */

#if defined(SQIL_USE_F32)
/* Float layer with float weights w[k][n] (row-major, the layer's constant): y = x @ w (+ bias),
 * each output one fused multiply-add chain over k in order from +0 (the IR's policy GEMM,
 * sqil_kernels_cpu::sgemm_chain), then the bias added once. */
static void sqil_gemv_f32(const float *w, int32_t n, int32_t k, const float *x, const float *bias, float *y)
{
    int32_t r, i;
    for (r = 0; r < n; r++) {
        float acc = 0.0f;
        for (i = 0; i < k; i++) {
            acc = fmaf(x[i], w[i * n + r], acc);
        }
        y[r] = bias ? acc + bias[r] : acc;
    }
}
#endif /* SQIL_USE_F32 */

#if defined(SQIL_USE_CONV_F32)
/* Float 2-D convolution of one image (groups of channels allowed): each output one fused
 * multiply-add chain in (channel, tap) order from +0, padding taps skipped (they add an exact
 * zero), then the bias: the IR's convolution (im2col, then the policy GEMM). geo as for
 * sqil_conv_q4q8, plus groups at geo[13]. w is [n][c / groups][kh][kw]. */
static void sqil_conv_f32(const float *x, const int32_t *geo, const float *w, int32_t n, const float *bias, float *y)
{
    const int32_t c = geo[0], h = geo[1], wd = geo[2], kh = geo[3], kw = geo[4], oh = geo[11], ow = geo[12];
    const int32_t cg = c / geo[13], ng = n / geo[13];
    int32_t o, oy, ox, ch, ty, tx;
    for (o = 0; o < n; o++) {
        const int32_t c0 = (o / ng) * cg;
        for (oy = 0; oy < oh; oy++) {
            for (ox = 0; ox < ow; ox++) {
                float acc = 0.0f;
                for (ch = 0; ch < cg; ch++) {
                    for (ty = 0; ty < kh; ty++) {
                        for (tx = 0; tx < kw; tx++) {
                            const int32_t iy = oy * geo[5] + ty * geo[7] - geo[9], ix = ox * geo[6] + tx * geo[8] - geo[10];
                            if (iy >= 0 && iy < h && ix >= 0 && ix < wd) {
                                acc = fmaf(x[((c0 + ch) * h + iy) * wd + ix], w[((o * cg + ch) * kh + ty) * kw + tx], acc);
                            }
                        }
                    }
                }
                y[(o * oh + oy) * ow + ox] = bias ? acc + bias[o] : acc;
            }
        }
    }
}
#endif /* SQIL_USE_CONV_F32 */

#if defined(SQIL_USE_POOL)
/* 2-D max or average pooling of `planes` planes; geo as sqil_conv_f32's (geo[0] unused). Taps
 * in (row, column) order, those in the padding skipped, values in double as the reference ops
 * take them. Max: the first tap, then each strictly greater one (a NaN first tap stays); -inf
 * for a window wholly in the padding. Average: the taps summed from `zero` (the reference sum's
 * start, whose sign an all-zero window keeps), divided by div[position], or by div0 when div is
 * 0. */
static void sqil_pool2d(const float *x, const int32_t *geo, int32_t planes, int32_t is_max, const int32_t *div,
                        int32_t div0, double zero, float *y)
{
    const int32_t h = geo[1], wd = geo[2], kh = geo[3], kw = geo[4], oh = geo[11], ow = geo[12];
    const uint32_t ninf_bits = 0xff800000u;
    float ninf;
    int32_t p, oy, ox, ty, tx;
    memcpy(&ninf, &ninf_bits, sizeof ninf);
    for (p = 0; p < planes; p++) {
        const float *xp = x + p * h * wd;
        for (oy = 0; oy < oh; oy++) {
            for (ox = 0; ox < ow; ox++) {
                const int32_t o = oy * ow + ox;
                double s = zero, best = 0.0;
                int seen = 0;
                for (ty = 0; ty < kh; ty++) {
                    for (tx = 0; tx < kw; tx++) {
                        const int32_t iy = oy * geo[5] + ty * geo[7] - geo[9], ix = ox * geo[6] + tx * geo[8] - geo[10];
                        if (iy >= 0 && iy < h && ix >= 0 && ix < wd) {
                            const double v = (double)xp[iy * wd + ix];
                            if (!is_max) {
                                s += v;
                            } else if (!seen || v > best) {
                                best = v;
                                seen = 1;
                            }
                        }
                    }
                }
                if (is_max) {
                    y[p * oh * ow + o] = seen ? (float)best : ninf;
                } else {
                    y[p * oh * ow + o] = (float)(s / (double)(div ? div[o] : div0));
                }
            }
        }
    }
}
#endif /* SQIL_USE_POOL */
