"""Pure-PyTorch reference: the executable form of docs/spec.md steps 3-5.

It materialises the per-pixel joint kernels as an (N, L*L, H, W) tensor and
box-filters them, exactly as the naive loss does, so it is slow and memory
hungry by design. Every fused backend is tested against it.

The backend contract, shared by every backend module (reference, triton, cpp, cuda):

    local_divergence(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid,
                     bins, bandwidth, kernel, divergence, eps) -> D

``u_*`` and ``m_*`` are (N, H, W) maps of bin units and neighbour values
(see :func:`entropy_kernels.options.pixel_maps`), one plane per image channel,
all of one floating dtype. ``D`` is the (N, Ho, Wo) map of per-window
divergences D_c, with Ho x Wo = H x W for 'same' and (H - win_h + 1) x
(W - win_w + 1) for ``valid``. D is differentiable with respect to ``u_pred``
and ``m_pred``; the target maps are constants.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kernel_values(v: torch.Tensor, bins: int, bandwidth: float, kernel: str) -> torch.Tensor:
    """K((v - k) / h) / h for every bin centre k: shape v.shape + (bins,)."""
    centres = torch.arange(bins, dtype=v.dtype, device=v.device)
    z = (v.unsqueeze(-1) - centres) / bandwidth
    if kernel == "logistic":
        # e^-|z| / (1 + e^-|z|)^2: the sigmoid's derivative in the form that never rounds to 0.
        e = torch.exp(-z.abs())
        k = e / (1 + e) ** 2
    else:
        k = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return k / bandwidth


def local_density(u, m, win_h, win_w, valid, bins, bandwidth, kernel) -> torch.Tensor:
    """P_c(i, j) for every window c: (N, L, L, Ho, Wo) (docs/spec.md steps 3-4)."""
    n, height, width = u.shape
    a = kernel_values(u, bins, bandwidth, kernel)  # (N, H, W, L): intensity axis i
    b = kernel_values(m, bins, bandwidth, kernel)  # (N, H, W, L): neighbour axis j
    if u.is_cuda:
        # A plain (N, L*L, H, W) layout on CUDA: there the channels-last backward of avg_pool2d
        # returned wrong gradients (H100, torch 2.11; docs/spec.md, Decisions 10).
        a, b = (t.permute(0, 3, 1, 2).contiguous() for t in (a, b))
        joint = (a.unsqueeze(2) * b.unsqueeze(1)).reshape(n, bins * bins, height, width)
    else:
        # einsum gives a channels-last view, whose avg_pool2d is the fast one on the CPU (2x).
        joint = torch.einsum("nhwi,nhwj->nijhw", a, b).reshape(n, bins * bins, height, width)
    pad = (0, 0) if valid else (win_h // 2, win_w // 2)
    # count_include_pad=False divides each window by its number of in-image pixels N_c.
    density = F.avg_pool2d(joint, (win_h, win_w), stride=1, padding=pad, count_include_pad=False)
    return density.view(n, bins, bins, *density.shape[-2:])


def divergence_of(p: torch.Tensor, q: torch.Tensor, divergence: str, eps: float) -> torch.Tensor:
    """D_c from densities (N, L, L, Ho, Wo), P from the target (docs/spec.md step 5)."""
    if divergence == "kl":
        # Generalised KL of the eps-floored densities. The "+ q - p" term makes D and its
        # gradient exactly zero at q == p even though KDE densities are not normalised
        # (their mass varies with the pixel values); see docs/spec.md.
        return ((p + eps) * (torch.log(p + eps) - torch.log(q + eps)) + q - p).sum((1, 2))
    sq = (torch.sqrt(p + eps) - torch.sqrt(q + eps)) ** 2
    return torch.sqrt(sq.sum((1, 2)) + eps) / math.sqrt(2)


def local_divergence(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
    args = (win_h, win_w, valid, bins, bandwidth, kernel)
    p = local_density(u_tgt, m_tgt, *args)
    q = local_density(u_pred, m_pred, *args)
    return divergence_of(p, q, divergence, eps)


def not_supported_reasons(device: torch.device, dtype: torch.dtype, bins: int):
    return []
