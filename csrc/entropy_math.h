// Per-pixel and per-window mathematics of the spatial entropy loss (docs/spec.md steps 3-5),
// shared by the C++ CPU code and the CUDA kernels so that the formulas exist once.
//
// Everything here is inline and usable on host and device. The CPU code calls these
// helpers inside contiguous loops over the L bins or the L*L cells, so they are written
// branch-free (selects instead of ifs) to let the compiler vectorise them.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: a call left out of line would keep the CPU loops over bins and cells scalar.
#define EK_HD inline __attribute__((always_inline))
#else
#define EK_HD inline
#endif

namespace entropy_kernels {

enum KernelKind : int { kLogistic = 0, kGaussian = 1 };
enum DivergenceKind : int { kKL = 0, kHellinger = 1 };

// One axis of the window geometry. Window c covers pixels [lo(c), hi(c)); pixel p is
// covered by windows [out_lo(p), out_hi(p)). 'same' centres the window (offset = side / 2)
// and clips it to the image; 'valid' starts window c at pixel c (offset 0). The global
// window is 'valid' with side = extent (one window, which may have an even side).
struct Axis {
  int extent;  // pixels along the axis
  int side;    // window side
  int offset;  // side / 2 for 'same', 0 for 'valid'
  int out;     // windows along the axis

  EK_HD int lo(int c) const { int v = c - offset; return v < 0 ? 0 : v; }
  EK_HD int hi(int c) const { int v = c - offset + side; return v > extent ? extent : v; }
  EK_HD int out_lo(int p) const { int v = p + offset - side + 1; return v < 0 ? 0 : v; }
  EK_HD int out_hi(int p) const { int v = p + offset + 1; return v > out ? out : v; }
};

EK_HD Axis make_axis(int extent, int side, bool valid) {
  Axis a;
  a.extent = extent;
  a.side = side;
  a.offset = valid ? 0 : side / 2;
  a.out = valid ? extent - side + 1 : extent;
  return a;
}

// Count of marked entries in [y0, y1) x [x0, x1) from a (rows + 1) x (cols + 1) int32 summed-area
// table with row stride `stride` (the NaN bookkeeping: non-finite pixels, poisoned windows).
EK_HD int32_t rect_count(const int32_t* sat, int64_t stride, int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
  return sat[y1 * stride + x1] - sat[y0 * stride + x1] - sat[y1 * stride + x0] + sat[y0 * stride + x0];
}

// ---------------------------------------------------------------------------------------
// exp and log. On the host, float uses Cephes-style polynomials written without branches
// so that loops over bins and cells vectorise (libm calls do not without -ffast-math, and
// -ffast-math would let the compiler assume NaN never occurs). Accuracy: about 1 ulp on the
// ranges used here. Double, and all device code, use the platform functions.
// ---------------------------------------------------------------------------------------
#if !defined(__CUDACC__)
// __builtin_bit_cast, unlike memcpy through a local, keeps the loops vectorisable.
EK_HD float ek_int_as_float(int32_t i) { return __builtin_bit_cast(float, i); }
EK_HD int32_t ek_float_as_int(float f) { return __builtin_bit_cast(int32_t, f); }

EK_HD float ek_fast_expf(float x) {
  const float lo = -87.33654f, hi = 88.37626f;
  float xc = x == x ? x : 0.0f;  // keep NaN out of the integer conversion below
  xc = xc < lo ? lo : xc;
  xc = xc > hi ? hi : xc;
  // floor(t) as a truncation of the positive t + 256 (t is within [-126, 128] after the clamp):
  // floorf is a libm call, and a truncate-and-correct select stops gcc from vectorising.
  float t = xc * 1.44269504088896341f + 0.5f;
  float n = (float)((int32_t)(t + 256.0f) - 256);
  float g = xc - n * 0.693359375f;
  g = g + n * 2.12194440e-4f;
  float z = g * g;
  float y = ((((1.9875691500e-4f * g + 1.3981999507e-3f) * g + 8.3334519073e-3f) * g + 4.1665795894e-2f) * g +
             1.6666665459e-1f) * g + 5.0000001201e-1f;
  y = y * z + g + 1.0f;
  float r = y * ek_int_as_float(((int32_t)n + 127) << 23);
  r = x < lo ? 0.0f : r;  // the true value is subnormal or 0: far below any eps that matters
  r = x > 88.72283f ? INFINITY : r;
  return x == x ? r : x;
}

// log(x) for x = (1 + f) 2^fe after the range reduction, 1 + f in [sqrt(1/2), sqrt(2)): the Cephes
// polynomial of ek_fast_logf. V is float or a GCC/Clang vector of floats (the CPU backend's
// AVX-512 KL loop reduces the range with getexp/getmant and shares this part).
template <typename V>
EK_HD V ek_logf_reduced(V f, V fe) {
  const V z = f * f;
  V y = ((((((((7.0376836292e-2f * f - 1.1514610310e-1f) * f + 1.1676998740e-1f) * f - 1.2420140846e-1f) * f +
             1.4249322787e-1f) * f - 1.6668057665e-1f) * f + 2.0000714765e-1f) * f - 2.4999993993e-1f) * f +
         3.3333331174e-1f) * f * z;
  y = y - 2.12194440e-4f * fe;
  y = y - 0.5f * z;
  return f + y + 0.693359375f * fe;
}

EK_HD float ek_fast_logf(float x) {
  const float min_normal = 1.17549435e-38f;
  bool tiny = x < min_normal;  // subnormals (and 0, negatives: fixed up at the end)
  float xs = tiny ? x * 33554432.0f : x;  // 2^25
  int32_t bits = ek_float_as_int(xs);
  int32_t e = ((bits >> 23) & 0xff) - 126;  // xs = m * 2^e with m in [0.5, 1)
  float m = ek_int_as_float((bits & 0x007fffff) | 0x3f000000);
  e = tiny ? e - 25 : e;
  bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  float f = small ? m + m - 1.0f : m - 1.0f;
  float r = ek_logf_reduced(f, (float)e);
  r = x == 0.0f ? -INFINITY : r;
  r = x < 0.0f ? NAN : r;
  r = x == INFINITY ? INFINITY : r;
  return x == x ? r : x;
}
#endif  // !__CUDACC__

EK_HD float ek_exp(float x) {
#if defined(__CUDACC__)
  return expf(x);
#else
  return ek_fast_expf(x);
#endif
}
EK_HD double ek_exp(double x) { return exp(x); }
EK_HD float ek_log(float x) {
#if defined(__CUDACC__)
  return logf(x);
#else
  return ek_fast_logf(x);
#endif
}
EK_HD double ek_log(double x) { return log(x); }
EK_HD float ek_sqrt(float x) { return sqrtf(x); }
EK_HD double ek_sqrt(double x) { return sqrt(x); }

// ---------------------------------------------------------------------------------------
// Kernel values. a(i) = K((v - i) / h) / h and its derivative in v, a'(i) = K'((v - i) / h) / h^2.
// ---------------------------------------------------------------------------------------
// K(z) and K'(z) together, with one exponential.
template <int Kind, typename T>
EK_HD void kde_kernel_and_deriv(T z, T* k, T* dk) {
  if (Kind == kLogistic) {
    // e^-|z| / (1 + e^-|z|)^2: the sigmoid's derivative in the form that never rounds to 0.
    const T e = ek_exp(-(z < T(0) ? -z : z)), d = T(1) + e, v = e / (d * d);
    *k = v;
    *dk = (z > T(0) ? -v : v) * ((T(1) - e) / d);
  } else {
    const T g = ek_exp(T(-0.5) * z * z) * T(0.398942280401432677939946);
    *k = g;
    *dk = -z * g;
  }
}

// K(z) alone (the derivative's few operations are dropped by the compiler once inlined).
template <int Kind, typename T>
EK_HD T kde_kernel(T z) {
  T k, dk;
  kde_kernel_and_deriv<Kind>(z, &k, &dk);
  return k;
}

// ---------------------------------------------------------------------------------------
// Per-cell divergence terms. P is the target density, Q the prediction's.
// ---------------------------------------------------------------------------------------
// kl: the generalised KL of the eps-floored densities (the densities are not normalised),
// D = sum (P + eps) (log(P + eps) - log(Q + eps)) + Q - P, evaluated with one log of the ratio
// per cell: more accurate in float, where each log of a value near eps is ~-23 with an ulp of
// 2e-6, while the log of the ratio carries only the ratio's relative rounding.
template <typename T>
EK_HD T kl_term(T p, T q, T eps) {
  const T pe = p + eps;
  return pe * ek_log(pe / (q + eps)) + (q - p);
}
// dD/dQ for kl: 1 - (P + eps) / (Q + eps) = (Q - P) / (Q + eps).
template <typename T>
EK_HD T kl_dq(T p, T q, T eps) { return (q - p) / (q + eps); }
// Both at once with one division (the value and dD/dQ of a cell share 1 / (Q + eps)).
template <typename T>
EK_HD T kl_term_dq(T p, T q, T eps, T* dq) {
  const T pe = p + eps, r = T(1) / (q + eps), diff = q - p;
  *dq = diff * r;
  return pe * ek_log(pe * r) + diff;
}

// hellinger: D = sqrt(sum (sqrt(P + eps) - sqrt(Q + eps))^2 + eps) / sqrt(2).
template <typename T>
EK_HD T hellinger_term(T p, T q, T eps) {
  T d = ek_sqrt(p + eps) - ek_sqrt(q + eps);
  return d * d;
}
template <typename T>
EK_HD T hellinger_finish(T sum, T eps) { return ek_sqrt(sum + eps) / T(1.41421356237309504880); }
// dD/dQ for hellinger, given the window's D: -(sqrt(P + eps) - sqrt(Q + eps)) / (4 D sqrt(Q + eps)).
template <typename T>
EK_HD T hellinger_dq(T p, T q, T eps, T d) {
  T sq = ek_sqrt(q + eps);
  return -(ek_sqrt(p + eps) - sq) / (T(4) * d * sq);
}

}  // namespace entropy_kernels
