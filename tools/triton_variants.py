"""Where the Triton kernels' time goes: the target case timed under variants of their knobs.

    python tools/triton_variants.py                 # on a GPU
    TRITON_INTERPRET=1 python tools/triton_variants.py --smoke   # the script itself, on CPU

Each variant changes one thing against the default launch (docs/triton.md): the algorithm
('slide', the default, or 'strip', the first design), the dot precision ('ieee' default; 'tf32x3'
uses tensor cores), libdevice exp/log and IEEE division against Triton's fast exp/log and '/'
(PRECISE_MATH), the pixel chunk (BLOCK_P), num_warps and a register cap (maxnreg).
For each it prints forward and forward+backward time (median of triton.testing.do_bench) at
B=8, C=3, 128x128, bins 32, window 11 (forward+backward with a uniform grad_output, as the loss's
'mean' gives it, so that 'slide' runs its fused forward and rescales; 'slide-unfused' times the two
passes), and the float32 error-bound ratios (RMS error against the
float64 reference, over the reference's own float32 error; the rule wants <= 2) of D and of the
gradient on a 2 x 3 x 48 x 48 case. A variant that speeds the kernel up but breaks the rule is not
a candidate for the default.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from entropy_kernels import reference  # noqa: E402
from entropy_kernels.ops import triton_kde  # noqa: E402

VARIANTS = [  # most telling first: the stage's time budget may stop the list early
    ("slide", {}),
    # 16 warps: 97 / 128 registers (forward / fused forward) instead of 164 / 220 at bins 32, no spills, so
    # an SM holds 16 warps of one program instead of 8 (tools/triton_static.py).
    ("slide-warps16", {"launch": {"num_warps": 16}}),
    # 8 warps with registers capped at 128: two programs per SM (16 warps) with 4% more instructions
    # per window than uncapped (16 warps: 34% more); the plain forward needs 126 (no spill), the fused
    # forward spills ~60 local stores and loads per window, outside the column sums.
    ("slide-maxnreg128", {"launch": {"maxnreg": 128}}),
    # Triton's exp/log and '/' (div.full) instead of libdevice and IEEE division: the fused forward
    # then needs 162 registers, and capped at 128 spills 1 store, with 12% fewer instructions per
    # window; whether it keeps the error-bound rule is what ratio_D / ratio_grad say.
    ("slide-fast-math-maxnreg128", {"launch": {"maxnreg": 128}, "precise": False}),
    ("strip", {"algorithm": "strip"}),
    ("slide-unfused", {"fuse": False}),
    ("slide-fast-math", {"precise": False}),
    ("slide-warps16-fast-math", {"launch": {"num_warps": 16}, "precise": False}),
    ("slide-warps4", {"launch": {"num_warps": 4}}),
    ("slide-P32", {"launch": {"BLOCK_P": 32}}),
    ("slide-tf32x3", {"precision": "tf32x3"}),
    ("strip-fast-math", {"algorithm": "strip", "precise": False}),
    ("strip-warps4", {"algorithm": "strip", "launch": {"num_warps": 4}}),
]
FIELDS = ["variant", "config", "fwd_ms", "fwd_bwd_ms", "ratio_D", "ratio_grad", "status"]


def _contract_inputs(n, size, seed, dtype, device, bins):
    """u_pred, m_pred, u_tgt, m_tgt in bin units (values in [0, bins - 1])."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, size, size, generator=gen, dtype=torch.float64) * (bins - 1)).to(dtype).to(device)
            for _ in range(4)]


def run(inputs, bins, window, with_grad, variant, uniform=False):
    u_pred, m_pred, u_tgt, m_tgt = inputs
    if with_grad:
        u_pred = u_pred.detach().requires_grad_()
        m_pred = m_pred.detach().requires_grad_()
    d = triton_kde.local_divergence(u_pred, m_pred, u_tgt, m_tgt, window, window, False, bins, 1.0, "logistic",
                                    "kl", 1e-10, _variant=variant)
    if not with_grad:
        return d, None
    if uniform:  # as the loss's 'mean' reduction gives it: the fused forward's gradient is rescaled
        grad_out = torch.full_like(d, 1.0 / d.numel())
    else:
        grad_out = torch.linspace(0.5, 1.5, d.numel(), device=d.device, dtype=d.dtype).reshape(d.shape)
    grads = torch.autograd.grad(d, (u_pred, m_pred), grad_out)
    return d, torch.cat([g.flatten() for g in grads])


def reference_run(inputs, bins, window):
    u_pred, m_pred, u_tgt, m_tgt = (x.detach() for x in inputs)
    u_pred.requires_grad_()
    m_pred.requires_grad_()
    d = reference.local_divergence(u_pred, m_pred, u_tgt, m_tgt, window, window, False, bins, 1.0, "logistic",
                                   "kl", 1e-10)
    grad_out = torch.linspace(0.5, 1.5, d.numel(), device=d.device, dtype=d.dtype).reshape(d.shape)
    grads = torch.autograd.grad(d, (u_pred, m_pred), grad_out)
    return d, torch.cat([g.flatten() for g in grads])


def rms(a, b):
    return (a.double() - b.double()).norm().item() / max(b.numel(), 1) ** 0.5


def launch_variant(changes):
    """The triton_kde launch of one entry of VARIANTS (its changes to the default, precise math on)."""
    return triton_kde._Variant(algorithm=changes.get("algorithm", "slide"), fuse_forward=changes.get("fuse", True),
                               precision=changes.get("precision", "ieee"), precise_math=changes.get("precise", True),
                               launch=tuple(changes.get("launch", {}).items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (for TRITON_INTERPRET=1 on CPU)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting new variants after this")
    parser.add_argument("--only", nargs="*", help="variant names to run")
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench_out")))
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    device = torch.device("cpu" if args.smoke else "cuda")
    bins, window = (8, 3) if args.smoke else (32, 11)
    big = _contract_inputs(1 if args.smoke else 24, 12 if args.smoke else 128, 0, torch.float32, device, bins)
    small64 = _contract_inputs(2 if args.smoke else 6, 9 if args.smoke else 48, 1, torch.float64, device, bins)
    cpu64 = [x.cpu() for x in small64]  # the float64 reference runs on the CPU (docs/spec.md, Decisions 10)
    exact_d, exact_g = (x.to(device) for x in reference_run(cpu64, bins, window))
    ref32_d, ref32_g = (x.to(device) for x in reference_run([x.float() for x in cpu64], bins, window))
    ref_err = (rms(ref32_d, exact_d), rms(ref32_g, exact_g))
    if args.smoke:
        def bench(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
    else:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=10, rep=50, return_mode="median")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"reference float32 RMS error: D {ref_err[0]:.2e}, grad {ref_err[1]:.2e}", flush=True)
    for name, variant in VARIANTS:
        if args.only and name not in args.only:
            continue
        row = dict(variant=name)
        if time.monotonic() > deadline:
            row["status"] = "skipped (time budget)"
            rows.append(row)
            continue
        launch = launch_variant(variant)
        try:
            config = (triton_kde._slide_config(window, bins, launch) if launch.algorithm == "slide"
                      else triton_kde._launch_config(window, window, 128, bins, launch))
            row["config"] = launch.algorithm + " " + " ".join(f"{k}={v}" for k, v in config.items())
            d, g = run([x.float() for x in small64], bins, window, True, launch)
            row["ratio_D"] = rms(d, exact_d) / max(ref_err[0], 1e-30)
            row["ratio_grad"] = rms(g, exact_g) / max(ref_err[1], 1e-30)
            row["fwd_ms"] = bench(lambda: run(big, bins, window, False, launch))
            row["fwd_bwd_ms"] = bench(lambda: run(big, bins, window, True, launch, uniform=True))
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is a result too
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append(row)
        print("  ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                        for k in FIELDS), flush=True)
    with open(out / "triton_variants.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in FIELDS} for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
