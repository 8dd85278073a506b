"""Triton backend: fused windowed joint-KDE histograms and their divergence, forward and backward.

Why fuse: the reference materialises the per-pixel joint kernels as an (N, L*L, H, W) tensor and
box-filters it, so its memory is about 25x N*L^2*H*W floats. Here one Triton program owns one
window c. It loads the window's pixels in chunks of BLOCK_P, evaluates the separable kernel
vectors a_p = K((u_p - i)/h)/h and b_p = K((m_p - j)/h)/h (L values each, never the L x L outer
product) and accumulates the window's histogram A^T B with ``tl.dot`` into an L x L register
tile, for pred and target. The divergence D_c is reduced from the two tiles in registers and only
D_c is written. Nothing with a bins axis ever reaches global memory.

Backward recomputes P_c and Q_c (as flash-attention recomputes attention) and forms
G_c = g_c dD_c/dQ_c / N_c in registers; a second pass over the window's pixels gives
grad_u_p = a'_p^T G_c b_p and grad_m_p = a_p^T G_c b'_p as two more ``tl.dot`` (B G^T and A G)
and adds them into the image-sized gradient maps with atomics. The order of those atomic adds
varies between GPU runs, so gradients agree between runs within float rounding, not bitwise.

Extra memory: D (N, Ho, Wo) saved for backward, and the two gradient maps (N, H, W).

Windows are never unrolled: the pixel loop runs over the clipped window's flattened index, so
window sides 1..31 and the whole-image 'global' window are the same code. Bins are padded to a
power of two (at least 16, the smallest ``tl.dot`` tile) and the padded cells masked out.
Sums are accumulated from non-negative terms only (no subtractive sliding), so a cell's value
keeps its relative accuracy even when it is many orders of magnitude below the window's peak.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from triton.runtime.interpreter import InterpretedFunction

KERNEL_CODES = {"logistic": 0, "gaussian": 1}
DIVERGENCE_CODES = {"kl": 0, "hellinger": 1}
MAX_BINS = 64
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
def _window(pid, H, W, Ho, Wo, win_h, win_w, off_h, off_w):
    """Image index and clipped pixel rectangle of window pid (row-major over N x Ho x Wo)."""
    wo = pid % Wo
    t = pid // Wo
    ho = t % Ho
    n = t // Ho
    top = ho - off_h
    left = wo - off_w
    row0 = tl.maximum(top, 0)
    col0 = tl.maximum(left, 0)
    rows = tl.minimum(top + win_h, H) - row0
    cols = tl.minimum(left + win_w, W) - col0
    return n, row0, col0, rows, cols


@triton.jit
def _pixel_chunk(n, row0, col0, rows, cols, k0, H, W, BLOCK_P: tl.constexpr):
    """Offsets and mask of pixels k0 .. k0 + BLOCK_P - 1 of the window, flattened row-major."""
    k = k0 + tl.arange(0, BLOCK_P)
    inside = k < rows * cols
    offs = (n * H + row0 + k // cols) * W + col0 + k % cols
    return offs, inside


@triton.jit
def _joint_histograms(u_pred, m_pred, u_tgt, m_tgt, n, row0, col0, rows, cols, H, W, h,
                      centres, bin_ok, KERNEL: tl.constexpr, BLOCK_P: tl.constexpr, LP: tl.constexpr,
                      PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """Unnormalised window histograms sum_p a_p b_p^T of pred (hq) and target (hp), LP x LP."""
    dtype = u_pred.dtype.element_ty
    hq = tl.zeros((LP, LP), dtype=dtype)
    hp = tl.zeros((LP, LP), dtype=dtype)
    for k0 in range(0, rows * cols, BLOCK_P):
        offs, inside = _pixel_chunk(n, row0, col0, rows, cols, k0, H, W, BLOCK_P)
        keep = inside[:, None] & bin_ok[None, :]
        up = tl.load(u_pred + offs, mask=inside, other=0.0)
        mp = tl.load(m_pred + offs, mask=inside, other=0.0)
        ut = tl.load(u_tgt + offs, mask=inside, other=0.0)
        mt = tl.load(m_tgt + offs, mask=inside, other=0.0)
        a, _ = _kernel_vectors(up[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
        b, _ = _kernel_vectors(mp[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
        a = tl.where(keep, a, 0.0)
        b = tl.where(keep, b, 0.0)
        hq = tl.dot(tl.trans(a), b, acc=hq, input_precision=PRECISION, out_dtype=dtype)
        a, _ = _kernel_vectors(ut[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
        b, _ = _kernel_vectors(mt[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
        a = tl.where(keep, a, 0.0)
        b = tl.where(keep, b, 0.0)
        hp = tl.dot(tl.trans(a), b, acc=hp, input_precision=PRECISION, out_dtype=dtype)
    return hp, hq


@triton.jit
def _kde_divergence_fwd(u_pred, m_pred, u_tgt, m_tgt, params, d_out, H, W, Ho, Wo, win_h, win_w, off_h, off_w,
                        BINS: tl.constexpr, KERNEL: tl.constexpr, DIVERGENCE: tl.constexpr,
                        BLOCK_P: tl.constexpr, LP: tl.constexpr, PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    pid = tl.program_id(0)
    n, row0, col0, rows, cols = _window(pid, H, W, Ho, Wo, win_h, win_w, off_h, off_w)
    h = tl.load(params)
    eps = tl.load(params + 1)
    bin_idx = tl.arange(0, LP)
    centres = bin_idx.to(u_pred.dtype.element_ty)
    bin_ok = bin_idx < BINS
    hp, hq = _joint_histograms(u_pred, m_pred, u_tgt, m_tgt, n, row0, col0, rows, cols, H, W, h,
                               centres, bin_ok, KERNEL, BLOCK_P, LP, PRECISION, PRECISE_MATH)
    count = (rows * cols).to(hp.dtype)
    p = _div(hp, count)
    q = _div(hq, count)
    cell_ok = bin_ok[:, None] & bin_ok[None, :]
    if DIVERGENCE == 0:
        # Generalised KL of the eps-floored densities (docs/spec.md, Decisions 1).
        term = (p + eps) * (_log(p + eps, PRECISE_MATH) - _log(q + eps, PRECISE_MATH)) + q - p
        d = tl.sum(tl.sum(tl.where(cell_ok, term, 0.0), axis=1), axis=0)
    else:
        diff = _sqrt(p + eps) - _sqrt(q + eps)
        s = tl.sum(tl.sum(tl.where(cell_ok, diff * diff, 0.0), axis=1), axis=0)
        d = _sqrt(s + eps) * 0.7071067811865476
    tl.store(d_out + pid, d)


@triton.jit
def _kde_divergence_bwd(u_pred, m_pred, u_tgt, m_tgt, params, d_saved, grad_d, grad_u, grad_m,
                        H, W, Ho, Wo, win_h, win_w, off_h, off_w,
                        BINS: tl.constexpr, KERNEL: tl.constexpr, DIVERGENCE: tl.constexpr,
                        BLOCK_P: tl.constexpr, LP: tl.constexpr, PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    pid = tl.program_id(0)
    n, row0, col0, rows, cols = _window(pid, H, W, Ho, Wo, win_h, win_w, off_h, off_w)
    h = tl.load(params)
    eps = tl.load(params + 1)
    bin_idx = tl.arange(0, LP)
    centres = bin_idx.to(u_pred.dtype.element_ty)
    bin_ok = bin_idx < BINS
    hp, hq = _joint_histograms(u_pred, m_pred, u_tgt, m_tgt, n, row0, col0, rows, cols, H, W, h,
                               centres, bin_ok, KERNEL, BLOCK_P, LP, PRECISION, PRECISE_MATH)
    count = (rows * cols).to(hp.dtype)
    p = _div(hp, count)
    q = _div(hq, count)
    if DIVERGENCE == 0:
        dq = _div(q - p, q + eps)
    else:
        root_q = _sqrt(q + eps)
        dq = -_div(_sqrt(p + eps) - root_q, 4.0 * tl.load(d_saved + pid) * root_q)
    # dD/dH_Q = dD/dQ / N_c; padded cells are dropped so eps = 0 cannot make 0/0 there.
    cell_ok = bin_ok[:, None] & bin_ok[None, :]
    g = tl.where(cell_ok, dq * _div(tl.load(grad_d + pid), count), 0.0)
    for k0 in range(0, rows * cols, BLOCK_P):
        offs, inside = _pixel_chunk(n, row0, col0, rows, cols, k0, H, W, BLOCK_P)
        keep = inside[:, None] & bin_ok[None, :]
        up = tl.load(u_pred + offs, mask=inside, other=0.0)
        mp = tl.load(m_pred + offs, mask=inside, other=0.0)
        a, da = _kernel_vectors(up[:, None], centres[None, :], h, True, KERNEL, PRECISE_MATH)
        b, db = _kernel_vectors(mp[:, None], centres[None, :], h, True, KERNEL, PRECISE_MATH)
        a = tl.where(keep, a, 0.0)
        b = tl.where(keep, b, 0.0)
        gb = tl.dot(b, tl.trans(g), input_precision=PRECISION, out_dtype=hp.dtype)  # (G b_p)(i)
        ag = tl.dot(a, g, input_precision=PRECISION, out_dtype=hp.dtype)  # (a_p^T G)(j)
        gu = tl.sum(tl.where(keep, da * gb, 0.0), axis=1)
        gm = tl.sum(tl.where(keep, db * ag, 0.0), axis=1)
        tl.atomic_add(grad_u + offs, gu, mask=inside, sem="relaxed")
        tl.atomic_add(grad_m + offs, gm, mask=inside, sem="relaxed")


_INTERPRETED = isinstance(_kde_divergence_fwd, InterpretedFunction)


def _launch_config(win_h: int, win_w: int, bins: int):
    lp = max(16, triton.next_power_of_2(bins))
    # Chunks no longer than the window (1x1 windows waste the least) nor than 64 pixels
    # (the a, b, a', b' chunks stay in registers next to the L x L tiles).
    block_p = min(max(16, triton.next_power_of_2(win_h * win_w)), 64 if lp <= 32 else 32)
    num_warps = 8 if lp >= 64 else 4
    return dict(BLOCK_P=block_p, LP=lp, num_warps=num_warps)


def _geometry(height, width, win_h, win_w, valid):
    if valid:
        return height - win_h + 1, width - win_w + 1, 0, 0
    return height, width, win_h // 2, win_w // 2


def _params(like: torch.Tensor, bandwidth: float, eps: float) -> torch.Tensor:
    # h and eps travel as a tensor so float64 runs keep them in float64 (scalars are fp32).
    return torch.tensor([bandwidth, eps], dtype=like.dtype, device=like.device)


def _check_maps(*maps):
    for x in maps:
        if x.dtype not in DTYPES:
            raise TypeError(f"triton_kde computes in float32 or float64, got {x.dtype}")
        if x.dim() != 3:
            raise ValueError(f"triton_kde expects (N, H, W) maps, got shape {tuple(x.shape)}")


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
    _kde_divergence_fwd[(n * ho * wo,)](
        u_pred, m_pred, u_tgt, m_tgt, _params(u_pred, bandwidth, eps), d,
        height, width, ho, wo, win_h, win_w, off_h, off_w,
        BINS=bins, KERNEL=KERNEL_CODES[kernel], DIVERGENCE=DIVERGENCE_CODES[divergence],
        PRECISION=DOT_PRECISION, PRECISE_MATH=not _INTERPRETED, **_launch_config(win_h, win_w, bins),
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
    _kde_divergence_bwd[(n * ho * wo,)](
        u_pred, m_pred, u_tgt, m_tgt, _params(u_pred, bandwidth, eps), d.contiguous(), grad_d, grad_u, grad_m,
        height, width, ho, wo, win_h, win_w, off_h, off_w,
        BINS=bins, KERNEL=KERNEL_CODES[kernel], DIVERGENCE=DIVERGENCE_CODES[divergence],
        PRECISION=DOT_PRECISION, PRECISE_MATH=not _INTERPRETED, **_launch_config(win_h, win_w, bins),
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
        if os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)")
        elif not _INTERPRETED:
            reasons.append("TRITON_INTERPRET=1 was set after Triton kernels were compiled for the GPU; "
                           "set it before importing entropy_kernels")
    elif device.type != "cuda":
        reasons.append(f"Triton kernels run on CUDA tensors, got {device.type}")
    if dtype not in DTYPES:
        reasons.append(f"dtype {dtype} is not computed by Triton (float32 and float64 are)")
    if bins > MAX_BINS:
        reasons.append(f"bins={bins} > {MAX_BINS}: the L x L histograms live in registers")
    return reasons


def local_divergence(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
    """The backend contract of entropy_kernels.reference, computed by the fused Triton kernels."""
    return triton_local_divergence(
        u_pred, m_pred, u_tgt.detach(), m_tgt.detach(), int(win_h), int(win_w), bool(valid), int(bins),
        float(bandwidth), kernel, divergence, float(eps),
    )
