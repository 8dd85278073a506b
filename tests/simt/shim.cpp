// csrc/entropy_cuda.cu compiled as C++ against the CPU emulator (simt.h), behind a C ABI that
// tests/test_cuda_emulated.py loads with ctypes. Pointers are host memory; dtype 0 is float,
// 1 double. Each call returns the launcher's cudaError_t. Each call takes the launch schedule
// (CudaProblem's last four fields): ring and column_ring, the shared-memory budgets in bytes
// (kTwoBlocksPerSm: the library's policy), tensor_cores, the tensor-core column sums, and step, the
// tensor-core training step.
#include "entropy_cuda.cu"

namespace {

entropy_kernels::CudaProblem problem(int planes, int height, int width, int bins, int win_h, int win_w, int valid,
                                     double bandwidth, double eps, int kernel, int divergence, size_t ring,
                                     size_t column_ring, int tensor_cores, int step) {
  entropy_kernels::CudaProblem pb;
  pb.planes = planes;
  pb.height = height;
  pb.width = width;
  pb.bins = bins;
  pb.win_h = win_h;
  pb.win_w = win_w;
  pb.valid = valid != 0;
  pb.bandwidth = bandwidth;
  pb.eps = eps;
  pb.kernel = kernel;
  pb.divergence = divergence;
  pb.max_shared_for_ring = ring;
  pb.max_shared_for_column_ring = column_ring;
  pb.tensor_core_column_sums = tensor_cores != 0;
  pb.tensor_core_step = step != 0;
  return pb;
}

template <typename T>
int forward(const entropy_kernels::CudaProblem& pb, const void* const* maps, const int32_t* bad_sat, void* d) {
  return entropy_kernels::launch_local_divergence_forward<T>(
      pb, static_cast<const T*>(maps[0]), static_cast<const T*>(maps[1]), static_cast<const T*>(maps[2]),
      static_cast<const T*>(maps[3]), bad_sat, static_cast<T*>(d), nullptr);
}

template <typename T>
int forward_with_grad(const entropy_kernels::CudaProblem& pb, const void* const* maps, const int32_t* bad_sat,
                      const int32_t* bad_window_sat, void* d, void* grad_u, void* grad_m) {
  return entropy_kernels::launch_local_divergence_forward_with_grad<T>(
      pb, static_cast<const T*>(maps[0]), static_cast<const T*>(maps[1]), static_cast<const T*>(maps[2]),
      static_cast<const T*>(maps[3]), bad_sat, bad_window_sat, static_cast<T*>(d), static_cast<T*>(grad_u),
      static_cast<T*>(grad_m), nullptr);
}

template <typename T>
int backward(const entropy_kernels::CudaProblem& pb, const void* const* maps, const void* d, const void* grad,
             const int32_t* poison_sat, void* grad_u, void* grad_m) {
  return entropy_kernels::launch_local_divergence_backward<T>(
      pb, static_cast<const T*>(maps[0]), static_cast<const T*>(maps[1]), static_cast<const T*>(maps[2]),
      static_cast<const T*>(maps[3]), static_cast<const T*>(d), static_cast<const T*>(grad), poison_sat,
      static_cast<T*>(grad_u), static_cast<T*>(grad_m), nullptr);
}

}  // namespace

extern "C" {

// The emulated device's shared memory per SM and per block (opt-in), in bytes.
void ek_emulated_set_device_shared(size_t per_sm, size_t optin) {
  simt::device().shared_per_sm = per_sm;
  simt::device().shared_optin = optin;
}

// The dynamic shared memory of the last launch, in bytes: which rings its schedule kept.
size_t ek_emulated_last_launch_shared() { return simt::device().last_launch_shared; }

// Whether the last launch ran the tensor-core training step.
int ek_emulated_last_launch_was_step() {
  return simt::device().last_launch_kernel == reinterpret_cast<const void*>(&entropy_kernels::tensor_core_step_kernel);
}

// The binary version of the emulated kernels' code (90 unless set: sm_90).
void ek_emulated_set_binary_version(int version) { simt::device().binary_version = version; }

// Threads in reverse order between barriers (1) or in index order (0).
void ek_emulated_set_reverse_order(int reverse) { simt::device().reverse_order = reverse != 0; }

// Why the tensor-core step does not serve a fused float pass of the problem ("" when it does).
const char* ek_emulated_step_refusal(int planes, int height, int width, int bins, int win_h, int win_w, int valid,
                                     size_t ring, size_t column_ring, int step) {
  const auto pb = problem(planes, height, width, bins, win_h, win_w, valid, 0.5, 1e-10, 0, 0, ring, column_ring, 0,
                          step);
  bool column_ring_kept = false;
  int sum_buffers = 0;
  const char* why = entropy_kernels::tensor_core_step_refusal(pb, &column_ring_kept, &sum_buffers);
  return why ? why : "";
}

// maps: u_pred, m_pred, u_tgt, m_tgt.
int ek_emulated_forward(int dtype, int planes, int height, int width, int bins, int win_h, int win_w, int valid,
                        double bandwidth, double eps, int kernel, int divergence, size_t ring, size_t column_ring,
                        int tensor_cores, int step, const void* const* maps, const int32_t* bad_sat, void* d) {
  const auto pb = problem(planes, height, width, bins, win_h, win_w, valid, bandwidth, eps, kernel, divergence, ring,
                          column_ring, tensor_cores, step);
  return dtype == 0 ? forward<float>(pb, maps, bad_sat, d) : forward<double>(pb, maps, bad_sat, d);
}

int ek_emulated_forward_with_grad(int dtype, int planes, int height, int width, int bins, int win_h, int win_w,
                                  int valid, double bandwidth, double eps, int kernel, int divergence,
                                  size_t ring, size_t column_ring, int tensor_cores, int step, const void* const* maps,
                                  const int32_t* bad_sat, const int32_t* bad_window_sat, void* d, void* grad_u,
                                  void* grad_m) {
  const auto pb = problem(planes, height, width, bins, win_h, win_w, valid, bandwidth, eps, kernel, divergence, ring,
                          column_ring, tensor_cores, step);
  return dtype == 0 ? forward_with_grad<float>(pb, maps, bad_sat, bad_window_sat, d, grad_u, grad_m)
                    : forward_with_grad<double>(pb, maps, bad_sat, bad_window_sat, d, grad_u, grad_m);
}

int ek_emulated_backward(int dtype, int planes, int height, int width, int bins, int win_h, int win_w, int valid,
                         double bandwidth, double eps, int kernel, int divergence, size_t ring, size_t column_ring,
                         int tensor_cores, int step, const void* const* maps, const void* d, const void* grad,
                         const int32_t* poison_sat, void* grad_u, void* grad_m) {
  const auto pb = problem(planes, height, width, bins, win_h, win_w, valid, bandwidth, eps, kernel, divergence, ring,
                          column_ring, tensor_cores, step);
  return dtype == 0 ? backward<float>(pb, maps, d, grad, poison_sat, grad_u, grad_m)
                    : backward<double>(pb, maps, d, grad, poison_sat, grad_u, grad_m);
}

}  // extern "C"
