// sqil CUDA: prepended by the host (crates/cuda) and the standalone emitter to every kernel
// source: fp16 helpers, and the macros a policy kernel is declared with.
// fp16 arithmetic through PTX (no cuda_fp16.h), so NVRTC compiles the kernels with no include
// paths (CI compiles them with only the nvidia-cuda-nvrtc wheel).

// A policy kernel (`policy_ops.cu`, the generated element-wise chains) is written as
// `SQIL_KERNEL void name(SQIL_VARGS ...)` over SQIL_BX / SQIL_TX / SQIL_BDIM. Normally these are
// a kernel and its block index, thread index and block size. With SQIL_MEGA defined (a
// persistent program, crates/cuda/src/fused.rs) the same code is a device function that a block
// of 256 threads calls once per block of the step's launch, with that block's index: the same
// threads compute the same values, without a launch per step.
#ifdef SQIL_MEGA
#define SQIL_KERNEL extern "C" __device__ __forceinline__
#define SQIL_VARGS const unsigned sqil_bx, const unsigned sqil_tx,
#define SQIL_LAUNCH_BOUNDS(n)
#define SQIL_BX sqil_bx
#define SQIL_TX sqil_tx
#define SQIL_BDIM 256u
#else
#define SQIL_KERNEL extern "C" __global__
#define SQIL_VARGS
#define SQIL_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define SQIL_BX blockIdx.x
#define SQIL_TX threadIdx.x
#define SQIL_BDIM blockDim.x
#endif

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

