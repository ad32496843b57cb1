// sqil CUDA: benchmark helpers (sqil-cuda-bench).

// Reads `n` 16-byte words (a buffer larger than the L2 cache) so that the L2 holds clean lines of
// it afterwards: flushes a kernel's data from L2 without leaving dirty lines whose write-back
// would compete with the next kernel's reads (a memset flush does). The XOR is stored only if
// it equals a value no buffer of zeros gives, so the loads are not removed.
extern "C" __global__ void sqil_flush_read(const uint4 *__restrict__ p, unsigned long long n, unsigned int *sink)
{
    unsigned int v = 0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const uint4 q = __ldcg(p + i);
        v ^= q.x ^ q.y ^ q.z ^ q.w;
    }
    if (v == 0x9e3779b9u) {
        *sink = v;
    }
}
