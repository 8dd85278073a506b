// C++ CPU implementation of the fused local divergence, forward and backward (docs/cpu.md).
//
// Work is split into fixed (plane, block of window rows) items run with at::parallel_for. The
// split does not depend on the thread count and every item is computed sequentially, so the
// result is bitwise the same for any number of threads.
//
// Forward, per item and window row r (RowWindows): the joint histograms of window c are a
// running sum along the row of per-window differences D(c) (the columns window c adds minus
// those it drops), each kept in double from row to row and brought to the new band of image rows
// by the rank-1 kernel products of the pixels entering and leaving it; the window's L*L cells
// then give D_c. Cost per pixel: about 8 L^2 multiply-adds in double and L^2 logs, independent of
// the window size.
//
// Gradient (backward_rows): for each window row r, G_{r,c} = dD_c/dQ for every window of the row,
// T_r(x) = the sum of G_{r,c} over the windows covering column x (slid along the row), and at once
// grad_u(p) += a'_p^T T_r(x) b_p, grad_m(p) += a_p^T T_r(x) b'_p for the pixels p of column x under
// row r (bilinear_forms, a register-blocked micro-kernel). Summed over r that is a'_p^T H_p b_p,
// H_p the sum of G_c over the windows containing p; nothing with a bins axis outlives its row.
//
// NaN/Inf: a non-finite pixel contributes nothing to the sums (so it cannot leak into the
// sliding state of other windows); instead the windows that contain it are found with an
// integer summed-area table and given D = NaN, and the pixels under any window whose D or
// grad_output is not finite get a NaN gradient.
#include "entropy_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
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

#if defined(__AVX512F__)
// KL's per-cell terms on 16 float lanes with AVX-512's exponent and mantissa extraction
// (getexp, getmant): the range reduction of ek_fast_logf (x = m 2^e, m in [sqrt(1/2), sqrt(2)))
// in five instructions instead of about twenty, then its polynomial (ek_logf_reduced). The
// hottest loop of the pass; generic builds use the portable loops. t = (P + eps) log((P + eps) / (Q + eps)) + Q - P
// and, when gc is given, gc = coef (Q - P) / (Q + eps).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own getmant/getexp wrappers
inline __m512 log16(__m512 x) {
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan);  // NaN for x < 0
  __m512 e = _mm512_getexp_ps(x);                                          // -inf for 0, inf for inf
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GE_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const __m512 r = ek_logf_reduced(_mm512_sub_ps(m, _mm512_set1_ps(1.0f)), e);
  // log(0) = -inf and log(inf) = inf: e is the answer (the sum above would give NaN)
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(_mm512_abs_ps(e), _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), e);
}
#pragma GCC diagnostic pop

inline void kl_terms16(const float* __restrict p, const float* __restrict q, int n, float eps, float coef,
                       float* __restrict t, float* __restrict gc) {
  const __m512 ve = _mm512_set1_ps(eps), vc = _mm512_set1_ps(coef), one = _mm512_set1_ps(1.0f);
  for (int k = 0; k < n; k += 16) {
    const __mmask16 mk = n - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - k)) - 1);
    const __m512 vp = _mm512_maskz_loadu_ps(mk, p + k), vq = _mm512_maskz_loadu_ps(mk, q + k);
    const __m512 pe = _mm512_add_ps(vp, ve), r = _mm512_div_ps(one, _mm512_add_ps(vq, ve));
    const __m512 diff = _mm512_sub_ps(vq, vp);
    _mm512_mask_storeu_ps(t + k, mk, _mm512_fmadd_ps(pe, log16(_mm512_mul_ps(pe, r)), diff));
    if (gc) _mm512_mask_storeu_ps(gc + k, mk, _mm512_mul_ps(vc, _mm512_mul_ps(diff, r)));
  }
}
#endif

// Vector types (GCC/Clang extensions) for the register-blocked loops: 64-byte vectors, and
// vectors of the target's register width.
template <typename S>
struct Vec64 {
  typedef S type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(S);
};

#if defined(__AVX512F__)
constexpr int kVecBytes = 64, kVecRegs = 32;
#elif defined(__AVX__)
constexpr int kVecBytes = 32, kVecRegs = 16;
#else
constexpr int kVecBytes = 16, kVecRegs = 16;
#endif
// Widest strip of T's row the micro-kernel takes, in vectors (at least one form in registers).
constexpr int kMaxStrip = kVecRegs == 32 ? 8 : 4;

// One register of S.
template <typename S>
struct VecR {
  typedef S type __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / (int)sizeof(S);
};

template <typename V, typename S>
EK_HD V load_vec(const S* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// acc[q][v] = sum over k < n, in order, of coef(q, k) * row(k)[v-th vector], with M x NV vector
// accumulators in registers: the rank-1 accumulation of the register-blocked loops (the
// gradient's contraction, an item's first-row column sums). row(k) points to NV vectors of S.
template <typename S, typename V, int M, int NV, typename Row, typename Coef>
EK_HD void accumulate_rows(V (&acc)[M][NV], int n, const Row& row, const Coef& coef) {
  constexpr int lanes = (int)(sizeof(V) / sizeof(S));
#pragma GCC unroll 16
  for (int q = 0; q < M; ++q)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[q][v] = V{};
  for (int k = 0; k < n; ++k) {
    const S* r = row(k);
    V rv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) rv[v] = load_vec<V>(r + lanes * v);
#pragma GCC unroll 16
    for (int q = 0; q < M; ++q) {
      const S c = coef(q, k);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[q][v] += c * rv[v];
    }
  }
}

typedef double v8d __attribute__((vector_size(64)));
typedef double v4d __attribute__((vector_size(32)));
typedef double v2d __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));

// Sum of the lanes in double, as a tree (a serial chain of 16 additions would cost more than
// the form itself): halves added, then quarters, and so on.
EK_HD double lane_sum(v8d v) {
  const v4d a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const v2d b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
  return b[0] + b[1];
}
EK_HD double lane_sum(typename Vec64<float>::type v) {
  const v8f lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8f hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return lane_sum(__builtin_convertvector(lo, v8d) + __builtin_convertvector(hi, v8d));
}
template <typename V>  // narrower vectors: the same tree
EK_HD double lane_sum(V v) {
  constexpr int n = sizeof(V) / sizeof(v[0]);
  double t[n];
  for (int i = 0; i < n; ++i) t[i] = (double)v[i];
  for (int w = n / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// std::vector on 64-byte aligned storage: the vector loops' rows (multiples of 64 bytes where the
// bins allow) then never straddle a cache line. malloc's 16-byte alignment had made every
// 64-byte load and store of the window pass a split access (measured: the pass ~1.5x slower).
template <typename S>
struct Aligned64 {
  typedef S value_type;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  S* allocate(size_t n) { return static_cast<S*>(::operator new(n * sizeof(S), std::align_val_t(64))); }
  void deallocate(S* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename S>
using avector = std::vector<S, Aligned64<S>>;

struct Problem {
  int planes, height, width, bins;
  Axis rows, cols;
  double bandwidth, eps;
  int divergence;
  int64_t plane_in() const { return (int64_t)height * width; }
  int64_t plane_out() const { return (int64_t)rows.out * cols.out; }
};

// a(i) = K((v - i) / h) / h for i = 0..L-1 (the division by h as a product: divisions are the
// slowest vector instructions here).
template <int Kind, typename T>
inline void kernel_row(T v, T h, int L, T* __restrict a) {
  const T inv_h = T(1) / h;
#pragma omp simd
  for (int i = 0; i < L; ++i) a[i] = kde_kernel<Kind>((v - T(i)) / h) * inv_h;
}

// a(i) and a'(i) together, one exponential per bin; a(i) exactly as kernel_row computes it.
template <int Kind, typename T>
inline void kernel_and_deriv_row(T v, T h, int L, T* __restrict a, T* __restrict da) {
  const T inv_h = T(1) / h, inv_h2 = T(1) / (h * h);
#pragma omp simd
  for (int i = 0; i < L; ++i) {
    T k, dk;
    kde_kernel_and_deriv<Kind>((v - T(i)) / h, &k, &dk);
    a[i] = k * inv_h;
    da[i] = dk * inv_h2;
  }
}

template <typename T>
inline bool finite_pixel(T u, T m) { return std::isfinite(u) && std::isfinite(m); }

// Kernel factors of the pixels of the rows a window row needs, computed once per pixel and kept
// for the last n_slots rows: per pixel, six vectors of Lp values of T (zero beyond L): pred
// a', a, b, b' (the derivatives only when the gradient is wanted), target a, b. A non-finite
// pixel gets zeros (it contributes nothing to the sums; its windows are made NaN from a
// summed-area table). n_slots = 0 (windows taller than 64 rows: a global window) keeps nothing
// and pixel() serves each request.
template <typename T, int Kind>
struct FactorRing {
  static constexpr int kDa = 0, kA = 1, kB = 2, kDb = 3, kTa = 4, kTb = 5;  // vector k at k * Lp
  const Problem& pb;
  int L, Lp, n_slots;
  bool derivs;
  avector<T> data;
  const T *up = nullptr, *mp = nullptr, *ut = nullptr, *mt = nullptr;
  int first = 0, next = 0;  // the rows [max(first, next - n_slots), next) are held

  FactorRing(const Problem& pb_, int Lp_, bool derivs_) : pb(pb_), L(pb_.bins), Lp(Lp_), derivs(derivs_) {
    const int rows = std::min(pb.rows.side + 1, pb.height);
    n_slots = rows <= 65 ? rows : 0;
    data.assign((size_t)n_slots * pb.width * 6 * Lp, T(0));
  }

  void start(const T* up_, const T* mp_, const T* ut_, const T* mt_) {
    up = up_;
    mp = mp_;
    ut = ut_;
    mt = mt_;
    first = next = 0;
  }

  bool holds(int y) const { return n_slots > 0 && y >= std::max(first, next - n_slots) && y < next; }
  T* at(int y, int x) { return data.data() + ((int64_t)(y % n_slots) * pb.width + x) * 6 * Lp; }

  // Hold the rows [y0, y1) (at most n_slots of them; rows are asked for in increasing order).
  void fill(int y0, int y1) {
    if (n_slots == 0) return;
    if (next < y0 || next == first) first = next = y0;
    for (; next < y1; ++next)
      for (int x = 0; x < pb.width; ++x) pixel(next, x, at(next, x));
  }

  void pixel(int y, int x, T* __restrict f) const {
    const T h = (T)pb.bandwidth;
    const int64_t i = (int64_t)y * pb.width + x;
    if (finite_pixel(up[i], mp[i])) {
      if (derivs) {
        kernel_and_deriv_row<Kind>(up[i], h, L, f + kA * Lp, f + kDa * Lp);
        kernel_and_deriv_row<Kind>(mp[i], h, L, f + kB * Lp, f + kDb * Lp);
      } else {
        kernel_row<Kind>(up[i], h, L, f + kA * Lp);
        kernel_row<Kind>(mp[i], h, L, f + kB * Lp);
      }
    } else {
      std::fill(f, f + 4 * Lp, T(0));
    }
    if (finite_pixel(ut[i], mt[i])) {
      kernel_row<Kind>(ut[i], h, L, f + kTa * Lp);
      kernel_row<Kind>(mt[i], h, L, f + kTb * Lp);
    } else {
      std::fill(f + kTa * Lp, f + 6 * Lp, T(0));
    }
  }
};

// acc += add - sub over n cells.
template <typename S>
inline void slide(double* __restrict acc, const S* __restrict add, const S* __restrict sub, int n) {
#pragma omp simd
  for (int k = 0; k < n; ++k) acc[k] += (double)add[k] - (double)sub[k];
}

// Joint histograms (target: p, pred: q) of the windows of one output row at a time.
//
// The window c of row r is a running sum along the row of per-window differences:
// W(r, c) = sum over c' <= c of D_r(c'), where D_r(c) is the sum of the column histograms (over
// the band of image rows [lo(r), hi(r))) of the columns that window c adds to window c - 1, minus
// those it drops (D_r(0) is the first window itself). Away from the image's edges D_r(c) is one
// column minus another. Each D(c) is kept from row to row; when window c is reached it is brought
// to the new band by the rank-1 kernel products a b^T of the pixels that enter and leave it (two
// columns x two rows: four per density), added to the window and normalised, all in one pass over
// the cells. That pass reads and writes one L x L state per density (D(c)) besides the window
// itself, which stays in L1; a band of column histograms would be read twice and written once.
//
// Why double: a sliding sum that adds and later subtracts a value carries an absolute error of
// about (unit round-off) x (largest value in the sum). In float that is ~1e-7, which would swamp
// cells of a few 1e-10 (eps) that the logs see. In double it is ~1e-16, far below eps, and the
// kernel products of float inputs are exact in double, so what is added is exactly what is later
// subtracted.
template <typename T, int Kind>
struct RowWindows {
  const Problem& pb;
  int L, L2, F, lo = 0, hi = 0;
  // The arrays one window pass reads and writes together are carved from two arenas at
  // staggered offsets: as separate allocations of a multiple of 4 KiB they would start at the
  // same address modulo 4 KiB, and the CPU would then take every load of one for a possible
  // reload of a store just made to another (4K aliasing), stalling the pass.
  avector<double> arena;     // D(c) of target and pred (cols.out x L2 each), the window
  avector<T> cells;          // the window's cells / N in the compute type; per-cell terms
  double *dp, *dq, *wp, *wq;
  T *pn, *qn, *terms;
  std::vector<int> d_lo, d_hi;   // the band each D(c) holds now (empty when equal)
  FactorRing<T, Kind> ring;      // the kernel factors of the band's pixels
  // Factors of up to four pixels in double (a, b of pred, then a, b of target: F = 4 L values
  // each), as the window pass takes them; zeros.
  avector<double> pix_f, zeros;
  avector<T> tmp;
  avector<double> cols_p, cols_q;  // column histograms, while D is rebuilt (rebuild)
  avector<double> col_fd;          // the factors of one column's pixels (column_histograms)

  RowWindows(const Problem& pb_, int Lp, bool derivs)
      : pb(pb_), L(pb_.bins), L2(pb_.bins * pb_.bins), F(4 * pb_.bins), d_lo(pb_.cols.out), d_hi(pb_.cols.out),
        ring(pb_, Lp, derivs), pix_f(4 * (size_t)F), zeros(std::max(F, pb_.bins * pb_.bins), 0.0), tmp(6 * (size_t)Lp) {
    const int64_t nd = (int64_t)pb.cols.out * L2, gap = 64 / sizeof(double);  // 64 B
    arena.assign(2 * nd + 2 * L2 + 16 * gap, 0.0);
    dp = arena.data();
    dq = dp + nd + 3 * gap;
    wp = dq + nd + 5 * gap;  // 1024 + 512 B: the window's offset varies as c walks D
    wq = wp + L2 + 2 * gap;
    const int64_t fgap = 64 / sizeof(T);
    cells.assign(3 * (int64_t)L2 + 16 * fgap, T(0));
    pn = cells.data() + 9 * fgap;
    qn = pn + L2 + 3 * fgap;
    terms = qn + L2 + 3 * fgap;
  }
  RowWindows(const RowWindows&) = delete;  // the pointers point into its own arenas
  RowWindows& operator=(const RowWindows&) = delete;

  // Start on one plane (pred maps up, mp; target maps ut, mt). The storage is reused from item
  // to item.
  void start(const T* up, const T* mp, const T* ut, const T* mt) {
    std::fill(d_lo.begin(), d_lo.end(), 0);
    std::fill(d_hi.begin(), d_hi.end(), 0);
    ring.start(up, mp, ut, mt);
  }

  // Factors of pixel (y, x) in double into scratch slot `slot` (0..3); zeros for y < 0 (no pixel).
  const double* factors(int y, int x, int slot) {
    if (y < 0) return zeros.data();
    double* d = pix_f.data() + (int64_t)slot * F;
    factors_into(y, x, d);
    return d;
  }

  // The same for pixel (y, x), y >= 0, into d (F values).
  void factors_into(int y, int x, double* __restrict d) {
    const int Lp = ring.Lp;
    const T* f;
    if (ring.holds(y)) {
      f = ring.at(y, x);
    } else {
      ring.pixel(y, x, tmp.data());
      f = tmp.data();
    }
    typedef FactorRing<T, Kind> R;
    const T *__restrict a = f + R::kA * Lp, *__restrict b = f + R::kB * Lp;
    const T *__restrict ta = f + R::kTa * Lp, *__restrict tb = f + R::kTb * Lp;
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      d[j] = (double)a[j];
      d[L + j] = (double)b[j];
      d[2 * L + j] = (double)ta[j];
      d[3 * L + j] = (double)tb[j];
    }
  }

  // Begin output row r: its band of image rows; the factors of its rows and of the row that
  // leaves the band.
  void begin_row(int r) {
    lo = pb.rows.lo(r);
    hi = pb.rows.hi(r);
    ring.fill(std::max(lo - 1, 0), hi);
    if (d_lo[0] == d_hi[0]) rebuild();  // the first row of an item
  }

  // The columns [a0, a1) window c adds to window c - 1 and those [s0, s1) it drops (window 0:
  // all of its columns, none dropped).
  void columns(int c, int& a0, int& a1, int& s0, int& s1) const {
    const Axis& ax = pb.cols;
    a0 = c == 0 ? ax.lo(0) : ax.hi(c - 1);
    a1 = ax.hi(c);
    s0 = c == 0 ? 0 : ax.lo(c - 1);
    s1 = c == 0 ? 0 : ax.lo(c);
  }

  // D(c) += sign (a_add b_add^T - a_sub b_sub^T) for both densities; f_*: factors (see F).
  void rank1(int c, const double* __restrict f_add, const double* __restrict f_sub, double sign) {
    for (int img = 0; img < 2; ++img) {
      double* dd = (img == 0 ? dq : dp) + (int64_t)c * L2;
      const double *aa = f_add + img * 2 * L, *ba = aa + L, *as = f_sub + img * 2 * L, *bs = as + L;
      for (int i = 0; i < L; ++i) {
        const double ai = sign * aa[i], si = sign * as[i];
        double* __restrict rowp = dd + (int64_t)i * L;
#pragma omp simd
        for (int j = 0; j < L; ++j) rowp[j] += ai * ba[j] - si * bs[j];
      }
    }
  }

  // dst_q += a b^T of pred and dst_p += of target (f: factors, see F).
  void add_outer(double* __restrict dst_p, double* __restrict dst_q, const double* __restrict f) {
    for (int img = 0; img < 2; ++img) {
      double* dd = img == 0 ? dst_q : dst_p;
      const double *a = f + img * 2 * L, *b = a + L;
      for (int i = 0; i < L; ++i) {
        const double ai = a[i];
        double* __restrict rowp = dd + (int64_t)i * L;
#pragma omp simd
        for (int j = 0; j < L; ++j) rowp[j] += ai * b[j];
      }
    }
  }

  // The histograms of column x over the band (target: hp, pred: hq): the sum over its rows y of
  // a_y b_y^T, each cell summed over the rows in order from zero. With bins a multiple of 8 up
  // to 64, blocks of cells are summed in registers (outer_sum_block: one store per cell instead
  // of a read and a write per row, the same operations in the same order).
  void column_histograms(double* __restrict hp, double* __restrict hq, int x) {
    const int n = hi - lo;
    switch (L % 8 == 0 ? L / 8 : 0) {
      case 1: return column_histograms_blocked<1>(hp, hq, x, n);
      case 2: return column_histograms_blocked<2>(hp, hq, x, n);
      case 4: return column_histograms_blocked<4>(hp, hq, x, n);
      case 8: return column_histograms_blocked<8>(hp, hq, x, n);
      default: break;
    }
    std::fill(hp, hp + L2, 0.0);
    std::fill(hq, hq + L2, 0.0);
    for (int y = lo; y < hi; ++y) add_outer(hp, hq, factors(y, x, 0));
  }

  template <int NV>  // L = 8 NV
  void column_histograms_blocked(double* __restrict hp, double* __restrict hq, int x, int n) {
    if ((int64_t)col_fd.size() < (int64_t)n * F) col_fd.resize((size_t)n * F);
    double* fd = col_fd.data();
    for (int k = 0; k < n; ++k) factors_into(lo + k, x, fd + (int64_t)k * F);
    outer_sum_block<NV>(hq, fd, n);          // pred: a, b at 0, L
    outer_sum_block<NV>(hp, fd + 2 * L, n);  // target: at 2 L, 3 L
  }

  // h = sum over k < n of a_k b_k^T (a_k = f + k F, b_k = a_k + L, L = 8 NV), IB rows of h at a
  // time in IB x NV vector registers.
  template <int NV>  // 1, 2, 4 or 8
  void outer_sum_block(double* __restrict h, const double* __restrict f, int n) {
    constexpr int Lc = 8 * NV, IB = NV == 1 ? 8 : 16 / NV;  // at most 16 accumulators; IB divides Lc
    for (int i0 = 0; i0 < Lc; i0 += IB) {
      v8d acc[IB][NV];
      accumulate_rows<double>(
          acc, n, [&](int k) { return f + (int64_t)k * F + Lc; },  // b_k
          [&](int q, int k) { return f[(int64_t)k * F + i0 + q]; });  // a_k[i0 + q]
#pragma GCC unroll 16
      for (int q = 0; q < IB; ++q)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) __builtin_memcpy(h + (int64_t)(i0 + q) * Lc + 8 * v, &acc[q][v], sizeof(v8d));
    }
  }

  // Every D(c) from scratch for the current band (the first row of an item): from the column
  // histograms of the band, each summed once from its pixels and kept in a ring of side + 2
  // columns (a column is the one added by one window and the one dropped by another, side + 1
  // windows later). Bringing each empty D(c) down to the band by itself would sum every column
  // twice, in single-pixel steps. Windows wider than 64 columns keep the step-by-step way.
  void rebuild() {
    const Axis& ax = pb.cols;
    const int n_cols = ax.side + 2;
    if (n_cols > 66) return;
    if (cols_p.empty()) {
      cols_p.assign((size_t)n_cols * L2, 0.0);
      cols_q.assign((size_t)n_cols * L2, 0.0);
    }
    int next = 0;
    auto column = [&](int x, double*& cp, double*& cq) {
      for (; next <= x; ++next) {
        double *np = cols_p.data() + (int64_t)(next % n_cols) * L2, *nq = cols_q.data() + (int64_t)(next % n_cols) * L2;
        column_histograms(np, nq, next);
      }
      cp = cols_p.data() + (int64_t)(x % n_cols) * L2;
      cq = cols_q.data() + (int64_t)(x % n_cols) * L2;
    };
    for (int c = 0; c < ax.out; ++c) {
      int a0, a1, s0, s1;
      columns(c, a0, a1, s0, s1);
      double *dpc = dp + (int64_t)c * L2, *dqc = dq + (int64_t)c * L2;
      std::fill(dpc, dpc + L2, 0.0);
      std::fill(dqc, dqc + L2, 0.0);
      for (int x = a1 - 1; x >= a0; --x) {  // the newest column first: the ring still holds the older ones
        double *cp, *cq;
        column(x, cp, cq);
        slide(dpc, cp, zeros.data(), L2);
        slide(dqc, cq, zeros.data(), L2);
      }
      for (int x = s0; x < s1; ++x) {
        double *cp, *cq;
        column(x, cp, cq);
        slide(dpc, zeros.data(), cp, L2);
        slide(dqc, zeros.data(), cq, L2);
      }
      d_lo[c] = lo;
      d_hi[c] = hi;
    }
  }

  // Window c of the current row into pn, qn (cells / N, inv_n = 1 / N); windows must be reached in
  // the order c = 0, 1, 2, ... in every row.
  void window(int c, double inv_n) {
    int a0, a1, s0, s1;
    columns(c, a0, a1, s0, s1);
    int& cl = d_lo[c];
    int& ch = d_hi[c];
    double *dpc = dp + (int64_t)c * L2, *dqc = dq + (int64_t)c * L2;
    if (cl == ch) {  // empty: start from the band's top
      cl = ch = lo;
      std::fill(dpc, dpc + L2, 0.0);
      std::fill(dqc, dqc + L2, 0.0);
    }
    const int n_add = std::max(0, hi - ch), n_sub = std::max(0, lo - cl), steps = std::max(n_add, n_sub);
    if (c > 0 && steps == 1 && a1 - a0 <= 1 && s1 - s0 <= 1) {
      // The common case, fused: D(c) += the four rank-1 products, window += D(c), cells / N.
      const int y_add = n_add ? ch : -1, y_sub = n_sub ? cl : -1;
      const bool has_a = a1 > a0, has_s = s1 > s0;
      const double* fia = has_a ? factors(y_add, a0, 0) : zeros.data();
      const double* foa = has_a ? factors(y_sub, a0, 1) : zeros.data();
      const double* fis = has_s ? factors(y_add, s0, 2) : zeros.data();
      const double* fos = has_s ? factors(y_sub, s0, 3) : zeros.data();
      // The common bin counts with L known at compile time (constant offsets, unrolled rows).
      if (L == 32)
        fused_step<32>(dpc, dqc, fia, foa, fis, fos, inv_n);
      else if (L == 16)
        fused_step<16>(dpc, dqc, fia, foa, fis, fos, inv_n);
      else if (L == 64)
        fused_step<64>(dpc, dqc, fia, foa, fis, fos, inv_n);
      else
        fused_step<0>(dpc, dqc, fia, foa, fis, fos, inv_n);
    } else {
      for (int k = 0; k < steps; ++k) {
        const int y_add = k < n_add ? ch + k : -1, y_sub = k < n_sub ? cl + k : -1;
        for (int x = a0; x < a1; ++x) rank1(c, factors(y_add, x, 0), factors(y_sub, x, 1), 1.0);
        for (int x = s0; x < s1; ++x) rank1(c, factors(y_add, x, 0), factors(y_sub, x, 1), -1.0);
      }
      double *xp = wp, *xq = wq;
      T *pp = pn, *qq = qn;
      const double keep = c == 0 ? 0.0 : 1.0;  // window 0 is D(0) itself
#pragma omp simd
      for (int k = 0; k < L2; ++k) {
        const double np = keep * xp[k] + dpc[k], nq = keep * xq[k] + dqc[k];
        xp[k] = np;
        xq[k] = nq;
        pp[k] = (T)(np * inv_n);
        qq[k] = (T)(nq * inv_n);
      }
    }
    cl = lo;
    ch = hi;
  }

  // One pass over the cells: D(c) (dpc, dqc) takes the products of the pixels entering (i) and
  // leaving (o) the band in the added (a) and dropped (s) columns, the window adds D(c), and its
  // cells / N go to pn, qn.
  template <int LC>  // L when known at compile time, else 0
  void fused_step(double* __restrict dpc, double* __restrict dqc, const double* __restrict fia,
                  const double* __restrict foa, const double* __restrict fis, const double* __restrict fos,
                  double inv_n) {
    const int L = LC > 0 ? LC : this->L;
    double *__restrict xp = wp, *__restrict xq = wq;
    T *__restrict pp = pn, *__restrict qq = qn;
    // b vectors: pred at offset L, target at 3 L.
    const double *qbia = fia + L, *qboa = foa + L, *qbis = fis + L, *qbos = fos + L;
    const double *pbia = fia + 3 * L, *pboa = foa + 3 * L, *pbis = fis + 3 * L, *pbos = fos + 3 * L;
    for (int i = 0; i < L; ++i) {
      const double qia = fia[i], qoa = foa[i], qis = fis[i], qos = fos[i];
      const double pia = fia[2 * L + i], poa = foa[2 * L + i], pis = fis[2 * L + i], pos = fos[2 * L + i];
      const int64_t o = (int64_t)i * L;
#pragma omp simd
      for (int j = 0; j < L; ++j) {
        const double dq_ = dqc[o + j] + ((qia * qbia[j] - qoa * qboa[j]) - (qis * qbis[j] - qos * qbos[j]));
        const double dp_ = dpc[o + j] + ((pia * pbia[j] - poa * pboa[j]) - (pis * pbis[j] - pos * pbos[j]));
        dqc[o + j] = dq_;
        dpc[o + j] = dp_;
        const double nq = xq[o + j] + dq_, np = xp[o + j] + dp_;
        xq[o + j] = nq;
        xp[o + j] = np;
        qq[o + j] = (T)(nq * inv_n);
        pp[o + j] = (T)(np * inv_n);
      }
    }
  }

  // D of the window from pn, qn (each term in T, summed in double).
  T divergence(T eps, int kind) {
    T* __restrict t = terms;
    const T *__restrict pp = pn, *__restrict qq = qn;
    if (kind == kKL) {
#if defined(__AVX512F__)
      if constexpr (std::is_same<T, float>::value) {
        kl_terms16(pp, qq, L2, eps, 0.0f, t, nullptr);
        return (T)sum_terms();
      }
#endif
#pragma omp simd
      for (int k = 0; k < L2; ++k) t[k] = kl_term(pp[k], qq[k], eps);
    } else {
#pragma omp simd
      for (int k = 0; k < L2; ++k) t[k] = hellinger_term(pp[k], qq[k], eps);
    }
    const double sum = sum_terms();
    return kind == kKL ? (T)sum : hellinger_finish((T)sum, eps);
  }

  // KL's D and, in one pass over the cells, gc = coef dD/dQ.
  T kl_divergence_and_grad(T eps, T coef, T* __restrict gc) {
    T* __restrict t = terms;
    const T *__restrict pp = pn, *__restrict qq = qn;
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value) {
      kl_terms16(pp, qq, L2, eps, coef, t, gc);
      return (T)sum_terms();
    }
#endif
#pragma omp simd
    for (int k = 0; k < L2; ++k) {
      T dq_;
      t[k] = kl_term_dq(pp[k], qq[k], eps, &dq_);
      gc[k] = coef * dq_;
    }
    return (T)sum_terms();
  }

  // gc = coef dD/dQ (d: the window's D, which Hellinger's derivative needs).
  void grad(T eps, T coef, T d, int kind, T* __restrict gc) {
    const T *__restrict pp = pn, *__restrict qq = qn;
    if (kind == kKL) {
#pragma omp simd
      for (int k = 0; k < L2; ++k) gc[k] = coef * kl_dq(pp[k], qq[k], eps);
    } else {
#pragma omp simd
      for (int k = 0; k < L2; ++k) gc[k] = coef * hellinger_dq(pp[k], qq[k], eps, d);
    }
  }

  double sum_terms() const {
    const T* __restrict t = terms;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int k = 0; k < L2; ++k) sum += (double)t[k];
    return sum;
  }
};

// Forward for the output rows [r0, r1) of one plane.
template <typename T, int Kind>
void forward_rows(const Problem& pb, RowWindows<T, Kind>& win, const T* up, const T* mp, const T* ut, const T* mt,
                  const int32_t* bad_sat, T* d, int r0, int r1) {
  win.start(up, mp, ut, mt);
  const T eps = (T)pb.eps;
  const int stride = pb.width + 1;
  for (int r = r0; r < r1; ++r) {
    const int y0 = pb.rows.lo(r), y1 = pb.rows.hi(r);
    win.begin_row(r);
    for (int c = 0; c < pb.cols.out; ++c) {
      const int x0 = pb.cols.lo(c), x1 = pb.cols.hi(c);
      win.window(c, 1.0 / ((double)(y1 - y0) * (x1 - x0)));
      d[(int64_t)r * pb.cols.out + c] = rect_count(bad_sat, stride, y0, y1, x0, x1) > 0
                                            ? std::numeric_limits<T>::quiet_NaN()
                                            : win.divergence(eps, pb.divergence);
    }
  }
}

// ---------------------------------------------------------------------------------------
// The gradient's contraction: out[k] = a_k^T T b_k for a batch of forms (a'^T T b and a^T T b'
// of the pixels under one window row), with T one L x L matrix, in the compute type S (float
// for float input, double otherwise). Written like a GEMM micro-kernel with GCC/Clang vector
// types of the target's register width (AVX-512: 64 bytes, 32 registers; AVX: 32 bytes, 16
// registers; otherwise 16 bytes, 16 registers): MB forms at a time keep their partial rows
// a_k^T T in registers (NV vectors each), and each row of T is loaded once per MB forms. Each
// form's lanes are summed in double.
// ---------------------------------------------------------------------------------------
// out[k] += sum_{i < L, j < NV lanes} a[k][i] t[i * ld + j] b[k][j] for k < n. Rows of more
// than kMaxStrip vectors are done in strips by the caller.
template <typename S, int NV>
void bilinear_strip(const S* __restrict t, int ld, int L, int n, const S* const* a, const S* const* b,
                    double* out) {
  typedef typename VecR<S>::type V;
  constexpr int lanes = VecR<S>::lanes;
  // Forms per block: MB x NV accumulators, NV rows of T and a broadcast in the registers. At
  // most 11: the default window side 11 gives 22 forms, two full blocks (a short block repeats
  // its last form).
  constexpr int MB = std::max(1, std::min(11, (kVecRegs - 1 - NV) / NV));
  for (int k0 = 0; k0 < n; k0 += MB) {
    const int m = std::min(MB, n - k0);
    const S* ak[MB];
    for (int q = 0; q < MB; ++q) ak[q] = a[k0 + std::min(q, m - 1)];  // a short block repeats its last form
    V acc[MB][NV];
    accumulate_rows<S>(
        acc, L, [&](int i) { return t + (int64_t)i * ld; },  // row i of T
        [&](int q, int i) { return ak[q][i]; });
    for (int q = 0; q < m; ++q) {
      const S* bq = b[k0 + q];
      V sum = acc[q][0] * load_vec<V>(bq);
      for (int v = 1; v < NV; ++v) sum += acc[q][v] * load_vec<V>(bq + lanes * v);
      out[k0 + q] += lane_sum(sum);
    }
  }
}

// out[k] = a[k]^T t b[k] for k < n; t has L rows of ld = Lp values (Lp a multiple of 64 bytes,
// zero beyond column L), b[k] is zero beyond L. Any L: strips of up to kMaxStrip vectors.
template <typename S>
void bilinear_forms(const S* t, int L, int Lp, int n, const S* const* a, const S* const* b, double* out,
                    std::vector<const S*>& b_shift) {
  constexpr int lanes = VecR<S>::lanes;
  std::fill(out, out + n, 0.0);
  for (int j0 = 0; j0 < Lp; j0 += kMaxStrip * lanes) {
    const S* const* bs = b;
    if (j0 > 0) {
      for (int k = 0; k < n; ++k) b_shift[k] = b[k] + j0;
      bs = b_shift.data();
    }
    const S* tj = t + j0;
    switch (std::min(kMaxStrip, (Lp - j0) / lanes)) {
      case 1: bilinear_strip<S, 1>(tj, Lp, L, n, a, bs, out); break;
      case 2: bilinear_strip<S, 2>(tj, Lp, L, n, a, bs, out); break;
      case 3: bilinear_strip<S, 3>(tj, Lp, L, n, a, bs, out); break;
      case 4: bilinear_strip<S, 4>(tj, Lp, L, n, a, bs, out); break;
#if defined(__AVX512F__)  // kMaxStrip 8
      case 5: bilinear_strip<S, 5>(tj, Lp, L, n, a, bs, out); break;
      case 6: bilinear_strip<S, 6>(tj, Lp, L, n, a, bs, out); break;
      case 7: bilinear_strip<S, 7>(tj, Lp, L, n, a, bs, out); break;
      case 8: bilinear_strip<S, 8>(tj, Lp, L, n, a, bs, out); break;
#endif
    }
  }
}

// Bins rounded up to a multiple of the vector lanes of T: the padded row length of T_r(x) and of
// the kernel factors.
template <typename T>
inline int padded_bins(int L) { return (L + Vec64<T>::lanes - 1) / Vec64<T>::lanes * Vec64<T>::lanes; }

// Scratch of the backward pass, allocated once per thread and reused by its items.
template <typename T, int Kind>
struct BackwardScratch {
  int Lp;
  RowWindows<T, Kind> win;  // also holds the kernel factors of the pixels under the window row
  int g_slots;              // windows of G kept (a ring along the row)
  avector<T> g_ring, zeros;
  avector<double> t_row, out;  // T_r(x) in double (slid along the row); the forms' values
  avector<T> t_c, col_f;       // T_r(x) in the compute type (float input); factors of one column
  std::vector<const T*> a, b, b_shift;

  explicit BackwardScratch(const Problem& pb) : Lp(padded_bins<T>(pb.bins)), win(pb, Lp, /*derivs=*/true) {
    const int L = pb.bins, L2 = L * L;
    const int span = std::min(pb.rows.side, pb.height);  // pixel rows under a window row
    g_slots = std::min(pb.cols.side + 2, pb.cols.out);
    g_ring.resize((size_t)g_slots * L2);
    zeros.assign(L2, T(0));
    t_row.assign((size_t)L * Lp, 0.0);
    if (!std::is_same<T, double>::value) t_c.assign((size_t)L * Lp, T(0));
    if (win.ring.n_slots == 0) col_f.assign((size_t)span * 6 * Lp, T(0));
    out.resize(2 * (size_t)span);
    a.resize(2 * (size_t)span);
    b.resize(2 * (size_t)span);
    b_shift.resize(2 * (size_t)span);
  }
};

// Backward for the output (window) rows [r0, r1) of one plane: their part of the gradient, for
// the pixel rows [y0, y1) = [rows.lo(r0), rows.hi(r1 - 1)) that they cover, into gacc (y - y0, x,
// {grad_u, grad_m}) in double; backward_impl adds up the parts of the items that share a pixel.
// Fused mode (d_out != nullptr; d and grad unused): the gradient for grad_output = 1 together
// with D of these rows; bad_sat marks non-finite pixels.
//
// For each window row r: G_{r,c} for every window c of the row (the histograms as in the
// forward pass), then T_r(x) = the sum of G_{r,c} over the windows c of the row that cover column
// x (slid along the row in double), and at once, for each pixel p = (y, x) under row r:
// grad_u(p) += a'_p^T T_r(x) b_p and grad_m(p) += a_p^T T_r(x) b'_p. Summed over the rows r, that
// is a'_p^T H_p b_p with H_p the sum of G_c over the windows containing p. Nothing with a bins
// axis outlives its window row, and every window is computed once.
template <typename T, int Kind>
void backward_rows(const Problem& pb, BackwardScratch<T, Kind>& s, const T* up, const T* mp, const T* ut,
                   const T* mt, const T* d, const T* grad, int r0, int r1, double* gacc, T* d_out,
                   const int32_t* bad_sat) {
  const int W = pb.width, Wo = pb.cols.out, L = pb.bins, L2 = L * L, Lp = s.Lp, g_slots = s.g_slots;
  const T eps = (T)pb.eps;
  const int y0 = pb.rows.lo(r0), y1 = pb.rows.hi(r1 - 1);
  auto& win = s.win;
  win.start(up, mp, ut, mt);
  std::fill(gacc, gacc + (int64_t)(y1 - y0) * W * 2, 0.0);
  T* g_ring = s.g_ring.data();
  const T* zeros = s.zeros.data();
  double* t_row = s.t_row.data();

  auto window_row = [&](int r) {
    const int wy0 = pb.rows.lo(r), wy1 = pb.rows.hi(r);  // the pixel rows under row r
    auto& ring = win.ring;
    win.begin_row(r);
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
          for (int i = 0; i < L; ++i) {
            double* __restrict tr = t_row + (int64_t)i * Lp;
            const T *__restrict ad = add + (int64_t)i * L, *__restrict sb = sub + (int64_t)i * L;
            if constexpr (std::is_same<T, double>::value) {
#pragma omp simd
              for (int j = 0; j < L; ++j) tr[j] += ad[j] - sb[j];
            } else {  // and T_r(x) in the compute type, rounded from the double sliding sum
              T* __restrict tc = s.t_c.data() + (int64_t)i * Lp;
#pragma omp simd
              for (int j = 0; j < L; ++j) {
                const double v = tr[j] + ((double)ad[j] - (double)sb[j]);
                tr[j] = v;
                tc[j] = (T)v;
              }
            }
          }
        }
        lo = new_lo;
        hi = new_hi;
        const T* tc;
        if constexpr (std::is_same<T, double>::value)
          tc = t_row;
        else
          tc = s.t_c.data();
        const int n = wy1 - wy0;
        for (int k = 0; k < n; ++k) {
          const int y = wy0 + k;
          T* f;
          if (ring.n_slots > 0) {
            f = ring.at(y, tx);
          } else {
            f = s.col_f.data() + (int64_t)k * 6 * Lp;
            ring.pixel(y, tx, f);
          }
          s.a[2 * k] = f;                // a'^T T b: grad_u
          s.b[2 * k] = f + 2 * Lp;
          s.a[2 * k + 1] = f + Lp;       // a^T T b': grad_m
          s.b[2 * k + 1] = f + 3 * Lp;
        }
        bilinear_forms<T>(tc, L, Lp, 2 * n, s.a.data(), s.b.data(), s.out.data(), s.b_shift);
        for (int k = 0; k < n; ++k) {
          double* g = gacc + ((int64_t)(wy0 + k - y0) * W + tx) * 2;
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
      if (d_out != nullptr) {  // grad_output = 1
        win.window(c, inv_n);
        if (rect_count(bad_sat, W + 1, wy0, wy1, x0, x1) > 0) {
          d_out[(int64_t)r * Wo + c] = std::numeric_limits<T>::quiet_NaN();
          std::fill(gc, gc + L2, T(0));
          continue;
        }
        const T coef = (T)inv_n;
        const T dc = pb.divergence == kKL ? win.kl_divergence_and_grad(eps, coef, gc) : win.divergence(eps, kHellinger);
        d_out[(int64_t)r * Wo + c] = dc;
        if (!std::isfinite(dc))
          std::fill(gc, gc + L2, T(0));
        else if (pb.divergence == kHellinger)
          win.grad(eps, coef, dc, kHellinger, gc);
        continue;
      }
      const T g = grad[(int64_t)r * Wo + c], dc = d[(int64_t)r * Wo + c];
      // Windows with a non-finite D or grad are reported through poison_sat; zeros keep the
      // sliding sums finite for the others.
      win.window(c, inv_n);
      if (!(std::isfinite(g) && std::isfinite(dc)) || g == T(0)) {
        std::fill(gc, gc + L2, T(0));
        continue;
      }
      win.grad(eps, (T)(g * inv_n), dc, pb.divergence, gc);
    }
    emit_until(Wo);
  };

  for (int r = r0; r < r1; ++r) window_row(r);
}

// Rows per work item: fixed (never derived from the thread count) so results are reproducible.
constexpr int kForwardRows = 32;
constexpr int kBackwardRows = 32;

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
    RowWindows<T, Kind> win(pb, padded_bins<T>(pb.bins), /*derivs=*/false);  // scratch for this thread's items
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int r0 = (int)(item % blocks) * kForwardRows, r1 = std::min(pb.rows.out, r0 + kForwardRows);
      const int64_t in = n * pb.plane_in();
      forward_rows<T, Kind>(pb, win, u_p + in, m_p + in, u_t + in, m_t + in, sat + n * sat_plane,
                            out + n * pb.plane_out(), r0, r1);
    }
  });
}

// d_out defined: the fused forward (D and the gradient for grad_output = 1; d and grad undefined).
template <typename T, int Kind>
void backward_impl(const Problem& pb, const at::Tensor& up, const at::Tensor& mp, const at::Tensor& ut,
                   const at::Tensor& mt, const at::Tensor& d, const at::Tensor& grad, const at::Tensor& poison_sat,
                   at::Tensor& gu, at::Tensor& gm, at::Tensor d_out = {}, const at::Tensor& bad_sat = {}) {
  // Items: (plane, block of kBackwardRows window rows). Each window is computed by one item; an
  // item's part of the gradient covers the pixel rows under its window rows, and the parts of
  // the (at most side / kBackwardRows + 2) items that share a pixel row are added in item order.
  const int blocks = (pb.rows.out + kBackwardRows - 1) / kBackwardRows;
  auto window_rows = [&](int block, int& r0, int& r1) {
    r0 = block * kBackwardRows;
    r1 = std::min(pb.rows.out, r0 + kBackwardRows);
  };
  auto first_pixel_row = [&](int block) { return pb.rows.lo(block * kBackwardRows); };
  int part_rows = 0;
  for (int blk = 0; blk < blocks; ++blk) {
    int r0, r1;
    window_rows(blk, r0, r1);
    part_rows = std::max(part_rows, pb.rows.hi(r1 - 1) - pb.rows.lo(r0));
  }
  const int W = pb.width;
  const int64_t part_size = (int64_t)part_rows * W * 2;
  at::Tensor parts = at::empty({(int64_t)pb.planes * blocks * part_size}, up.options().dtype(at::kDouble));
  double* parts_p = parts.data_ptr<double>();
  const T *u_p = up.data_ptr<T>(), *m_p = mp.data_ptr<T>(), *u_t = ut.data_ptr<T>(), *m_t = mt.data_ptr<T>();
  const T *dd = d.defined() ? d.data_ptr<T>() : nullptr, *gg = grad.defined() ? grad.data_ptr<T>() : nullptr;
  T* d_out_p = d_out.defined() ? d_out.data_ptr<T>() : nullptr;
  const int32_t* bad = bad_sat.defined() ? bad_sat.data_ptr<int32_t>() : nullptr;
  const int64_t bad_plane = (int64_t)(pb.height + 1) * (pb.width + 1);
  at::parallel_for(0, (int64_t)pb.planes * blocks, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    BackwardScratch<T, Kind> scratch(pb);  // shared by this thread's items
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      int r0, r1;
      window_rows((int)(item % blocks), r0, r1);
      const int64_t in = n * pb.plane_in(), out = n * pb.plane_out();
      backward_rows<T, Kind>(pb, scratch, u_p + in, m_p + in, u_t + in, m_t + in, dd ? dd + out : nullptr,
                             gg ? gg + out : nullptr, r0, r1, parts_p + item * part_size,
                             d_out_p ? d_out_p + out : nullptr, bad ? bad + n * bad_plane : nullptr);
    }
  });
  // Add up the parts; NaN for the pixels under a window whose D or grad_output is not finite
  // (poison_sat) and for non-finite pixels.
  const int64_t sat_plane = (int64_t)(pb.rows.out + 1) * (pb.cols.out + 1);
  const int32_t* poison = poison_sat.data_ptr<int32_t>();
  T *gu_p = gu.data_ptr<T>(), *gm_p = gm.data_ptr<T>();
  const int pstride = pb.cols.out + 1;
  at::parallel_for(0, (int64_t)pb.planes * pb.height, 16, [&](int64_t begin, int64_t end) {
    std::vector<const double*> row_parts;  // row y of the parts of the blocks with a window row over y
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / pb.height;
      const int y = (int)(row % pb.height);
      const int wr0 = pb.rows.out_lo(y), wr1 = pb.rows.out_hi(y);
      row_parts.clear();
      for (int blk = wr0 / kBackwardRows; blk <= (wr1 - 1) / kBackwardRows; ++blk)
        row_parts.push_back(parts_p + (n * blocks + blk) * part_size + (int64_t)(y - first_pixel_row(blk)) * W * 2);
      const int32_t* sat = poison + n * sat_plane;
      for (int x = 0; x < W; ++x) {
        const int64_t at = n * pb.plane_in() + (int64_t)y * W + x;
        if (rect_count(sat, pstride, wr0, wr1, pb.cols.out_lo(x), pb.cols.out_hi(x)) > 0 ||
            !finite_pixel(u_p[at], m_p[at])) {
          gu_p[at] = gm_p[at] = std::numeric_limits<T>::quiet_NaN();
          continue;
        }
        double su = 0.0, sm = 0.0;
        for (const double* part : row_parts) {
          su += part[2 * x];
          sm += part[2 * x + 1];
        }
        gu_p[at] = (T)su;
        gm_p[at] = (T)sm;
      }
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
