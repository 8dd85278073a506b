// Kernels that check csrc/ek_mma.h's matrix product through the CPU emulator
// (tests/test_cuda_mma.py): one warp loads A (16 x 8, row-major), B (8 x 8, row-major in memory) and
// C (16 x 8) into the fragments PTX documents, multiplies, and stores D from its fragments. Valid
// CUDA too (`nvcc -c` compiles it; on a GPU it runs the instruction itself).
#include <cuda_runtime.h>

#ifndef EK_SIMT_EMULATION
#define EK_LAUNCH_KERNEL(kernel, grid, block, shared, stream) kernel<<<grid, block, shared, stream>>>
#endif

#include "ek_mma.h"

namespace {

using entropy_kernels::mma_3xtf32_m16n8k8;
using entropy_kernels::mma_tf32_m16n8k8;
using entropy_kernels::split_tf32;
using entropy_kernels::to_tf32;

// mode 0: one TF32 product of the operands as given; 1: the operands rounded by to_tf32 first;
// 2: the split 3xTF32 product.
__global__ void mma_kernel(const float* A, const float* B, const float* C, float* D, int mode) {
  const int lane = (int)threadIdx.x, g = lane / 4, c = lane % 4;
  float a[4] = {A[g * 8 + c], A[(g + 8) * 8 + c], A[g * 8 + c + 4], A[(g + 8) * 8 + c + 4]};
  float b[2] = {B[c * 8 + g], B[(c + 4) * 8 + g]};
  float d[4] = {C[g * 8 + 2 * c], C[g * 8 + 2 * c + 1], C[(g + 8) * 8 + 2 * c], C[(g + 8) * 8 + 2 * c + 1]};
  if (mode == 2) {
    float a_hi[4], a_lo[4], b_hi[2], b_lo[2];
    for (int e = 0; e < 4; ++e) split_tf32(a[e], &a_hi[e], &a_lo[e]);
    for (int e = 0; e < 2; ++e) split_tf32(b[e], &b_hi[e], &b_lo[e]);
    mma_3xtf32_m16n8k8(d, a_hi, a_lo, b_hi, b_lo);
  } else {
    if (mode == 1) {
      for (int e = 0; e < 4; ++e) a[e] = to_tf32(a[e]);
      for (int e = 0; e < 2; ++e) b[e] = to_tf32(b[e]);
    }
    mma_tf32_m16n8k8(d, a, b, d);
  }
  D[g * 8 + 2 * c] = d[0];
  D[g * 8 + 2 * c + 1] = d[1];
  D[(g + 8) * 8 + 2 * c] = d[2];
  D[(g + 8) * 8 + 2 * c + 1] = d[3];
}

// bits 0: to_tf32 (cvt.rna on a device), 1: to_tf32_bits (the integer form the training step uses).
__global__ void to_tf32_kernel(const float* in, float* out, int n, int bits) {
  for (int i = (int)threadIdx.x; i < n; i += 32) out[i] = bits ? entropy_kernels::to_tf32_bits(in[i]) : to_tf32(in[i]);
}

}  // namespace

extern "C" {

int simt_mma(const float* A, const float* B, const float* C, float* D, int mode, int threads) {
  EK_LAUNCH_KERNEL(mma_kernel, 1, threads, 0, nullptr)(A, B, C, D, mode);
  return cudaGetLastError();
}

int simt_to_tf32(const float* in, float* out, int n, int bits) {
  EK_LAUNCH_KERNEL(to_tf32_kernel, 1, 32, 0, nullptr)(in, out, n, bits);
  return cudaGetLastError();
}

}  // extern "C"
