// CPU entry points of the fused local divergence (see entropy_cpu.cpp).
//
// Inputs are contiguous (N, H, W) maps of one floating dtype. bad_sat is the int32
// (N, H + 1, W + 1) summed-area table of pixels where any of the four maps is not finite;
// poison_sat the (N, Ho + 1, Wo + 1) table of windows whose D or grad_output is not finite.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace entropy_kernels {

at::Tensor local_divergence_forward_cpu(const at::Tensor& u_pred, const at::Tensor& m_pred, const at::Tensor& u_tgt,
                                        const at::Tensor& m_tgt, const at::Tensor& bad_sat, int64_t win_h,
                                        int64_t win_w, bool valid, int64_t bins, double bandwidth, int64_t kernel,
                                        int64_t divergence, double eps);

std::vector<at::Tensor> local_divergence_backward_cpu(const at::Tensor& u_pred, const at::Tensor& m_pred,
                                                      const at::Tensor& u_tgt, const at::Tensor& m_tgt,
                                                      const at::Tensor& d, const at::Tensor& grad,
                                                      const at::Tensor& poison_sat, int64_t win_h, int64_t win_w,
                                                      bool valid, int64_t bins, double bandwidth, int64_t kernel,
                                                      int64_t divergence, double eps);

// D together with the gradient for grad_output = 1 in one pass (the backward's pass, which
// recomputes the histograms anyway). bad_window_sat: (N, Ho + 1, Wo + 1) table of the windows
// that contain a non-finite pixel. Returns {D, grad_u, grad_m}.
std::vector<at::Tensor> local_divergence_forward_with_grad_cpu(
    const at::Tensor& u_pred, const at::Tensor& m_pred, const at::Tensor& u_tgt, const at::Tensor& m_tgt,
    const at::Tensor& bad_sat, const at::Tensor& bad_window_sat, int64_t win_h, int64_t win_w, bool valid,
    int64_t bins, double bandwidth, int64_t kernel, int64_t divergence, double eps);

}  // namespace entropy_kernels
