// sqil CUDA: the element-wise steps of a policy plan (the int4 layers are q4_gemv.cu), on fp16
// activations with fp32 arithmetic. One thread per element.

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

// y[i] = x[i] op c[i % m]: op 0 add, 1 sub, 2 mul, 3 div; c in fp32 (the plan's constant).
extern "C" __global__ void sqil_binary_const(const sqil_half *__restrict__ x, sqil_half *__restrict__ y,
                                             const float *__restrict__ c, int n, int m, int op)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    y[i] = f_to_h(sqil_binop(h_to_f(x[i]), c[i % m], op));
}

// The policy's input arrives in fp32: its first element-wise step (typically the observation
// normalisation (x - mean) / std, where fp16 would lose x's low bits before the subtraction) reads
// it in fp32; any other first use goes through a cast.
extern "C" __global__ void sqil_binary_const_f32in(const float *__restrict__ x, sqil_half *__restrict__ y,
                                                   const float *__restrict__ c, int n, int m, int op)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    y[i] = f_to_h(sqil_binop(x[i], c[i % m], op));
}

extern "C" __global__ void sqil_cast_f32_f16(const float *__restrict__ x, sqil_half *__restrict__ y, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = f_to_h(x[i]);
    }
}

// y = f(x): op 0 relu, 1 tanh, 2 sigmoid, 3 neg; then clamped to [lo, hi] (Clip; +-inf for none).
extern "C" __global__ void sqil_unary(const sqil_half *__restrict__ x, sqil_half *__restrict__ y, int n, int op,
                                      float lo, float hi)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    float v = h_to_f(x[i]);
    switch (op) {
    case 0: v = v < 0.0f ? 0.0f : v; break;
    case 1: v = tanhf(v); break;
    case 2: v = 1.0f / (1.0f + expf(-v)); break;
    case 3: v = -v; break;
    default: break;
    }
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    y[i] = f_to_h(v);
}

// Per-tensor activation quantizer (FakeQuant): q = clamp(rint(x / s) + z, lo, hi), y = (q - z) * s.
extern "C" __global__ void sqil_fake_quant(const sqil_half *__restrict__ x, sqil_half *__restrict__ y, int n, float s,
                                           float z, float lo, float hi)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    float q = rintf(h_to_f(x[i]) / s) + z;
    q = q < lo ? lo : (q > hi ? hi : q);
    y[i] = f_to_h((q - z) * s);
}
