// Torch binding of the fused local divergence: argument checks, the NaN bookkeeping tables,
// and dispatch to the CPU code or (when built with EK_WITH_CUDA) the CUDA launchers.
// The autograd and fake registrations live in Python (entropy_kernels/ops/_extension.py).
// ATen and torch's pybind casters only: torch/extension.h would pull in the whole C++
// frontend and double the build time of this file.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "entropy_cpu.h"
#include "entropy_math.h"

#ifdef EK_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "entropy_cuda.h"
#endif

namespace entropy_kernels {
namespace {

void check_maps(std::initializer_list<const at::Tensor*> maps, const at::Tensor& like, int64_t rows, int64_t cols,
                const char* what) {
  for (const at::Tensor* t : maps) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == like.size(0) && t->size(1) == rows && t->size(2) == cols, what,
                " must be (", like.size(0), ", ", rows, ", ", cols, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == like.scalar_type(), what, " must all be ", like.scalar_type(), ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == like.device(), what, " must all be on ", like.device(), ", got ", t->device());
    TORCH_CHECK(t->is_contiguous(), what, " must be contiguous");
  }
}

void check_problem(const at::Tensor& u, int64_t win_h, int64_t win_w, bool valid, int64_t bins, double bandwidth,
                   int64_t kernel, int64_t divergence) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "entropy_kernels: maps must be float32 or float64, got ", u.scalar_type());
  TORCH_CHECK(win_h >= 1 && win_w >= 1, "window sides must be >= 1, got ", win_h, "x", win_w);
  TORCH_CHECK(!valid || (win_h <= u.size(1) && win_w <= u.size(2)), "a 'valid' window of ", win_h, "x", win_w,
              " does not fit an image of ", u.size(1), "x", u.size(2));
  TORCH_CHECK(bins >= 2, "bins must be >= 2, got ", bins);
  TORCH_CHECK(bandwidth > 0, "bandwidth must be > 0, got ", bandwidth);
  TORCH_CHECK(kernel == kLogistic || kernel == kGaussian, "unknown kernel id ", kernel);
  TORCH_CHECK(divergence == kKL || divergence == kHellinger, "unknown divergence id ", divergence);
}

// int32 (N, R + 1, C + 1) summed-area table of a boolean (N, R, C) map, zero first row and column.
at::Tensor summed_area(const at::Tensor& marks) {
  at::Tensor s = marks.to(at::kInt).cumsum(1, at::kInt).cumsum(2, at::kInt);
  return at::constant_pad_nd(s, {1, 0, 1, 0}, 0).contiguous();
}

// The same from a mark function mark(n, y, x) in plain loops (CPU tensors: one pass instead of
// ~25 small tensor operations per call, which cost ~4% of a 64 x 64 call).
template <typename Mark>
at::Tensor summed_area_cpu(int64_t planes, int64_t rows, int64_t cols, const Mark& mark) {
  at::Tensor s = at::empty({planes, rows + 1, cols + 1}, at::TensorOptions().dtype(at::kInt));
  int32_t* p = s.data_ptr<int32_t>();
  const int64_t stride = cols + 1, plane = (rows + 1) * stride;
  for (int64_t n = 0; n < planes; ++n) {
    int32_t* q = p + n * plane;
    std::fill(q, q + stride, 0);
    for (int64_t y = 0; y < rows; ++y) {
      int32_t* row = q + (y + 1) * stride;
      const int32_t* above = row - stride;
      row[0] = 0;
      int32_t run = 0;  // marks in this row up to x
      for (int64_t x = 0; x < cols; ++x) {
        run += mark(n, y, x) ? 1 : 0;
        row[x + 1] = above[x + 1] + run;
      }
    }
  }
  return s;
}

at::Tensor bad_pixel_table(const at::Tensor& up, const at::Tensor& mp, const at::Tensor& ut, const at::Tensor& mt) {
  if (up.is_cuda())
    return summed_area(at::logical_not(up.isfinite() & mp.isfinite() & ut.isfinite() & mt.isfinite()));
  const int64_t rows = up.size(1), cols = up.size(2), plane = rows * cols;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(up.scalar_type(), "bad_pixel_table", [&] {
    const scalar_t *a = up.data_ptr<scalar_t>(), *b = mp.data_ptr<scalar_t>(), *c = ut.data_ptr<scalar_t>(),
                   *d = mt.data_ptr<scalar_t>();
    out = summed_area_cpu(up.size(0), rows, cols, [&](int64_t n, int64_t y, int64_t x) {
      const int64_t i = n * plane + y * cols + x;
      return !(std::isfinite(a[i]) && std::isfinite(b[i]) && std::isfinite(c[i]) && std::isfinite(d[i]));
    });
  });
  return out;
}

// Summed-area table over the window grid of the windows that contain a non-finite pixel.
at::Tensor bad_window_table(const at::Tensor& bad_sat, int64_t height, int64_t width, int64_t win_h, int64_t win_w,
                            bool valid) {
  if (!bad_sat.is_cuda()) {
    const Axis ra = make_axis((int)height, (int)win_h, valid), ca = make_axis((int)width, (int)win_w, valid);
    const int32_t* sat = bad_sat.data_ptr<int32_t>();
    const int64_t stride = width + 1, plane = (height + 1) * stride;
    return summed_area_cpu(bad_sat.size(0), ra.out, ca.out, [&](int64_t n, int64_t r, int64_t c) {
      return rect_count(sat + n * plane, stride, ra.lo((int)r), ra.hi((int)r), ca.lo((int)c), ca.hi((int)c)) > 0;
    });
  }
  auto bounds = [&](int64_t extent, int64_t side) {
    const Axis axis = make_axis((int)extent, (int)side, valid);
    const at::Tensor idx = at::arange(axis.out, bad_sat.options().dtype(at::kLong));
    return std::make_pair((idx - axis.offset).clamp_min(0), (idx - axis.offset + side).clamp_max(extent));
  };
  const auto rows = bounds(height, win_h), cols = bounds(width, win_w);
  const at::Tensor top = bad_sat.index_select(1, rows.first), bottom = bad_sat.index_select(1, rows.second);
  const at::Tensor count = bottom.index_select(2, cols.second) - top.index_select(2, cols.second) -
                           bottom.index_select(2, cols.first) + top.index_select(2, cols.first);
  return summed_area(count > 0);
}

#ifdef EK_WITH_CUDA
CudaProblem cuda_problem(const at::Tensor& u, int64_t win_h, int64_t win_w, bool valid, int64_t bins,
                         double bandwidth, int64_t kernel, int64_t divergence, double eps,
                         const std::vector<int64_t>& schedule) {
  TORCH_CHECK(bins <= kCudaMaxBins, "the cuda backend serves bins <= ", kCudaMaxBins, ", got ", bins);
  CudaProblem pb;
  pb.planes = (int)u.size(0);
  pb.height = (int)u.size(1);
  pb.width = (int)u.size(2);
  pb.bins = (int)bins;
  pb.win_h = (int)win_h;
  pb.win_w = (int)win_w;
  pb.valid = valid;
  pb.bandwidth = bandwidth;
  pb.eps = eps;
  pb.kernel = (int)kernel;
  pb.divergence = (int)divergence;
  if (!schedule.empty()) {  // see check_schedule
    const auto budget = [](int64_t bytes) { return bytes < 0 ? kTwoBlocksPerSm : (size_t)bytes; };
    pb.max_shared_for_ring = budget(schedule[0]);
    pb.max_shared_for_column_ring = budget(schedule[1]);
    pb.tensor_core_column_sums = schedule[2] != 0;
    pb.tensor_core_step = schedule[3] != 0;
  }
  return pb;
}
#endif

// schedule: empty (the library's policy), or the CUDA launch schedule (entropy_kernels/ops/cuda.py's
// _Schedule) as {max_shared_for_ring, max_shared_for_column_ring, tensor_core_column_sums,
// tensor_core_step}, a
// budget of -1 meaning the default (CudaProblem).
void check_schedule(const std::vector<int64_t>& schedule, bool cuda) {
  if (schedule.empty()) return;
  TORCH_CHECK(cuda, "a launch schedule applies to CUDA tensors only, got one for CPU tensors");
  TORCH_CHECK(schedule.size() == 4 && schedule[0] >= -1 && schedule[1] >= -1 && schedule[2] >= 0 &&
                  schedule[2] <= 1 && schedule[3] >= 0 && schedule[3] <= 1,
              "schedule must be {ring bytes >= -1, column ring bytes >= -1, tensor cores 0 or 1, tensor-core step 0 "
              "or 1}, got ", schedule);
}

}  // namespace

// Returns {D, grad_u, grad_m}. With with_grad (and eps > 0) the pass also yields the gradient for
// grad_output = 1, which the backward rescales when grad_output is uniform (the 'mean' and 'sum'
// reductions) instead of recomputing the histograms; otherwise the two are empty.
std::vector<at::Tensor> local_divergence_forward(const at::Tensor& u_pred, const at::Tensor& m_pred,
                                                 const at::Tensor& u_tgt, const at::Tensor& m_tgt, int64_t win_h,
                                                 int64_t win_w, bool valid, int64_t bins, double bandwidth,
                                                 int64_t kernel, int64_t divergence, double eps, bool with_grad,
                                                 const std::vector<int64_t>& schedule) {
  check_problem(u_pred, win_h, win_w, valid, bins, bandwidth, kernel, divergence);
  check_schedule(schedule, u_pred.is_cuda());
  check_maps({&u_pred, &m_pred, &u_tgt, &m_tgt}, u_pred, u_pred.size(1), u_pred.size(2), "u and m maps");
  const at::Tensor bad_sat = bad_pixel_table(u_pred, m_pred, u_tgt, m_tgt);
  if (u_pred.is_cuda()) {
#ifdef EK_WITH_CUDA
    const c10::cuda::CUDAGuard guard(u_pred.device());
    const CudaProblem pb =
        cuda_problem(u_pred, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps, schedule);
    const int64_t ho = valid ? pb.height - win_h + 1 : pb.height, wo = valid ? pb.width - win_w + 1 : pb.width;
    at::Tensor d = at::empty({pb.planes, ho, wo}, u_pred.options());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    cudaError_t err = cudaSuccess;
    if (with_grad && eps > 0) {  // one pass: D and the gradient for grad_output = 1
      const at::Tensor bad_windows = bad_window_table(bad_sat, pb.height, pb.width, win_h, win_w, valid);
      at::Tensor gu = at::zeros_like(u_pred), gm = at::zeros_like(u_pred);
      AT_DISPATCH_FLOATING_TYPES(u_pred.scalar_type(), "local_divergence_forward_with_grad_cuda", [&] {
        err = launch_local_divergence_forward_with_grad<scalar_t>(
            pb, u_pred.data_ptr<scalar_t>(), m_pred.data_ptr<scalar_t>(), u_tgt.data_ptr<scalar_t>(),
            m_tgt.data_ptr<scalar_t>(), bad_sat.data_ptr<int32_t>(), bad_windows.data_ptr<int32_t>(),
            d.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), stream);
      });
      TORCH_CHECK(err == cudaSuccess, "entropy_kernels cuda forward: ", cudaGetErrorString(err));
      return {d, gu, gm};
    }
    AT_DISPATCH_FLOATING_TYPES(u_pred.scalar_type(), "local_divergence_forward_cuda", [&] {
      err = launch_local_divergence_forward<scalar_t>(
          pb, u_pred.data_ptr<scalar_t>(), m_pred.data_ptr<scalar_t>(), u_tgt.data_ptr<scalar_t>(),
          m_tgt.data_ptr<scalar_t>(), bad_sat.data_ptr<int32_t>(), d.data_ptr<scalar_t>(), stream);
    });
    TORCH_CHECK(err == cudaSuccess, "entropy_kernels cuda forward: ", cudaGetErrorString(err));
    return {d, at::empty({0}, u_pred.options()), at::empty({0}, u_pred.options())};
#else
    TORCH_CHECK(false, "this build of the entropy_kernels extension has no CUDA support");
#endif
  }
  if (with_grad && eps > 0) {
    const at::Tensor bad_windows = bad_window_table(bad_sat, u_pred.size(1), u_pred.size(2), win_h, win_w, valid);
    return local_divergence_forward_with_grad_cpu(u_pred, m_pred, u_tgt, m_tgt, bad_sat, bad_windows, win_h, win_w,
                                                  valid, bins, bandwidth, kernel, divergence, eps);
  }
  return {local_divergence_forward_cpu(u_pred, m_pred, u_tgt, m_tgt, bad_sat, win_h, win_w, valid, bins, bandwidth,
                                       kernel, divergence, eps),
          at::empty({0}, u_pred.options()), at::empty({0}, u_pred.options())};
}

// grad_u1, grad_m1: the forward's gradient for grad_output = 1, or empty.
std::vector<at::Tensor> local_divergence_backward(const at::Tensor& grad, const at::Tensor& d,
                                                  const at::Tensor& u_pred, const at::Tensor& m_pred,
                                                  const at::Tensor& u_tgt, const at::Tensor& m_tgt,
                                                  const at::Tensor& grad_u1, const at::Tensor& grad_m1,
                                                  int64_t win_h, int64_t win_w, bool valid, int64_t bins,
                                                  double bandwidth, int64_t kernel, int64_t divergence, double eps,
                                                  const std::vector<int64_t>& schedule) {
  check_problem(u_pred, win_h, win_w, valid, bins, bandwidth, kernel, divergence);
  check_schedule(schedule, u_pred.is_cuda());
  check_maps({&u_pred, &m_pred, &u_tgt, &m_tgt}, u_pred, u_pred.size(1), u_pred.size(2), "u and m maps");
  check_maps({&d}, u_pred, d.size(1), d.size(2), "D");
  const at::Tensor g = grad.contiguous();
  check_maps({&g}, u_pred, d.size(1), d.size(2), "grad_output");
  if (grad_u1.numel() == u_pred.numel() && grad_m1.numel() == u_pred.numel() && g.numel() > 0) {
    const at::Tensor g0 = g.reshape(-1)[0];
    if (g0.isfinite().item<bool>() && at::equal(g, g0.expand_as(g))) return {grad_u1 * g0, grad_m1 * g0};
  }
  at::Tensor poison_sat;
  if (u_pred.is_cuda()) {
    poison_sat = summed_area(at::logical_not(d.isfinite() & g.isfinite()));
  } else {
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "poison_table", [&] {
      const scalar_t *dp = d.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
      const int64_t rows = d.size(1), cols = d.size(2);
      poison_sat = summed_area_cpu(d.size(0), rows, cols, [&](int64_t n, int64_t y, int64_t x) {
        const int64_t i = (n * rows + y) * cols + x;
        return !(std::isfinite(dp[i]) && std::isfinite(gp[i]));
      });
    });
  }
  if (u_pred.is_cuda()) {
#ifdef EK_WITH_CUDA
    const c10::cuda::CUDAGuard guard(u_pred.device());
    const CudaProblem pb =
        cuda_problem(u_pred, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps, schedule);
    at::Tensor gu = at::zeros_like(u_pred), gm = at::zeros_like(u_pred);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    cudaError_t err = cudaSuccess;
    AT_DISPATCH_FLOATING_TYPES(u_pred.scalar_type(), "local_divergence_backward_cuda", [&] {
      err = launch_local_divergence_backward<scalar_t>(
          pb, u_pred.data_ptr<scalar_t>(), m_pred.data_ptr<scalar_t>(), u_tgt.data_ptr<scalar_t>(),
          m_tgt.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), poison_sat.data_ptr<int32_t>(),
          gu.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), stream);
    });
    TORCH_CHECK(err == cudaSuccess, "entropy_kernels cuda backward: ", cudaGetErrorString(err));
    return {gu, gm};
#else
    TORCH_CHECK(false, "this build of the entropy_kernels extension has no CUDA support");
#endif
  }
  return local_divergence_backward_cpu(u_pred, m_pred, u_tgt, m_tgt, d, g, poison_sat, win_h, win_w, valid, bins,
                                       bandwidth, kernel, divergence, eps);
}

}  // namespace entropy_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused local divergence of the spatial entropy loss (forward and backward)";
  namespace py = pybind11;
  const std::vector<int64_t> policy;  // the default schedule: the library's (see check_schedule)
  m.def("forward", &entropy_kernels::local_divergence_forward,
        "(D (N, Ho, Wo), grad_u for grad_output = 1, grad_m likewise; the last two empty unless with_grad)",
        py::arg("u_pred"), py::arg("m_pred"), py::arg("u_tgt"), py::arg("m_tgt"), py::arg("win_h"), py::arg("win_w"),
        py::arg("valid"), py::arg("bins"), py::arg("bandwidth"), py::arg("kernel"), py::arg("divergence"),
        py::arg("eps"), py::arg("with_grad"), py::arg("schedule") = policy);
  m.def("backward", &entropy_kernels::local_divergence_backward,
        "(grad_u_pred, grad_m_pred) from grad_output and the saved D", py::arg("grad"), py::arg("d"),
        py::arg("u_pred"), py::arg("m_pred"), py::arg("u_tgt"), py::arg("m_tgt"), py::arg("grad_u1"),
        py::arg("grad_m1"), py::arg("win_h"), py::arg("win_w"), py::arg("valid"), py::arg("bins"),
        py::arg("bandwidth"), py::arg("kernel"), py::arg("divergence"), py::arg("eps"), py::arg("schedule") = policy);
#ifdef EK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
