"""Check the loss backends of this machine against the float64 reference.

    python -m entropy_kernels.check                       # every backend that serves CPU tensors
    python -m entropy_kernels.check --device cuda         # ... CUDA tensors (cuda, triton)
    python -m entropy_kernels.check --backends cpp --bins 17 --window 5 3 --seed 4
    TRITON_INTERPRET=1 python -m entropy_kernels.check --backends triton --size 9 7   # Triton on the CPU

For each backend, on fresh random images (odd sizes by default) through the public
`spatial_entropy_loss`, with a fixed random set of neighbour weights:

- **float64 parity**: the loss map (`reduction='none'`) and the gradient of a random weighting of it
  against `backend='reference'`, within the backend's float64 tolerance (printed: the largest error
  relative to the reference's largest value, and the share of the tolerance it uses);
- **gradcheck**: `torch.autograd.gradcheck` of the float64 loss through the backend, on a small image;
- **float32**: the float32 rule: on float32 inputs, the backend's float32 error against the float64
  reference at most twice the reference's own float32 error;
- **float32 mean**: the same rule on the gradient of a 'mean' loss, whose uniform grad_output takes
  the backends' training step (on CUDA the tensor-core step where it serves) rather than their
  backward pass.

The tolerances and the rule are entropy_kernels.testing's, the ones the test suite holds every
backend to.

Prints one line per check and exits with status 1 when any fails (2 when no backend can run).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import backends, testing
from .loss import spatial_entropy_loss
from .options import make_options


def _case(args, device, dtype, size, generator):
    """(pred, target, neighbour weights) for one check, drawn on the CPU. 'valid' windows need
    images at least as large as the window: smaller sizes are raised to the largest side."""
    if args.padding == "valid":
        size = tuple(max(s, max(args.window)) for s in size)
    shape = (args.batch, args.channels, *size)
    pred = torch.rand(shape, generator=generator, dtype=torch.float64)
    target = (pred + 0.2 * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    ring = torch.rand(8, generator=generator, dtype=torch.float64) + 0.1
    return pred.to(device, dtype), target.to(device, dtype), ring.to(device)


def _reduction(opts) -> str:
    """'none' (a weighted map gives a non-uniform grad_output) unless the options forbid it: 'valid'
    windows of several sides give maps of different sizes, and then the sum is weighted by a scalar."""
    return "sum" if opts["padding"] == "valid" and isinstance(opts["window"], tuple) else "none"


def _loss_and_grad(backend: str, pred, target, ring, weight, opts, reduction=None) -> Tuple[torch.Tensor, torch.Tensor]:
    pred = pred.detach().clone().requires_grad_(True)
    loss_map = spatial_entropy_loss(pred, target, neighbor_weights=ring.to(pred.dtype),
                                    reduction=reduction or _reduction(opts), backend=backend, **opts)
    (grad,) = torch.autograd.grad((loss_map * weight.to(loss_map.dtype)).sum(), pred)
    return loss_map.detach(), grad


def _random_weight(pred, target, ring, opts, generator) -> torch.Tensor:
    """Weights in [0.5, 1.5) for the loss map (so grad_output is not uniform) or the summed loss."""
    with torch.no_grad():
        shape = spatial_entropy_loss(pred.cpu(), target.cpu(), neighbor_weights=ring.cpu().to(pred.dtype),
                                     reduction=_reduction(opts), backend="reference", **opts).shape
    return torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    return float((a.double() - b.double()).abs().max()) / (scale if scale > 0 else 1.0)


def check_parity(backend, device, args, opts, generator) -> Tuple[bool, str]:
    pred, target, ring = _case(args, device, torch.float64, args.size, generator)
    weight = _random_weight(pred, target, ring, opts, generator)
    ref = _loss_and_grad("reference", pred.cpu(), target.cpu(), ring.cpu(), weight, opts)
    got = _loss_and_grad(backend, pred, target, ring, weight.to(device), opts)
    errors = [_relative(g.cpu(), r) for g, r in zip(got, ref)]
    used = max(testing.float64_parity_error(g, r, backend) for g, r in zip(got, ref))
    return used <= 1, f"loss {errors[0]:.1e}, gradient {errors[1]:.1e} (relative; {used:.0%} of the tolerance)"


def check_gradcheck(backend, device, args, opts, generator) -> Tuple[bool, str]:
    pred, target, ring = _case(args, device, torch.float64, args.gradcheck_size, generator)
    pred.requires_grad_(True)

    def loss(p):
        return spatial_entropy_loss(p, target, neighbor_weights=ring, backend=backend, **opts)

    try:
        ok = torch.autograd.gradcheck(loss, (pred,), **testing.GRADCHECK, fast_mode=True)
    except RuntimeError as exc:  # gradcheck raises with the Jacobians when they differ
        return False, str(exc).splitlines()[0]
    return ok, f"passed on {tuple(pred.shape)}"


def check_float32(backend, device, args, opts, generator, reduction=None) -> Tuple[bool, str]:
    # every input float32-representable, so that only the arithmetic differs
    pred, target, ring = (t.float().double() for t in _case(args, "cpu", torch.float64, args.size, generator))
    if reduction == "mean":  # a uniform grad_output, not 1
        weight = (torch.rand((), generator=generator, dtype=torch.float64) + 0.5).float().double()
    else:
        weight = _random_weight(pred, target, ring, opts, generator).float().double()
    exact = _loss_and_grad("reference", pred, target, ring, weight, opts, reduction)
    single = [pred.float(), target.float(), ring]
    ref32 = _loss_and_grad("reference", *single, weight, opts, reduction)
    got32 = _loss_and_grad(backend, *(t.to(device) for t in single), weight.to(device), opts, reduction)
    lines, ok = [], True
    for name, g, r, e in zip(("loss", "gradient"), got32, ref32, exact):
        err_backend = float((g.cpu().double() - e).abs().max())
        err_reference = float((r.double() - e).abs().max())
        if e.dim() == 0:
            # A summed or averaged loss: its error is mostly the float32 sum's own rounding, noise to
            # the rule; the maps it sums are judged through the gradient.
            lines.append(f"{name} {err_backend:.1e} (reference {err_reference:.1e}; a scalar, not judged)")
            continue
        ok &= not testing.float32_rule_violation(g, r, e, backend)
        lines.append(f"{name} {err_backend:.1e} (reference {err_reference:.1e})")
    return ok, ", ".join(lines)


def check_float32_mean(backend, device, args, opts, generator) -> Tuple[bool, str]:
    return check_float32(backend, device, args, opts, generator, reduction="mean")


CHECKS: Dict[str, Callable] = {"float64 parity": check_parity, "gradcheck": check_gradcheck, "float32": check_float32,
                               "float32 mean": check_float32_mean}


def loss_options(args) -> dict:
    """The loss keywords of the command line, validated as `spatial_entropy_loss` would."""
    opts = dict(bins=args.bins, window=tuple(args.window) if len(args.window) > 1 else args.window[0],
                bandwidth=args.bandwidth, kernel=args.kernel, divergence=args.divergence, padding=args.padding)
    make_options(**opts, reduction=_reduction(opts))  # raises ValueError naming the bad option
    return opts


def run(backend_names: Sequence[str], device: torch.device, args, opts: dict, out=print) -> Optional[bool]:
    """Runs every check for every named backend with the loss keywords `opts` (`loss_options`);
    True when all pass, None when none could run."""
    ran, passed = False, True
    for name in backend_names:
        reasons = backends.not_supported_reasons(name, device, torch.float64, args.bins)
        if reasons:
            out(f"{name:9s} skipped: {'; '.join(reasons)}")
            continue
        for check, fn in CHECKS.items():
            if check.startswith("float32") and backends.not_supported_reasons(name, device, torch.float32, args.bins):
                out(f"{name:9s} {check:15s} skipped: float32 not served")
                continue
            generator = torch.Generator().manual_seed(args.seed)
            ok, detail = fn(name, device, args, opts, generator)
            ran = True
            passed &= ok
            out(f"{name:9s} {check:15s} {'ok  ' if ok else 'FAIL'} {detail}")
    return passed if ran else None


def _parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--backends", nargs="+", choices=[n for n in backends.MODULES if n != "reference"],
                        help="default: every backend that serves the device")
    parser.add_argument("--size", type=int, nargs=2, default=(23, 19), metavar=("H", "W"))
    parser.add_argument("--gradcheck-size", type=int, nargs=2, default=(7, 6), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--bins", type=int, default=13)
    parser.add_argument("--window", type=int, nargs="+", default=[5], help="one side, or several (a tuple)")
    parser.add_argument("--bandwidth", type=float, default=0.5)
    parser.add_argument("--kernel", default="logistic")
    parser.add_argument("--divergence", default="kl")
    parser.add_argument("--padding", default="same")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """`prog`: the name in usage lines; None is the console script's (`entropy-kernels-check`)."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        opts = loss_options(args)
    except (RuntimeError, ValueError) as exc:
        parser.error(str(exc))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False")
        return 2
    names = args.backends or [n for n in backends.MODULES if n != "reference"]
    result = run(names, device, args, opts)
    if result is None:
        print(f"no backend could run on {device.type}")
        return 2
    print("all checks passed" if result else "some checks FAILED")
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main(prog="python -m entropy_kernels.check"))
