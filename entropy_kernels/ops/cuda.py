"""backend='cuda': the fused local divergence in CUDA C++ on CUDA tensors (csrc/entropy_cuda.cu).

Implements the backend contract of :mod:`entropy_kernels.reference` through the
``entropy_kernels::cuda_local_divergence`` op. D is deterministic; the pixel gradients are
accumulated with atomics, so their last bits can vary run to run. When a gradient will be
needed, the forward computes it for grad_output = 1 in the same pass (the backward kernel with
the divergence computed as its windows enter) and the backward scales it when grad_output is
uniform, as the 'mean' and 'sum' reductions make it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

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


def _step_shared_bytes(win_w: int, column_ring: bool, sum_buffers: int) -> int:
    """The tensor-core step's dynamic shared memory (csrc/entropy_cuda.cu's step_layout): T's TF32
    parts, the column sums' staging buffers, the gradient's staging, partial sums, the G ring and,
    with it, the column ring."""
    fragments = 2 * 4 * 32 * 4  # floats of a 32-row A operand of 4 k-steps
    total = (2 * fragments + sum_buffers * 4 * fragments + 2 * 16 * 36 + 4 * 4 * 32 * 4 + 4 * 16) * 4
    total += win_w * 4 * 256 * 4
    return total + ((win_w + 1) * 2 * 4 * 256 * 4 if column_ring else 0)


def tensor_core_step_refusal(bins: int, win_h: int, win_w: int, capability: Tuple[int, int], shared_optin: int,
                             schedule: Optional[_Schedule] = None) -> str:
    """Why the training step (the fused float pass of a 'mean' or 'sum' loss) of bins and a win_h x
    win_w window does not run on the tensor-core step on a device of this compute capability whose
    blocks may have shared_optin bytes, or '' when it does (docs/tensor_cores.md). What it refuses
    runs on the sliding kernels. The launcher's own rule (tensor_core_step_refusal in
    csrc/entropy_cuda.cu), which tests/test_cuda_emulated.py checks this against, except one test
    only the launcher can make: that the extension holds code for compute capability 8.0 or later
    (as it does when built for the device or for torch's default targets)."""
    schedule = schedule or _Schedule()
    if not schedule.tensor_core_step:
        return "turned off by the schedule"
    if bins > 32:
        return "it serves bins <= 32"
    if win_h > 16:
        return "it serves windows of at most 16 rows"
    if win_w > 63:
        return "it serves windows of at most 63 columns"
    if capability[0] < 8:
        return "it needs a device of compute capability 8.0 or later (TF32 tensor cores)"

    def allowed(budget):
        return shared_optin if budget is None else min(budget, shared_optin)

    for ring in (True, False):
        for buffers in (2, 1):
            size = _step_shared_bytes(win_w, ring, buffers)
            if size <= allowed(schedule.max_shared_for_ring) and (
                    not ring or size <= allowed(schedule.max_shared_for_column_ring)):
                return ""
    return "its G ring does not fit the shared memory allowed"


def training_step_kernel(device, bins: int, win_h: int, win_w: int) -> str:
    """Which kernel runs the float training step of backend 'cuda' on a CUDA device, with the reason
    when it is not the tensor-core step: 'tensor-core step' or 'sliding kernels: <reason>'."""
    device = torch.device(device)
    props = torch.cuda.get_device_properties(device)
    why = tensor_core_step_refusal(bins, win_h, win_w, (props.major, props.minor),
                                   int(getattr(props, "shared_memory_per_block_optin", 0)))
    return "tensor-core step" if not why else f"sliding kernels: {why}"


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
