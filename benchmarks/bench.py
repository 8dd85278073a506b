"""Time and peak memory of the loss per backend over a sweep of shapes.

    python benchmarks/bench.py --backends reference cpp --sizes 64 128 --bins 32 --windows 11
    python benchmarks/bench.py --device cuda --backends reference triton cuda --sizes 64 128 256 --batch 1 8

Each case runs in a fresh subprocess, so a backend that runs out of memory or crashes costs
only its row, and on CPU the peak memory is honest: the increase of the process's peak
resident set size (VmHWM, reset with clear_refs) over its level just before the measured call,
after a call on a tiny input has loaded the backend, with glibc returning freed blocks above
64 KiB to the system. On CUDA it
is torch.cuda.max_memory_allocated over the memory held by the inputs. Times are medians
of repeated runs after a warm-up: forward (with autograd recording), forward+backward,
and backward as their difference. Prints a table and writes CSV (default bench_out/).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import MALLOC_ENV, PeakMemory, median_seconds, run_child, synchronize  # noqa: E402

FIELDS = ["backend", "device", "B", "C", "H", "W", "bins", "window", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
          "peak_extra_MiB", "status"]


def _window_arg(text: str):
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def run_case(case: dict) -> dict:
    """Executed inside the child process: one backend, one shape."""
    import torch

    import entropy_kernels as ek

    device = torch.device(case["device"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (case["B"], case["C"], case["H"], case["W"])
    pred = torch.rand(shape, generator=gen).to(device).requires_grad_(True)
    target = torch.rand(shape, generator=gen).to(device)
    kwargs = dict(bins=case["bins"], window=_window_arg(case["window"]), backend=case["backend"])
    cuda = device.type == "cuda"

    # Load the backend (extension, kernels, op registration) on a tiny input first, so that
    # the code and its one-off allocations are not counted as the loss's memory. The input has
    # enough planes to give every CPU thread work: a worker's first task also makes one-off
    # allocations (its malloc arena, thread-local state).
    small = torch.rand(1, 2 * torch.get_num_threads(), 8, 8).to(device)
    ek.spatial_entropy_loss(small.requires_grad_(True), small.detach(), **kwargs).backward()
    synchronize(cuda)
    peak = PeakMemory(device)
    peak.start()
    value = ek.spatial_entropy_loss(pred, target, **kwargs)
    value.backward()
    peak_extra = peak.extra()

    def timed(fn, setup=None):
        """Median ms of fn(setup()) over the repeats; setup (untimed) runs before each call."""
        return 1e3 * median_seconds(fn, case["repeats"], cuda, setup=setup, seconds=case["seconds"])

    def forward():
        return ek.spatial_entropy_loss(pred, target, **kwargs)

    def fresh_loss():
        pred.grad = None
        return forward()

    def backward(value):
        value.backward()

    def both():
        backward(fresh_loss())

    forward()  # warm-up (JIT compilation, autotuning)
    # The backward is timed on its own (after an untimed forward), not as the difference of two
    # medians: a fused forward that already computed the gradient (cpp) leaves a backward of ~1 ms,
    # which the difference would bury in noise, even below zero.
    fwd, bwd, fwd_bwd = timed(forward), timed(backward, fresh_loss), timed(both)
    return dict(fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=fwd_bwd, peak_extra_MiB=peak_extra / 2**20, status="ok")


def environment(device: str) -> dict:
    import torch

    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.check_output(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def sweep(args) -> list:
    rows = []
    cases = itertools.product(args.backends, args.batch, args.sizes, args.bins, args.windows)
    for backend, batch, size, bins, window in cases:
        case = dict(backend=backend, device=args.device, B=batch, C=args.channels, H=size, W=size, bins=bins,
                    window=window, repeats=args.repeats, seconds=args.seconds)
        result = run_child([sys.executable, __file__, "--child", json.dumps(case)], timeout=args.timeout, cwd=ROOT,
                           env={**os.environ, **MALLOC_ENV})
        result.pop("stderr", None)
        row = {k: case.get(k, "") for k in FIELDS}
        row.update(result)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    def num(key):
        value = row.get(key, "")
        return f"{value:10.2f}" if isinstance(value, float) else f"{'-':>10}"

    shape = f"{row['B']}x{row['C']}x{row['H']}x{row['W']}"
    return (f"{row['backend']:>9} {row['device']:>5} {shape:>16} {row['bins']:>4} {str(row['window']):>7} "
            f"{num('fwd_ms')} {num('bwd_ms')} {num('fwd_bwd_ms')} {num('peak_extra_MiB')}  {row['status']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["reference", "cpp"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64])
    parser.add_argument("--bins", nargs="+", type=int, default=[32])
    parser.add_argument("--windows", nargs="+", default=["11"], help="a side, or sides joined by commas: 1,3,5")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0, help="stop repeating after this, once 3 runs are in")
    parser.add_argument("--timeout", type=float, default=900.0, help="per case")
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "bench.csv"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return
    info = environment(args.device)
    print("# " + " ".join(f"{k}={v}" for k, v in info.items()))
    print(f"{'backend':>9} {'dev':>5} {'BxCxHxW':>16} {'bins':>4} {'window':>7} {'fwd ms':>10} {'bwd ms':>10} "
          f"{'fwd+bwd ms':>10} {'peak+ MiB':>10}  status")
    rows = sweep(args)
    out = Path(os.environ.get("OUT", "")) / "bench.csv" if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        fh.write("# " + json.dumps(info) + "\n")
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
