// CUDA implementation of the fused local divergence, forward and backward. Plain CUDA (raw
// pointers, a launcher taking a stream, no torch headers): `nvcc -c` compiles it alone.
//
// One thread block per (plane, output row r). The block's threads share the L*L cells of a
// window's joint histograms (each thread keeps up to 16 cells of P and Q in registers, in
// double) and slide the window along the row: a column entering the window adds its column
// sum (the kernel products of the window's rows in that column, computed from kernel values
// staged in shared memory), a column leaving subtracts the same column sum, recomputed
// bit-identically. Double accumulators keep the add-then-subtract error near 1e-16, far
// below eps (see entropy_cpu.cpp for the argument). No tensor with a bins axis is stored.
//
// Forward: D_c per window from a deterministic block reduction.
// Backward: the block of row r builds T_r(x) = sum over the windows c of row r that cover
// column x of G_c, sliding two window states (the window entering T and the one leaving it;
// the column the first leaves is the one the second enters, computed once: three column sums
// per column x, not four). T goes to shared memory and each warp takes one image row y at a
// time, its lanes the columns j of T, for a'(y)^T T b(y) and a(y)^T T b'(y): the pixel
// gradients, added to grad_u and grad_m with atomicAdd (blocks of neighbouring rows share
// pixels), so their last bits can vary between runs.
// Fused forward (grad_output uniform, the 'mean' and 'sum' reductions): the backward kernel with
// grad = 1, computing each window's D from its leading state as it enters T (the same column
// sums in the same order as the forward kernel, so the same D): D and the gradient in one pass.
//
// NaN/Inf: non-finite pixels contribute nothing to the sums; windows containing one get
// D = NaN from a summed-area table, and pixels under windows with non-finite D or grad_output
// get NaN gradients, exactly as on the CPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "ek_mma.h"
#include "entropy_cuda.h"
#include "entropy_math.h"

// tests/simt/simt.h (a CPU emulator that runs these kernels in CI) defines both differently.
#ifndef EK_SIMT_EMULATION
#define EK_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#define EK_LAUNCH_KERNEL(kernel, grid, block, shared, stream) kernel<<<grid, block, shared, stream>>>
#endif

namespace entropy_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 16;  // image rows of kernel values staged in shared memory at a time

// The cells of a thread: S x S of them, rows ri(0..S-1) by columns cj(0..S-1), cell k being
// (ri(k / S), cj(k % S)). A row of a column sum then costs 2 S loads from shared memory for S^2
// products of each histogram (one load per product when a thread's cells shared no i or j).
// S = 2 for 4 cells per thread (bins <= 32): the cells of the accumulator fragment of an m16n8k8
// matrix product (csrc/ek_mma.h), warp w holding the 16 x 8 tile at rows 16 (w / 4), columns
// 8 (w % 4), lane l its rows g, g + 8 and columns 2c, 2c + 1 (g = l / 4, c = l % 4), so that the
// column sums can be tensor-core products. S = 4 for 16 cells (bins <= 64): the 16 x 16 threads
// tile the L x L cells in 4 x 4 blocks.
// The side S of a thread's block of cells for its cells per thread.
constexpr __host__ __device__ int cell_block_side(int cells_per_thread) { return cells_per_thread == 4 ? 2 : 4; }

template <int CPT>
struct Cells {
  static constexpr int S = cell_block_side(CPT);
  static constexpr int kRowStep = CPT == 4 ? 8 : 1;  // between a thread's rows of cells
  static_assert(S * S == CPT && kThreads == 256, "8 warps of 16 x 8 tiles, or 16 x 16 threads of 4 x 4 cells");
  int i0, j0;
  __device__ Cells()
      : i0(CPT == 4 ? 16 * ((int)threadIdx.x / 128) + (int)threadIdx.x % 32 / 4 : S * ((int)threadIdx.x / 16)),
        j0(CPT == 4 ? 8 * ((int)threadIdx.x / 32 % 4) + 2 * ((int)threadIdx.x % 4) : S * ((int)threadIdx.x % 16)) {}
  __device__ int ri(int e) const { return i0 + kRowStep * e; }
  __device__ int cj(int e) const { return j0 + e; }
  __device__ int i(int k) const { return ri(k / S); }
  __device__ int j(int k) const { return cj(k % S); }
  __device__ bool valid(int k, int L) const { return i(k) < L && j(k) < L; }
  // Whether any cell of this thread's group (its warp's tile for 4 cells, else its own block) is
  // below L: the same in every lane of a warp for 4 cells, as a warp-collective product needs.
  __device__ bool group_active(int L) const {
    return CPT == 4 ? 16 * ((int)threadIdx.x / 128) < L && 8 * ((int)threadIdx.x / 32 % 4) < L : i0 < L && j0 < L;
  }
};

// Float column sums at bins <= 32 are tensor-core products (3xTF32, csrc/ek_mma.h) in the kernels
// instantiated with TC, where the target has them (sm_80 and later, and the CPU emulator, which
// models sm_90); else FMA products.
#if defined(EK_SIMT_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
constexpr bool kTargetHasTensorCores = true;
#else
constexpr bool kTargetHasTensorCores = false;
#endif
template <typename T, int CPT>
constexpr bool kTensorCoreColumnSums = kTargetHasTensorCores && CPT == 4 && std::is_same<T, float>::value;

// The sum over rows t < n of a(t, i) b(t, j) for the warp's 16 x 8 tile of cells (Cells<4>), added
// to acc (this lane's four cells, as Cells<4> numbers them): 3xTF32 products, one k-step of 8 rows at
// a time, of the parts stage_factors<T, true> wrote (hi at sa, sb; lo lo_at further on; rows of
// staged_stride = 32 values, those past L only reaching cells past L), rows past n taken as zero.
// Every lane of the warp takes part. (A template of the float type alone, so that
// a target without tensor cores, which never calls it, does not compile it.)
template <typename T>
__device__ __forceinline__ void tensor_core_column_sum(const T* sa, const T* sb, int lo_at, int n, T acc[4]) {
  static_assert(std::is_same<T, float>::value, "TF32 products of float operands");
  const int lane = (int)threadIdx.x % 32, g = lane / 4, c = lane % 4, warp = (int)threadIdx.x / 32;
  constexpr int ls = 32;  // staged_stride at 4 cells per thread
  const int ia = 16 * (warp / 4) + g, ia8 = ia + 8, jb = 8 * (warp % 4) + g;
  for (int k0 = 0; k0 < n; k0 += 8) {
    const bool in0 = k0 + c < n, in1 = k0 + c + 4 < n;  // rows past n are zero
    const T* r0 = sa + (k0 + c) * ls;
    const T* r1 = r0 + 4 * ls;
    const T* q0 = sb + (k0 + c) * ls + jb;
    const T* q1 = q0 + 4 * ls;
    const T a_hi[4] = {in0 ? r0[ia] : T(0), in0 ? r0[ia8] : T(0), in1 ? r1[ia] : T(0), in1 ? r1[ia8] : T(0)};
    const T a_lo[4] = {in0 ? r0[lo_at + ia] : T(0), in0 ? r0[lo_at + ia8] : T(0), in1 ? r1[lo_at + ia] : T(0),
                       in1 ? r1[lo_at + ia8] : T(0)};
    const T b_hi[2] = {in0 ? *q0 : T(0), in1 ? *q1 : T(0)};
    const T b_lo[2] = {in0 ? q0[lo_at] : T(0), in1 ? q1[lo_at] : T(0)};
    mma_3xtf32_m16n8k8(acc, a_hi, a_lo, b_hi, b_lo);
  }
}

// Row stride of the staged kernel values: at 4 cells per thread the 32 columns of the warps' tiles
// (bins <= 32), else bins rounded up to S, so that the values a thread reads for its cells stay
// inside the row (those past L are loaded, never written, and only reach cells past L, which
// nothing reads); a thread's adjacent columns are one 8-byte load.
inline __host__ __device__ int staged_stride(int bins, int cells_per_thread) {
  const int s = cell_block_side(cells_per_thread);
  return cells_per_thread == 4 ? 32 : (bins + s - 1) / s * s;
}

struct Geometry {
  Axis rows, cols;
  int width, height, bins;
  double bandwidth, eps;
  double inv_h;  // 1 / bandwidth, exact when h_pow2
  bool h_pow2;   // bandwidth a power of two (the default 0.5)
  bool ring;     // backward: the G of the windows in T kept in shared memory (see backward_kernel)
  int column_ring_at;  // bytes into dynamic shared memory of the column ring (see ColumnSum), or -1
  int kernel, divergence;
  bool tensor_cores;  // launch the tensor-core column sums' kernels (CudaProblem::tensor_core_column_sums, sm_80+)
  int sum_buffers;    // the tensor-core step: buffers of staged column-sum values (2, or 1 where 2 do not fit)
};

// x / h, as a product with the exact 1 / h where h is a power of two (the same float: both
// scale x by a power of two and round once), else an IEEE division.
template <typename T>
__device__ __forceinline__ T over_h(T x, const Geometry& g) {
  return g.h_pow2 ? x * (T)g.inv_h : x / (T)g.bandwidth;
}

// The (row, bin) pairs t * L + i of n rows, kThreads apart from this thread's first, without an
// integer division per pair.
struct RowBinWalk {
  int t, i, dt, di, L;
  __device__ RowBinWalk(int bins)
      : t((int)threadIdx.x / bins), i((int)threadIdx.x % bins), dt(kThreads / bins), di(kThreads % bins), L(bins) {}
  __device__ void next() {
    t += dt;
    i += di;
    if (i >= L) {
      i -= L;
      ++t;
    }
  }
};

// The kernel is chosen at run time (a uniform branch) to halve the instantiations, and so
// the compile time, of the kernels below.
template <typename T>
__device__ __forceinline__ void kernel_and_deriv(T z, int kind, T* k, T* dk) {
  if (kind == kLogistic)
    kde_kernel_and_deriv<kLogistic>(z, k, dk);
  else
    kde_kernel_and_deriv<kGaussian>(z, k, dk);
}
// K alone (the derivative's few operations are dropped once inlined, as in kde_kernel).
template <typename T>
__device__ __forceinline__ T kernel_value(T z, int kind) {
  T k, dk;
  kernel_and_deriv(z, kind, &k, &dk);
  return k;
}

template <typename T>
__device__ __forceinline__ bool finite(T v) { return isfinite(v); }

// Sum over the block, in a fixed order (so the forward pass is deterministic). All threads get it.
__device__ double block_sum(double v, double* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// Kernel values a(i) = K((v - i) / h) / h of the pixels (y0 + t, x), t < n, into sa[t * ls + i]
// (zero for non-finite pixels); likewise b from m; of pred (up, mp into sap, sbp) and target (ut, mt
// into sat, sbt) in one pass, which shares each (row, bin) pair's address arithmetic and loop.
template <typename T>
__device__ __forceinline__ T staged_value(T v, int i, bool ok, const Geometry& g) {
  return ok ? over_h(kernel_value(over_h(v - T(i), g), g.kernel), g) : T(0);
}
// SPLIT (the tensor-core column sums): each value v goes in as its TF32 parts, hi = to_tf32(v) in
// sa.. and lo = to_tf32(v - hi) at lo_at values further on, split once here rather than by each of
// the 2-4 warps whose products read it.
template <typename T, bool SPLIT>
__device__ void stage_factors(const T* up, const T* mp, const T* ut, const T* mt, int y0, int n, int x,
                              const Geometry& g, int ls, T* sap, T* sbp, T* sat, T* sbt, int lo_at) {
  for (RowBinWalk w(g.bins); w.t < n; w.next()) {
    const int t = w.t, i = w.i, at = t * ls + i;
    const int64_t px = (int64_t)(y0 + t) * g.width + x;
    const T upv = up[px], mpv = mp[px], utv = ut[px], mtv = mt[px];
    const bool ok_p = finite(upv) && finite(mpv), ok_t = finite(utv) && finite(mtv);
    const T v[4] = {staged_value(upv, i, ok_p, g), staged_value(mpv, i, ok_p, g), staged_value(utv, i, ok_t, g),
                    staged_value(mtv, i, ok_t, g)};
    T* dst[4] = {sap + at, sbp + at, sat + at, sbt + at};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (SPLIT) {
        split_tf32(v[e], dst[e], dst[e] + lo_at);
      } else {
        *dst[e] = v[e];
      }
    }
  }
}

// The column sum of column x over image rows [y0, y1) for this thread's cells: the sum over the
// rows of a_i b_j, Q from pred and P from target, each chunk of 16 rows summed in T and the
// chunks in double. Deterministic: a column computed again is bit-identical, so a window state
// that adds it and later subtracts it returns to within rounding of double.
//
// The column ring (Geometry::column_ring_at, for windows of at most one chunk of rows): the sums
// of the last win_w + 1 columns computed, each thread its own entries (no barrier), in T, which
// holds a one-chunk sum exactly. A column leaving the window is then read back instead of
// computed again: one column sum per window instead of two. win_w + 1 slots, because a window
// adds the column entering before it subtracts the one leaving (the order every schedule keeps,
// so that D is bit for bit the same in each).
template <typename T, int CPT, bool TC>
struct ColumnSum {
  int x = -1;  // the column held (-1: none)
  double p[CPT], q[CPT];
  // This thread's entries of the column ring: column col's cell k of Q at slot(col)[k * kThreads],
  // of P at slot(col)[(CPT + k) * kThreads]. Taken from the launch's Geometry each time rather
  // than kept in registers, which the kernels have few of to spare.
  __device__ __forceinline__ static T* slot(const Geometry& g, int col) {
    EK_DYNAMIC_SHARED(smem);
    return reinterpret_cast<T*>(smem + g.column_ring_at) + (col % (g.cols.side + 1)) * 2 * CPT * kThreads + threadIdx.x;
  }

  __device__ __forceinline__ void load(int col, const Geometry& g) {
    x = col;
    fetch(slot(g, col), q, p);
  }
  // A column's sums of this thread's cells from its slot s of a column ring, and into it (the
  // tensor-core step keeps its ring in this layout too).
  __device__ __forceinline__ static void fetch(const T* s, double q[CPT], double p[CPT]) {
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      q[k] = (double)s[k * kThreads];
      p[k] = (double)s[(CPT + k) * kThreads];
    }
  }
  __device__ __forceinline__ static void store(T* s, const double q[CPT], const double p[CPT]) {
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      s[k * kThreads] = (T)q[k];
      s[(CPT + k) * kThreads] = (T)p[k];
    }
  }

  __device__ __forceinline__ void compute(int col, int y0, int y1, const T* up, const T* mp, const T* ut, const T* mt,
                          const Geometry& g, T* sh) {
    constexpr int S = Cells<CPT>::S;
    const int L = g.bins, ls = staged_stride(L, CPT);
    const Cells<CPT> cells;
    constexpr bool tensor_cores = TC && kTensorCoreColumnSums<T, CPT>;
    T *sap = sh, *sbp = sh + kChunk * ls, *sat = sh + 2 * kChunk * ls, *sbt = sh + 3 * kChunk * ls;
    x = col;
#pragma unroll
    for (int k = 0; k < CPT; ++k) p[k] = q[k] = 0.0;
    for (int yc = y0; yc < y1; yc += kChunk) {
      const int n = min(kChunk, y1 - yc);
      __syncthreads();  // the previous chunk has been read
      if (tensor_cores)
        stage_factors<T, kTensorCoreColumnSums<T, CPT>>(up, mp, ut, mt, yc, n, col, g, ls, sap, sbp, sat, sbt,
                                                         4 * kChunk * ls);
      else
        stage_factors<T, false>(up, mp, ut, mt, yc, n, col, g, ls, sap, sbp, sat, sbt, 0);
      __syncthreads();
      if (cells.group_active(L)) {  // a group wholly past L reads nothing
        T sq[CPT], sp[CPT];
#pragma unroll
        for (int k = 0; k < CPT; ++k) sq[k] = sp[k] = T(0);
        if constexpr (kTensorCoreColumnSums<T, CPT>) {
          if (tensor_cores) {
            tensor_core_column_sum(sap, sbp, 4 * kChunk * ls, n, sq);
            tensor_core_column_sum(sat, sbt, 4 * kChunk * ls, n, sp);
          }
        }
        if (!tensor_cores) {
          for (int t = 0; t < n; ++t) {
            T ap[S], bp[S], at[S], bt[S];
#pragma unroll
            for (int e = 0; e < S; ++e) {
              ap[e] = sap[t * ls + cells.ri(e)];
              bp[e] = sbp[t * ls + cells.cj(e)];
              at[e] = sat[t * ls + cells.ri(e)];
              bt[e] = sbt[t * ls + cells.cj(e)];
            }
#pragma unroll
            for (int k = 0; k < CPT; ++k) {
              sq[k] += ap[k / S] * bp[k % S];
              sp[k] += at[k / S] * bt[k % S];
            }
          }
        }
#pragma unroll
        for (int k = 0; k < CPT; ++k) {  // cells past L hold garbage: never read (see Cells::valid)
          q[k] += (double)sq[k];
          p[k] += (double)sp[k];
        }
      }
    }
    if (g.column_ring_at >= 0) store(slot(g, col), q, p);  // one chunk: q[k] and p[k] are values of T, stored exactly
  }
};

// Window histograms of P (target) and Q (pred) over image rows [y0, y1), kept per thread.
template <typename T, int CPT, bool TC>
struct WindowState {
  double p[CPT], q[CPT];
  int lo, hi;

  __device__ void reset(int at) {
#pragma unroll
    for (int k = 0; k < CPT; ++k) p[k] = q[k] = 0.0;
    lo = hi = at;
  }

  // Slides to columns [new_lo, new_hi): adds the column sums entering, subtracts those leaving.
  // Each is taken from `cache` when it holds that column, else (a leaving column, with the column
  // ring) read from the ring, else computed into it: the backward's two states cross the same
  // column one after the other (the leading window leaves the column the lagging one enters), so
  // they share it.
  __device__ __forceinline__ void move_to(int new_lo, int new_hi, int y0, int y1, const T* up, const T* mp, const T* ut,
                          const T* mt, const Geometry& g, T* sh, ColumnSum<T, CPT, TC>& cache) {
    for (int x = hi; x < new_hi; ++x) add(x, 1.0, y0, y1, up, mp, ut, mt, g, sh, cache);
    for (int x = lo; x < new_lo; ++x) add(x, -1.0, y0, y1, up, mp, ut, mt, g, sh, cache);
    lo = new_lo > lo ? new_lo : lo;
    hi = new_hi > hi ? new_hi : hi;
  }

  __device__ __forceinline__ void add(int x, double sign, int y0, int y1, const T* up, const T* mp, const T* ut, const T* mt,
                      const Geometry& g, T* sh, ColumnSum<T, CPT, TC>& cache) {
    if (cache.x != x) {  // x and sign are the same in every thread
      if (sign < 0.0 && g.column_ring_at >= 0)
        cache.load(x, g);
      else
        cache.compute(x, y0, y1, up, mp, ut, mt, g, sh);
    }
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      p[k] += sign * cache.p[k];
      q[k] += sign * cache.q[k];
    }
  }
};

// D of the window held by `win` (every thread gets it), with N = 1 / inv_n pixels.
template <typename T, int CPT, bool TC>
__device__ __forceinline__ T window_divergence(const WindowState<T, CPT, TC>& win, double inv_n, const Geometry& g,
                                               double* scratch) {
  const Cells<CPT> cells;
  const T eps = (T)g.eps;
  double part = 0.0;
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    if (cells.valid(k, g.bins)) {
      const T p = (T)(win.p[k] * inv_n), q = (T)(win.q[k] * inv_n);
      part += (double)(g.divergence == kKL ? kl_term(p, q, eps) : hellinger_term(p, q, eps));
    }
  }
  const double total = block_sum(part, scratch);
  return g.divergence == kKL ? (T)total : hellinger_finish((T)total, eps);
}

template <typename T, int CPT, bool TC>
__global__ void __launch_bounds__(kThreads, CPT == 4 ? 4 : 1)
    forward_kernel(Geometry g, const T* up, const T* mp, const T* ut, const T* mt, const int32_t* bad_sat, T* d) {
  EK_DYNAMIC_SHARED(smem);
  T* sh = reinterpret_cast<T*>(smem);
  __shared__ double scratch[kWarps];
  const int r = blockIdx.x, plane = blockIdx.y;
  const int64_t in = (int64_t)plane * g.height * g.width;
  up += in; mp += in; ut += in; mt += in;
  bad_sat += (int64_t)plane * (g.height + 1) * (g.width + 1);
  d += ((int64_t)plane * g.rows.out + r) * g.cols.out;
  const int y0 = g.rows.lo(r), y1 = g.rows.hi(r);
  WindowState<T, CPT, TC> win;
  ColumnSum<T, CPT, TC> cache;
  win.reset(g.cols.lo(0));
  for (int c = 0; c < g.cols.out; ++c) {
    const int x0 = g.cols.lo(c), x1 = g.cols.hi(c);
    win.move_to(x0, x1, y0, y1, up, mp, ut, mt, g, sh, cache);
    const T value = window_divergence(win, 1.0 / ((double)(y1 - y0) * (x1 - x0)), g, scratch);
    if (threadIdx.x == 0) d[c] = rect_count(bad_sat, g.width + 1, y0, y1, x0, x1) > 0 ? (T)NAN : value;
  }
}

// G_c = grad_c / N_c * dD_c/dQ_c for the cells of this thread, or zero for a window whose D or
// grad is not finite (those are reported through poison_sat) or whose grad is zero; added to acc
// with `sign`, and stored in `slot` (cell k at slot[k * kThreads]) when given.
template <typename T, int CPT, bool TC>
__device__ __forceinline__ void window_grad(const WindowState<T, CPT, TC>& win, T grad, T dval, double inv_n,
                                            const Geometry& g, double sign, double* acc, T* slot) {
  const bool skip = !(finite(grad) && finite(dval)) || grad == T(0);
  const Cells<CPT> cells;
  const T eps = (T)g.eps, coef = (T)(grad * inv_n);
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    T value = T(0);
    if (!skip && cells.valid(k, g.bins)) {
      const T p = (T)(win.p[k] * inv_n), q = (T)(win.q[k] * inv_n);
      const T dq = g.divergence == kKL ? kl_dq(p, q, eps) : hellinger_dq(p, q, eps, dval);
      value = coef * dq;
      acc[k] += sign * (double)value;
    }
    if (slot) slot[k * kThreads] = value;
  }
}

// Dynamic shared memory of the forward: the kernel values of a chunk of rows (4 x 16 rows of
// staged_stride values, in T; in float at 4 cells per thread twice that, room for their TF32 parts,
// whether or not the device's code splits them), then with a column ring that ring.
template <typename T>
__host__ __device__ size_t forward_shared_bytes(int bins, int cells_per_thread) {
  const int copies = sizeof(T) == sizeof(float) && cells_per_thread == 4 ? 2 : 1;
  return (size_t)copies * 4 * kChunk * staged_stride(bins, cells_per_thread) * sizeof(T);
}
// Dynamic shared memory of the backward, in bytes: T (L*L doubles), then the kernel values of a
// chunk of rows (the column sums' as in the forward; the gradient's, 4 x 16 x L, in the same
// place), then with Geometry::ring the G ring (win_w slots of the block's cells, in T), then with
// a column ring that ring.
template <typename T>
__host__ __device__ size_t backward_ring_offset(int bins, int cells_per_thread) {
  return (size_t)bins * bins * sizeof(double) + forward_shared_bytes<T>(bins, cells_per_thread);
}
template <typename T>
size_t ring_bytes(int win_w, int cells_per_thread) {
  return (size_t)win_w * cells_per_thread * kThreads * sizeof(T);
}
template <typename T>
size_t column_ring_bytes(int win_w, int cells_per_thread) {
  return (size_t)(win_w + 1) * 2 * cells_per_thread * kThreads * sizeof(T);
}

// The G ring is used when the backward's shared memory then stays within the problem's
// max_shared_for_ring, and the column ring when the kernel's shared memory with it stays within
// its max_shared_for_column_ring (the backward's only together with the G ring); never beyond what
// a block of the device may opt in to. By default both are kTwoBlocksPerSm: two blocks of 128
// registers per thread share an SM, as the launch bounds plan (sm_90: 2 x 113 KiB of its 228 KiB).

// What the launchers ask of the current device: its compute capability's major number and its
// shared memory per SM and per block (opt-in); all zero where they cannot be read (no tensor
// cores, no rings: the plain schedules need no more than 48 KiB at bins <= 32).
struct DeviceLimits {
  int major;
  size_t shared_per_sm, shared_optin;
};
DeviceLimits device_limits() {
  int device = 0, major = 0, per_sm = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // not sticky; the launch reports its own errors
    return {0, 0, 0};
  }
  return {major, (size_t)per_sm, (size_t)optin};
}

// What a budget allows on the current device, in bytes.
struct SharedBudgets {
  size_t ring, column_ring;
};
SharedBudgets shared_budgets(const CudaProblem& pb) {
  const DeviceLimits device = device_limits();
  // Half an SM, less the 1 KiB the runtime reserves per block.
  const size_t two_blocks = device.shared_per_sm >= 2048 ? device.shared_per_sm / 2 - 1024 : 0;
  const auto allowed = [&](size_t knob) {
    return std::min(knob == kTwoBlocksPerSm ? two_blocks : knob, device.shared_optin);
  };
  return {allowed(pb.max_shared_for_ring), allowed(pb.max_shared_for_column_ring)};
}

// The gradient with respect to pred. With FUSED (the forward pass of a loss whose grad_output
// will be uniform) grad is 1 everywhere, and each window's D is computed from the leading
// state, written to d and NaN where bad_sat marks a non-finite pixel; otherwise d and grad are
// inputs. poison_sat marks the windows whose D or grad is not finite.
template <typename T, int CPT, bool FUSED, bool TC>
__global__ void __launch_bounds__(kThreads, CPT == 4 ? 2 : 1)
    backward_kernel(Geometry g, const T* up, const T* mp, const T* ut, const T* mt, T* d, const T* grad,
                    const int32_t* bad_sat, const int32_t* poison_sat, T* gu, T* gm) {
  EK_DYNAMIC_SHARED(smem);
  double* s_t = reinterpret_cast<double*>(smem);
  T* sf = reinterpret_cast<T*>(s_t + g.bins * g.bins);  // kernel values of the gradient
  T* sh = sf;                                          // kernel values of the column sums
  // This thread's entries of the ring: window c's G of cell k at ring_slot(c)[k * kThreads].
  T* ring = g.ring ? reinterpret_cast<T*>(smem + backward_ring_offset<T>(g.bins, CPT)) + threadIdx.x : nullptr;
  const auto ring_slot = [&](int c) { return ring + (c % g.cols.side) * CPT * kThreads; };
  __shared__ double scratch[kWarps];
  const int r = blockIdx.x, plane = blockIdx.y;
  const int64_t in = (int64_t)plane * g.height * g.width;
  up += in; mp += in; ut += in; mt += in; gu += in; gm += in;
  const int64_t out_row = ((int64_t)plane * g.rows.out + r) * g.cols.out;
  d += out_row;
  if (!FUSED) grad += out_row;
  if (FUSED) bad_sat += (int64_t)plane * (g.height + 1) * (g.width + 1);
  poison_sat += (int64_t)plane * (g.rows.out + 1) * (g.cols.out + 1);
  const int L = g.bins, y0 = g.rows.lo(r), y1 = g.rows.hi(r);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // The window entering T, and (without the ring) the one leaving it. With the ring, a window's G
  // is kept from when it entered T (slot c % win_w: at most win_w windows cover a column) and
  // subtracted from it when it leaves, instead of sliding a second state to recompute it.
  WindowState<T, CPT, TC> lead, lag;
  ColumnSum<T, CPT, TC> cache;
  lead.reset(g.cols.lo(0));
  lag.reset(g.cols.lo(0));
  double t[CPT];
#pragma unroll
  for (int k = 0; k < CPT; ++k) t[k] = 0.0;
  constexpr bool kTInRegisters = CPT == 4 && sizeof(T) == sizeof(float);
  T t_col[kTInRegisters ? 32 : 1];  // this lane's column of T (kTInRegisters)
  int t_lo = g.cols.out_lo(0), t_hi = t_lo;

  for (int x = 0; x < g.width; ++x) {
    const int new_lo = g.cols.out_lo(x), new_hi = g.cols.out_hi(x);
    if (g.ring) {  // the leaving windows first: an entering one may take the same slot
      for (int c = t_lo; c < new_lo; ++c) {
        const T* slot = ring_slot(c);
#pragma unroll
        for (int k = 0; k < CPT; ++k) t[k] -= (double)slot[k * kThreads];
      }
    }
    for (int c = t_hi; c < new_hi; ++c) {
      const int x0 = g.cols.lo(c), x1 = g.cols.hi(c);
      lead.move_to(x0, x1, y0, y1, up, mp, ut, mt, g, sh, cache);
      const double inv_n = 1.0 / ((double)(y1 - y0) * (x1 - x0));
      T dval;
      if (FUSED) {
        const T value = window_divergence(lead, inv_n, g, scratch);
        dval = rect_count(bad_sat, g.width + 1, y0, y1, x0, x1) > 0 ? (T)NAN : value;
        if (threadIdx.x == 0) d[c] = dval;  // read back by the lagging state (no ring), after barriers
      } else {
        dval = d[c];
      }
      window_grad(lead, FUSED ? T(1) : grad[c], dval, inv_n, g, 1.0, t, g.ring ? ring_slot(c) : (T*)nullptr);
    }
    if (!g.ring) {
      for (int c = t_lo; c < new_lo; ++c) {
        const int x0 = g.cols.lo(c), x1 = g.cols.hi(c);
        lag.move_to(x0, x1, y0, y1, up, mp, ut, mt, g, sh, cache);
        window_grad(lag, FUSED ? T(1) : grad[c], d[c], 1.0 / ((double)(y1 - y0) * (x1 - x0)), g, -1.0, t,
                    (T*)nullptr);
      }
    }
    t_lo = new_lo > t_lo ? new_lo : t_lo;
    t_hi = new_hi > t_hi ? new_hi : t_hi;

    // grad_u(y, x) = a'(y)^T T b(y) and grad_m(y, x) = a(y)^T T b'(y) for the rows y of this
    // block's windows: T goes to shared memory, and one warp takes one row at a time, its lanes
    // the columns j of T (no reduction across warps). In float at bins <= 32 each lane first
    // copies its column of T to registers (in float), so a row costs two broadcast loads and two
    // FMAs per bin i; otherwise the products read T from shared memory in double.
    const bool poisoned = rect_count(poison_sat, g.cols.out + 1, r, r + 1, new_lo, new_hi) > 0;
    T *sa = reinterpret_cast<T*>(sf), *sda = sa + kChunk * L, *sb = sa + 2 * kChunk * L, *sdb = sa + 3 * kChunk * L;
    for (int yc = y0; yc < y1; yc += kChunk) {
      const int n = min(kChunk, y1 - yc);
      __syncthreads();  // the column sums' and the previous chunk's readers are done
      if (yc == y0) {
        const Cells<CPT> cells;
#pragma unroll
        for (int k = 0; k < CPT; ++k)
          if (cells.valid(k, L)) s_t[cells.i(k) * L + cells.j(k)] = t[k];
      }
      for (RowBinWalk w(L); w.t < n; w.next()) {
        const int tt = w.t, i = w.i, idx = tt * L + i;
        const int64_t at = (int64_t)(yc + tt) * g.width + x;
        const T uv = up[at], mv = mp[at];
        const bool ok = finite(uv) && finite(mv);
        T ku, dku, km, dkm;
        kernel_and_deriv(over_h(uv - T(i), g), g.kernel, &ku, &dku);
        kernel_and_deriv(over_h(mv - T(i), g), g.kernel, &km, &dkm);
        sa[idx] = ok ? over_h(ku, g) : T(0);
        sda[idx] = ok ? over_h(over_h(dku, g), g) : T(0);
        sb[idx] = ok ? over_h(km, g) : T(0);
        sdb[idx] = ok ? over_h(over_h(dkm, g), g) : T(0);
      }
      __syncthreads();
      if (kTInRegisters && yc == y0) {
#pragma unroll
        for (int i = 0; i < (kTInRegisters ? 32 : 1); ++i) t_col[i] = i < L && lane < L ? (T)s_t[i * L + lane] : T(0);
      }
      for (int tt = warp; tt < n; tt += kWarps) {  // the same rows for a warp's lanes: shuffles stay whole-warp
        const T *ra = sa + tt * L, *rda = sda + tt * L;
        double vu = 0.0, vm = 0.0;
        if constexpr (kTInRegisters) {
          T su = T(0), sm = T(0);
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            if (i < L) {
              su += rda[i] * t_col[i];
              sm += ra[i] * t_col[i];
            }
          }
          if (lane < L) {
            vu = (double)su * (double)sb[tt * L + lane];
            vm = (double)sm * (double)sdb[tt * L + lane];
          }
        } else {
          for (int j = lane; j < L; j += 32) {
            double su = 0.0, sm = 0.0;
            for (int i = 0; i < L; ++i) {
              const double tij = s_t[i * L + j];
              su += (double)rda[i] * tij;
              sm += (double)ra[i] * tij;
            }
            vu += su * (double)sb[tt * L + j];
            vm += sm * (double)sdb[tt * L + j];
          }
        }
        for (int off = 16; off > 0; off >>= 1) {
          vu += __shfl_down_sync(0xffffffffu, vu, off);
          vm += __shfl_down_sync(0xffffffffu, vm, off);
        }
        if (lane == 0) {
          const int64_t at = (int64_t)(yc + tt) * g.width + x;
          atomicAdd(gu + at, poisoned ? (T)NAN : (T)vu);
          atomicAdd(gm + at, poisoned ? (T)NAN : (T)vm);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The tensor-core training step (docs/tensor_cores.md): the fused pass (D and the gradient for
// grad_output = 1) for float at bins <= 32 and windows of at most 16 rows, on devices with TF32
// tensor cores. One block per (plane, row r of windows), sliding along the row as backward_kernel
// does with both rings, but:
// - a column's kernel values are evaluated once per column sum, each thread one (row, pair of
//   bins) from one load of each map (loaded a column ahead), without branches within a warp (the
//   warps whose rows are all past the window's skip it);
// - the column sums are 3xTF32 tensor-core products on the accumulator fragments (Cells<4>), and
//   so are the pixel gradients: with T the sum of G over the windows of row r covering column x,
//   R = T [B | B'] (M = 32 bins i, N = 16 rows of b then 16 of b', K = 32 bins j) is one 16 x 8
//   tile per warp, and grad_u(y) = sum_i a'(y, i) R(i, y), grad_m(y) = sum_i a(y, i) R(i, 16 + y)
//   are a product and a sum over the tile's rows; every TF32 operand is staged in fragment order
//   (below), three 16-byte loads per product;
// - leaving column sums come from the column ring where it fits (else they are computed again,
//   the same bits), leaving windows' G from the G ring;
// - which columns and windows hold a non-finite pixel is counted at the column sums' barrier
//   (__syncthreads_count), so that the block reads no summed-area table;
// - the staged column-sum values are double-buffered (by column parity) and the gradient's have
//   their own area, so that five barriers per window order the phases.
// Precision: the column sums as the tensor-core column sums; T, b and b' in TF32 parts (3xTF32,
// float accumulation), a and a' multiplying in float. On the device, exp(x) is ex2.approx of the
// rounded x log2(e) (the rounding of the product is the larger error, and the emulator makes it
// too, with the host's exp2) and reciprocals rcp.approx refined by one Newton step (within an ulp;
// the emulator divides); the kl log is step_log, the same code in both. The float32 error rule
// holds (tests/test_cuda_emulated.py).
constexpr int kStepStride = 36;  // row stride of the staged a and a' (floats): conflict-free weight loads

// The tensor-core operands are staged in fragment order: each lane's values of one k-step are
// contiguous, so that a lane loads its A fragment's four hi values, its four lo values and its B
// fragment's (hi, hi, lo, lo) with three 16-byte loads and hands them to the instruction as they
// lie in registers (a layout of (hi, lo) pairs cost ~11 register moves per product).
// A (rows r = 16 rb + g + 8 e1, columns k = 8 ks + c + 4 e2; a[e1 + 2 e2]) and B (rows k, columns
// n = 8 nb + g; b[e2], its lo part two floats on), k_steps k-steps of 8, lane 4 g + c:
__device__ __forceinline__ int a_fragment_at(int r, int k, int k_steps) {
  return (((r / 16) * k_steps + k / 8) * 32 + 4 * (r % 8) + k % 4) * 4 + (r / 8) % 2 + 2 * ((k / 4) % 2);
}
__device__ __forceinline__ int b_fragment_at(int n, int k, int k_steps) {
  return (((n / 8) * k_steps + k / 8) * 32 + 4 * (n % 8) + k % 4) * 4 + (k / 4) % 2;
}
constexpr int kAFragments = 2 * 4 * 32 * 4;  // floats of a 32-row A operand of 4 k-steps, or of 2 for
                                             // its hi and lo parts together (a 16-row column of sums)
constexpr int kBFragments = 4 * 4 * 32 * 4;  // floats of a 32-column B operand of 4 k-steps, hi and lo

// Built with EK_STATIC_PATH (tools/cuda_static.py --target-path, never for use), the step takes the
// target case's branches as constants (logistic kernel, kl, bandwidth 0.5, the column ring), so
// that its static instruction count is the path that case runs.
#if defined(EK_STATIC_PATH)
constexpr bool kStaticPath = true;
#else
constexpr bool kStaticPath = false;
#endif

// Dynamic shared memory of the tensor-core step, byte offsets.
struct StepLayout {
  size_t t_at, sums_at, grads_at, partial_at, g_ring_at, column_ring_at, total;  // column_ring_at: 0 without
};
// A buffer of staged column-sum values: a of pred, b of pred, a of target, b of target, each 16 rows
// t (2 k-steps) by 32 bins in fragment order: A hi, A lo (kAFragments / 2 each), B hi and lo.
constexpr int kSumsMap = kAFragments / 2 * 2;  // floats per map (A: hi then lo; B: interleaved)
constexpr int kSumsBuffer = 4 * kSumsMap;
__host__ __device__ inline StepLayout step_layout(int win_w, bool column_ring, int sum_buffers) {
  StepLayout s;
  s.t_at = 0;                                                         // T: A fragments, hi then lo
  s.sums_at = s.t_at + 2 * kAFragments * sizeof(float);               // 1 or 2 buffers (column parity)
  s.grads_at = s.sums_at + sum_buffers * kSumsBuffer * sizeof(float);  // a, a' rows, then [B | B']
  s.partial_at = s.grads_at + (2 * kChunk * kStepStride + kBFragments) * sizeof(float);
  s.g_ring_at = s.partial_at + 2 * 2 * kChunk * sizeof(float);  // per half of the bins, grad_u and grad_m rows
  s.column_ring_at = 0;
  s.total = s.g_ring_at + (size_t)win_w * 4 * kThreads * sizeof(float);
  if (column_ring) {
    s.column_ring_at = s.total;
    s.total += (size_t)(win_w + 1) * 2 * 4 * kThreads * sizeof(float);
  }
  return s;
}

// 1 / d for a normal d: rcp.approx refined by one Newton step (within an ulp of the quotient).
__device__ __forceinline__ float step_recip(float d) {
#if defined(EK_SIMT_EMULATION)
  return 1.0f / d;
#else
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return fmaf(r, fmaf(-d, r, 1.0f), r);
#endif
}

// exp(x) as 2^(x log2 e) with the product rounded to float (ex2.approx on the device).
__device__ __forceinline__ float step_exp(float x) {
  const float y = x * 1.44269504088896340736f;
#if defined(EK_SIMT_EMULATION)
  return std::exp2(y);
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
#endif
}

// log(x) for a positive normal finite x (what the kl term's ratio of eps-floored densities is):
// CUDA's logf without its cases for zero, subnormals, infinities and NaN. x = m 2^e with m in
// [2/3, 4/3), log(x) = e log(2) + log1p(m - 1), the latter f + f^2 P(f) with P of degree 8 (the
// coefficients of CUDA 13's logf, read from its SASS; within an ulp).
__device__ __forceinline__ float step_log(float x) {
  const uint32_t bits = float_bits(x), exponent = (bits - 0x3f2aaaabu) & 0xff800000u;
  const float f = bits_float(bits - exponent) - 1.0f;
  float p = fmaf(f, -0.13018856942653656f, 0.14084610342979431f);
  p = fmaf(f, p, -0.12148627638816833f);
  p = fmaf(f, p, 0.13980610668659210f);
  p = fmaf(f, p, -0.16684235632419586f);
  p = fmaf(f, p, 0.20012299716472626f);
  p = fmaf(f, p, -0.24999669194221497f);
  p = fmaf(f, p, 0.33333182334899902f);
  p = fmaf(f, p, -0.5f);
  const float r = fmaf(f, f * p, f);
  return fmaf((float)(int32_t)exponent, 0.693147182f * 1.1920928955078125e-07f, r);
}

// K(z) and, with DERIV, K'(z) (csrc/entropy_math.h's kde_kernel_and_deriv) without branches.
template <bool DERIV>
__device__ __forceinline__ void step_kernel(float z, int kind, float* k, float* dk) {
  if (kind == kLogistic) {
    const float e = step_exp(-fabsf(z)), r = step_recip(1.0f + e), v = e * (r * r);
    *k = v;
    if (DERIV) *dk = (z > 0.0f ? -v : v) * ((1.0f - e) * r);
  } else {
    const float g = step_exp(-0.5f * z * z) * 0.398942280401432677939946f;
    *k = g;
    if (DERIV) *dk = -z * g;
  }
}

// at[0..3] = a, b, c, d in one 16-byte store, at[0..1] = a, b in one 8-byte store (at aligned);
// at[0..3] in one 16-byte load.
__device__ __forceinline__ void store4(float* at, float a, float b, float c, float d) {
#if defined(EK_SIMT_EMULATION)
  at[0] = a;
  at[1] = b;
  at[2] = c;
  at[3] = d;
#else
  *reinterpret_cast<float4*>(at) = make_float4(a, b, c, d);
#endif
}
__device__ __forceinline__ void store2(float* at, float a, float b) {
#if defined(EK_SIMT_EMULATION)
  at[0] = a;
  at[1] = b;
#else
  *reinterpret_cast<float2*>(at) = make_float2(a, b);
#endif
}
__device__ __forceinline__ void load4(const float* at, float out[4]) {
#if defined(EK_SIMT_EMULATION)
  for (int e = 0; e < 4; ++e) out[e] = at[e];
#else
  const float4 v = *reinterpret_cast<const float4*>(at);
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
#endif
}
// One k-step of a 3xTF32 product from fragment-ordered operands: a at A (hi) and A + lo_at (lo),
// b at B (hi, hi, lo, lo).
__device__ __forceinline__ void fragment_product(const float* a, int lo_at, const float* b, float acc[4]) {
  float a_hi[4], a_lo[4], bv[4];
  load4(a, a_hi);
  load4(a + lo_at, a_lo);
  load4(b, bv);
  mma_3xtf32_m16n8k8(acc, a_hi, a_lo, bv, bv + 2);
}

// The pixel values one thread stages: of its row t of the window's rows (0 for rows past n).
struct StepPixels {
  float v[4];  // u_pred, m_pred, u_tgt, m_tgt (the gradient's staging reads the first two)
  __device__ __forceinline__ void load(const float* const maps[4], int count, int64_t at, bool live) {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = live && e < count ? maps[e][at] : 0.0f;
  }
};

// Stages the column sums' kernel values of the pixels px (this thread's row t, bins i0, i0 + 1) in
// fragment order (a as the A operand, rows i and k-steps over t; b as the B operand, columns j);
// zeros past n and L. Returns whether the pixel is not finite.
__device__ __forceinline__ bool step_stage_sums(const StepPixels& px, bool live, int t, int i0, const Geometry& g,
                                                float* dst) {
  const bool ok_p = finite(px.v[0]) && finite(px.v[1]), ok_t = finite(px.v[2]) && finite(px.v[3]);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float hi[2], lo[2];
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      float k, dk;
      step_kernel<false>(over_h(px.v[e] - float(i0 + b), g), g.kernel, &k, &dk);
      split_tf32_bits(live && (e < 2 ? ok_p : ok_t) && i0 + b < g.bins ? over_h(k, g) : 0.0f, &hi[b], &lo[b]);
    }
    float* map = dst + e * kSumsMap;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      if (e % 2 == 0) {  // a: A(i, t)
        const int at = a_fragment_at(i0 + b, t, 2);
        map[at] = hi[b];
        map[kAFragments / 2 + at] = lo[b];
      } else {  // b: B(t, j)
        const int at = b_fragment_at(i0 + b, t, 2);
        map[at] = hi[b];
        map[at + 2] = lo[b];
      }
    }
  }
  return live && !(ok_p && ok_t);
}

// The column sums of the staged rows (ks k-steps of 8; the rows past n are zeros) for this warp's
// tile (rows 16 (w / 4), columns 8 (w % 4)) from the fragment-ordered a (sa) and b (sb).
__device__ __forceinline__ void step_sum_products(const float* sa, const float* sb, int ks, float acc[4]) {
  const int lane = (int)threadIdx.x % 32, warp = (int)threadIdx.x / 32;
  const float* fa = sa + ((warp / 4) * 2 * 32 + lane) * 4;
  const float* fb = sb + ((warp % 4) * 2 * 32 + lane) * 4;
#pragma unroll
  for (int s = 0; s < kChunk / 8; ++s) {
    if (s >= ks) break;  // the same in every lane
    fragment_product(fa + s * 128, kAFragments / 2, fb + s * 128, acc);
  }
}

// The column sums of the staged column (buffer sums) into q and p (this thread's cells), and into
// its slot of the column ring when the ring is kept. A barrier first (the staging is complete), which also counts the
// threads that staged a non-finite pixel: returns whether the column holds one.
__device__ __forceinline__ bool step_column_sum(int n, bool bad_pixel, const Geometry& g, const float* sums,
                                                float* ring_slot, double q[4], double p[4]) {
  const bool bad = __syncthreads_count(bad_pixel) > 0;
  float sq[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const Cells<4> cells;
  if (cells.group_active(g.bins)) {  // a warp whose tile is wholly past L reads nothing
    const int ks = (n + 7) / 8;
    step_sum_products(sums, sums + kSumsMap, ks, sq);
    step_sum_products(sums + 2 * kSumsMap, sums + 3 * kSumsMap, ks, sp);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    q[k] = (double)sq[k];
    p[k] = (double)sp[k];
  }
  if (kStaticPath || g.column_ring_at >= 0) ColumnSum<float, 4, true>::store(ring_slot, q, p);  // float sums, exactly
  return bad;
}

// D of the window in lead (every thread gets it; NaN when bad) and its G = dD/dQ / N in this
// thread's cells, added to t and kept in slot (cell k at slot[k * kThreads]); G is zero for a
// window whose D is not finite (the gradients under it are made NaN). One reciprocal per cell
// serves the kl value and dD/dQ.
__device__ __forceinline__ float step_window(const WindowState<float, 4, true>& lead, double inv_n, bool bad,
                                             const Geometry& g, double* scratch, double t[4], float* slot) {
  const Cells<4> cells;
  const float eps = (float)g.eps, coef = (float)inv_n;
  float dq[4], ps[4], qs[4];  // dD/dQ, P and Q of this thread's cells
  double part = 0.0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float p = ps[k] = (float)(lead.p[k] * inv_n), q = qs[k] = (float)(lead.q[k] * inv_n);
    float term;
    if (g.divergence == kKL) {
      const float pe = p + eps, r = step_recip(q + eps), diff = q - p;
      dq[k] = diff * r;
      term = pe * step_log(pe * r) + diff;
    } else {
      term = hellinger_term(p, q, eps);
      dq[k] = 0.0f;
    }
    part += cells.valid(k, g.bins) ? (double)term : 0.0;
  }
  const double total = block_sum(part, scratch);
  const float value = g.divergence == kKL ? (float)total : hellinger_finish((float)total, eps);
  const float dval = bad ? NAN : value;
  const bool skip = !finite(dval);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float gk = 0.0f;
    if (!skip && cells.valid(k, g.bins)) {
      if (g.divergence != kKL) dq[k] = hellinger_dq(ps[k], qs[k], eps, dval);
      gk = coef * dq[k];
      t[k] += (double)gk;
    }
    slot[k * kThreads] = gk;
  }
  return dval;
}

// Stages the gradient's values of column x's pixels px (pred's u and m): a, a' (rows of
// kStepStride floats) and [B | B'] in fragment order (B(j, y) = b_y(j), B(j, 16 + y) = b'_y(j)),
// zeros past n and L, in the warps that hold a row below n (staging_warp); T as A fragments, from
// t, in every thread.
__device__ __forceinline__ void step_stage_gradient(const StepPixels& px, bool live, bool staging_warp, int r, int i0,
                                                    const double t[4], const Geometry& g, float* s_t, float* grads) {
  constexpr int ts = kStepStride;
  const Cells<4> cells;  // T's cells past L are 0 (step_window adds only cells below L)
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int at = a_fragment_at(cells.i(k), cells.j(k), 4);
    split_tf32_bits((float)t[k], s_t + at, s_t + kAFragments + at);
  }
  if (!staging_warp) return;  // its rows are zeros from the start
  const bool ok = live && finite(px.v[0]) && finite(px.v[1]);
  float a[2], da[2];
  float* fb = grads + 2 * kChunk * ts;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const bool on = ok && i0 + e < g.bins;
    float ku, dku, km, dkm;
    step_kernel<true>(over_h(px.v[0] - float(i0 + e), g), g.kernel, &ku, &dku);
    step_kernel<true>(over_h(px.v[1] - float(i0 + e), g), g.kernel, &km, &dkm);
    a[e] = on ? over_h(ku, g) : 0.0f;
    da[e] = on ? over_h(over_h(dku, g), g) : 0.0f;
    const int at_b = b_fragment_at(r, i0 + e, 4), at_db = b_fragment_at(kChunk + r, i0 + e, 4);
    split_tf32_bits(on ? over_h(km, g) : 0.0f, fb + at_b, fb + at_b + 2);
    split_tf32_bits(on ? over_h(over_h(dkm, g), g) : 0.0f, fb + at_db, fb + at_db + 2);
  }
  store2(grads + r * ts + i0, a[0], a[1]);
  store2(grads + (kChunk + r) * ts + i0, da[0], da[1]);
}

// The pixel gradients of column x (rows [y0, y0 + n)) from the staged T and values, added to gu and
// gm (NaN where poisoned). Two barriers: the staging is complete; the partial sums are.
__device__ __forceinline__ void step_gradient_products(int x, int y0, int n, int out_which, int out_y, bool poisoned,
                                                       const Geometry& g, const float* s_t, const float* grads,
                                                       float* partial, float* gu, float* gm) {
  constexpr int ts = kStepStride;
  const int L = g.bins, lane = (int)threadIdx.x % 32, warp = (int)threadIdx.x / 32;
  __syncthreads();
  // Warp w: rows 16 (w / 4) of R (bins i), columns 8 (w % 4): rows y = 8 (w % 2) + .. of b (w % 4 < 2,
  // for grad_u) or of b' (grad_m).
  const int i_base = 16 * (warp / 4), col = warp % 4, y_base = 8 * (col % 2), which = col / 2;
  const int gq = lane / 4, c = lane % 4;
  if (i_base < L && y_base < n) {  // the same in every lane of the warp
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float* fa = s_t + ((warp / 4) * 4 * 32 + lane) * 4;
    const float* fb = grads + 2 * kChunk * ts + (col * 4 * 32 + lane) * 4;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      if (8 * ks >= L) break;  // the same in every lane
      fragment_product(fa + ks * 128, kAFragments, fb + ks * 128, acc);
    }
    // acc[e] = R(i_base + gq + 8 (e / 2), y_base + 2c + e % 2), weighted by a' (grad_u) or a (grad_m)
    // of that row y and bin i, then summed over the tile's 16 bins (the lanes of one c).
    const float* weight = grads + (which == 0 ? kChunk * ts : 0) + (y_base + 2 * c) * ts + i_base + gq;
    float v0 = acc[0] * weight[0] + acc[2] * weight[8], v1 = acc[1] * weight[ts] + acc[3] * weight[ts + 8];
    for (int off = 16; off >= 4; off >>= 1) {
      v0 += __shfl_down_sync(0xffffffffu, v0, off);
      v1 += __shfl_down_sync(0xffffffffu, v1, off);
    }
    if (lane < 4) store2(partial + (warp / 4) * 2 * kChunk + which * kChunk + y_base + 2 * c, v0, v1);
  }
  __syncthreads();
  if (out_which < 2) {  // thread out_which * n + out_y adds grad_u (0) or grad_m (1) of row out_y
    float value = partial[out_which * kChunk + out_y];
    if (L > 16) value += partial[2 * kChunk + out_which * kChunk + out_y];
    const int64_t at = (int64_t)(y0 + out_y) * g.width + x;
    atomicAdd((out_which == 0 ? gu : gm) + at, poisoned ? NAN : value);
  }
}

// Bit i % 64 of a mask: whether column or window i holds a non-finite pixel (at most 64 of either
// are live at once: windows are at most 64 columns wide where the step serves them).
__device__ __forceinline__ bool mask_bit(uint64_t mask, int i) { return (mask >> (i % 64)) & 1u; }
__device__ __forceinline__ uint64_t with_bit(uint64_t mask, int i, bool on) {
  const uint64_t bit = (uint64_t)1 << (i % 64);
  return on ? mask | bit : mask & ~bit;
}

__global__ void __launch_bounds__(kThreads, 1)
    tensor_core_step_kernel(Geometry g, const float* up, const float* mp, const float* ut, const float* mt, float* d,
                            float* gu, float* gm) {
  EK_DYNAMIC_SHARED(smem);
  if (kStaticPath) {
    g.kernel = kLogistic;
    g.divergence = kKL;
    g.h_pow2 = true;
    g.inv_h = 2.0;
  }
  const StepLayout lay = step_layout(g.cols.side, g.column_ring_at >= 0, g.sum_buffers);
  float* s_t = reinterpret_cast<float*>(smem + lay.t_at);
  float* sums = reinterpret_cast<float*>(smem + lay.sums_at);  // buffer col % 2 for column col
  float* grads = reinterpret_cast<float*>(smem + lay.grads_at);
  float* partial = reinterpret_cast<float*>(smem + lay.partial_at);
  // The rings, this thread's entries: window c's G at slot c % s of the G ring, column col's sums
  // at slot col % (s + 1) of the column ring (ColumnSum's entries); the slots of what enters and
  // leaves next are kept as counters
  // rather than computed with a division each time.
  float* ring = reinterpret_cast<float*>(smem + lay.g_ring_at) + threadIdx.x;
  float* column_ring = reinterpret_cast<float*>(smem + (g.column_ring_at >= 0 ? g.column_ring_at : 0)) + threadIdx.x;
  const int s = g.cols.side;
  const auto next_slot = [](int& slot, int slots) { slot = slot + 1 == slots ? 0 : slot + 1; };
  __shared__ double scratch[kWarps];
  const int r = blockIdx.x, plane = blockIdx.y;
  const int64_t in = (int64_t)plane * g.height * g.width;
  up += in; mp += in; ut += in; mt += in; gu += in; gm += in;
  d += ((int64_t)plane * g.rows.out + r) * g.cols.out;
  const int y0 = g.rows.lo(r), y1 = g.rows.hi(r), n = y1 - y0;
  const float* const maps[4] = {up, mp, ut, mt};
  // This thread's pixel (row t of the window's rows) and pair of bins i0, i0 + 1 in both stagings.
  const int t_row = (int)threadIdx.x / 16, i0 = 2 * ((int)threadIdx.x % 16);
  const bool live = t_row < n;
  // Warps whose two rows are both past n stage nothing: their rows stay the zeros written here.
  const bool staging_warp = 2 * ((int)threadIdx.x / 32) < n;
  for (int at = 4 * (int)threadIdx.x; at < (int)((lay.partial_at - lay.sums_at) / sizeof(float)); at += 4 * kThreads)
    store4(sums + at, 0.0f, 0.0f, 0.0f, 0.0f);  // the staging areas, the gradient's included
  __syncthreads();
  const int out_which = (int)threadIdx.x / n, out_y = (int)threadIdx.x % n;  // the gradient this thread adds
  const int64_t row_at = (int64_t)(y0 + (live ? t_row : 0)) * g.width;
  // The pixels of the next column to enter a column sum, and of the next column of the gradient,
  // loaded ahead (columns are taken in order, except leaving ones computed again without the ring).
  StepPixels next_sum, next_grad;
  next_sum.load(maps, 4, row_at, live);
  next_grad.load(maps, 2, row_at, live);

  WindowState<float, 4, true> lead;  // the window entering T: its P and Q, columns [lo, hi)
  lead.reset(g.cols.lo(0));
  double t[4] = {0.0, 0.0, 0.0, 0.0};
  int t_lo = g.cols.out_lo(0), t_hi = t_lo;
  int g_in = t_hi % s, g_out = t_lo % s, col_in = lead.hi % (s + 1), col_out = lead.lo % (s + 1);
  int inv_n_width = 0;  // the window width inv_n was computed for
  double inv_n = 0.0;
  uint64_t bad_columns = 0, bad_windows = 0;  // bits of the columns in lead and of the windows in T
  int bad_in_lead = 0, bad_in_t = 0;          // how many of them hold a non-finite pixel
#pragma unroll 1
  for (int x = 0; x < g.width; ++x) {
    const int new_lo = g.cols.out_lo(x), new_hi = g.cols.out_hi(x);
#pragma unroll 1
    for (int c = t_lo; c < new_lo; ++c) {  // the leaving windows first: an entering one may take the same slot
      const float* slot = ring + g_out * 4 * kThreads;
      next_slot(g_out, s);
#pragma unroll
      for (int k = 0; k < 4; ++k) t[k] -= (double)slot[k * kThreads];
      bad_in_t -= mask_bit(bad_windows, c);
    }
#pragma unroll 1
    for (int c = t_hi; c < new_hi; ++c) {
      const int x0 = g.cols.lo(c), x1 = g.cols.hi(c);
      double q[4], p[4];
#pragma unroll 1
      for (int xc = lead.hi; xc < x1; ++xc) {  // entering columns: computed (and kept in the column ring)
        float* buffer = sums + (g.sum_buffers == 2 && xc % 2 ? kSumsBuffer : 0);
        if (!kStaticPath && g.sum_buffers == 1) __syncthreads();  // the buffer's last readers are done
        const StepPixels px = next_sum;
        next_sum.load(maps, 4, row_at + (xc + 1 < g.width ? xc + 1 : xc), live);
        float* slot = column_ring + col_in * 8 * kThreads;
        next_slot(col_in, s + 1);
        const bool bad_pixel = staging_warp && step_stage_sums(px, live, t_row, i0, g, buffer);
        const bool bad = step_column_sum(n, bad_pixel, g, buffer, slot, q, p);
        bad_columns = with_bit(bad_columns, xc, bad);
        bad_in_lead += bad;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          lead.q[k] += q[k];
          lead.p[k] += p[k];
        }
      }
#pragma unroll 1
      for (int xc = lead.lo; xc < x0; ++xc) {  // leaving columns: read back, or computed again (the same bits)
        float* slot = column_ring + col_out * 8 * kThreads;
        next_slot(col_out, s + 1);
        if (kStaticPath || g.column_ring_at >= 0) {
          ColumnSum<float, 4, true>::fetch(slot, q, p);
        } else {
          float* buffer = sums + (g.sum_buffers == 2 && xc % 2 ? kSumsBuffer : 0);
          StepPixels px;
          px.load(maps, 4, row_at + xc, live);
          __syncthreads();  // the buffer's last readers (column xc - 2 or xc + s - 1) are done
          step_column_sum(n, staging_warp && step_stage_sums(px, live, t_row, i0, g, buffer), g, buffer, slot, q, p);
        }
        bad_in_lead -= mask_bit(bad_columns, xc);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          lead.q[k] -= q[k];
          lead.p[k] -= p[k];
        }
      }
      lead.lo = x0 > lead.lo ? x0 : lead.lo;
      lead.hi = x1 > lead.hi ? x1 : lead.hi;
      const bool bad = bad_in_lead > 0;
      bad_windows = with_bit(bad_windows, c, bad);
      bad_in_t += bad;
      if (x1 - x0 != inv_n_width) {  // steady: the same width window after window
        inv_n_width = x1 - x0;
        inv_n = 1.0 / ((double)n * inv_n_width);
      }
      float* slot = ring + g_in * 4 * kThreads;
      next_slot(g_in, s);
      const float dval = step_window(lead, inv_n, bad, g, scratch, t, slot);
      if (threadIdx.x == 0) d[c] = dval;
    }
    t_lo = new_lo > t_lo ? new_lo : t_lo;
    t_hi = new_hi > t_hi ? new_hi : t_hi;
    const StepPixels px = next_grad;
    next_grad.load(maps, 2, row_at + (x + 1 < g.width ? x + 1 : x), live);
    step_stage_gradient(px, live, staging_warp, t_row, i0, t, g, s_t, grads);
    step_gradient_products(x, y0, n, out_which, out_y, bad_in_t > 0, g, s_t, grads, partial, gu, gm);
  }
}

// Cells of the L*L histograms per thread: two instantiations cover bins <= 32 and <= 64.
int cells_per_thread(int bins) { return bins * bins <= 4 * kThreads ? 4 : 16; }

Geometry geometry(const CudaProblem& pb) {
  Geometry g;
  g.rows = make_axis(pb.height, pb.win_h, pb.valid);
  g.cols = make_axis(pb.width, pb.win_w, pb.valid);
  g.width = pb.width;
  g.height = pb.height;
  g.bins = pb.bins;
  g.bandwidth = pb.bandwidth;
  int exponent = 0;
  g.h_pow2 = std::frexp(pb.bandwidth, &exponent) == 0.5 && exponent > -100 && exponent < 100;
  g.inv_h = 1.0 / pb.bandwidth;
  g.ring = false;
  g.column_ring_at = -1;
  g.sum_buffers = 2;
  g.tensor_cores = pb.tensor_core_column_sums && device_limits().major >= 8;
  g.eps = pb.eps;
  g.kernel = pb.kernel;
  g.divergence = pb.divergence;
  return g;
}

// A column sum of one chunk of rows: what the column ring holds exactly.
bool one_chunk(const Geometry& g) { return g.rows.side <= kChunk; }

// The kernel instantiation for the problem's cells per thread.
// TC (the tensor-core column sums) is a kernel of its own, so that the default kernels keep their
// registers (compiled into the same kernel behind a branch, its registers spilled the forward's).
#define EK_PICK(KERNEL, ...)                                                                          \
  (cells_per_thread(pb.bins) == 16 ? &KERNEL<T, 16, ##__VA_ARGS__, false>                               \
   : g.tensor_cores                 ? &KERNEL<T, 4, ##__VA_ARGS__, std::is_same<T, float>::value>        \
                                    : &KERNEL<T, 4, ##__VA_ARGS__, false>)

// Above 48 KiB of dynamic shared memory (the backward at bins > 45 in double) a kernel must
// opt in.
template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  return bytes > 48 * 1024 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes)
                           : cudaSuccess;
}

// Why the tensor-core step does not serve a fused float pass of pb, or nullptr when it does; then
// *column_ring and *sum_buffers tell whether its column ring and a second staging buffer fit.
// Budgets as in shared_budgets, except that the policy (kTwoBlocksPerSm) lets the step take what
// one block may opt in to: it plans one block of 8 warps per SM (192.75 KiB at window 11 with
// both rings).
const char* tensor_core_step_refusal(const CudaProblem& pb, bool* column_ring, int* sum_buffers) {
  if (!pb.tensor_core_step) return "turned off by the schedule";
  if (pb.bins > 32) return "it serves bins <= 32";
  if (pb.win_h > kChunk) return "it serves windows of at most 16 rows";
  if (pb.win_w > 63) return "it serves windows of at most 63 columns";
  const DeviceLimits device = device_limits();
  if (device.major < 8) return "it needs a device of compute capability 8.0 or later (TF32 tensor cores)";
  // The code the device runs must have the tensor-core instructions too: an extension built only for
  // older targets (its sm_80+ branch compiled out to a trap) reports an older binary version.
  cudaFuncAttributes attributes;
  const bool built = cudaFuncGetAttributes(&attributes, tensor_core_step_kernel) == cudaSuccess &&
                     attributes.binaryVersion >= 80;
  cudaGetLastError();
  if (!built) return "the extension was not built for compute capability 8.0 or later";
  const auto allowed = [&](size_t knob) {
    return knob == kTwoBlocksPerSm ? device.shared_optin : std::min(knob, device.shared_optin);
  };
  // The column ring first (it saves a column sum per window), then the second buffer (a barrier).
  for (const bool ring : {true, false}) {
    for (const int buffers : {2, 1}) {
      const size_t bytes = step_layout(pb.win_w, ring, buffers).total;
      if (bytes <= allowed(pb.max_shared_for_ring) && (!ring || bytes <= allowed(pb.max_shared_for_column_ring))) {
        *column_ring = ring;
        *sum_buffers = buffers;
        return nullptr;
      }
    }
  }
  return "its G ring does not fit the shared memory allowed";
}

// The fused float pass on the tensor-core step, if it serves pb; *launched says whether it did.
template <typename T>
cudaError_t launch_tensor_core_step(const CudaProblem& pb, const T* up, const T* mp, const T* ut, const T* mt, T* d,
                                    T* gu, T* gm, cudaStream_t stream, bool* launched) {
  *launched = false;
  bool column_ring = false;
  int sum_buffers = 2;
  if constexpr (std::is_same<T, float>::value) {
    if (tensor_core_step_refusal(pb, &column_ring, &sum_buffers) != nullptr) return cudaSuccess;
    Geometry g = geometry(pb);
    const StepLayout lay = step_layout(pb.win_w, column_ring, sum_buffers);
    g.column_ring_at = column_ring ? (int)lay.column_ring_at : -1;
    g.sum_buffers = sum_buffers;
    const cudaError_t err = allow_shared(tensor_core_step_kernel, lay.total);
    if (err != cudaSuccess) return err;
    *launched = true;
    EK_LAUNCH_KERNEL(tensor_core_step_kernel, dim3(g.rows.out, pb.planes), kThreads, lay.total, stream)(
        g, up, mp, ut, mt, d, gu, gm);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <typename T, bool FUSED>
cudaError_t launch_backward(const CudaProblem& pb, const T* u_pred, const T* m_pred, const T* u_tgt, const T* m_tgt,
                            T* d, const T* grad, const int32_t* bad_sat, const int32_t* poison_sat, T* grad_u,
                            T* grad_m, cudaStream_t stream) {
  Geometry g = geometry(pb);
  if (g.rows.out <= 0 || g.cols.out <= 0 || pb.planes <= 0) return cudaSuccess;
  if (pb.bins < 2 || pb.bins > kCudaMaxBins) return cudaErrorInvalidValue;
  if (FUSED) {
    bool launched = false;
    const cudaError_t err =
        launch_tensor_core_step(pb, u_pred, m_pred, u_tgt, m_tgt, d, grad_u, grad_m, stream, &launched);
    if (launched || err != cudaSuccess) return err;
  }
  const dim3 grid(g.rows.out, pb.planes);
  const int cpt = cells_per_thread(pb.bins);
  const size_t base = backward_ring_offset<T>(pb.bins, cpt), with_ring = base + ring_bytes<T>(pb.win_w, cpt),
               with_both = with_ring + column_ring_bytes<T>(pb.win_w, cpt);
  const SharedBudgets budgets = shared_budgets(pb);
  g.ring = with_ring <= budgets.ring;
  if (g.ring && one_chunk(g) && with_both <= budgets.column_ring) g.column_ring_at = (int)with_ring;
  const size_t shared = g.column_ring_at >= 0 ? with_both : g.ring ? with_ring : base;
  const auto kernel = EK_PICK(backward_kernel, FUSED);
  const cudaError_t err = allow_shared(kernel, shared);
  if (err != cudaSuccess) return err;
  EK_LAUNCH_KERNEL(kernel, grid, kThreads, shared, stream)(g, u_pred, m_pred, u_tgt, m_tgt, d, grad, bad_sat,
                                                            poison_sat, grad_u, grad_m);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_local_divergence_forward(const CudaProblem& pb, const T* u_pred, const T* m_pred, const T* u_tgt,
                                            const T* m_tgt, const int32_t* bad_sat, T* d, cudaStream_t stream) {
  Geometry g = geometry(pb);
  if (g.rows.out <= 0 || g.cols.out <= 0 || pb.planes <= 0) return cudaSuccess;
  if (pb.bins < 2 || pb.bins > kCudaMaxBins) return cudaErrorInvalidValue;
  const dim3 grid(g.rows.out, pb.planes);
  const int cpt = cells_per_thread(pb.bins);
  const size_t base = forward_shared_bytes<T>(pb.bins, cpt), with_ring = base + column_ring_bytes<T>(pb.win_w, cpt);
  if (one_chunk(g) && with_ring <= shared_budgets(pb).column_ring) g.column_ring_at = (int)base;
  const size_t shared = g.column_ring_at >= 0 ? with_ring : base;
  const auto kernel = EK_PICK(forward_kernel);
  const cudaError_t err = allow_shared(kernel, shared);
  if (err != cudaSuccess) return err;
  EK_LAUNCH_KERNEL(kernel, grid, kThreads, shared, stream)(g, u_pred, m_pred, u_tgt, m_tgt, bad_sat, d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_local_divergence_forward_with_grad(const CudaProblem& pb, const T* u_pred, const T* m_pred,
                                                      const T* u_tgt, const T* m_tgt, const int32_t* bad_sat,
                                                      const int32_t* bad_window_sat, T* d, T* grad_u, T* grad_m,
                                                      cudaStream_t stream) {
  return launch_backward<T, true>(pb, u_pred, m_pred, u_tgt, m_tgt, d, nullptr, bad_sat, bad_window_sat, grad_u,
                                  grad_m, stream);
}

template <typename T>
cudaError_t launch_local_divergence_backward(const CudaProblem& pb, const T* u_pred, const T* m_pred, const T* u_tgt,
                                             const T* m_tgt, const T* d, const T* grad, const int32_t* poison_sat,
                                             T* grad_u, T* grad_m, cudaStream_t stream) {
  // d is only read when the kernel is not FUSED.
  return launch_backward<T, false>(pb, u_pred, m_pred, u_tgt, m_tgt, const_cast<T*>(d), grad, nullptr, poison_sat,
                                   grad_u, grad_m, stream);
}

template cudaError_t launch_local_divergence_forward<float>(const CudaProblem&, const float*, const float*,
                                                            const float*, const float*, const int32_t*, float*,
                                                            cudaStream_t);
template cudaError_t launch_local_divergence_forward<double>(const CudaProblem&, const double*, const double*,
                                                             const double*, const double*, const int32_t*, double*,
                                                             cudaStream_t);
template cudaError_t launch_local_divergence_forward_with_grad<float>(const CudaProblem&, const float*, const float*,
                                                                      const float*, const float*, const int32_t*,
                                                                      const int32_t*, float*, float*, float*,
                                                                      cudaStream_t);
template cudaError_t launch_local_divergence_forward_with_grad<double>(const CudaProblem&, const double*,
                                                                       const double*, const double*, const double*,
                                                                       const int32_t*, const int32_t*, double*,
                                                                       double*, double*, cudaStream_t);
template cudaError_t launch_local_divergence_backward<float>(const CudaProblem&, const float*, const float*,
                                                             const float*, const float*, const float*, const float*,
                                                             const int32_t*, float*, float*, cudaStream_t);
template cudaError_t launch_local_divergence_backward<double>(const CudaProblem&, const double*, const double*,
                                                              const double*, const double*, const double*,
                                                              const double*, const int32_t*, double*, double*,
                                                              cudaStream_t);

}  // namespace entropy_kernels
