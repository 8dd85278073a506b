"""backend='cpp': the fused local divergence in C++ on CPU tensors (csrc/entropy_cpu.cpp).

Implements the backend contract of :mod:`entropy_kernels.reference` through the
``entropy_kernels::cpp_local_divergence`` op. Results do not depend on the thread count.
"""
from __future__ import annotations

import torch

from . import _extension

local_divergence_op = _extension.register("cpp", "cpu", cuda=False)


def not_supported_reasons(device: torch.device, dtype: torch.dtype, bins: int):
    return _extension.reasons(torch.device(device), dtype, "cpu", cuda=False)


def local_divergence(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
    return _extension.call(
        local_divergence_op, u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence,
        eps,
    )
