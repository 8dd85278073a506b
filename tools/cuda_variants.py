"""The CUDA backend's schedules, for a lent GPU: parity of each against the float64 reference, then
forward+backward time and peak memory at one case (default the issue's target: B=8, C=3, 128^2,
bins 32, window 11).

    python tools/cuda_variants.py                 # after `python setup.py build_ext --inplace`
    python tools/cuda_variants.py --size 256 --batch 4

Schedules (docs/cuda.md, Algorithm; docs/tensor_cores.md), each a pass and the kernels' launch
schedule (the cuda backend's private _schedule argument: the two shared-memory budgets, the G ring's
and the column ring's, the column sums' products and whether the tensor-core step may run):
  fused, defaults           the training step: a 'mean' loss, so the forward computes the gradient for
                            grad_output = 1 and the backward rescales it; float at bins <= 32 on
                            sm_80+: the tensor-core step, with its column ring where a block may have
                            it (199 KiB at the default case, one block per SM)
  fused, step without column ring   the step computing each leaving column sum again (103 KiB)
  fused, sliding            the sliding kernels' training step (the step turned off): the backward
                            kernel with grad_output = 1, each window's G kept in shared memory (two
                            blocks per SM at the default case)
  fused, sliding, both rings / two states / tensor cores: the sliding kernels with the last column
                            sums kept too (164 KiB), with neither ring (a second window state
                            recomputes G), with the float column sums as 3xTF32 tensor-core products
  unfused, defaults         a non-uniform grad_output (reduction 'none', random weights): the forward
                            kernel (with its column ring where it fits two blocks per SM), then the backward kernel
  forward, defaults / forward, no column ring: D alone (no gradient), the evaluation's pass
Times are medians of triton.testing.do_bench. No GPU: exits with a message.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from entropy_kernels.loss import _loss  # noqa: E402
from entropy_kernels.ops import _extension  # noqa: E402
from entropy_kernels.ops.cuda import _Schedule  # noqa: E402
from entropy_kernels.options import make_options  # noqa: E402
from gpu_sweep import add_case_arguments, make_inputs  # noqa: E402  (tools/ is on the path: this script's folder)


SM_SHARED = 227 * 1024  # an sm_90 block's most dynamic shared memory


def loss_fn(pred, target, schedule=None, **options):
    """spatial_entropy_loss with the cuda backend's launch schedule (the reference ignores it)."""
    return _loss(pred, target, make_options(**options), _schedule=schedule)


def step_fn(pred, target, bins, window, mode, schedule):
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return loss_fn(pred, target, schedule, bins=bins, window=window, backend="cuda")
        return forward
    if mode == "fused":
        return lambda: torch.autograd.grad(loss_fn(pred, target, schedule, bins=bins, window=window,
                                                   backend="cuda"), pred)
    weights = torch.rand_like(pred, requires_grad=False)

    def step():
        loss = loss_fn(pred, target, schedule, bins=bins, window=window, backend="cuda", reduction="none")
        return torch.autograd.grad((loss * weights).sum(), pred)
    return step


def parity(mode, dtype, schedule):
    """Largest error (the map of D for 'forward', else the gradient) against the float64 reference
    over its largest value, 40 x 33, bins 32, window 11, the inputs in dtype. Each ring the schedule uses is
    allowed an SM's 227 KiB here: in float64 the rings need about twice the bytes, and at bins 32 /
    window 11 float64 the backward's column ring does not fit even so (the forward's does)."""
    ring, column_ring = (0 if budget == 0 else SM_SHARED
                         for budget in (schedule.max_shared_for_ring, schedule.max_shared_for_column_ring))
    schedule = schedule._replace(max_shared_for_ring=ring, max_shared_for_column_ring=column_ring)
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 40, 33, generator=gen, dtype=torch.float64).cuda()
    target = torch.rand(2, 3, 40, 33, generator=gen, dtype=torch.float64).cuda()
    weights = torch.rand(2, 3, 40, 33, generator=gen, dtype=torch.float64).cuda()
    out = {}
    for backend, kind in (("reference", torch.float64), ("cuda", dtype)):
        p = pred.to(kind).requires_grad_(mode != "forward")
        loss = loss_fn(p, target.to(kind), schedule if backend == "cuda" else None, bins=32, window=11,
                       backend=backend, reduction="mean" if mode == "fused" else "none",
                       generator=torch.Generator().manual_seed(2))  # the same neighbour weights
        if mode == "forward":
            out[backend] = loss.detach().double()
        else:
            out[backend] = torch.autograd.grad(loss if mode == "fused" else (loss * weights.to(kind)).sum(), p)[0].double()
    scale = out["reference"].abs().max().item()
    return (out["cuda"] - out["reference"]).abs().max().item() / scale


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_variants.py needs a GPU")
    module, error = _extension.load(True)
    if module is None:
        sys.exit(f"the CUDA extension is unavailable: {error}")
    from triton.testing import do_bench

    pred, target = make_inputs(args.batch, args.channels, args.size, args.size, seed=1)
    print(f"{torch.cuda.get_device_name()}; B={args.batch} C={args.channels} {args.size}^2 bins {args.bins} "
          f"window {args.window}, float32; shared-memory budgets (G ring, column ring) by default: "
          "what a block may have for the tensor-core step, two blocks per SM for the sliding kernels")
    from entropy_kernels.ops.cuda import training_step_kernel

    print(f"float training step at this case: {training_step_kernel('cuda', args.bins, args.window, args.window)}")
    print("schedule | parity float64 | parity float32 (max error / max value vs float64 reference) | ms | peak extra MiB")
    defaults = _Schedule()
    sliding = dict(tensor_core_step=False)
    schedules = (
        ("fused, defaults", "fused", defaults), ("fused, step without column ring", "fused", _Schedule(None, 0)),
        ("fused, sliding", "fused", _Schedule(**sliding)),
        ("fused, sliding, both rings", "fused", _Schedule(SM_SHARED, SM_SHARED, **sliding)),
        ("fused, sliding, two states", "fused", _Schedule(0, 0, **sliding)),
        ("fused, sliding, tensor cores", "fused", _Schedule(tensor_core_column_sums=True, **sliding)),
        ("unfused, defaults", "unfused", defaults),
        ("forward, defaults", "forward", defaults), ("forward, no column ring", "forward", _Schedule(None, 0)),
    )
    for name, mode, schedule in schedules:
        errors = [parity(mode, dtype, schedule) for dtype in (torch.float64, torch.float32)]
        step = step_fn(pred, target, args.bins, args.window, mode, schedule)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = do_bench(step, return_mode="median")
        print(f"{name} | {errors[0]:.2e} | {errors[1]:.2e} | {ms:.2f} | {peak:.1f}", flush=True)


if __name__ == "__main__":
    main()
