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
  const T *up, *mp, *ut, *mt;
  int L, L2, lo = 0, hi = 0;
  std::vector<double> p, q;                 // width x L2 each
  std::vector<int> col_lo, col_hi;          // the rows each column holds now
  std::vector<T> factors;                   // 8 vectors of L: pred/target x add/sub x (a, b)
  std::vector<double> bd;                   // the 4 b vectors of `factors` in double

  BandHistograms(const Problem& pb_, const T* up_, const T* mp_, const T* ut_, const T* mt_)
      : pb(pb_), up(up_), mp(mp_), ut(ut_), mt(mt_), L(pb_.bins), L2(pb_.bins * pb_.bins),
        p((size_t)pb_.width * L2, 0.0), q((size_t)pb_.width * L2, 0.0), col_lo(pb_.width, 0),
        col_hi(pb_.width, 0), factors(8 * (size_t)L), bd(4 * (size_t)L) {}

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

  // Bring column x to the rows [lo, hi): add the entering rows, remove the leaving ones.
  void refresh(int x) {
    int &cl = col_lo[x], &ch = col_hi[x];
    if (cl == ch) cl = ch = lo;
    const int n_add = std::max(0, hi - ch), n_sub = std::max(0, lo - cl);
    T* f = factors.data();
    for (int k = 0; k < std::max(n_add, n_sub); ++k) {
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
      rank1_slide(q.data() + (int64_t)x * L2, f, g, f + 2 * L, g + L, L);
      rank1_slide(p.data() + (int64_t)x * L2, f + 4 * L, g + 2 * L, f + 6 * L, g + 3 * L, L);
    }
    cl = lo;
    ch = hi;
  }
};

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
  // entered, in this same row.
  template <typename Band>
  void move_to(int new_lo, int new_hi, Band& band) {
    const int n_add = std::max(0, new_hi - hi), n_sub = std::max(0, new_lo - lo);
    for (int k = 0; k < std::max(n_add, n_sub); ++k) {
      if (k < n_add) band.refresh(hi + k);
      const double* zp = zeros.data();
      const int64_t xa = k < n_add ? (int64_t)(hi + k) * L2 : -1, xs = k < n_sub ? (int64_t)(lo + k) * L2 : -1;
      slide(p.data(), xa >= 0 ? band.p.data() + xa : zp, xs >= 0 ? band.p.data() + xs : zp, L2);
      slide(q.data(), xa >= 0 ? band.q.data() + xa : zp, xs >= 0 ? band.q.data() + xs : zp, L2);
    }
    lo = new_lo;
    hi = new_hi;
  }
};

template <typename T>
T window_divergence(const double* __restrict wp, const double* __restrict wq, int L2, double inv_n, T eps,
                    int divergence) {
  double sum = 0.0;
  if (divergence == kKL) {
#pragma omp simd reduction(+ : sum)
    for (int k = 0; k < L2; ++k) sum += (double)kl_term((T)(wp[k] * inv_n), (T)(wq[k] * inv_n), eps);
    return (T)sum;
  }
#pragma omp simd reduction(+ : sum)
  for (int k = 0; k < L2; ++k) sum += (double)hellinger_term((T)(wp[k] * inv_n), (T)(wq[k] * inv_n), eps);
  return hellinger_finish((T)sum, eps);
}

// Forward for the output rows [r0, r1) of one plane.
template <typename T, int Kind>
void forward_rows(const Problem& pb, const T* up, const T* mp, const T* ut, const T* mt, const int32_t* bad_sat,
                  T* d, int r0, int r1) {
  BandHistograms<T, Kind> band(pb, up, mp, ut, mt);
  WindowSums win(band.L2);
  const T eps = (T)pb.eps;
  const int stride = pb.width + 1;
  for (int r = r0; r < r1; ++r) {
    const int y0 = pb.rows.lo(r), y1 = pb.rows.hi(r);
    band.move_to(y0, y1);
    win.reset(pb.cols.lo(0));
    for (int c = 0; c < pb.cols.out; ++c) {
      const int x0 = pb.cols.lo(c), x1 = pb.cols.hi(c);
      win.move_to(x0, x1, band);
      T* out = d + (int64_t)r * pb.cols.out + c;
      if (rect_count(bad_sat, stride, y0, y1, x0, x1) > 0) {
        *out = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const double inv_n = 1.0 / ((double)(y1 - y0) * (x1 - x0));
      *out = window_divergence<T>(win.p.data(), win.q.data(), band.L2, inv_n, eps, pb.divergence);
    }
  }
}

// Backward for the input rows [y0, y1) of one plane, from grad_output and the saved D.
// Fused mode (d_out != nullptr; d and grad unused): the gradient for grad_output = 1 together
// with D, written for the output rows [y0, y1) that this item owns; bad_sat marks non-finite
// pixels and poison_sat the windows that contain one.
template <typename T, int Kind>
void backward_rows(const Problem& pb, const T* up, const T* mp, const T* ut, const T* mt, const T* d,
                   const T* grad, const int32_t* poison_sat, T* gu, T* gm, int y0, int y1, T* d_out,
                   const int32_t* bad_sat) {
  const int W = pb.width, Wo = pb.cols.out, L = pb.bins, L2 = L * L;
  const T eps = (T)pb.eps, h = (T)pb.bandwidth;
  BandHistograms<T, Kind> band(pb, up, mp, ut, mt);
  WindowSums win(L2);
  // One slot per row a pixel can see: a new row's slot holds the row that leaves at the same y,
  // which is subtracted from acc just before it is overwritten (see window_row).
  const int ring_n = std::min(pb.rows.side, pb.rows.out);
  const int g_slots = std::min(pb.cols.side + 2, Wo);
  std::vector<T> g_ring((size_t)g_slots * L2), ring((size_t)ring_n * W * L2), zeros(L2, T(0));
  std::vector<double> t_row(L2), acc((size_t)W * L2, 0.0);

  // T_r(x) = sum of G_{r, c} over the windows c of row r covering column x, into ring slot r.
  // T_r is produced column by column as soon as the G_c it needs exist, so G lives in a ring of
  // g_slots windows (at most side + 1 are live: those of T(x - 1) and the ones entering T(x)),
  // which stays in L1/L2 instead of a whole row of G.
  // acc(x) holds the sum of T_r(x) over rows [r_low, r_next).
  int r_low = pb.rows.out_lo(y0), r_next = r_low;
  auto window_row = [&](int r) {
    const int wy0 = pb.rows.lo(r), wy1 = pb.rows.hi(r);
    // The slot of row r holds row r - ring_n. If that row is still in acc, it leaves acc at the
    // y that needs row r (a pixel sees at most ring_n rows), so it is subtracted here, column by
    // column, just before T_r overwrites it.
    const bool take_out = r - ring_n >= r_low;
    band.move_to(wy0, wy1);
    win.reset(pb.cols.lo(0));
    T* slot = ring.data() + (int64_t)(r % ring_n) * W * L2;
    std::fill(t_row.begin(), t_row.end(), 0.0);
    int tx = 0, lo = pb.cols.out_lo(0), hi = lo;
    // Emit T_r(x) for every x whose windows are all below `ready` (G_c exists for c < ready).
    auto emit_until = [&](int ready) {
      for (; tx < W && pb.cols.out_hi(tx) <= ready; ++tx) {
        const int new_lo = pb.cols.out_lo(tx), new_hi = pb.cols.out_hi(tx);
        const int n_add = std::max(0, new_hi - hi), n_sub = std::max(0, new_lo - lo);
        for (int k = 0; k < std::max(n_add, n_sub); ++k) {
          const T* add = k < n_add ? g_ring.data() + (int64_t)((hi + k) % g_slots) * L2 : zeros.data();
          const T* sub = k < n_sub ? g_ring.data() + (int64_t)((lo + k) % g_slots) * L2 : zeros.data();
          slide(t_row.data(), add, sub, L2);
        }
        lo = new_lo;
        hi = new_hi;
        T* dst = slot + (int64_t)tx * L2;
        if (take_out) {
          double* __restrict hx = acc.data() + (int64_t)tx * L2;
#pragma omp simd
          for (int k = 0; k < L2; ++k) {
            hx[k] -= (double)dst[k];
            dst[k] = (T)t_row[k];
          }
        } else {
#pragma omp simd
          for (int k = 0; k < L2; ++k) dst[k] = (T)t_row[k];
        }
      }
    };
    for (int c = 0; c < Wo; ++c) {
      emit_until(c);  // before slot c % g_slots is overwritten
      const int x0 = pb.cols.lo(c), x1 = pb.cols.hi(c);
      win.move_to(x0, x1, band);
      T* gc = g_ring.data() + (int64_t)(c % g_slots) * L2;
      T g, dc;
      if (d_out != nullptr) {
        const bool owned = r >= y0 && r < y1;
        g = T(1);
        dc = T(0);  // KL's G does not use D
        if (rect_count(bad_sat, W + 1, wy0, wy1, x0, x1) > 0) {
          dc = std::numeric_limits<T>::quiet_NaN();
        } else if (owned && pb.divergence == kKL) {
          // D and G in one pass over the cells (G for grad_output = 1).
          const double inv_n = 1.0 / ((double)(wy1 - wy0) * (x1 - x0));
          const T coef = (T)inv_n;
          const double *wp = win.p.data(), *wq = win.q.data();
          double sum = 0.0;
#pragma omp simd reduction(+ : sum)
          for (int k = 0; k < L2; ++k) {
            const T pk = (T)(wp[k] * inv_n), qk = (T)(wq[k] * inv_n);
            T dq;
            sum += (double)kl_term_dq(pk, qk, eps, &dq);
            gc[k] = coef * dq;
          }
          d_out[(int64_t)r * Wo + c] = (T)sum;
          if (!std::isfinite((T)sum)) std::fill(gc, gc + L2, T(0));
          continue;
        } else if (owned || pb.divergence == kHellinger) {
          const double inv_n = 1.0 / ((double)(wy1 - wy0) * (x1 - x0));
          dc = window_divergence<T>(win.p.data(), win.q.data(), L2, inv_n, eps, pb.divergence);
        }
        if (owned) d_out[(int64_t)r * Wo + c] = dc;
      } else {
        g = grad[(int64_t)r * Wo + c];
        dc = d[(int64_t)r * Wo + c];
      }
      // Windows with a non-finite D or grad are reported through poison_sat; zeros keep the
      // sliding sums finite for the others.
      if (!(std::isfinite(g) && std::isfinite(dc)) || g == T(0)) {
        std::fill(gc, gc + L2, T(0));
        continue;
      }
      const double inv_n = 1.0 / ((double)(wy1 - wy0) * (x1 - x0));
      const T coef = (T)(g * inv_n);
      const double *wp = win.p.data(), *wq = win.q.data();
      if (pb.divergence == kKL) {
#pragma omp simd
        for (int k = 0; k < L2; ++k) gc[k] = coef * kl_dq((T)(wp[k] * inv_n), (T)(wq[k] * inv_n), eps);
      } else {
#pragma omp simd
        for (int k = 0; k < L2; ++k) gc[k] = coef * hellinger_dq((T)(wp[k] * inv_n), (T)(wq[k] * inv_n), eps, dc);
      }
    }
    emit_until(Wo);
    if (take_out) r_low = r - ring_n + 1;
  };

  std::vector<T> f(4 * (size_t)L);
  T *a = f.data(), *da = a + L, *b = da + L, *db = b + L;
  std::vector<double> v(L), w(L);
  const int pstride = Wo + 1;
  for (int y = y0; y < y1; ++y) {
    // Move acc to the rows covering y: compute the entering rows (which subtract the leaving
    // rows whose slots they take), then add them and subtract the remaining leaving rows.
    const int new_lo = pb.rows.out_lo(y), new_hi = pb.rows.out_hi(y);
    for (int r = r_next; r < new_hi; ++r) window_row(r);
    const int n_add = std::max(0, new_hi - r_next), n_sub = std::max(0, new_lo - r_low);
    const int wr0 = new_lo, wr1 = new_hi;
    for (int x = 0; x < W; ++x) {
      double* __restrict hx = acc.data() + (int64_t)x * L2;
      for (int k = 0; k < std::max(n_add, n_sub); ++k) {
        const T* add = k < n_add ? ring.data() + ((int64_t)((r_next + k) % ring_n) * W + x) * L2 : zeros.data();
        const T* sub = k < n_sub ? ring.data() + ((int64_t)((r_low + k) % ring_n) * W + x) * L2 : zeros.data();
        slide(hx, add, sub, L2);
      }
      const int64_t at = (int64_t)y * W + x;
      const T u = up[at], m = mp[at];
      if (rect_count(poison_sat, pstride, wr0, wr1, pb.cols.out_lo(x), pb.cols.out_hi(x)) > 0 ||
          !finite_pixel(u, m)) {
        gu[at] = gm[at] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      kernel_row<Kind>(u, h, L, a);
      kernel_deriv_row<Kind>(u, h, L, da);
      kernel_row<Kind>(m, h, L, b);
      kernel_deriv_row<Kind>(m, h, L, db);
      // v = H^T a', w = H^T a, then grad_u = v . b and grad_m = w . b'.
      std::fill(v.begin(), v.end(), 0.0);
      std::fill(w.begin(), w.end(), 0.0);
      const double* hp = hx;
      for (int i = 0; i < L; ++i) {
        const double dai = da[i], ai = a[i];
        const double* __restrict row = hp + (int64_t)i * L;
        double* __restrict vv = v.data();
        double* __restrict ww = w.data();
#pragma omp simd
        for (int j = 0; j < L; ++j) {
          vv[j] += dai * row[j];
          ww[j] += ai * row[j];
        }
      }
      double su = 0.0, sm = 0.0;
#pragma omp simd reduction(+ : su, sm)
      for (int j = 0; j < L; ++j) {
        su += v[j] * (double)b[j];
        sm += w[j] * (double)db[j];
      }
      gu[at] = (T)su;
      gm[at] = (T)sm;
    }
    r_low = std::max(r_low, new_lo);
    r_next = std::max(r_next, new_hi);
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
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int r0 = (int)(item % blocks) * kForwardRows, r1 = std::min(pb.rows.out, r0 + kForwardRows);
      const int64_t in = n * pb.plane_in();
      forward_rows<T, Kind>(pb, u_p + in, m_p + in, u_t + in, m_t + in, sat + n * sat_plane, out + n * pb.plane_out(),
                            r0, r1);
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
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int y0 = (int)(item % blocks) * rows_per_item, y1 = std::min(pb.height, y0 + rows_per_item);
      const int64_t in = n * pb.plane_in(), out = n * pb.plane_out();
      backward_rows<T, Kind>(pb, u_p + in, m_p + in, u_t + in, m_t + in, dd ? dd + out : nullptr,
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
