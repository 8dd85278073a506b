"""backend='cuda': the fused local divergence in CUDA C++ on CUDA tensors (csrc/entropy_cuda.cu).

Implements the backend contract of :mod:`entropy_kernels.reference` through the
``entropy_kernels::cuda_local_divergence`` op. D is deterministic; the pixel gradients are
accumulated with atomics, so their last bits can vary run to run. When a gradient will be
needed, the forward computes it for grad_output = 1 in the same pass (the backward kernel with
the divergence computed as its windows enter) and the backward scales it when grad_output is
uniform, as the 'mean' and 'sum' reductions make it.
"""
from __future__ import annotations

import torch

from . import _extension

local_divergence_op = _extension.register("cuda", "cuda", cuda=True)


def not_supported_reasons(device: torch.device, dtype: torch.dtype, bins: int):
    device = torch.device(device)
    out = []
    if bins > _extension.CUDA_MAX_BINS:
        out.append(f"serves bins <= {_extension.CUDA_MAX_BINS}, got {bins}")
    if device.type == "cuda" and not torch.cuda.is_available():
        out.append("no CUDA device is available")
    return out or _extension.reasons(device, dtype, "cuda", cuda=True)


def local_divergence(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
    return _extension.call(
        local_divergence_op, u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence,
        eps,
    )
