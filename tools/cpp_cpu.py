"""CPU timing and peak-memory of backend='cpp' against the reference (docs/cpu.md).

    PYTHONPATH=. python tools/cpp_cpu.py [--sizes 64 128 256 512] [--bins 32] [--window 11]

Times forward + backward of the backend contract call (local_divergence on (B*C, H, W) maps)
after a warm-up. Where both backends run, their calls are interleaved (one reference call, then
several cpp calls, round after round) so that both see the same load on a shared machine; the
medians are compared, and the minima are printed beside them.

Peak memory is the rise of the process's peak RSS over its RSS before one call (Linux:
/proc/self/clear_refs resets the peak), measured in a child process run with
MALLOC_MMAP_THRESHOLD_ set so that every allocation above 64 KiB is returned to the system when
freed; otherwise glibc keeps freed scratch in its arenas and later calls would not show in the RSS
at all. Times are not taken in that child: there every allocation above 64 KiB becomes an
mmap/munmap pair whose page faults and TLB shootdowns cost this 2-core VM several milliseconds per
call, a cost of that allocator setting, not of the code (``--time-with-malloc-setting`` measures
it anyway).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measure import MALLOC_ENV, reset_peak_rss, status_kib  # noqa: E402 - the benchmarks' measuring helper
from entropy_kernels import reference  # noqa: E402
from entropy_kernels.ops import cpp  # noqa: E402

GRAD_OUTPUT = "uniform"
IMPLS = {"cpp": cpp, "reference": reference}


def step(impl, maps, args):
    u, m, ut, mt = maps
    d = impl.local_divergence(u, m, ut, mt, *args)
    # 'uniform' is what the 'mean' and 'sum' reductions send back (the cpp backend then reuses the
    # gradient its forward pass computed); 'random' forces its full backward pass.
    g = torch.ones_like(d) if GRAD_OUTPUT == "uniform" else torch.rand_like(d)
    d.backward(g)


def timed(impl, maps, args):
    t, c = time.perf_counter(), time.process_time()
    step(impl, maps, args)
    return time.perf_counter() - t, time.process_time() - c


def make_case(size, channels, bins, window):
    gen = torch.Generator().manual_seed(size)
    maps = [torch.rand(channels, size, size, generator=gen) * (bins - 1) for _ in range(4)]
    maps[0].requires_grad_()
    maps[1].requires_grad_()
    call = (window, window, False, bins, 0.5, "logistic", "kl", 1e-10)
    return maps, call


def measure_times(names, maps, call, rounds, cpp_per_round):
    """{name: [(wall, cpu), ...]}, the backends' calls interleaved round by round."""
    for name in names:
        step(IMPLS[name], maps, call)  # warm-up (and the JIT build for cpp)
    samples = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            for _ in range(cpp_per_round if name == "cpp" else 1):
                samples[name].append(timed(IMPLS[name], maps, call))
    return samples


def measure_peak_mib(name, maps, call):
    step(IMPLS[name], maps, call)  # warm-up at full size
    before = reset_peak_rss()
    step(IMPLS[name], maps, call)
    return (status_kib("VmHWM") - before) / 1024


def peak_in_child(args, size, name):
    """Peak MiB of one call, measured in a child process under MALLOC_ENV."""
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-only", name, "--sizes", str(size),
           "--bins", str(args.bins), "--window", str(args.window), "--channels", str(args.channels),
           "--grad-output", args.grad_output]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--bins", type=int, default=32)
    parser.add_argument("--window", type=int, default=11)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--reference-up-to", type=int, default=64)
    parser.add_argument("--grad-output", choices=("uniform", "random"), default="uniform")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one reference call each)")
    parser.add_argument("--time-with-malloc-setting", action="store_true",
                        help="also take the times under MALLOC_ENV (re-executes this script)")
    parser.add_argument("--peak-only", choices=tuple(IMPLS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global GRAD_OUTPUT
    GRAD_OUTPUT = args.grad_output

    if args.peak_only:  # child: one backend, one size, under MALLOC_ENV
        maps, call = make_case(args.sizes[0], args.channels, args.bins, args.window)
        print(json.dumps({"peak_mib": measure_peak_mib(args.peak_only, maps, call)}))
        return
    if args.time_with_malloc_setting and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)
        os.execv(sys.executable, [sys.executable] + sys.argv)
    malloc = "MALLOC_MMAP_THRESHOLD_=65536" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "default malloc"
    print(
        f"# {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"bins {args.bins}, window {args.window}, C {args.channels}, grad_output {args.grad_output}; "
        f"times under {malloc}, peaks under {MALLOC_ENV}"
    )
    print("size  backend    fwd+bwd ms (median / min)   cpu ms (all threads)   peak MiB   ms/Mpixel")
    for size in args.sizes:
        maps, call = make_case(size, args.channels, args.bins, args.window)
        names = ["cpp"] + (["reference"] if size <= args.reference_up_to else [])
        rounds = args.rounds if size <= 128 else max(1, args.rounds // 2)
        samples = measure_times(names, maps, call, rounds, cpp_per_round=4 if len(names) > 1 else 2)
        results = {}
        for name in names:
            wall = statistics.median(s[0] for s in samples[name])
            best = min(s[0] for s in samples[name])
            cpu = statistics.median(s[1] for s in samples[name])
            mib = peak_in_child(args, size, name)
            results[name] = (wall, best, cpu, mib)
            mpix = args.channels * size * size / 1e6
            print(f"{size:4d}  {name:9s} {wall * 1e3:12.1f} / {best * 1e3:7.1f} {cpu * 1e3:22.1f} {mib:10.1f} "
                  f"{wall * 1e3 / mpix:11.1f}")
        if "reference" in results:
            (ts, bs, cs, ms), (tr, br, cr, mr) = results["cpp"], results["reference"]
            print(
                f"      speed-up {tr / ts:.1f}x wall (medians; minima {br / bs:.1f}x), {cr / cs:.1f}x cpu time; "
                f"peak memory ratio reference/cpp {mr / max(ms, 1e-3):.0f}"
            )


if __name__ == "__main__":
    main()
