// sqil CUDA: fp16 helpers prepended by the host (crates/cuda) to every kernel source.
// fp16 arithmetic through PTX (no cuda_fp16.h), so NVRTC compiles the kernels with no include
// paths (CI compiles them with only the nvidia-cuda-nvrtc wheel).

typedef unsigned short sqil_half;   // IEEE binary16 bits
typedef unsigned int sqil_half2;    // two binary16 values, element 0 in the low half

__device__ __forceinline__ sqil_half2 h2_sub(sqil_half2 a, sqil_half2 b)
{
    sqil_half2 r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
__device__ __forceinline__ sqil_half2 h2_mul(sqil_half2 a, sqil_half2 b)
{
    sqil_half2 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
__device__ __forceinline__ sqil_half2 h2_fma(sqil_half2 a, sqil_half2 b, sqil_half2 c)
{
    sqil_half2 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
__device__ __forceinline__ float h_to_f(sqil_half h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ sqil_half f_to_h(float f)
{
    sqil_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

