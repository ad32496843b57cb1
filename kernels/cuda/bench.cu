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

// Probes of where a GEMV's time goes (sqil-cuda-bench probe). The launch floor: a grid of the
// GEMV's shape doing nothing.
extern "C" __global__ void sqil_probe_empty(unsigned int *sink)
{
    if (threadIdx.x == 4096) {
        *sink = 1;
    }
}

// The weight reads of the split-K GEMV alone (R rows per block, lane every 32 * S-th 16-byte
// chunk, blockDim = 32 * S; a chunk's R loads issued together as the GEMV issues them),
// XOR-reduced and kept as sqil_flush_read keeps its loads.
template <int R>
__device__ __forceinline__ void probe_rows(const uint4 *__restrict__ w, int n, int k, unsigned int *sink)
{
    const int chunks = k >> 5;
    unsigned int v = 0;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        uint4 q[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            q[r] = __ldg(w + (size_t)min((int)blockIdx.x * R + r, n - 1) * chunks + c);
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            v ^= q[r].x ^ q[r].y ^ q[r].z ^ q[r].w;
        }
    }
    if (v == 0x9e3779b9u) {
        *sink = v;
    }
}

extern "C" __global__ void sqil_probe_rows_r2(const uint4 *__restrict__ w, int n, int k, unsigned int *sink)
{
    probe_rows<2>(w, n, k, sink);
}

extern "C" __global__ void sqil_probe_rows_r4(const uint4 *__restrict__ w, int n, int k, unsigned int *sink)
{
    probe_rows<4>(w, n, k, sink);
}
