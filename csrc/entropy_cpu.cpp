// C++ CPU implementation of the fused local divergence, forward and backward.
//
// Work is split into fixed (plane, block of rows) items run with at::parallel_for. The split
// does not depend on the thread count and every item is computed sequentially, so the
// result is bitwise the same for any number of threads.
//
// Forward, per item and output row r: per-column joint histograms of the band of image rows
// covered by row r's windows are kept in double and slid down the rows (add the entering
// row's rank-1 kernel products, subtract the leaving row's); a window's histograms are slid
// across the columns the same way; the window's L*L cells then give D_c. Cost per pixel:
// about 8 L^2 multiply-adds in double and 2 L^2 logs, independent of the window size.
//
// Backward, per item and input row y: the gradient of pixel p is a'_p^T H_p b_p (and
// a_p^T H_p b'_p) with H_p the sum of G_c over the windows c containing p. G rows are
// recomputed from the histograms as in the forward pass, box-summed along the row into T_r,
// and T_r is box-summed down the rows with a ring buffer of the last `side` rows.
//
// Why double accumulators: a sliding sum that adds and later subtracts a value carries an
// absolute error of about (unit round-off) x (largest value in the band). In float that is
// ~1e-7, which would swamp cells of a few 1e-10 (eps) that the logs see. In double it is
// ~1e-16, far below eps, and the kernel products of float inputs are exact in double, so
// what is added is exactly what is later subtracted.
//
// NaN/Inf: a non-finite pixel contributes nothing to the sums (so it cannot leak into the
// sliding state of other windows); instead the windows that contain it are found with an
// integer summed-area table and given D = NaN, and the pixels under any window whose D or
// grad_output is not finite get a NaN gradient.
#include "entropy_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define EK_HAVE_MXCSR 1
#endif

#include "entropy_math.h"

namespace entropy_kernels {
namespace {

// Flush subnormal floats to zero while a work item runs. Far-off bins give densities of
// 1e-40 and below; as float subnormals every operation on them takes a microcode assist
// (~100x slower), while their value is ~1e-30 below eps. Restored on exit.
class FlushSubnormals {
 public:
#ifdef EK_HAVE_MXCSR
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

struct Problem {
  int planes, height, width, bins;
  Axis rows, cols;
  double bandwidth, eps;
  int divergence;
  int64_t plane_in() const { return (int64_t)height * width; }
  int64_t plane_out() const { return (int64_t)rows.out * cols.out; }
};

// Count of marked entries in [y0, y1) x [x0, x1) from a (rows + 1) x (cols + 1) summed-area table.
inline int32_t rect_count(const int32_t* sat, int stride, int y0, int y1, int x0, int x1) {
  return sat[y1 * stride + x1] - sat[y0 * stride + x1] - sat[y1 * stride + x0] + sat[y0 * stride + x0];
}

// a(i) = K((v - i) / h) / h for i = 0..L-1.
template <int Kind, typename T>
inline void kernel_row(T v, T h, int L, T* __restrict a) {
#pragma omp simd
  for (int i = 0; i < L; ++i) a[i] = kde_kernel<Kind>((v - T(i)) / h) / h;
}

// a'(i) = K'((v - i) / h) / h^2.
template <int Kind, typename T>
inline void kernel_deriv_row(T v, T h, int L, T* __restrict da) {
  const T h2 = h * h;
#pragma omp simd
  for (int i = 0; i < L; ++i) da[i] = kde_kernel_deriv<Kind>((v - T(i)) / h) / h2;
}

template <typename T>
inline bool finite_pixel(T u, T m) { return std::isfinite(u) && std::isfinite(m); }

// acc += a_add b_add^T - a_sub b_sub^T (an L x L row-major matrix). The b factors come in
// double (converted once per pixel, not once per cell).
template <typename T>
inline void rank1_slide(double* __restrict acc, const T* __restrict a_add, const double* __restrict b_add,
                        const T* __restrict a_sub, const double* __restrict b_sub, int L) {
  for (int i = 0; i < L; ++i) {
    const double ai = a_add[i], si = a_sub[i];
    double* __restrict row = acc + (int64_t)i * L;
#pragma omp simd
    for (int j = 0; j < L; ++j) row[j] += ai * b_add[j] - si * b_sub[j];
  }
}

// acc += add - sub over n cells.
template <typename S>
inline void slide(double* __restrict acc, const S* __restrict add, const S* __restrict sub, int n) {
#pragma omp simd
  for (int k = 0; k < n; ++k) acc[k] += (double)add[k] - (double)sub[k];
}

// Per-column joint histograms (pred: q, target: p) of the image rows [lo, hi) of one plane.
// A column catches up with the band lazily, when a window first takes it in, so that its
// update and its addition to the window happen while it is in L1.
template <typename T, int Kind>
struct BandHistograms {
  const Problem& pb;
  const T *up = nullptr, *mp = nullptr, *ut = nullptr, *mt = nullptr;
  int L, L2, lo = 0, hi = 0;
  std::vector<double> p, q;                 // width x L2 each
  std::vector<int> col_lo, col_hi;          // the rows each column holds now
  std::vector<T> factors;                   // 8 vectors of L: pred/target x add/sub x (a, b)
  std::vector<double> bd;                   // the 4 b vectors of `factors` in double

  explicit BandHistograms(const Problem& pb_)
      : pb(pb_), L(pb_.bins), L2(pb_.bins * pb_.bins), p((size_t)pb_.width * L2), q((size_t)pb_.width * L2),
        col_lo(pb_.width), col_hi(pb_.width), factors(8 * (size_t)L), bd(4 * (size_t)L) {}

  // Start on one plane (pred maps up, mp; target maps ut, mt) with an empty band. The storage is
  // reused from item to item.
  void start(const T* up_, const T* mp_, const T* ut_, const T* mt_) {
    up = up_;
    mp = mp_;
    ut = ut_;
    mt = mt_;
    std::fill(p.begin(), p.end(), 0.0);
    std::fill(q.begin(), q.end(), 0.0);
    std::fill(col_lo.begin(), col_lo.end(), 0);
    std::fill(col_hi.begin(), col_hi.end(), 0);
    lo = hi = 0;
  }

  // Kernel factors of pixel (y, x) of one image into (a, b); the zero vector when y < 0 or
  // when the pixel is not finite.
  void pixel(const T* u, const T* m, int y, int x, T* a, T* b) {
    const T h = (T)pb.bandwidth;
    if (y >= 0) {
      const int64_t at = (int64_t)y * pb.width + x;
      if (finite_pixel(u[at], m[at])) {
        kernel_row<Kind>(u[at], h, L, a);
        kernel_row<Kind>(m[at], h, L, b);
        return;
      }
    }
    std::fill(a, a + L, T(0));
    std::fill(b, b + L, T(0));
  }

  void move_to(int new_lo, int new_hi) {
    lo = new_lo;
    hi = new_hi;
  }

  // Bring column x to the rows [lo, hi): add the entering rows, remove the leaving ones. With
  // leave_last, the last of these steps is not applied; its factors stay in `factors` and `bd`
  // for the caller to apply (fused_step), and the return value says whether there was one.
  bool refresh(int x, bool leave_last = false) {
    int &cl = col_lo[x], &ch = col_hi[x];
    if (cl == ch) cl = ch = lo;
    const int n_add = std::max(0, hi - ch), n_sub = std::max(0, lo - cl), steps = std::max(n_add, n_sub);
    T* f = factors.data();
    for (int k = 0; k < steps; ++k) {
      const int y_add = k < n_add ? ch + k : -1, y_sub = k < n_sub ? cl + k : -1;
      pixel(up, mp, y_add, x, f, f + L);
      pixel(up, mp, y_sub, x, f + 2 * L, f + 3 * L);
      pixel(ut, mt, y_add, x, f + 4 * L, f + 5 * L);
      pixel(ut, mt, y_sub, x, f + 6 * L, f + 7 * L);
      double* g = bd.data();
      for (int v = 0; v < 4; ++v) {
        const T* src = f + (2 * v + 1) * L;
#pragma omp simd
        for (int j = 0; j < L; ++j) g[v * L + j] = (double)src[j];
      }
      if (leave_last && k == steps - 1) break;
      rank1_slide(q.data() + (int64_t)x * L2, f, g, f + 2 * L, g + L, L);
      rank1_slide(p.data() + (int64_t)x * L2, f + 4 * L, g + 2 * L, f + 6 * L, g + 3 * L, L);
    }
    cl = lo;
    ch = hi;
    return leave_last && steps > 0;
  }
};

// Sum of f(k, P_k, Q_k) over the cells of a window (P, Q: the window's raw sums). f may also
// write per-cell outputs (G).
template <class F>
inline double sum_cells(const double* __restrict wp, const double* __restrict wq, int L2, F f) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int k = 0; k < L2; ++k) sum += f(k, wp[k], wq[k]);
  return sum;
}

// One window step fused with the use of its cells, in a single pass over them: the window adds
// the entering column (ap, aq; zeros when none) and drops the leaving one (sp, sq), with the
// arithmetic of slide, and f sees each updated cell.
template <class F>
inline double fused_step(double* __restrict wp, double* __restrict wq, const double* __restrict ap,
                         const double* __restrict aq, const double* __restrict sp, const double* __restrict sq,
                         int L2, F f) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int k = 0; k < L2; ++k) {
    const double np = wp[k] + (ap[k] - sp[k]), nq = wq[k] + (aq[k] - sq[k]);
    wp[k] = np;
    wq[k] = nq;
    sum += f(k, np, nq);
  }
  return sum;
}

// Joint histograms of one window, slid across the columns of a band.
struct WindowSums {
  int L2, lo = 0, hi = 0;
  std::vector<double> p, q, zeros;
  explicit WindowSums(int L2_) : L2(L2_), p(L2_, 0.0), q(L2_, 0.0), zeros(L2_, 0.0) {}

  void reset(int at) {
    std::fill(p.begin(), p.end(), 0.0);
    std::fill(q.begin(), q.end(), 0.0);
    lo = hi = at;
  }

  // Columns entering the window are refreshed first; the leaving ones were refreshed when they
  // entered, in this same row. Steps [k0, k1) of the move to [new_lo, new_hi).
  template <typename Band>
  void steps(int new_lo, int new_hi, Band& band, int k0, int k1) {
    const int n_add = std::max(0, new_hi - hi), n_sub = std::max(0, new_lo - lo);
    for (int k = k0; k < k1; ++k) {
      if (k < n_add) band.refresh(hi + k);
      const double* zp = zeros.data();
      const int64_t xa = k < n_add ? (int64_t)(hi + k) * L2 : -1, xs = k < n_sub ? (int64_t)(lo + k) * L2 : -1;
      slide(p.data(), xa >= 0 ? band.p.data() + xa : zp, xs >= 0 ? band.p.data() + xs : zp, L2);
      slide(q.data(), xa >= 0 ? band.q.data() + xa : zp, xs >= 0 ? band.q.data() + xs : zp, L2);
    }
  }

  template <typename Band>
  void move_to(int new_lo, int new_hi, Band& band) {
    steps(new_lo, new_hi, band, 0, std::max(std::max(0, new_hi - hi), std::max(0, new_lo - lo)));
    lo = new_lo;
    hi = new_hi;
  }

  // move_to, then the sum of f(k, P_k, Q_k) over the cells (see sum_cells), with the last step
  // of the move and of the entering column's band update done in the same pass as f.
  template <typename Band, class F>
  double move_and_sum(int new_lo, int new_hi, Band& band, F f) {
    const int n_add = std::max(0, new_hi - hi), n_sub = std::max(0, new_lo - lo), n = std::max(n_add, n_sub);
    if (n == 0) return sum_cells(p.data(), q.data(), L2, f);
    steps(new_lo, new_hi, band, 0, n - 1);
    const int k = n - 1;
    const double* z = zeros.data();
    const bool add = k < n_add, sub = k < n_sub;
    if (add) band.refresh(hi + k);
    const int64_t xa = (int64_t)(hi + k) * L2, xs = (int64_t)(lo + k) * L2;
    const double sum = fused_step(p.data(), q.data(), add ? band.p.data() + xa : z, add ? band.q.data() + xa : z,
                                  sub ? band.p.data() + xs : z, sub ? band.q.data() + xs : z, L2, f);
    lo = new_lo;
    hi = new_hi;
    return sum;
  }
};

// Moves the window to the columns [x0, x1) and returns its D (inv_n: 1 / pixels in the window).
template <typename T, typename Band>
T move_and_divergence(WindowSums& win, int x0, int x1, Band& band, double inv_n, T eps, int divergence) {
  if (divergence == kKL)
    return (T)win.move_and_sum(x0, x1, band, [=](int64_t, double p, double q) {
      return (double)kl_term((T)(p * inv_n), (T)(q * inv_n), eps);
    });
  const double sum = win.move_and_sum(x0, x1, band, [=](int64_t, double p, double q) {
    return (double)hellinger_term((T)(p * inv_n), (T)(q * inv_n), eps);
  });
  return hellinger_finish((T)sum, eps);
}

// Forward for the output rows [r0, r1) of one plane.
template <typename T, int Kind>
void forward_rows(const Problem& pb, BandHistograms<T, Kind>& band, WindowSums& win, const T* up, const T* mp,
                  const T* ut, const T* mt, const int32_t* bad_sat, T* d, int r0, int r1) {
  band.start(up, mp, ut, mt);
  const T eps = (T)pb.eps;
  const int stride = pb.width + 1;
  for (int r = r0; r < r1; ++r) {
    const int y0 = pb.rows.lo(r), y1 = pb.rows.hi(r);
    band.move_to(y0, y1);
    win.reset(pb.cols.lo(0));
    for (int c = 0; c < pb.cols.out; ++c) {
      const int x0 = pb.cols.lo(c), x1 = pb.cols.hi(c);
      T* out = d + (int64_t)r * pb.cols.out + c;
      if (rect_count(bad_sat, stride, y0, y1, x0, x1) > 0) {
        win.move_to(x0, x1, band);
        *out = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const double inv_n = 1.0 / ((double)(y1 - y0) * (x1 - x0));
      *out = move_and_divergence<T>(win, x0, x1, band, inv_n, eps, pb.divergence);
    }
  }
}

// ---------------------------------------------------------------------------------------
// The gradient's contraction: out[k] = a_k^T T b_k for a batch of forms (a'^T T b and a^T T b'
// of the pixels under one window row), with T one L x L matrix. Written like a GEMM
// micro-kernel with GCC/Clang vector types: MB forms at a time keep their partial rows a_k^T T
// in registers (NV vectors of 8 doubles each), each row of T is loaded once per MB forms.
// ---------------------------------------------------------------------------------------
typedef double v8d __attribute__((vector_size(64)));

EK_HD v8d load8(const double* p) {
  v8d v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// out[k] += sum_{i < L, j < 8 NV} a[k][i] t[i * ld + j] b[k][j] for k < n. Rows of more than
// 8 NV columns are done in strips by the caller.
template <int NV>
void bilinear_strip(const double* __restrict t, int ld, int L, int n, const double* const* a, const double* const* b,
                    double* out) {
  constexpr int MB = NV <= 2 ? 12 : (NV == 3 ? 8 : (NV == 4 ? 6 : (NV <= 6 ? 4 : 3)));
  for (int k0 = 0; k0 < n; k0 += MB) {
    const int m = std::min(MB, n - k0);
    const double* ak[MB];
    for (int q = 0; q < MB; ++q) ak[q] = a[k0 + std::min(q, m - 1)];  // a short block repeats its last form
    v8d acc[MB][NV];
#pragma GCC unroll 16
    for (int q = 0; q < MB; ++q)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[q][v] = v8d{};
    for (int i = 0; i < L; ++i) {
      v8d tv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) tv[v] = load8(t + (int64_t)i * ld + 8 * v);
#pragma GCC unroll 16
      for (int q = 0; q < MB; ++q) {
        const double s = ak[q][i];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[q][v] += s * tv[v];
      }
    }
    for (int q = 0; q < m; ++q) {
      const double* bq = b[k0 + q];
      v8d sum = acc[q][0] * load8(bq);
      for (int v = 1; v < NV; ++v) sum += acc[q][v] * load8(bq + 8 * v);
      double r = 0.0;
      for (int l = 0; l < 8; ++l) r += sum[l];
      out[k0 + q] += r;
    }
  }
}

// out[k] = a[k]^T t b[k] for k < n; t has L rows of ld = Lp doubles (Lp a multiple of 8, zero
// beyond column L), b[k] is zero beyond L. Any L: strips of up to 64 columns.
inline void bilinear_forms(const double* t, int L, int Lp, int n, const double* const* a, const double* const* b,
                           double* out, std::vector<const double*>& b_shift) {
  std::fill(out, out + n, 0.0);
  for (int j0 = 0; j0 < Lp; j0 += 64) {
    const double* const* bs = b;
    if (j0 > 0) {
      for (int k = 0; k < n; ++k) b_shift[k] = b[k] + j0;
      bs = b_shift.data();
    }
    const double* tj = t + j0;
    switch (std::min(8, (Lp - j0) / 8)) {
      case 1: bilinear_strip<1>(tj, Lp, L, n, a, bs, out); break;
      case 2: bilinear_strip<2>(tj, Lp, L, n, a, bs, out); break;
      case 3: bilinear_strip<3>(tj, Lp, L, n, a, bs, out); break;
      case 4: bilinear_strip<4>(tj, Lp, L, n, a, bs, out); break;
      case 5: bilinear_strip<5>(tj, Lp, L, n, a, bs, out); break;
      case 6: bilinear_strip<6>(tj, Lp, L, n, a, bs, out); break;
      case 7: bilinear_strip<7>(tj, Lp, L, n, a, bs, out); break;
      default: bilinear_strip<8>(tj, Lp, L, n, a, bs, out); break;
    }
  }
}

// Scratch of the backward pass, allocated once per thread and reused by its items.
template <typename T, int Kind>
struct BackwardScratch {
  BandHistograms<T, Kind> band;
  WindowSums win;
  int Lp;            // bins rounded up to a multiple of 8 (the padded row length of T and the factors)
  int ring_n;        // pixel rows whose kernel factors are kept (0: computed per column instead)
  int g_slots;       // windows of G kept (a ring along the row)
  std::vector<T> g_ring, zeros, kf;
  std::vector<double> t_row, factors, gacc, out;
  std::vector<const double*> a, b, b_shift;

  BackwardScratch(const Problem& pb, int rows_per_item)
      : band(pb), win(pb.bins * pb.bins), Lp((pb.bins + 7) / 8 * 8) {
    const int L = pb.bins, L2 = L * L, W = pb.width;
    // Window row r covers at most min(side, rows per item) pixel rows of an item; their factors
    // are kept in a ring of that many rows when it is small (every window side the SPEC allows),
    // otherwise (a global window over a tall image, where each pixel row is used once anyway)
    // they are computed for one column at a time.
    const int span = std::min(std::min(pb.rows.side, pb.height), rows_per_item);
    ring_n = span <= 64 ? span : 0;
    g_slots = std::min(pb.cols.side + 2, pb.cols.out);
    g_ring.resize((size_t)g_slots * L2);
    zeros.assign(L2, T(0));
    kf.resize(4 * (size_t)L);
    t_row.resize((size_t)L * Lp);
    factors.assign((size_t)(ring_n > 0 ? ring_n * W : span) * 4 * Lp, 0.0);
    gacc.resize((size_t)rows_per_item * W * 2);
    out.resize(2 * (size_t)span);
    a.resize(2 * (size_t)span);
    b.resize(2 * (size_t)span);
    b_shift.resize(2 * (size_t)span);
  }

  // Kernel factors of pixel value (u, m) into dst: a' | a | b | b', each Lp doubles (the
  // padding stays zero).
  void pixel_factors(T u, T m, T h, int L, double* dst) {
    T *ka = kf.data(), *kda = ka + L, *kb = kda + L, *kdb = kb + L;
    kernel_row<Kind>(u, h, L, ka);
    kernel_deriv_row<Kind>(u, h, L, kda);
    kernel_row<Kind>(m, h, L, kb);
    kernel_deriv_row<Kind>(m, h, L, kdb);
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      dst[j] = (double)kda[j];
      dst[Lp + j] = (double)ka[j];
      dst[2 * Lp + j] = (double)kb[j];
      dst[3 * Lp + j] = (double)kdb[j];
    }
  }
};

// Backward for the input rows [y0, y1) of one plane, from grad_output and the saved D.
// Fused mode (d_out != nullptr; d and grad unused): the gradient for grad_output = 1 together
// with D, written for the output rows [y0, y1) that this item owns; bad_sat marks non-finite
// pixels and poison_sat the windows that contain one.
//
// For each window row r covering a pixel of the item: G_{r,c} for every window c of the row
// (the histograms as in the forward pass), then T_r(x) = the sum of G_{r,c} over the windows c
// of the row that cover column x (slid along the row in double), and at once, for each pixel
// p = (y, x) of the item under row r: grad_u(p) += a'_p^T T_r(x) b_p and grad_m(p) += a_p^T T_r(x)
// b'_p. Summed over the rows r, that is a'_p^T H_p b_p with H_p the sum of G_c over the windows
// containing p. Nothing with a bins axis outlives its window row.
template <typename T, int Kind>
void backward_rows(const Problem& pb, BackwardScratch<T, Kind>& s, const T* up, const T* mp, const T* ut,
                   const T* mt, const T* d, const T* grad, const int32_t* poison_sat, T* gu, T* gm, int y0, int y1,
                   T* d_out, const int32_t* bad_sat) {
  const int W = pb.width, Wo = pb.cols.out, L = pb.bins, L2 = L * L, Lp = s.Lp, g_slots = s.g_slots;
  const T eps = (T)pb.eps, h = (T)pb.bandwidth;
  auto& band = s.band;
  auto& win = s.win;
  band.start(up, mp, ut, mt);
  double* gacc = s.gacc.data();  // (y - y0, x): grad_u, grad_m
  std::fill(gacc, gacc + (int64_t)(y1 - y0) * W * 2, 0.0);
  T* g_ring = s.g_ring.data();
  const T* zeros = s.zeros.data();
  double* t_row = s.t_row.data();
  int f_next = y0;  // the next pixel row whose factors are to be computed (cached mode)

  auto window_row = [&](int r) {
    const int wy0 = pb.rows.lo(r), wy1 = pb.rows.hi(r);
    const int py0 = std::max(wy0, y0), py1 = std::min(wy1, y1);  // the item's pixel rows under row r
    auto factors_at = [&](int y, int x) {
      return s.factors.data() + ((int64_t)(s.ring_n > 0 ? (y % s.ring_n) * W + x : y - py0)) * 4 * Lp;
    };
    if (s.ring_n > 0) {
      for (; f_next < py1; ++f_next)
        for (int x = 0; x < W; ++x) {
          const int64_t at = (int64_t)f_next * W + x;
          s.pixel_factors(up[at], mp[at], h, L, factors_at(f_next, x));
        }
    }
    band.move_to(wy0, wy1);
    win.reset(pb.cols.lo(0));
    std::fill(t_row, t_row + (int64_t)L * Lp, 0.0);
    int tx = 0, lo = pb.cols.out_lo(0), hi = lo;
    // T_r(x) for every x whose windows are all below `ready` (G_c exists for c < ready), and its
    // contraction with the pixels of column x under row r.
    auto emit_until = [&](int ready) {
      for (; tx < W && pb.cols.out_hi(tx) <= ready; ++tx) {
        const int new_lo = pb.cols.out_lo(tx), new_hi = pb.cols.out_hi(tx);
        const int n_add = std::max(0, new_hi - hi), n_sub = std::max(0, new_lo - lo);
        for (int k = 0; k < std::max(n_add, n_sub); ++k) {
          const T* add = k < n_add ? g_ring + (int64_t)((hi + k) % g_slots) * L2 : zeros;
          const T* sub = k < n_sub ? g_ring + (int64_t)((lo + k) % g_slots) * L2 : zeros;
          for (int i = 0; i < L; ++i) slide(t_row + (int64_t)i * Lp, add + (int64_t)i * L, sub + (int64_t)i * L, L);
        }
        lo = new_lo;
        hi = new_hi;
        const int n = py1 - py0;
        for (int k = 0; k < n; ++k) {
          const int y = py0 + k;
          double* f = factors_at(y, tx);
          if (s.ring_n == 0) {
            const int64_t at = (int64_t)y * W + tx;
            s.pixel_factors(up[at], mp[at], h, L, f);
          }
          s.a[2 * k] = f;                // a'^T T b: grad_u
          s.b[2 * k] = f + 2 * Lp;
          s.a[2 * k + 1] = f + Lp;       // a^T T b': grad_m
          s.b[2 * k + 1] = f + 3 * Lp;
        }
        bilinear_forms(t_row, L, Lp, 2 * n, s.a.data(), s.b.data(), s.out.data(), s.b_shift);
        for (int k = 0; k < n; ++k) {
          double* g = gacc + ((int64_t)(py0 + k - y0) * W + tx) * 2;
          g[0] += s.out[2 * k];
          g[1] += s.out[2 * k + 1];
        }
      }
    };
    for (int c = 0; c < Wo; ++c) {
      emit_until(c);  // before slot c % g_slots is overwritten
      const int x0 = pb.cols.lo(c), x1 = pb.cols.hi(c);
      T* gc = g_ring + (int64_t)(c % g_slots) * L2;
      const double inv_n = 1.0 / ((double)(wy1 - wy0) * (x1 - x0));
      // The window's cells are used in the same pass as its last sliding step (move_and_sum).
      const auto kl_g = [=](T coef) {
        return [=](int64_t k, double p, double q) {
          gc[k] = coef * kl_dq((T)(p * inv_n), (T)(q * inv_n), eps);
          return 0.0;
        };
      };
      T dc;
      if (d_out != nullptr) {  // grad_output = 1
        const bool owned = r >= y0 && r < y1;
        if (rect_count(bad_sat, W + 1, wy0, wy1, x0, x1) > 0) {
          win.move_to(x0, x1, band);
          if (owned) d_out[(int64_t)r * Wo + c] = std::numeric_limits<T>::quiet_NaN();
          std::fill(gc, gc + L2, T(0));
          continue;
        }
        const T coef = (T)inv_n;
        if (pb.divergence == kKL) {
          if (owned) {  // D and G in one pass over the cells
            const T sum = (T)win.move_and_sum(x0, x1, band, [=](int64_t k, double p, double q) {
              T dq;
              const double v = (double)kl_term_dq((T)(p * inv_n), (T)(q * inv_n), eps, &dq);
              gc[k] = coef * dq;
              return v;
            });
            d_out[(int64_t)r * Wo + c] = sum;
            if (!std::isfinite(sum)) std::fill(gc, gc + L2, T(0));
          } else {
            win.move_and_sum(x0, x1, band, kl_g(coef));
          }
          continue;
        }
        // Hellinger's G needs the window's D: a second pass.
        dc = move_and_divergence<T>(win, x0, x1, band, inv_n, eps, pb.divergence);
        if (owned) d_out[(int64_t)r * Wo + c] = dc;
        if (!std::isfinite(dc)) {
          std::fill(gc, gc + L2, T(0));
          continue;
        }
        const double *wp = win.p.data(), *wq = win.q.data();
#pragma omp simd
        for (int k = 0; k < L2; ++k) gc[k] = coef * hellinger_dq((T)(wp[k] * inv_n), (T)(wq[k] * inv_n), eps, dc);
        continue;
      }
      const T g = grad[(int64_t)r * Wo + c];
      dc = d[(int64_t)r * Wo + c];
      // Windows with a non-finite D or grad are reported through poison_sat; zeros keep the
      // sliding sums finite for the others.
      if (!(std::isfinite(g) && std::isfinite(dc)) || g == T(0)) {
        win.move_to(x0, x1, band);
        std::fill(gc, gc + L2, T(0));
        continue;
      }
      const T coef = (T)(g * inv_n);
      if (pb.divergence == kKL) {
        win.move_and_sum(x0, x1, band, kl_g(coef));
      } else {
        win.move_and_sum(x0, x1, band, [=](int64_t k, double p, double q) {
          gc[k] = coef * hellinger_dq((T)(p * inv_n), (T)(q * inv_n), eps, dc);
          return 0.0;
        });
      }
    }
    emit_until(Wo);
  };

  for (int r = pb.rows.out_lo(y0); r < pb.rows.out_hi(y1 - 1); ++r) window_row(r);

  const int pstride = Wo + 1;
  for (int y = y0; y < y1; ++y) {
    const int wr0 = pb.rows.out_lo(y), wr1 = pb.rows.out_hi(y);
    for (int x = 0; x < W; ++x) {
      const int64_t at = (int64_t)y * W + x;
      if (rect_count(poison_sat, pstride, wr0, wr1, pb.cols.out_lo(x), pb.cols.out_hi(x)) > 0 ||
          !finite_pixel(up[at], mp[at])) {
        gu[at] = gm[at] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const double* g = gacc + ((int64_t)(y - y0) * W + x) * 2;
      gu[at] = (T)g[0];
      gm[at] = (T)g[1];
    }
  }
}

// Rows per work item: fixed (never derived from the thread count) so results are reproducible.
constexpr int kForwardRows = 16;
inline int backward_rows_per_item(const Axis& rows) { return std::max(32, 4 * (std::min(rows.side, rows.extent) - 1)); }

Problem make_problem(const at::Tensor& u, int64_t win_h, int64_t win_w, bool valid, int64_t bins, double bandwidth,
                     int64_t divergence, double eps) {
  Problem pb;
  pb.planes = (int)u.size(0);
  pb.height = (int)u.size(1);
  pb.width = (int)u.size(2);
  pb.bins = (int)bins;
  pb.rows = make_axis(pb.height, (int)win_h, valid);
  pb.cols = make_axis(pb.width, (int)win_w, valid);
  pb.bandwidth = bandwidth;
  pb.eps = eps;
  pb.divergence = (int)divergence;
  return pb;
}

template <typename T, int Kind>
void forward_impl(const Problem& pb, const at::Tensor& up, const at::Tensor& mp, const at::Tensor& ut,
                  const at::Tensor& mt, const at::Tensor& bad_sat, at::Tensor& d) {
  const int blocks = (pb.rows.out + kForwardRows - 1) / kForwardRows;
  const int64_t sat_plane = (int64_t)(pb.height + 1) * (pb.width + 1);
  const T *u_p = up.data_ptr<T>(), *m_p = mp.data_ptr<T>(), *u_t = ut.data_ptr<T>(), *m_t = mt.data_ptr<T>();
  const int32_t* sat = bad_sat.data_ptr<int32_t>();
  T* out = d.data_ptr<T>();
  at::parallel_for(0, (int64_t)pb.planes * blocks, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    BandHistograms<T, Kind> band(pb);  // scratch, shared by this thread's items
    WindowSums win(pb.bins * pb.bins);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int r0 = (int)(item % blocks) * kForwardRows, r1 = std::min(pb.rows.out, r0 + kForwardRows);
      const int64_t in = n * pb.plane_in();
      forward_rows<T, Kind>(pb, band, win, u_p + in, m_p + in, u_t + in, m_t + in, sat + n * sat_plane,
                            out + n * pb.plane_out(), r0, r1);
    }
  });
}

// d_out defined: the fused forward (D and the gradient for grad_output = 1; d and grad undefined).
template <typename T, int Kind>
void backward_impl(const Problem& pb, const at::Tensor& up, const at::Tensor& mp, const at::Tensor& ut,
                   const at::Tensor& mt, const at::Tensor& d, const at::Tensor& grad, const at::Tensor& poison_sat,
                   at::Tensor& gu, at::Tensor& gm, at::Tensor d_out = {}, const at::Tensor& bad_sat = {}) {
  const int rows_per_item = backward_rows_per_item(pb.rows);
  const int blocks = (pb.height + rows_per_item - 1) / rows_per_item;
  const int64_t sat_plane = (int64_t)(pb.rows.out + 1) * (pb.cols.out + 1);
  const T *u_p = up.data_ptr<T>(), *m_p = mp.data_ptr<T>(), *u_t = ut.data_ptr<T>(), *m_t = mt.data_ptr<T>();
  const T *dd = d.defined() ? d.data_ptr<T>() : nullptr, *gg = grad.defined() ? grad.data_ptr<T>() : nullptr;
  const int32_t* sat = poison_sat.data_ptr<int32_t>();
  T* d_out_p = d_out.defined() ? d_out.data_ptr<T>() : nullptr;
  const int32_t* bad = bad_sat.defined() ? bad_sat.data_ptr<int32_t>() : nullptr;
  const int64_t bad_plane = (int64_t)(pb.height + 1) * (pb.width + 1);
  T *gu_p = gu.data_ptr<T>(), *gm_p = gm.data_ptr<T>();
  at::parallel_for(0, (int64_t)pb.planes * blocks, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    BackwardScratch<T, Kind> scratch(pb, std::min(rows_per_item, pb.height));  // shared by this thread's items
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int y0 = (int)(item % blocks) * rows_per_item, y1 = std::min(pb.height, y0 + rows_per_item);
      const int64_t in = n * pb.plane_in(), out = n * pb.plane_out();
      backward_rows<T, Kind>(pb, scratch, u_p + in, m_p + in, u_t + in, m_t + in, dd ? dd + out : nullptr,
                             gg ? gg + out : nullptr, sat + n * sat_plane, gu_p + in, gm_p + in, y0, y1,
                             d_out_p ? d_out_p + out : nullptr, bad ? bad + n * bad_plane : nullptr);
    }
  });
}

}  // namespace

at::Tensor local_divergence_forward_cpu(const at::Tensor& u_pred, const at::Tensor& m_pred, const at::Tensor& u_tgt,
                                        const at::Tensor& m_tgt, const at::Tensor& bad_sat, int64_t win_h,
                                        int64_t win_w, bool valid, int64_t bins, double bandwidth, int64_t kernel,
                                        int64_t divergence, double eps) {
  const Problem pb = make_problem(u_pred, win_h, win_w, valid, bins, bandwidth, divergence, eps);
  at::Tensor d = at::empty({pb.planes, pb.rows.out, pb.cols.out}, u_pred.options());
  AT_DISPATCH_FLOATING_TYPES(u_pred.scalar_type(), "local_divergence_forward_cpu", [&] {
    if (kernel == kLogistic)
      forward_impl<scalar_t, kLogistic>(pb, u_pred, m_pred, u_tgt, m_tgt, bad_sat, d);
    else
      forward_impl<scalar_t, kGaussian>(pb, u_pred, m_pred, u_tgt, m_tgt, bad_sat, d);
  });
  return d;
}

std::vector<at::Tensor> local_divergence_backward_cpu(const at::Tensor& u_pred, const at::Tensor& m_pred,
                                                      const at::Tensor& u_tgt, const at::Tensor& m_tgt,
                                                      const at::Tensor& d, const at::Tensor& grad,
                                                      const at::Tensor& poison_sat, int64_t win_h, int64_t win_w,
                                                      bool valid, int64_t bins, double bandwidth, int64_t kernel,
                                                      int64_t divergence, double eps) {
  const Problem pb = make_problem(u_pred, win_h, win_w, valid, bins, bandwidth, divergence, eps);
  at::Tensor gu = at::empty_like(u_pred), gm = at::empty_like(u_pred);
  AT_DISPATCH_FLOATING_TYPES(u_pred.scalar_type(), "local_divergence_backward_cpu", [&] {
    if (kernel == kLogistic)
      backward_impl<scalar_t, kLogistic>(pb, u_pred, m_pred, u_tgt, m_tgt, d, grad, poison_sat, gu, gm);
    else
      backward_impl<scalar_t, kGaussian>(pb, u_pred, m_pred, u_tgt, m_tgt, d, grad, poison_sat, gu, gm);
  });
  return {gu, gm};
}

std::vector<at::Tensor> local_divergence_forward_with_grad_cpu(
    const at::Tensor& u_pred, const at::Tensor& m_pred, const at::Tensor& u_tgt, const at::Tensor& m_tgt,
    const at::Tensor& bad_sat, const at::Tensor& bad_window_sat, int64_t win_h, int64_t win_w, bool valid,
    int64_t bins, double bandwidth, int64_t kernel, int64_t divergence, double eps) {
  const Problem pb = make_problem(u_pred, win_h, win_w, valid, bins, bandwidth, divergence, eps);
  at::Tensor d = at::empty({pb.planes, pb.rows.out, pb.cols.out}, u_pred.options());
  at::Tensor gu = at::empty_like(u_pred), gm = at::empty_like(u_pred);
  AT_DISPATCH_FLOATING_TYPES(u_pred.scalar_type(), "local_divergence_forward_with_grad_cpu", [&] {
    if (kernel == kLogistic)
      backward_impl<scalar_t, kLogistic>(pb, u_pred, m_pred, u_tgt, m_tgt, {}, {}, bad_window_sat, gu, gm, d, bad_sat);
    else
      backward_impl<scalar_t, kGaussian>(pb, u_pred, m_pred, u_tgt, m_tgt, {}, {}, bad_window_sat, gu, gm, d, bad_sat);
  });
  return {d, gu, gm};
}

}  // namespace entropy_kernels
