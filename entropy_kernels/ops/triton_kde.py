"""Triton backend: fused windowed joint-KDE histograms and their divergence, forward and backward.

Why fuse: the reference materialises the per-pixel joint kernels as an (N, L*L, H, W) tensor and
box-filters it, so its memory is about 25x N*L^2*H*W floats. Here nothing with a bins axis ever
reaches global memory: a window's histogram A^T B (A, B the pixels x L separable kernel values
a_p = K((u_p - i)/h)/h, b_p = K((m_p - j)/h)/h) is accumulated with ``tl.dot`` into an L x L
register tile, for pred and target, and only the divergence D_c is written.

Two algorithms (``_Variant.algorithm``), both tested against the float64 reference:

- 'slide' (default): one program per output row. The joint sums of one column of the window's
  rows (a (LP x rows) x (rows x LP) ``tl.dot``) enter a float64 window state when the window
  reaches the column and leave it, recomputed bit for bit, when the window passes it, so a window
  costs two column sums per histogram. Backward slides two such states (the window entering
  T(x) = sum of the G_c covering column x and the one leaving it; the column the first leaves is the
  one the second enters, summed once) and gives every pixel of column x a'_p^T T b_p and
  a_p^T T b'_p with two more dots. Same scheme as the CUDA and C++ backends.
- 'strip': one program per strip of T consecutive windows of a row; the strip's core (the columns
  inside all T windows) is summed once and each window adds its own T - 1 columns; no subtractive
  sliding. Backward recomputes the strip's histograms (as flash-attention recomputes attention),
  forms G_c, and adds B G^T and A G per pixel chunk. Measured at 109x the floor on an H100
  (docs/triton.md); kept so that a GPU session can time both in one call.

Gradients are added into the image-sized maps with atomics, whose order varies between GPU runs:
they agree between runs within rounding, not bitwise.

Extra memory: D (N, Ho, Wo) saved for backward, and the two gradient maps (N, H, W).

Windows are never unrolled: pixel loops run over a region's flattened index, so window sides
1..31 and the whole-image 'global' window are the same code. Bins are padded to a power of two
(at least 16, the smallest ``tl.dot`` tile) and the padded cells masked out. docs/triton.md has
the operation counts and the floor.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from triton.runtime.interpreter import InterpretedFunction

KERNEL_CODES = {"logistic": 0, "gaussian": 1}
# Added to the KERNEL code when the bandwidth is a power of two: the kernels then get 1/h instead of h
# and multiply by it where they would divide by h (the same numbers, see _kernel_vectors).
RECIPROCAL_H = 2
DIVERGENCE_CODES = {"kl": 0, "hellinger": 1}
MAX_BINS = 64
# The compiled float32 kernels with 64 x 64 tiles (bins 33..64) returned gradients wrong by 1e7 x
# on an H100 with Triton 3.6, while float64 and bins <= 32 matched the reference (docs/triton.md).
MAX_VERIFIED_FLOAT32_BINS = 32
DTYPES = (torch.float32, torch.float64)
# 'ieee' keeps the window products free of TF32 rounding, so the float32 error stays at the
# reference's level (the error-bound rule); float64 dots exist only in 'ieee'.
DOT_PRECISION = "ieee"


@triton.jit
def _div(x, y, PRECISE_MATH: tl.constexpr = True):
    # Triton's fp32 '/' is div.full (2 ulp); the error-bound rule wants IEEE rounding as torch has.
    # Without PRECISE_MATH (the fast-math benchmark variants; the interpreter, whose '/' is numpy's
    # IEEE division anyway) the hot paths use '/'.
    if x.dtype == tl.float32 and PRECISE_MATH:
        q = tl.div_rn(x, y)
    else:
        q = x / y
    return q


@triton.jit
def _sqrt(x):
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _exp(x, PRECISE_MATH: tl.constexpr):
    # On the GPU tl.exp in fp32 is ex2.approx(x * log2 e), whose error grows with |x|; libdevice's
    # expf is within 2 ulp. The interpreter has no libdevice and its tl.exp is numpy's.
    if PRECISE_MATH:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _log(x, PRECISE_MATH: tl.constexpr):
    if PRECISE_MATH:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _over_h(x, y, h, KERNEL: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """x / (y h), or with RECIPROCAL_H in KERNEL (h is then 1/h of a power of two) x / y times it."""
    if KERNEL >= 2:
        r = _div(x, y, PRECISE_MATH) * h
    else:
        r = _div(x, y * h, PRECISE_MATH)
    return r


@triton.jit
def _kernel_vectors(v, centres, h, WITH_SLOPE: tl.constexpr, KERNEL: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """K((v - k)/h)/h for v (P, 1) and bin centres k (1, LP); with WITH_SLOPE also its d/dv.

    KERNEL is the kernel's code, plus RECIPROCAL_H when the bandwidth is a power of two (the default
    0.5): `h` then holds 1/h, and x / h becomes x * (1/h), which is the same real number and so rounds
    to the same float (and x / (y h) becomes (x / y) * (1/h): scaling a float by a power of two is
    exact outside the subnormal range). That saves one IEEE division per value, two with the slope.
    """
    # Divisions, not products with a rounded 1/h: z's rounding is amplified by |z| in the kernel tails.
    if KERNEL >= 2:
        z = (v - centres) * h
    else:
        z = _div(v - centres, h, PRECISE_MATH)
    if KERNEL % 2 == 0:
        # e^-|z| / (1 + e^-|z|)^2: the symmetric form never rounds to 0 on one side.
        e = _exp(-tl.abs(z), PRECISE_MATH)
        opp = 1.0 + e
        k = _over_h(e, opp * opp, h, KERNEL, PRECISE_MATH)
        if WITH_SLOPE:
            # K'(z) = -sign(z) K(z) (1 - e)/(1 + e); sign(0) = 0 as for torch's abs.
            sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
            slope = _over_h(-sign * k * (1.0 - e), opp, h, KERNEL, PRECISE_MATH)
        else:
            slope = k
    else:
        g = _exp(-0.5 * z * z, PRECISE_MATH)
        k = _over_h(g, 2.5066282746310002, h, KERNEL, PRECISE_MATH)
        if WITH_SLOPE:
            if KERNEL >= 2:
                slope = -z * k * h
            else:
                slope = _div(-z * k, h, PRECISE_MATH)
        else:
            slope = k
    return k, slope


@triton.jit
def _strip(pid, H, W, Ho, Wo, win_h, win_w, off_h, off_w, per_strip):
    """Image, output row, first window and window count of strip pid, the rows its windows span,
    and its core columns [core_lo, core_hi): those inside every window of the strip."""
    strips = tl.cdiv(Wo, per_strip)
    t = pid // strips
    wo0 = (pid % strips) * per_strip
    ho = t % Ho
    n = t // Ho
    count = tl.minimum(per_strip, Wo - wo0)
    top = ho - off_h
    row0 = tl.maximum(top, 0)
    rows = tl.minimum(top + win_h, H) - row0
    core_lo = tl.maximum(wo0 + count - 1 - off_w, 0)
    core_hi = tl.minimum(wo0 - off_w + win_w, W)
    return n, ho, wo0, count, row0, rows, core_lo, core_hi


@triton.jit
def _window_cols(wo, W, win_w, off_w):
    """In-image columns [first, end) of the window at output column wo."""
    left = wo - off_w
    return tl.maximum(left, 0), tl.minimum(left + win_w, W)


@triton.jit
def _pixel_chunk(n, row0, rows, a0, a1, b0, b1, k0, H, W, BLOCK_P: tl.constexpr):
    """Offsets and mask of pixels k0 .. k0 + BLOCK_P - 1 of the region rows x ([a0, a1) + [b0, b1)),
    flattened row-major (the region is a window's core, or the columns it has beyond the core)."""
    k = k0 + tl.arange(0, BLOCK_P)
    left = a1 - a0
    cols = left + b1 - b0
    inside = k < rows * cols
    j = k % cols
    offs = (n * H + row0 + k // cols) * W + tl.where(j < left, a0 + j, b0 + j - left)
    return offs, inside


@triton.jit
def _add_chunk(hp, hq, up, mp, ut, mt, keep, h, centres, KERNEL: tl.constexpr, PRECISION: tl.constexpr,
               PRECISE_MATH: tl.constexpr):
    """hp + A_t^T B_t and hq + A_p^T B_p for a chunk of pixels (values (P,), keep (P, LP))."""
    a, _ = _kernel_vectors(up[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
    b, _ = _kernel_vectors(mp[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
    hq = tl.dot(tl.trans(tl.where(keep, a, 0.0)), tl.where(keep, b, 0.0), acc=hq, input_precision=PRECISION,
                out_dtype=hq.dtype)
    a, _ = _kernel_vectors(ut[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
    b, _ = _kernel_vectors(mt[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
    hp = tl.dot(tl.trans(tl.where(keep, a, 0.0)), tl.where(keep, b, 0.0), acc=hp, input_precision=PRECISION,
                out_dtype=hp.dtype)
    return hp, hq


@triton.jit
def _add_histograms(hp, hq, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, a0, a1, b0, b1, H, W, h,
                    centres, bin_ok, KERNEL: tl.constexpr, BLOCK_P: tl.constexpr,
                    PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """hp + sum_p a_p b_p^T over the region for the target, hq + the same for pred (LP x LP)."""
    for k0 in range(0, rows * (a1 - a0 + b1 - b0), BLOCK_P):
        offs, inside = _pixel_chunk(n, row0, rows, a0, a1, b0, b1, k0, H, W, BLOCK_P)
        up = tl.load(u_pred + offs, mask=inside, other=0.0)
        mp = tl.load(m_pred + offs, mask=inside, other=0.0)
        ut = tl.load(u_tgt + offs, mask=inside, other=0.0)
        mt = tl.load(m_tgt + offs, mask=inside, other=0.0)
        hp, hq = _add_chunk(hp, hq, up, mp, ut, mt, inside[:, None] & bin_ok[None, :], h, centres, KERNEL,
                            PRECISION, PRECISE_MATH)
    return hp, hq


@triton.jit
def _add_gradients(g, grad_u, grad_m, u_pred, m_pred, n, row0, rows, a0, a1, b0, b1, H, W, h,
                   centres, bin_ok, KERNEL: tl.constexpr, BLOCK_P: tl.constexpr,
                   PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """grad_u_p += a'_p^T G b_p and grad_m_p += a_p^T G b'_p for the pixels of the region."""
    for k0 in range(0, rows * (a1 - a0 + b1 - b0), BLOCK_P):
        offs, inside = _pixel_chunk(n, row0, rows, a0, a1, b0, b1, k0, H, W, BLOCK_P)
        keep = inside[:, None] & bin_ok[None, :]
        up = tl.load(u_pred + offs, mask=inside, other=0.0)
        mp = tl.load(m_pred + offs, mask=inside, other=0.0)
        a, da = _kernel_vectors(up[:, None], centres[None, :], h, True, KERNEL, PRECISE_MATH)
        b, db = _kernel_vectors(mp[:, None], centres[None, :], h, True, KERNEL, PRECISE_MATH)
        a = tl.where(keep, a, 0.0)
        b = tl.where(keep, b, 0.0)
        gb = tl.dot(b, tl.trans(g), input_precision=PRECISION, out_dtype=g.dtype)  # (G b_p)(i)
        ag = tl.dot(a, g, input_precision=PRECISION, out_dtype=g.dtype)  # (a_p^T G)(j)
        gu = tl.sum(tl.where(keep, da * gb, 0.0), axis=1)
        gm = tl.sum(tl.where(keep, db * ag, 0.0), axis=1)
        tl.atomic_add(grad_u + offs, gu, mask=inside, sem="relaxed")
        tl.atomic_add(grad_m + offs, gm, mask=inside, sem="relaxed")


@triton.jit
def _divergence(p, q, eps, cell_ok, DIVERGENCE: tl.constexpr, PRECISE_MATH: tl.constexpr):
    if DIVERGENCE == 0:
        # Generalised KL of the eps-floored densities (docs/spec.md, Decisions 1).
        term = (p + eps) * (_log(p + eps, PRECISE_MATH) - _log(q + eps, PRECISE_MATH)) + q - p
        d = tl.sum(tl.sum(tl.where(cell_ok, term, 0.0), axis=1), axis=0)
    else:
        diff = _sqrt(p + eps) - _sqrt(q + eps)
        s = tl.sum(tl.sum(tl.where(cell_ok, diff * diff, 0.0), axis=1), axis=0)
        d = _sqrt(s + eps) * 0.7071067811865476
    return d


@triton.jit
def _kernel_setup(scalars, u_pred, BINS: tl.constexpr, LP: tl.constexpr):
    """(bandwidth, eps, bin centres, valid bins, valid cells): what every kernel starts with."""
    h = tl.load(scalars)
    eps = tl.load(scalars + 1)
    bin_idx = tl.arange(0, LP)
    bin_ok = bin_idx < BINS
    return h, eps, bin_idx.to(u_pred.dtype.element_ty), bin_ok, bin_ok[:, None] & bin_ok[None, :]


@triton.jit
def _kde_divergence_fwd(u_pred, m_pred, u_tgt, m_tgt, scalars, d_out, H, W, Ho, Wo, win_h, win_w, off_h, off_w,
                        per_strip, BINS: tl.constexpr, KERNEL: tl.constexpr, DIVERGENCE: tl.constexpr,
                        BLOCK_P: tl.constexpr, LP: tl.constexpr, PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    n, ho, wo0, count, row0, rows, core_lo, core_hi = _strip(tl.program_id(0), H, W, Ho, Wo, win_h, win_w,
                                                             off_h, off_w, per_strip)
    h, eps, centres, bin_ok, cell_ok = _kernel_setup(scalars, u_pred, BINS, LP)
    zero = tl.zeros((LP, LP), dtype=u_pred.dtype.element_ty)
    hp_core, hq_core = _add_histograms(zero, zero, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, core_lo, core_hi,
                                       0, 0, H, W, h, centres, bin_ok, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)
    for t in range(0, count):
        first, end = _window_cols(wo0 + t, W, win_w, off_w)
        hp, hq = _add_histograms(hp_core, hq_core, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, first, core_lo,
                                 core_hi, end, H, W, h, centres, bin_ok, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)
        pixels = (rows * (end - first)).to(hp.dtype)
        d = _divergence(_div(hp, pixels), _div(hq, pixels), eps, cell_ok, DIVERGENCE, PRECISE_MATH)
        tl.store(d_out + (n * Ho + ho) * Wo + wo0 + t, d)


@triton.jit
def _kde_divergence_bwd(u_pred, m_pred, u_tgt, m_tgt, scalars, d_saved, grad_d, grad_u, grad_m,
                        H, W, Ho, Wo, win_h, win_w, off_h, off_w, per_strip,
                        BINS: tl.constexpr, KERNEL: tl.constexpr, DIVERGENCE: tl.constexpr,
                        BLOCK_P: tl.constexpr, LP: tl.constexpr, PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    n, ho, wo0, count, row0, rows, core_lo, core_hi = _strip(tl.program_id(0), H, W, Ho, Wo, win_h, win_w,
                                                             off_h, off_w, per_strip)
    h, eps, centres, bin_ok, cell_ok = _kernel_setup(scalars, u_pred, BINS, LP)
    zero = tl.zeros((LP, LP), dtype=u_pred.dtype.element_ty)
    hp_core, hq_core = _add_histograms(zero, zero, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, core_lo, core_hi,
                                       0, 0, H, W, h, centres, bin_ok, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)
    # Every window of the strip contains the core pixels: their gradient needs only the sum of the G_c.
    g_core = zero
    for t in range(0, count):
        first, end = _window_cols(wo0 + t, W, win_w, off_w)
        hp, hq = _add_histograms(hp_core, hq_core, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, first, core_lo,
                                 core_hi, end, H, W, h, centres, bin_ok, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)
        pixels = (rows * (end - first)).to(hp.dtype)
        p = _div(hp, pixels)
        q = _div(hq, pixels)
        c = (n * Ho + ho) * Wo + wo0 + t
        if DIVERGENCE == 0:
            dq = _div(q - p, q + eps)
        else:
            root_q = _sqrt(q + eps)
            dq = -_div(_sqrt(p + eps) - root_q, 4.0 * tl.load(d_saved + c) * root_q)
        # G_c = g_c dD/dH_Q = g_c dD/dQ / N_c; padded cells are dropped so eps = 0 cannot make 0/0 there.
        g = tl.where(cell_ok, dq * _div(tl.load(grad_d + c), pixels), 0.0)
        g_core += g
        _add_gradients(g, grad_u, grad_m, u_pred, m_pred, n, row0, rows, first, core_lo, core_hi, end, H, W, h,
                       centres, bin_ok, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)
    _add_gradients(g_core, grad_u, grad_m, u_pred, m_pred, n, row0, rows, core_lo, core_hi, 0, 0, H, W, h,
                   centres, bin_ok, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)


# ---- 'slide': one program per output row, windows slid along it (the CUDA backend's scheme) ----
#
# The joint sums of a column of the window's rows (A^T B over <= win_h pixels: one tl.dot) enter a
# float64 window state when the window reaches the column and leave it, recomputed bit for bit, when
# the window passes it, so a window costs two column sums per histogram instead of its ~win^2 pixels.
# float64 keeps the add-then-subtract error near 1e-16 of the window's largest cell, far below eps
# (docs/cpu.md has the argument; the CUDA and C++ backends use the same scheme). Non-finite pixels add
# nothing to the sums; sliding counts of them (forward) and of poisoned windows (backward) give the
# NaN results instead, so one NaN cannot spread along the row through the sliding state.


@triton.jit
def _is_finite(v):
    return tl.abs(v) < float("inf")  # False for NaN and +-Inf


@triton.jit
def _column_sums(u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, x, H, W, h, centres, bin_ok,
                 LP: tl.constexpr, KERNEL: tl.constexpr, BLOCK_P: tl.constexpr,
                 PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """Target and pred joint sums sum_y a_y b_y^T over rows [row0, row0 + rows) of column x (LP x LP,
    in the maps' dtype), and the number of non-finite pixels there, which add nothing."""
    hp = tl.zeros((LP, LP), dtype=u_pred.dtype.element_ty)
    hq = tl.zeros((LP, LP), dtype=u_pred.dtype.element_ty)
    bad = rows * 0
    for k0 in range(0, rows, BLOCK_P):
        r = k0 + tl.arange(0, BLOCK_P)
        inside = r < rows
        offs = (n * H + row0 + r) * W + x
        up = tl.load(u_pred + offs, mask=inside, other=0.0)
        mp = tl.load(m_pred + offs, mask=inside, other=0.0)
        ut = tl.load(u_tgt + offs, mask=inside, other=0.0)
        mt = tl.load(m_tgt + offs, mask=inside, other=0.0)
        finite = inside & _is_finite(up) & _is_finite(mp) & _is_finite(ut) & _is_finite(mt)
        bad += tl.sum((inside & ~finite).to(tl.int32), axis=0)
        hp, hq = _add_chunk(hp, hq, up, mp, ut, mt, finite[:, None] & bin_ok[None, :], h, centres, KERNEL,
                            PRECISION, PRECISE_MATH)
    return hp, hq, bad


@triton.jit
def _column(x, cx, cp, cq, cbad, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, H, W, h, centres, bin_ok,
            LP: tl.constexpr, KERNEL: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
            PRECISE_MATH: tl.constexpr, SHARE: tl.constexpr):
    """Column x's sums as (x, sums of the target, of pred, non-finite count): the one-column cache
    (cx, cp, cq, cbad) updated to hold x. With SHARE a cache that already holds x is returned as it
    is (the same floats: the sums are deterministic); without, the sums are always computed."""
    if SHARE:
        if x != cx:
            cp, cq, cbad = _column_sums(u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, x, H, W, h, centres, bin_ok,
                                        LP, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)
    else:
        cp, cq, cbad = _column_sums(u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, x, H, W, h, centres, bin_ok,
                                    LP, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)
    return x, cp, cq, cbad


@triton.jit
def _slide_window(sp, sq, sbad, lo, hi, first, end, cx, cp, cq, cbad, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows,
                  H, W, h, centres, bin_ok, LP: tl.constexpr, KERNEL: tl.constexpr, BLOCK_P: tl.constexpr,
                  PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr, SHARE: tl.constexpr):
    """The float64 window state (sp, sq, sbad) over columns [lo, hi) moved to [first, end) (both ends
    only move right): entering columns are added, leaving ones subtracted. The column sums go through
    the one-column cache (cx, cp, cq, cbad), returned updated; with SHARE a cached column is not
    summed again: the backward's lagging state enters the column its leading state has just left
    (see _kde_divergence_bwd_slide)."""
    for x in range(hi, end):
        cx, cp, cq, cbad = _column(x, cx, cp, cq, cbad, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, H, W, h,
                                   centres, bin_ok, LP, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH, SHARE)
        sp += cp.to(tl.float64)
        sq += cq.to(tl.float64)
        sbad += cbad
    for x in range(lo, first):
        cx, cp, cq, cbad = _column(x, cx, cp, cq, cbad, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, H, W, h,
                                   centres, bin_ok, LP, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH, SHARE)
        sp -= cp.to(tl.float64)
        sq -= cq.to(tl.float64)
        sbad -= cbad
    return sp, sq, sbad, tl.maximum(lo, first), tl.maximum(hi, end), cx, cp, cq, cbad


@triton.jit
def _row(pid, H, Ho, win_h, off_h):
    """Image, output row and the image rows [row0, row0 + rows) of program pid's windows."""
    ho = pid % Ho
    n = pid // Ho
    top = ho - off_h
    row0 = tl.maximum(top, 0)
    return n, ho, row0, tl.minimum(top + win_h, H) - row0


@triton.jit
def _kde_divergence_fwd_slide(u_pred, m_pred, u_tgt, m_tgt, scalars, d_out, H, W, Ho, Wo, win_h, win_w, off_h,
                              off_w, BINS: tl.constexpr, KERNEL: tl.constexpr, DIVERGENCE: tl.constexpr,
                              BLOCK_P: tl.constexpr, LP: tl.constexpr, PRECISION: tl.constexpr,
                              PRECISE_MATH: tl.constexpr):
    n, ho, row0, rows = _row(tl.program_id(0), H, Ho, win_h, off_h)
    h, eps, centres, bin_ok, cell_ok = _kernel_setup(scalars, u_pred, BINS, LP)
    sp = tl.zeros((LP, LP), dtype=tl.float64)
    sq = tl.zeros((LP, LP), dtype=tl.float64)
    sbad = rows * 0
    lo = rows * 0
    hi = rows * 0
    cx = rows * 0 - 1  # the column cache, unused here (no column is summed twice in a row)
    cp = tl.zeros((LP, LP), dtype=u_pred.dtype.element_ty)
    cq = tl.zeros((LP, LP), dtype=u_pred.dtype.element_ty)
    cbad = rows * 0
    for c in range(0, Wo):
        first, end = _window_cols(c, W, win_w, off_w)
        sp, sq, sbad, lo, hi, cx, cp, cq, cbad = _slide_window(
            sp, sq, sbad, lo, hi, first, end, cx, cp, cq, cbad, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, H, W,
            h, centres, bin_ok, LP, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH, False)
        inv_n = 1.0 / (rows * (end - first)).to(tl.float64)  # one division per window, not one per cell
        p = (sp * inv_n).to(u_pred.dtype.element_ty)
        q = (sq * inv_n).to(u_pred.dtype.element_ty)
        d = _divergence(p, q, eps, cell_ok, DIVERGENCE, PRECISE_MATH)
        d = tl.where(sbad > 0, float("nan"), d)
        tl.store(d_out + (n * Ho + ho) * Wo + c, d)


@triton.jit
def _window_g(sp, sq, sbad, c, d_saved, grad_d, rows, first, end, eps, cell_ok, DIVERGENCE: tl.constexpr,
              PRECISE_MATH: tl.constexpr, FUSED: tl.constexpr, WANT_D: tl.constexpr):
    """(G_c = g_c dD/dQ / N_c, poisoned, D_c): poisoned windows (D or g_c not finite) give G = 0.
    FUSED (eps > 0): g_c = 1 and D_c is computed here as the forward computes it when WANT_D; without
    WANT_D (KL, whose dD/dQ does not read D) only its finiteness is needed: finite unless the window
    holds a non-finite pixel."""
    pixels = (rows * (end - first)).to(tl.float64)
    inv_n = 1.0 / pixels  # as the C++ and CUDA backends: cells times 1/N in float64, then rounded
    p = (sp * inv_n).to(grad_d.dtype.element_ty)
    q = (sq * inv_n).to(grad_d.dtype.element_ty)
    if FUSED:
        if WANT_D:
            d = tl.where(sbad > 0, float("nan"), _divergence(p, q, eps, cell_ok, DIVERGENCE, PRECISE_MATH))
        else:
            d = tl.where(sbad > 0, float("nan"), 0.0).to(p.dtype)
        g = tl.full([], 1.0, p.dtype)
    else:
        d = tl.load(d_saved + c)
        g = tl.load(grad_d + c)
    if DIVERGENCE == 0:
        dq = _div(q - p, q + eps, PRECISE_MATH)
    else:
        root_q = _sqrt(q + eps)
        dq = -_div(_sqrt(p + eps) - root_q, 4.0 * d * root_q, PRECISE_MATH)
    healthy = _is_finite(d) & _is_finite(g)
    # Padded cells are dropped so that eps = 0 cannot make 0/0 there.
    G = tl.where(cell_ok, dq * _div(g, pixels.to(grad_d.dtype.element_ty)), 0.0)
    return tl.where(healthy, G, 0.0), tl.where(healthy, 0, 1), d


@triton.jit
def _window_at(sp, sq, sbad, lo, hi, c, cx, cp, cq, cbad, d_row, g_row, eps, cell_ok, u_pred, m_pred, u_tgt, m_tgt,
               n, row0, rows, H, W, win_w, off_w, h, centres, bin_ok, LP: tl.constexpr, KERNEL: tl.constexpr,
               DIVERGENCE: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
               PRECISE_MATH: tl.constexpr, FUSED: tl.constexpr, WANT_D: tl.constexpr):
    """A window state moved to window c (column sums through the cache), and that window's
    (G_c, poisoned, D_c)."""
    first, end = _window_cols(c, W, win_w, off_w)
    sp, sq, sbad, lo, hi, cx, cp, cq, cbad = _slide_window(
        sp, sq, sbad, lo, hi, first, end, cx, cp, cq, cbad, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, H, W, h,
        centres, bin_ok, LP, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH, True)
    G, bad, d = _window_g(sp, sq, sbad, c, d_row, g_row, rows, first, end, eps, cell_ok, DIVERGENCE, PRECISE_MATH,
                          FUSED, WANT_D)
    return sp, sq, sbad, lo, hi, cx, cp, cq, cbad, G, bad, d


@triton.jit
def _kde_divergence_bwd_slide(u_pred, m_pred, u_tgt, m_tgt, scalars, d_saved, grad_d, grad_u, grad_m,
                              H, W, Ho, Wo, win_h, win_w, off_h, off_w,
                              BINS: tl.constexpr, KERNEL: tl.constexpr, DIVERGENCE: tl.constexpr,
                              BLOCK_P: tl.constexpr, LP: tl.constexpr, PRECISION: tl.constexpr,
                              PRECISE_MATH: tl.constexpr, FUSED: tl.constexpr = False):
    """T(x) = sum of G_c over this row's windows c that cover column x, slid along the row with two
    window states (the window entering T and the one leaving it); then every pixel (y, x) of the
    rows gets a'^T T b and a^T T b' (atomics: each pixel is under win_h output rows).

    At column x the leading state moves to window x + off_w, whose columns are [x, x + win_w): it
    leaves column x - 1. The lagging one moves to window x + off_w - win_w, columns [x - win_w, x):
    it enters column x - 1. A one-column cache shared by both hands that sum over, so a window
    costs three column sums here instead of four.

    FUSED (the forward when a gradient will be needed): d_saved receives D, computed by the leading
    state as the forward computes it, and grad_d is not read: the gradients are those of
    grad_output = 1, which the backward rescales when grad_output is uniform."""
    n, ho, row0, rows = _row(tl.program_id(0), H, Ho, win_h, off_h)
    h, eps, centres, bin_ok, cell_ok = _kernel_setup(scalars, u_pred, BINS, LP)
    d_row = d_saved + (n * Ho + ho) * Wo
    g_row = grad_d + (n * Ho + ho) * Wo
    lead_p = tl.zeros((LP, LP), dtype=tl.float64)
    lead_q = tl.zeros((LP, LP), dtype=tl.float64)
    lag_p = tl.zeros((LP, LP), dtype=tl.float64)
    lag_q = tl.zeros((LP, LP), dtype=tl.float64)
    t_sum = tl.zeros((LP, LP), dtype=tl.float64)
    zero = rows * 0
    lead_bad = zero
    lead_lo = zero
    lead_hi = zero
    lag_bad = zero
    lag_lo = zero
    lag_hi = zero
    t_lo = zero
    t_hi = zero
    poison = zero
    cx = zero - 1  # the one-column cache: column index and its sums
    cp = tl.zeros((LP, LP), dtype=u_pred.dtype.element_ty)
    cq = tl.zeros((LP, LP), dtype=u_pred.dtype.element_ty)
    cbad = zero
    for x in range(0, W):
        # The windows c covering column x: c - off_w <= x < c - off_w + win_w.
        new_lo = tl.maximum(x + off_w - win_w + 1, 0)
        new_hi = tl.minimum(x + off_w + 1, Wo)
        for c in range(t_hi, new_hi):
            lead_p, lead_q, lead_bad, lead_lo, lead_hi, cx, cp, cq, cbad, G, bad, d = _window_at(
                lead_p, lead_q, lead_bad, lead_lo, lead_hi, c, cx, cp, cq, cbad, d_row, g_row, eps, cell_ok, u_pred,
                m_pred, u_tgt, m_tgt, n, row0, rows, H, W, win_w, off_w, h, centres, bin_ok, LP, KERNEL, DIVERGENCE,
                BLOCK_P, PRECISION, PRECISE_MATH, FUSED, True)
            if FUSED:
                tl.store(d_row + c, d)
            t_sum += G.to(tl.float64)
            poison += bad
        for c in range(t_lo, new_lo):
            lag_p, lag_q, lag_bad, lag_lo, lag_hi, cx, cp, cq, cbad, G, bad, _ = _window_at(
                lag_p, lag_q, lag_bad, lag_lo, lag_hi, c, cx, cp, cq, cbad, d_row, g_row, eps, cell_ok, u_pred,
                m_pred, u_tgt, m_tgt, n, row0, rows, H, W, win_w, off_w, h, centres, bin_ok, LP, KERNEL, DIVERGENCE,
                BLOCK_P, PRECISION, PRECISE_MATH, FUSED, DIVERGENCE == 1)
            t_sum -= G.to(tl.float64)
            poison -= bad
        t_lo = tl.maximum(t_lo, new_lo)
        t_hi = tl.maximum(t_hi, new_hi)
        t = tl.where(poison > 0, float("nan"), t_sum.to(u_pred.dtype.element_ty))
        _add_gradients(t, grad_u, grad_m, u_pred, m_pred, n, row0, rows, x, x + 1, 0, 0, H, W, h,
                       centres, bin_ok, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)


_INTERPRETED = isinstance(_kde_divergence_fwd, InterpretedFunction)
# libdevice expf/logf and IEEE division on the GPU (the interpreter has no libdevice).
PRECISE_MATH = not _INTERPRETED
ALGORITHMS = ("slide", "strip")


@dataclass(frozen=True)
class _Variant:
    """How the kernels are launched. The defaults are the library's choice; the tools that time or
    compile other launches (benchmarks/triton_variants.py, triton_static.py) pass another variant as
    local_divergence's private `_variant` argument, so the library holds no state for them."""

    # 'slide' (default): one program per output row, windows slid along it; 'strip': the first design,
    # strips of windows each summed directly (measured at 109x the floor on an H100, docs/triton.md).
    algorithm: str = "slide"
    # The forward computes the gradient for grad_output = 1 too when one will be needed ('slide' only;
    # see local_divergence); off, the two passes run separately.
    fuse_forward: bool = True
    precision: str = DOT_PRECISION  # the dots' input_precision
    precise_math: bool = PRECISE_MATH  # libdevice exp/log and IEEE division, else Triton's fast ones
    # Pinned launch parameters, as (name, value) pairs: per_strip, BLOCK_P, num_warps; maxnreg for 'slide'.
    launch: Tuple[Tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"_Variant.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")

    def key(self) -> str:
        """The variant as the custom ops carry it ('' for the default), read back by _variant_of."""
        return "" if self == _DEFAULT else json.dumps(dataclasses.asdict(self))


_DEFAULT = _Variant()


@functools.lru_cache(maxsize=16)
def _variant_of(key: str) -> _Variant:
    if not key:
        return _DEFAULT
    fields = json.loads(key)
    return _Variant(**dict(fields, launch=tuple(tuple(pair) for pair in fields["launch"])))


def _slide_config(win_h: int, bins: int, variant: _Variant = _DEFAULT):
    """Bins padded for tl.dot; pixel chunks of a column as short as tl.dot allows (16) for short windows."""
    lp = max(16, triton.next_power_of_2(bins))
    # 8 warps: the backward carries five float64 LP x LP tiles (two window states, T) in registers.
    config = dict(BLOCK_P=16 if win_h <= 16 else 32, LP=lp, num_warps=8)
    # maxnreg (a register cap for ptxas, launch option) only when a variant sets it.
    config.update({k: v for k, v in variant.launch if k in config or k == "maxnreg"})
    return config


def _launch(fwd: bool, args, win_h, win_w, n, ho, wo, bins, constants, variant: _Variant = _DEFAULT):
    """Runs the forward or backward kernel of the variant's algorithm on (args..., geometry) with the constexprs."""
    if variant.algorithm == "slide":
        kernel = _kde_divergence_fwd_slide if fwd else _kde_divergence_bwd_slide
        kernel[(n * ho,)](*args, **constants, **_slide_config(win_h, bins, variant))
    else:
        config = _launch_config(win_h, win_w, wo, bins, variant)
        kernel = _kde_divergence_fwd if fwd else _kde_divergence_bwd
        per_strip = config.pop("per_strip")
        kernel[(n * ho * triton.cdiv(wo, per_strip),)](*args, per_strip, **constants, **config)


def _launch_config(win_h: int, win_w: int, wo: int, bins: int, variant: _Variant = _DEFAULT):
    """Bins padded for tl.dot, and the strip length and pixel chunk with the fewest padded pixels.

    A strip of T windows reads its core (win_h x (win_w - T + 1) pixels) once and each window's
    own T - 1 columns, so per window it costs core/T + extra pixels, each rounded up to chunks.
    """
    lp = max(16, triton.next_power_of_2(bins))
    chunks = (16, 32, 64) if lp <= 32 else (16, 32)  # a, b, a', b' chunks sit beside the L x L tiles
    best = None
    for per_strip in range(1, min(win_w, wo, 8) + 1):
        for block_p in chunks:
            core = triton.cdiv(win_h * (win_w - per_strip + 1), block_p)
            extra = triton.cdiv(win_h * (per_strip - 1), block_p)
            # Each chunk also pays a fixed cost (loads, loop, reductions): about 8 pixels' worth.
            cost = (core / per_strip + extra) * (block_p + 8)
            if best is None or cost < best[0]:
                best = (cost, per_strip, block_p)
    _, per_strip, block_p = best
    # 8 warps from LP 32: at 4 warps the 32 x 32 tiles spilled registers (tools/triton_static.py: 73
    # local stores forward, 133 backward; 8 warps: 0 and 2), and 8 warps ran the target case in 99.8 ms
    # against 144 ms on an H100 (docs/results.md).
    config = dict(per_strip=per_strip, BLOCK_P=block_p, LP=lp, num_warps=8 if lp >= 32 else 4)
    config.update(variant.launch)
    config["per_strip"] = max(1, min(config["per_strip"], win_w, wo))  # a strip longer than a window has no core
    return config


def _reciprocal_h(bandwidth: float) -> bool:
    """Whether the kernels may multiply by 1/bandwidth instead of dividing: bandwidth is a power of
    two whose reciprocal is a normal float32 (then both give the same floats)."""
    return bandwidth > 0 and math.frexp(bandwidth)[0] == 0.5 and 2.0**-125 <= bandwidth <= 2.0**125


def _constants(bins, kernel, divergence, bandwidth, variant: _Variant = _DEFAULT):
    code = KERNEL_CODES[kernel] + (RECIPROCAL_H if _reciprocal_h(bandwidth) else 0)
    return dict(BINS=bins, KERNEL=code, DIVERGENCE=DIVERGENCE_CODES[divergence],
                PRECISION=variant.precision, PRECISE_MATH=variant.precise_math and not _INTERPRETED)


def _geometry(height, width, win_h, win_w, valid):
    if valid:
        return height - win_h + 1, width - win_w + 1, 0, 0
    return height, width, win_h // 2, win_w // 2


@functools.lru_cache(maxsize=64)
def _params(device: torch.device, dtype: torch.dtype, bandwidth: float, eps: float) -> torch.Tensor:
    # h (or its exact reciprocal, see _constants) and eps travel as a tensor so float64 runs keep them in
    # float64 (Triton's float scalars are fp32); cached so that a training step does not copy them to the
    # device every call.
    h = 1.0 / bandwidth if _reciprocal_h(bandwidth) else bandwidth
    return torch.tensor([h, eps], dtype=dtype, device=device)


def _check_maps(*maps):
    first = maps[0]
    if first.dtype not in DTYPES:
        raise TypeError(f"triton_kde computes in float32 or float64, got {first.dtype}")
    if first.dim() != 3:
        raise ValueError(f"triton_kde expects (N, H, W) maps, got shape {tuple(first.shape)}")
    if first.numel() >= 2**31:
        raise ValueError(f"triton_kde indexes pixels in int32, got {first.numel()} in shape {tuple(first.shape)}")
    for x in maps[1:]:
        if (x.shape, x.dtype, x.device) != (first.shape, first.dtype, first.device):
            raise ValueError(f"triton_kde needs maps of one shape, dtype and device, got {tuple(x.shape)} "
                             f"{x.dtype} {x.device} and {tuple(first.shape)} {first.dtype} {first.device}")


def _fuses(with_grad: bool, eps: float, variant: _Variant) -> bool:
    """Whether the forward also computes the gradient for grad_output = 1 (see local_divergence)."""
    return bool(with_grad) and eps > 0 and variant.fuse_forward and variant.algorithm == "slide"


@torch.library.custom_op("entropy_kernels::triton_local_divergence", mutates_args=())
def triton_local_divergence(
    u_pred: torch.Tensor, m_pred: torch.Tensor, u_tgt: torch.Tensor, m_tgt: torch.Tensor,
    win_h: int, win_w: int, valid: bool, bins: int, bandwidth: float, kernel: str, divergence: str, eps: float,
    with_grad: bool, variant: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, grad_u1, grad_m1): with a fused pass (_fuses) the gradients for grad_output = 1, else empty.
    variant: a _Variant's key ('' for the library's launch)."""
    _check_maps(u_pred, m_pred, u_tgt, m_tgt)
    launch = _variant_of(variant)
    u_pred, m_pred, u_tgt, m_tgt = (x.contiguous() for x in (u_pred, m_pred, u_tgt, m_tgt))
    n, height, width = u_pred.shape
    ho, wo, off_h, off_w = _geometry(height, width, win_h, win_w, valid)
    d = torch.empty((n, ho, wo), dtype=u_pred.dtype, device=u_pred.device)
    params = _params(u_pred.device, u_pred.dtype, bandwidth, eps)
    constants = _constants(bins, kernel, divergence, bandwidth, launch)
    if _fuses(with_grad, eps, launch):
        grad_u = torch.zeros_like(u_pred)
        grad_m = torch.zeros_like(m_pred)
        # The backward kernel with FUSED: d receives D and stands in for grad_d, which it does not read.
        args = (u_pred, m_pred, u_tgt, m_tgt, params, d, d, grad_u, grad_m, height, width, ho, wo, win_h, win_w,
                off_h, off_w)
        _launch(False, args, win_h, win_w, n, ho, wo, bins, dict(constants, FUSED=True), launch)
        return d, grad_u, grad_m
    args = (u_pred, m_pred, u_tgt, m_tgt, params, d, height, width, ho, wo, win_h, win_w, off_h, off_w)
    _launch(True, args, win_h, win_w, n, ho, wo, bins, constants, launch)
    return d, u_pred.new_empty((0,)), u_pred.new_empty((0,))


@triton_local_divergence.register_fake
def _(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps, with_grad,
      variant=""):
    n, height, width = u_pred.shape
    ho, wo, _, _ = _geometry(height, width, win_h, win_w, valid)
    if _fuses(with_grad, eps, _variant_of(variant)):
        return u_pred.new_empty((n, ho, wo)), torch.empty_like(u_pred), torch.empty_like(m_pred)
    return u_pred.new_empty((n, ho, wo)), u_pred.new_empty((0,)), u_pred.new_empty((0,))


def _uniform(grad_d: torch.Tensor):
    """grad_d's one value when all its elements equal it and it is finite, else None (one host sync;
    an expanded grad_d, as 'mean' and 'sum' send it, is read without being copied)."""
    g0 = grad_d[(0,) * grad_d.dim()]
    return g0 if bool(torch.isfinite(g0) & (grad_d == g0).all()) else None


@torch.library.custom_op("entropy_kernels::triton_local_divergence_backward", mutates_args=())
def triton_local_divergence_backward(
    grad_d: torch.Tensor, d: torch.Tensor,
    u_pred: torch.Tensor, m_pred: torch.Tensor, u_tgt: torch.Tensor, m_tgt: torch.Tensor,
    grad_u1: torch.Tensor, grad_m1: torch.Tensor,
    win_h: int, win_w: int, valid: bool, bins: int, bandwidth: float, kernel: str, divergence: str, eps: float,
    variant: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients for grad_d: the forward's ones for grad_output = 1 (grad_u1, grad_m1, when not
    empty) scaled by grad_d's value when grad_d is uniform (the 'mean' and 'sum' reductions), else
    the backward kernel."""
    _check_maps(u_pred, m_pred, u_tgt, m_tgt)
    grad_d = grad_d.to(u_pred.dtype)
    if grad_u1.numel() == u_pred.numel() and grad_m1.numel() == m_pred.numel() and grad_d.numel() > 0:
        g0 = _uniform(grad_d)
        if g0 is not None:
            return grad_u1 * g0, grad_m1 * g0
    grad_d = grad_d.contiguous()
    u_pred, m_pred, u_tgt, m_tgt = (x.contiguous() for x in (u_pred, m_pred, u_tgt, m_tgt))
    n, height, width = u_pred.shape
    ho, wo, off_h, off_w = _geometry(height, width, win_h, win_w, valid)
    grad_u = torch.zeros_like(u_pred)
    grad_m = torch.zeros_like(m_pred)
    args = (u_pred, m_pred, u_tgt, m_tgt, _params(u_pred.device, u_pred.dtype, bandwidth, eps), d.contiguous(),
            grad_d, grad_u, grad_m, height, width, ho, wo, win_h, win_w, off_h, off_w)
    launch = _variant_of(variant)
    _launch(False, args, win_h, win_w, n, ho, wo, bins, _constants(bins, kernel, divergence, bandwidth, launch), launch)
    return grad_u, grad_m


@triton_local_divergence_backward.register_fake
def _(grad_d, d, u_pred, m_pred, u_tgt, m_tgt, grad_u1, grad_m1, win_h, win_w, valid, bins, bandwidth, kernel,
      divergence, eps, variant=""):
    return torch.empty_like(u_pred), torch.empty_like(m_pred)


def _setup_context(ctx, inputs, output):
    u_pred, m_pred, u_tgt, m_tgt, *options, with_grad, variant = inputs
    ctx.options = (*options, variant)
    ctx.save_for_backward(u_pred, m_pred, u_tgt, m_tgt, *output)


def _backward(ctx, grad_d, _grad_u1, _grad_m1):
    u_pred, m_pred, u_tgt, m_tgt, d, grad_u1, grad_m1 = ctx.saved_tensors
    grad_u, grad_m = triton_local_divergence_backward(grad_d, d, u_pred, m_pred, u_tgt, m_tgt, grad_u1, grad_m1,
                                                      *ctx.options)
    # The target maps are constants of the loss (docs/spec.md): no gradient flows to them.
    return (grad_u, grad_m, None, None) + (None,) * (len(ctx.options) + 1)  # options, with_grad


triton_local_divergence.register_autograd(_backward, setup_context=_setup_context)


def not_supported_reasons(device: torch.device, dtype: torch.dtype, bins: int):
    """Why this backend cannot serve an input (empty when it can)."""
    reasons = []
    if device.type == "cpu":
        if not _INTERPRETED:
            # Triton binds a kernel to its interpreter when the kernel is defined, not when it runs.
            reasons.append("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "entropy_kernels.ops.triton_kde is first imported")
    elif device.type != "cuda":
        reasons.append(f"Triton kernels run on CUDA tensors, got {device.type}")
    if dtype not in DTYPES:
        reasons.append(f"dtype {dtype} is not computed by Triton (float32 and float64 are)")
    if bins > MAX_BINS:
        reasons.append(f"bins={bins} > {MAX_BINS}: the L x L histograms live in registers")
    elif device.type == "cuda" and dtype != torch.float64 and bins > MAX_VERIFIED_FLOAT32_BINS:
        reasons.append(f"bins={bins} > {MAX_VERIFIED_FLOAT32_BINS} in float32 gave wrong gradients on an H100 "
                       "(Triton 3.6, docs/triton.md); refused until fixed")
    return reasons


def local_divergence(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps,
                     _variant: Optional[_Variant] = None):
    """The backend contract of entropy_kernels.reference, computed by the fused Triton kernels.

    When a gradient will be needed (and eps > 0), one pass computes D and the gradient for
    grad_output = 1 (the backward kernel's work, which a separate forward would repeat), and the
    backward only rescales it when grad_output is uniform, as the 'mean' and 'sum' reductions make
    it; another grad_output runs the backward kernel. As the C++ CPU backend does. `_variant` (private,
    for the tools) launches the kernels another way than the library's default.
    """
    with_grad = torch.is_grad_enabled() and (u_pred.requires_grad or m_pred.requires_grad)
    d, _, _ = triton_local_divergence(
        u_pred, m_pred, u_tgt.detach(), m_tgt.detach(), int(win_h), int(win_w), bool(valid), int(bins),
        float(bandwidth), kernel, divergence, float(eps), bool(with_grad), (_variant or _DEFAULT).key(),
    )
    return d
