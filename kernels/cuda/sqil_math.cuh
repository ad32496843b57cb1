// sqil's elementary functions in double, as the CPU defines them (sqil_kernels_cpu::generic:
// exp_nonpos, sigmoid, tanh, log1p_unit, softplus), and its int8 level quantizer (sqil_level):
// the same IEEE operations in the same order (each rounded: no contraction into fused
// multiply-adds), the same constants, so the same bits as the interpreter and the CPU runtime
// (crates/cuda/tests/kernels.rs checks the constants).
// Prepended, after fp16.cuh, to every kernel source, generated ones included (guarded: a
// source that carries it already may have it prepended again).
#ifndef SQIL_MATH_CUH
#define SQIL_MATH_CUH
#define SQIL_EXP_MAGIC 6755399441055744.0
__device__ __forceinline__ double sqil_exp_nonpos(double x)
{
    if (x != x) {
        return x;
    }
    if (x <= -708.0) {
        return 0.0;
    }
    const double log2e = __longlong_as_double(0x3ff71547652b82feLL);
    const double ln2_hi = __longlong_as_double(0x3fe62e42fee00000LL);
    const double ln2_lo = __longlong_as_double(0x3dea39ef35793c76LL);
    const double t = __dadd_rn(__dmul_rn(x, log2e), SQIL_EXP_MAGIC);
    const double n = __dsub_rn(t, SQIL_EXP_MAGIC);
    const double r = __dsub_rn(__dsub_rn(x, __dmul_rn(n, ln2_hi)), __dmul_rn(n, ln2_lo));
    // 1 / k! for k = 13 down to 0 (EXP_TAYLOR), by Horner.
    const double c[14] = {1.0,           1.0,            1.0 / 2.0,        1.0 / 6.0,
                          1.0 / 24.0,    1.0 / 120.0,    1.0 / 720.0,      1.0 / 5040.0,
                          1.0 / 40320.0, 1.0 / 362880.0, 1.0 / 3628800.0,  1.0 / 39916800.0,
                          1.0 / 479001600.0, 1.0 / 6227020800.0};
    double p = c[13];
#pragma unroll
    for (int k = 12; k >= 0; k--) {
        p = __dadd_rn(__dmul_rn(p, r), c[k]);
    }
    const long long e = __double_as_longlong(t) - __double_as_longlong(SQIL_EXP_MAGIC) + 1023;
    return __dmul_rn(p, __longlong_as_double(e << 52));
}
__device__ __forceinline__ double sqil_sigmoid(double x)
{
    const double e = sqil_exp_nonpos(-fabs(x));
    return x >= 0.0 ? __ddiv_rn(1.0, __dadd_rn(1.0, e)) : __ddiv_rn(e, __dadd_rn(1.0, e));
}
__device__ __forceinline__ double sqil_tanh(double x)
{
    const double a = fabs(x);
    double t;
    if (a < 1.0 / 1024.0) {
        const double a2 = __dmul_rn(a, a);
        const double inner = __dadd_rn(2.0 / 15.0, __dmul_rn(a2, -17.0 / 315.0));
        const double poly = __dadd_rn(-1.0 / 3.0, __dmul_rn(a2, inner));
        t = __dadd_rn(a, __dmul_rn(__dmul_rn(a, a2), poly));
    } else {
        const double e = sqil_exp_nonpos(__dmul_rn(-2.0, a));
        t = __ddiv_rn(__dsub_rn(1.0, e), __dadd_rn(1.0, e));
    }
    return copysign(t, x);
}
__device__ __forceinline__ double sqil_log1p_unit(double t)
{
    const double s = __ddiv_rn(t, __dadd_rn(2.0, t));
    const double z = __dmul_rn(s, s);
    // 1 / (2n + 1) for n = 17 down to 0 (ATANH_SERIES), by Horner.
    double p = 1.0 / 35.0;
#pragma unroll
    for (int n = 16; n >= 0; n--) {
        p = __dadd_rn(__dmul_rn(p, z), 1.0 / (double)(2 * n + 1));
    }
    return __dmul_rn(__dmul_rn(2.0, s), p);
}
__device__ __forceinline__ double sqil_softplus(double x)
{
    const double m = x > 0.0 ? x : 0.0;
    return __dadd_rn(m, sqil_log1p_unit(sqil_exp_nonpos(-fabs(x))));
}
__device__ __forceinline__ double sqil_expm1_nonpos(double x)
{
    if (x > -1.0 / 1024.0) {
        const double p = __dadd_rn(1.0 / 2.0, __dmul_rn(x, __dadd_rn(1.0 / 6.0, __dmul_rn(x, __dadd_rn(1.0 / 24.0, __dmul_rn(x, 1.0 / 120.0))))));
        return __dadd_rn(x, __dmul_rn(__dmul_rn(x, x), p));
    }
    return __dsub_rn(sqil_exp_nonpos(x), 1.0);
}
__device__ __forceinline__ double sqil_elu(double x, double alpha)
{
    return x < 0.0 ? __dmul_rn(alpha, sqil_expm1_nonpos(x)) : x;
}

// Quantized activation levels minus the zero point, as floats (exact small integers):
// clamp(rint(x / s) + z, lo, hi) - z, the CPU's int8 quantizer (NaN stays NaN). Here, in every
// source's prelude, so the generated element-wise chains that write levels call it too.
__device__ __forceinline__ float sqil_level(float x, float s, float z, float lo, float hi)
{
    float q = rintf(__fdiv_rn(x, s)) + z;
    q = q < lo ? lo : (q > hi ? hi : q);
    return q - z;
}

#endif // SQIL_MATH_CUH
