"""A few training steps of the loss alone (forward and backward of a 'mean' loss, so the fused
backends do their work in one kernel), for a profiler to attach to: device_check.sh runs it under
Nsight Compute (ncu) where the device machine has it, to read what bounds the kernels (issue
slots, stall reasons, occupancy) that timings alone cannot say.

    ncu --launch-skip 2 --launch-count 1 -k regex:backward_kernel --section WarpStateStats \\
        python tools/profile_step.py --backend cuda
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entropy_kernels import spatial_entropy_loss  # noqa: E402
from gpu_sweep import add_case_arguments, make_inputs  # noqa: E402  (tools/ is on the path: this script's folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cuda")
    add_case_arguments(parser)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step.py needs a GPU")
    pred, target = make_inputs(args.batch, args.channels, args.size, args.size)
    for _ in range(args.steps):
        loss = spatial_entropy_loss(pred, target, bins=args.bins, window=args.window, backend=args.backend,
                                    generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad(loss, pred)
    torch.cuda.synchronize()
    print(f"{args.backend}: {args.steps} steps, loss {loss.item():.6f}, grad norm {grad.norm().item():.6f}")


if __name__ == "__main__":
    main()
