"""backend='cuda': the fused local divergence in CUDA C++ on CUDA tensors (csrc/entropy_cuda.cu).

Implements the backend contract of :mod:`entropy_kernels.reference` through the
``entropy_kernels::cuda_local_divergence`` op. D is deterministic; the pixel gradients are
accumulated with atomics, so their last bits can vary run to run. When a gradient will be
needed, the forward computes it for grad_output = 1 in the same pass (the backward kernel with
the divergence computed as its windows enter) and the backward scales it when grad_output is
uniform, as the 'mean' and 'sum' reductions make it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _extension

local_divergence_op = _extension.register("cuda", "cuda", cuda=True)


class _Schedule(NamedTuple):
    """The kernels' launch schedule (csrc/entropy_cuda.h's CudaProblem), private: for
    tools/cuda_variants.py and the tests, never set by the loss. Shared-memory budgets in bytes:
    the backward keeps each window's G in shared memory (the G ring) and both kernels the last
    column sums (the column ring) where they fit their budget; None: the library's policy (two
    blocks per SM, within what the device allows), 0: never. tensor_core_column_sums: float column
    sums at bins <= 32 as 3xTF32 tensor-core products on sm_80 and later, in the kernels that are not
    the tensor-core step (docs/tensor_cores.md). tensor_core_step: the fused float pass on the
    tensor-core training step where it serves the problem (the policy), else on those kernels."""

    max_shared_for_ring: Optional[int] = None
    max_shared_for_column_ring: Optional[int] = None
    tensor_core_column_sums: bool = False
    tensor_core_step: bool = True

    def op_argument(self):
        """As the op takes it: [ring, column ring, tensor cores, tensor-core step], -1 for a budget
        left to the policy."""
        budgets = [-1 if b is None else int(b) for b in (self.max_shared_for_ring, self.max_shared_for_column_ring)]
        return budgets + [int(bool(self.tensor_core_column_sums)), int(bool(self.tensor_core_step))]


def not_supported_reasons(device: torch.device, dtype: torch.dtype, bins: int):
    device = torch.device(device)
    out = []
    if bins > _extension.CUDA_MAX_BINS:
        out.append(f"serves bins <= {_extension.CUDA_MAX_BINS}, got {bins}")
    if device.type == "cuda" and not torch.cuda.is_available():
        out.append("no CUDA device is available")
    return out or _extension.reasons(device, dtype, "cuda", cuda=True)


def local_divergence(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps,
                     _schedule: Optional[_Schedule] = None):
    """The backend contract; _schedule (private): the launch schedule, None for the library's policy."""
    return _extension.call(
        local_divergence_op, u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence,
        eps, None if _schedule is None else _schedule.op_argument(),
    )
