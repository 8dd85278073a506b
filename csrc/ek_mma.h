// The warp-level matrix product the CUDA kernels use, D = A B + C with m16n8k8 TF32 operands and
// float accumulators (PTX `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`, sm_80 and later),
// behind one wrapper so that the CPU emulator (tests/simt/simt.h) can run the same kernels.
//
// Fragments, per lane (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32), with
// g = lane / 4 and c = lane % 4:
//   A (16 x 8, row-major): a[0] = A(g, c), a[1] = A(g + 8, c), a[2] = A(g, c + 4), a[3] = A(g + 8, c + 4)
//   B (8 x 8, column-major): b[0] = B(c, g), b[1] = B(c + 4, g)
//   C, D (16 x 8):          d[0] = D(g, 2c), d[1] = D(g, 2c + 1), d[2] = D(g + 8, 2c), d[3] = D(g + 8, 2c + 1)
// Every lane of the warp must call it together (it is warp-collective, as the instruction).
//
// Rounding. The operands are float registers of which the tensor core reads a TF32 value (1 sign,
// 8 exponent and 10 mantissa bits). PTX does not define what it makes of the 13 low mantissa bits
// of a plain float, so the kernels never rely on it: they round every operand first with
// `to_tf32` (`cvt.rna.tf32.f32`: to nearest, ties away from zero), and the emulator, given an
// operand with low bits set, truncates them (an assumption, which tests/test_cuda_mma.py checks
// where a device is present; the kernels never rely on it). The 8 products of TF32 values are exact in float (11 x 11
// significant bits); the emulator adds them to C in k order in float, rounding to nearest. The
// tensor core's internal addition is not IEEE (it aligns and truncates; Fasi et al., "Numerical
// behavior of NVIDIA tensor cores", PeerJ CS 2021), so device and emulator may differ by a few
// float ulps of the accumulated sum, within the float32 error rule's margin (docs/tensor_cores.md).
//
// Split products ("3xTF32"): x = hi + lo with hi = to_tf32(x) and lo = to_tf32(x - hi) (x - hi is
// exact), and A B ~ A_hi B_hi + A_hi B_lo + A_lo B_hi, which drops A_lo B_lo (relative 2^-22) and
// the rounding of lo (2^-11 of lo, 2^-22 of x): about float's own product error.
#pragma once

#include <cstdint>
#include <cstring>

namespace entropy_kernels {

#if defined(EK_SIMT_EMULATION)
inline float tf32_bits(float x, uint32_t add) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) != 0x7f800000u) u += add;  // Inf and NaN keep their class
  u &= 0xffffe000u;
  std::memcpy(&x, &u, sizeof u);
  return x;
}
// cvt.rna.tf32.f32: half an ulp of TF32 added to the magnitude, then the 13 low bits dropped.
inline float to_tf32(float x) { return tf32_bits(x, 0x1000u); }

inline void mma_tf32_m16n8k8(float d[4], const float a[4], const float b[2], const float c[4]) {
  const int lane = (int)threadIdx.x % 32;  // the kernels' blocks are one-dimensional
  float mine[10];
  for (int e = 0; e < 4; ++e) mine[e] = tf32_bits(a[e], 0);  // operand bits past TF32 truncated
  for (int e = 0; e < 2; ++e) mine[4 + e] = tf32_bits(b[e], 0);
  for (int e = 0; e < 4; ++e) mine[6 + e] = c[e];
  float all[32][10];
  ::simt::warp_all_gather(mine, all);
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, k = l % 4;
    A[g][k] = all[l][0];
    A[g + 8][k] = all[l][1];
    A[g][k + 4] = all[l][2];
    A[g + 8][k + 4] = all[l][3];
    B[k][g] = all[l][4];
    B[k + 4][g] = all[l][5];
  }
  const int g = lane / 4, c2 = 2 * (lane % 4);
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = c2 + e % 2;
    float sum = c[e];
    for (int k = 0; k < 8; ++k) sum += A[row][k] * B[k][col];
    d[e] = sum;
  }
}
#else
__device__ __forceinline__ float to_tf32(float x) {
#if __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
#else
  return x;  // never launched below sm_80 (the launcher checks the device)
#endif
}

__device__ __forceinline__ void mma_tf32_m16n8k8(float d[4], const float a[4], const float b[2], const float c[4]) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#else
  __trap();  // never launched below sm_80 (the launcher checks the device)
#endif
}
#endif

// d += A B in place (the accumulators tied to the instruction's C and D operands, so that the
// compiler needs no register moves between products).
#if defined(EK_SIMT_EMULATION)
inline void mma_tf32_m16n8k8_acc(float d[4], const float a[4], const float b[2]) { mma_tf32_m16n8k8(d, a, b, d); }
#else
__device__ __forceinline__ void mma_tf32_m16n8k8_acc(float d[4], const float a[4], const float b[2]) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
#else
  __trap();  // never launched below sm_80 (the launcher checks the device)
#endif
}
#endif

// d += A B with both operands split into TF32 high and low parts (see above): three products.
// a_hi, a_lo, b_hi, b_lo are the parts of the fragments, as split_tf32 makes them.
#if defined(EK_SIMT_EMULATION)
#define EK_MMA_HD inline
#else
#define EK_MMA_HD __device__ __forceinline__
#endif
EK_MMA_HD void split_tf32(float x, float* hi, float* lo) {
  *hi = to_tf32(x);
  *lo = to_tf32(x - *hi);
}

// A float's bits and back (on the device the register reinterpreted; in the emulator memcpy).
EK_MMA_HD uint32_t float_bits(float x) {
#if defined(EK_SIMT_EMULATION)
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#else
  return __float_as_uint(x);
#endif
}
EK_MMA_HD float bits_float(uint32_t u) {
#if defined(EK_SIMT_EMULATION)
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#else
  return __uint_as_float(u);
#endif
}

// to_tf32 in two integer operations on the bits (half an ulp of TF32 added to the magnitude, the 13
// low bits dropped): the value cvt.rna gives for every float but NaN, whose payload may differ (a
// NaN stays a NaN), where the compiler makes four instructions of cvt.rna.
EK_MMA_HD float to_tf32_bits(float x) { return bits_float((float_bits(x) + 0x1000u) & 0xffffe000u); }
// split_tf32 with to_tf32_bits: the same parts for every float but NaN.
EK_MMA_HD void split_tf32_bits(float x, float* hi, float* lo) {
  *hi = to_tf32_bits(x);
  *lo = to_tf32_bits(x - *hi);
}
EK_MMA_HD void mma_3xtf32_m16n8k8(float d[4], const float a_hi[4], const float a_lo[4], const float b_hi[2],
                                  const float b_lo[2]) {
  // The small terms first, so that they are not lost below the large one's rounding.
  mma_tf32_m16n8k8_acc(d, a_lo, b_hi);
  mma_tf32_m16n8k8_acc(d, a_hi, b_lo);
  mma_tf32_m16n8k8_acc(d, a_hi, b_hi);
}
#undef EK_MMA_HD

}  // namespace entropy_kernels
