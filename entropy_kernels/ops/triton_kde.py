"""Triton backend: fused windowed joint-KDE histograms and their divergence, forward and backward.

Why fuse: the reference materialises the per-pixel joint kernels as an (N, L*L, H, W) tensor and
box-filters it, so its memory is about 25x N*L^2*H*W floats. Here nothing with a bins axis ever
reaches global memory: a window's histogram A^T B (A, B the pixels x L separable kernel values
a_p = K((u_p - i)/h)/h, b_p = K((m_p - j)/h)/h) is accumulated with ``tl.dot`` into an L x L
register tile, for pred and target, and only the divergence D_c is written.

One program owns a strip of T consecutive windows of one output row. The strip's core (the
columns inside all T windows) is summed once; each window then adds only its own T - 1 columns,
so a window costs core/T + (T - 1) columns instead of its full width, and every sum adds
non-negative terms only. There is no subtractive sliding: a cell keeps its relative accuracy even
when it is many orders of magnitude below the window's peak, which the log of KL needs.

Backward recomputes the strip's histograms (as flash-attention recomputes attention) and forms
G_c = g_c dD_c/dQ_c / N_c in registers. grad_u_p = a'_p^T G_c b_p and grad_m_p = a_p^T G_c b'_p
are two more ``tl.dot`` per pixel chunk (B G^T and A G); the core pixels are visited once with
the sum of the strip's G_c. Results are added into the image-sized gradient maps with atomics,
whose order varies between GPU runs: gradients agree between runs within rounding, not bitwise.

Extra memory: D (N, Ho, Wo) saved for backward, and the two gradient maps (N, H, W).

Windows are never unrolled: pixel loops run over a region's flattened index, so window sides
1..31 and the whole-image 'global' window are the same code. Bins are padded to a power of two
(at least 16, the smallest ``tl.dot`` tile) and the padded cells masked out. docs/triton.md has
the operation counts and the floor.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from triton.runtime.interpreter import InterpretedFunction

KERNEL_CODES = {"logistic": 0, "gaussian": 1}
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
def _div(x, y):
    # Triton's fp32 '/' is div.full (2 ulp); the error-bound rule wants IEEE rounding as torch has.
    if x.dtype == tl.float32:
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
def _kernel_vectors(v, centres, h, WITH_SLOPE: tl.constexpr, KERNEL: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """K((v - k)/h)/h for v (P, 1) and bin centres k (1, LP); with WITH_SLOPE also its d/dv."""
    # Divisions, not products with 1/h: z's rounding is amplified by |z| in the kernel tails.
    z = _div(v - centres, h)
    if KERNEL == 0:
        # e^-|z| / (1 + e^-|z|)^2: the symmetric form never rounds to 0 on one side.
        e = _exp(-tl.abs(z), PRECISE_MATH)
        opp = 1.0 + e
        k = _div(e, opp * opp * h)
        if WITH_SLOPE:
            # K'(z) = -sign(z) K(z) (1 - e)/(1 + e); sign(0) = 0 as for torch's abs.
            sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
            slope = _div(-sign * k * (1.0 - e), opp * h)
        else:
            slope = k
    else:
        k = _div(_exp(-0.5 * z * z, PRECISE_MATH), 2.5066282746310002 * h)
        if WITH_SLOPE:
            slope = _div(-z * k, h)
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
def _add_histograms(hp, hq, u_pred, m_pred, u_tgt, m_tgt, n, row0, rows, a0, a1, b0, b1, H, W, h,
                    centres, bin_ok, KERNEL: tl.constexpr, BLOCK_P: tl.constexpr,
                    PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """hp + sum_p a_p b_p^T over the region for the target, hq + the same for pred (LP x LP)."""
    for k0 in range(0, rows * (a1 - a0 + b1 - b0), BLOCK_P):
        offs, inside = _pixel_chunk(n, row0, rows, a0, a1, b0, b1, k0, H, W, BLOCK_P)
        keep = inside[:, None] & bin_ok[None, :]
        up = tl.load(u_pred + offs, mask=inside, other=0.0)
        mp = tl.load(m_pred + offs, mask=inside, other=0.0)
        ut = tl.load(u_tgt + offs, mask=inside, other=0.0)
        mt = tl.load(m_tgt + offs, mask=inside, other=0.0)
        a, _ = _kernel_vectors(up[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
        b, _ = _kernel_vectors(mp[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
        a = tl.where(keep, a, 0.0)
        b = tl.where(keep, b, 0.0)
        hq = tl.dot(tl.trans(a), b, acc=hq, input_precision=PRECISION, out_dtype=hq.dtype)
        a, _ = _kernel_vectors(ut[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
        b, _ = _kernel_vectors(mt[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
        a = tl.where(keep, a, 0.0)
        b = tl.where(keep, b, 0.0)
        hp = tl.dot(tl.trans(a), b, acc=hp, input_precision=PRECISION, out_dtype=hp.dtype)
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
def _kde_divergence_fwd(u_pred, m_pred, u_tgt, m_tgt, scalars, d_out, H, W, Ho, Wo, win_h, win_w, off_h, off_w,
                        per_strip, BINS: tl.constexpr, KERNEL: tl.constexpr, DIVERGENCE: tl.constexpr,
                        BLOCK_P: tl.constexpr, LP: tl.constexpr, PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    n, ho, wo0, count, row0, rows, core_lo, core_hi = _strip(tl.program_id(0), H, W, Ho, Wo, win_h, win_w,
                                                             off_h, off_w, per_strip)
    h = tl.load(scalars)
    eps = tl.load(scalars + 1)
    bin_idx = tl.arange(0, LP)
    centres = bin_idx.to(u_pred.dtype.element_ty)
    bin_ok = bin_idx < BINS
    cell_ok = bin_ok[:, None] & bin_ok[None, :]
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
    h = tl.load(scalars)
    eps = tl.load(scalars + 1)
    bin_idx = tl.arange(0, LP)
    centres = bin_idx.to(u_pred.dtype.element_ty)
    bin_ok = bin_idx < BINS
    cell_ok = bin_ok[:, None] & bin_ok[None, :]
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


_INTERPRETED = isinstance(_kde_divergence_fwd, InterpretedFunction)
# libdevice expf/logf and IEEE division on the GPU (the interpreter has no libdevice).
PRECISE_MATH = not _INTERPRETED
# Benchmarks may pin launch parameters here (per_strip, BLOCK_P, num_warps) to compare variants.
LAUNCH_OVERRIDES: dict = {}


def _launch_config(win_h: int, win_w: int, wo: int, bins: int):
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
    config = dict(per_strip=per_strip, BLOCK_P=block_p, LP=lp, num_warps=8 if lp >= 64 else 4)
    config.update(LAUNCH_OVERRIDES)
    config["per_strip"] = max(1, min(config["per_strip"], win_w, wo))  # a strip longer than a window has no core
    return config


def _geometry(height, width, win_h, win_w, valid):
    if valid:
        return height - win_h + 1, width - win_w + 1, 0, 0
    return height, width, win_h // 2, win_w // 2


@functools.lru_cache(maxsize=64)
def _params(device: torch.device, dtype: torch.dtype, bandwidth: float, eps: float) -> torch.Tensor:
    # h and eps travel as a tensor so float64 runs keep them in float64 (Triton's float scalars are
    # fp32); cached so that a training step does not copy them to the device every call.
    return torch.tensor([bandwidth, eps], dtype=dtype, device=device)


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


@torch.library.custom_op("entropy_kernels::triton_local_divergence", mutates_args=())
def triton_local_divergence(
    u_pred: torch.Tensor, m_pred: torch.Tensor, u_tgt: torch.Tensor, m_tgt: torch.Tensor,
    win_h: int, win_w: int, valid: bool, bins: int, bandwidth: float, kernel: str, divergence: str, eps: float,
) -> torch.Tensor:
    _check_maps(u_pred, m_pred, u_tgt, m_tgt)
    u_pred, m_pred, u_tgt, m_tgt = (x.contiguous() for x in (u_pred, m_pred, u_tgt, m_tgt))
    n, height, width = u_pred.shape
    ho, wo, off_h, off_w = _geometry(height, width, win_h, win_w, valid)
    d = torch.empty((n, ho, wo), dtype=u_pred.dtype, device=u_pred.device)
    config = _launch_config(win_h, win_w, wo, bins)
    _kde_divergence_fwd[(n * ho * triton.cdiv(wo, config["per_strip"]),)](
        u_pred, m_pred, u_tgt, m_tgt, _params(u_pred.device, u_pred.dtype, bandwidth, eps), d,
        height, width, ho, wo, win_h, win_w, off_h, off_w,
        BINS=bins, KERNEL=KERNEL_CODES[kernel], DIVERGENCE=DIVERGENCE_CODES[divergence],
        PRECISION=DOT_PRECISION, PRECISE_MATH=PRECISE_MATH and not _INTERPRETED, **config,
    )
    return d


@triton_local_divergence.register_fake
def _(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
    n, height, width = u_pred.shape
    ho, wo, _, _ = _geometry(height, width, win_h, win_w, valid)
    return u_pred.new_empty((n, ho, wo))


@torch.library.custom_op("entropy_kernels::triton_local_divergence_backward", mutates_args=())
def triton_local_divergence_backward(
    grad_d: torch.Tensor, d: torch.Tensor,
    u_pred: torch.Tensor, m_pred: torch.Tensor, u_tgt: torch.Tensor, m_tgt: torch.Tensor,
    win_h: int, win_w: int, valid: bool, bins: int, bandwidth: float, kernel: str, divergence: str, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_maps(u_pred, m_pred, u_tgt, m_tgt)
    u_pred, m_pred, u_tgt, m_tgt = (x.contiguous() for x in (u_pred, m_pred, u_tgt, m_tgt))
    grad_d = grad_d.to(u_pred.dtype).contiguous()
    n, height, width = u_pred.shape
    ho, wo, off_h, off_w = _geometry(height, width, win_h, win_w, valid)
    grad_u = torch.zeros_like(u_pred)
    grad_m = torch.zeros_like(m_pred)
    config = _launch_config(win_h, win_w, wo, bins)
    _kde_divergence_bwd[(n * ho * triton.cdiv(wo, config["per_strip"]),)](
        u_pred, m_pred, u_tgt, m_tgt, _params(u_pred.device, u_pred.dtype, bandwidth, eps), d.contiguous(), grad_d, grad_u, grad_m,
        height, width, ho, wo, win_h, win_w, off_h, off_w,
        BINS=bins, KERNEL=KERNEL_CODES[kernel], DIVERGENCE=DIVERGENCE_CODES[divergence],
        PRECISION=DOT_PRECISION, PRECISE_MATH=PRECISE_MATH and not _INTERPRETED, **config,
    )
    return grad_u, grad_m


@triton_local_divergence_backward.register_fake
def _(grad_d, d, u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
    return torch.empty_like(u_pred), torch.empty_like(m_pred)


def _setup_context(ctx, inputs, output):
    u_pred, m_pred, u_tgt, m_tgt, *ctx.options = inputs
    ctx.save_for_backward(u_pred, m_pred, u_tgt, m_tgt, output)


def _backward(ctx, grad_d):
    u_pred, m_pred, u_tgt, m_tgt, d = ctx.saved_tensors
    grad_u, grad_m = triton_local_divergence_backward(grad_d, d, u_pred, m_pred, u_tgt, m_tgt, *ctx.options)
    # The target maps are constants of the loss (SPEC.md): no gradient flows to them.
    return (grad_u, grad_m, None, None) + (None,) * len(ctx.options)


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


def local_divergence(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
    """The backend contract of entropy_kernels.reference, computed by the fused Triton kernels."""
    return triton_local_divergence(
        u_pred, m_pred, u_tgt.detach(), m_tgt.detach(), int(win_h), int(win_w), bool(valid), int(bins),
        float(bandwidth), kernel, divergence, float(eps),
    )
