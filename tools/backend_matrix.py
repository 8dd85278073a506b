"""Parity of one backend against the float64 reference on the CPU, over a grid of options.

    python tools/backend_matrix.py --backend cuda      # on a GPU
    python tools/backend_matrix.py --backend cpp       # anywhere

Each cell of the grid (kernel x divergence x bins x window x planes) runs the backend contract
(entropy_kernels.reference.local_divergence) on random maps in bin units, float64, with a random
grad_output, and prints the largest error of D and of both gradient maps relative to the largest
reference value, flagging a cell that breaks the backend's contract (entropy_kernels.testing: the
float64 tolerance, or in float32 the float32 rule). A grid, not a test: it narrows a failure down
to the options that cause it.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entropy_kernels import backends, reference, testing  # noqa: E402


def contract(impl, maps, grad_out, args):
    u, m, ut, mt = (t.detach().clone() for t in maps)
    u.requires_grad_(True)
    m.requires_grad_(True)
    d = impl(u, m, ut, mt, *args)
    gu, gm = torch.autograd.grad(d, (u, m), grad_out)
    return d.detach(), gu, gm


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--size", type=int, nargs=2, default=(37, 41), metavar=("H", "W"))
    parser.add_argument("--bins", type=int, nargs="+", default=[12, 17, 32, 64])
    parser.add_argument("--windows", type=int, nargs="+", default=[3, 11])
    parser.add_argument("--planes", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--bandwidth", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--device", help="default: cuda for cuda and triton, else cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if args.backend in ("cuda", "triton") else "cpu"))
    module, error = backends._load(args.backend)
    if module is None:
        sys.exit(error)
    impl = module.local_divergence
    dtype = getattr(torch, args.dtype)
    worst = 0.0
    grid = itertools.product(["logistic", "gaussian"], ["kl", "hellinger"], args.bins, args.windows, args.planes,
                             args.bandwidth)
    for kernel, divergence, bins, window, planes, bandwidth in grid:
        gen = torch.Generator().manual_seed(bins * 1000 + window * 10 + planes)
        h, w = args.size
        maps = [(torch.rand(planes, h, w, generator=gen, dtype=torch.float64) * 1.1 - 0.05) * (bins - 1)
                for _ in range(4)]
        call = (window, window, False, bins, bandwidth, kernel, divergence, 1e-10)
        d0 = reference.local_divergence(*maps, *call)
        grad_out = torch.rand(d0.shape, generator=gen, dtype=torch.float64) * 2 - 0.5
        maps, grad_out = [t.to(dtype).double() for t in maps], grad_out.to(dtype).double()  # representable in dtype
        exact = contract(reference.local_divergence, maps, grad_out, call)
        ours = contract(impl, [t.to(device, dtype) for t in maps], grad_out.to(device, dtype), call)
        errs = [((o.cpu().double() - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()
                for o, e in zip(ours, exact)]
        worst = max(worst, *errs)
        if dtype == torch.float64:
            failed = any(testing.float64_parity_error(o, e, args.backend) > 1 for o, e in zip(ours, exact))
        else:  # entropy_kernels.testing's float32 rule, against the reference run in float32
            ref32 = contract(reference.local_divergence, [t.to(dtype) for t in maps], grad_out.to(dtype), call)
            failed = any(testing.float32_rule_violation(o, r, e, args.backend) for o, r, e in zip(ours, ref32, exact))
        flag = "  <-- FAIL (entropy_kernels.testing)" if failed else ""
        print(f"{kernel:8s} {divergence:9s} bins={bins:2d} window={window:2d} planes={planes} h={bandwidth}: "
              f"rel err D {errs[0]:.1e} grad_u {errs[1]:.1e} grad_m {errs[2]:.1e}{flag}", flush=True)
    print(f"worst relative error {worst:.1e}")


if __name__ == "__main__":
    main()
