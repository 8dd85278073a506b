// CUDA launchers of the fused local divergence. Plain CUDA: raw device pointers and a
// stream, no torch headers, so the toolkit alone compiles entropy_cuda.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace entropy_kernels {

// The launch schedule's default shared-memory budget (see CudaProblem): half an SM's shared
// memory less the 1 KiB reserved per block (113 KiB on sm_90).
constexpr size_t kTwoBlocksPerSm = ~(size_t)0;

struct CudaProblem {
  int planes, height, width, bins;
  int win_h, win_w;
  bool valid;
  double bandwidth, eps;
  int kernel, divergence;
  // The launch schedule: the library's policy by default; the CUDA op's private schedule argument
  // sets it for benchmarks (tools/cuda_variants.py) and tests.
  // Shared-memory budgets, in bytes. The backward keeps the G of the windows in T in shared memory
  // (a ring) when its shared memory then stays within max_shared_for_ring, else it slides a second
  // window state to recompute them. Both kernels keep the column sums of the last win_w + 1 columns
  // (a column ring: one column sum per window instead of two) when their shared memory then stays
  // within max_shared_for_column_ring and a window has at most 16 rows (the backward only together
  // with the G ring). 0: never; never more than a block may opt in to.
  size_t max_shared_for_ring = kTwoBlocksPerSm;
  size_t max_shared_for_column_ring = kTwoBlocksPerSm;
  // Float column sums at bins <= 32 as tensor-core products (3xTF32) on devices of compute
  // capability 8.0 and later; elsewhere, and by default, FMA products. Opt-in: their static count
  // is no lower than the FMA path's (docs/tensor_cores.md), and no GPU has timed them yet.
  bool tensor_core_column_sums = false;
  // The fused float pass (D and the gradient for grad_output = 1) on the tensor-core training
  // step (docs/tensor_cores.md) where it serves the problem: bins <= 32, windows of at most 16
  // rows, compute capability 8.0 or later, its G ring within max_shared_for_ring (its column ring
  // kept when within max_shared_for_column_ring; for both, kTwoBlocksPerSm means what one block
  // may opt in to). Elsewhere, or when false, the kernels above.
  bool tensor_core_step = true;
};

// Largest bins the CUDA kernels serve (each thread keeps at most 16 of the L*L cells).
constexpr int kCudaMaxBins = 64;

// d: (planes, Ho, Wo). bad_sat: int32 (planes, H + 1, W + 1) summed-area table of non-finite pixels.
template <typename T>
cudaError_t launch_local_divergence_forward(const CudaProblem& pb, const T* u_pred, const T* m_pred, const T* u_tgt,
                                            const T* m_tgt, const int32_t* bad_sat, T* d, cudaStream_t stream);

// The forward pass of a loss whose grad_output will be uniform: D as above, and in the same pass
// the gradient for grad_output = 1 (the backward then only scales it). bad_window_sat: int32
// (planes, Ho + 1, Wo + 1) table of the windows that contain a non-finite pixel. grad_u, grad_m
// zero-filled by the caller.
template <typename T>
cudaError_t launch_local_divergence_forward_with_grad(const CudaProblem& pb, const T* u_pred, const T* m_pred,
                                                      const T* u_tgt, const T* m_tgt, const int32_t* bad_sat,
                                                      const int32_t* bad_window_sat, T* d, T* grad_u, T* grad_m,
                                                      cudaStream_t stream);

// grad_u, grad_m: (planes, H, W), zero-filled by the caller (windows accumulate into them with
// atomics). poison_sat: int32 (planes, Ho + 1, Wo + 1) table of windows with non-finite D or grad.
template <typename T>
cudaError_t launch_local_divergence_backward(const CudaProblem& pb, const T* u_pred, const T* m_pred, const T* u_tgt,
                                             const T* m_tgt, const T* d, const T* grad, const int32_t* poison_sat,
                                             T* grad_u, T* grad_m, cudaStream_t stream);

}  // namespace entropy_kernels
