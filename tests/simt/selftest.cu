// Kernels that check the CPU emulator itself (tests/test_cuda_emulated.py): a block
// reduction through shared memory and warp shuffles, a deadlock, a read of shared memory no
// thread wrote, and the dynamic shared memory limit. Valid CUDA too (`nvcc -c` compiles it).
#include <cuda_runtime.h>

#ifndef EK_SIMT_EMULATION
#define EK_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#define EK_LAUNCH_KERNEL(kernel, grid, block, shared, stream) kernel<<<grid, block, shared, stream>>>
#endif

namespace {

// out[block] = sum of in[block * blockDim + t] over the block's threads (blockDim a multiple of 32).
__global__ void block_sum_kernel(const double* in, double* out) {
  __shared__ double partial[32];
  double v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
    out[blockIdx.x] = total;
  }
}

// Lanes 0-15 of warp 0 wait at __syncthreads while lanes 16-31 wait in a shuffle: neither can
// complete.
__global__ void deadlock_kernel(float* out) {
  float v = (float)threadIdx.x;
  if (threadIdx.x < 16)
    __syncthreads();
  else
    v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Thread t reads the dynamic shared slot that thread t + 1 should have written, but the last
// thread's neighbour slot is never written.
__global__ void unwritten_shared_kernel(float* out) {
  EK_DYNAMIC_SHARED(smem);
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + 1];
}

// Every thread adds its index to out[0] (atomics) and writes the block's dynamic shared size check.
__global__ void atomic_kernel(float* out) {
  EK_DYNAMIC_SHARED(smem);
  smem[threadIdx.x] = 1;
  atomicAdd(out, (float)threadIdx.x);
}

}  // namespace

extern "C" {

int simt_block_sum(const double* in, double* out, int blocks, int threads) {
  EK_LAUNCH_KERNEL(block_sum_kernel, blocks, threads, 0, nullptr)(in, out);
  return cudaGetLastError();
}

int simt_deadlock(float* out) {
  EK_LAUNCH_KERNEL(deadlock_kernel, 1, 64, 0, nullptr)(out);
  return cudaGetLastError();
}

int simt_unwritten_shared(float* out, int threads) {
  EK_LAUNCH_KERNEL(unwritten_shared_kernel, 1, threads, (threads + 1) * sizeof(float), nullptr)(out);
  return cudaGetLastError();
}

// Launches with `shared` bytes of dynamic shared memory, first raising the kernel's limit to
// `limit` bytes when limit > 0.
int simt_atomic(float* out, int threads, int shared, int limit) {
  if (limit > 0) {
    const cudaError_t e = cudaFuncSetAttribute(atomic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
    if (e != cudaSuccess) return e;
  }
  EK_LAUNCH_KERNEL(atomic_kernel, 1, threads, (size_t)shared, nullptr)(out);
  return cudaGetLastError();
}

}  // extern "C"
