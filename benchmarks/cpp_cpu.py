"""CPU timing and peak-memory of backend='cpp' against the reference (docs/cpp.md).

    PYTHONPATH=. python benchmarks/cpp_cpu.py [--sizes 64 128 256 512] [--bins 32] [--window 11]

Times forward + backward of the backend contract call (local_divergence on (B*C, H, W)
maps) with warm-up and the median of several runs. Peak memory is the rise of the
process's peak RSS over its RSS before the call (Linux: /proc/self/clear_refs resets the peak).
The script re-executes itself with MALLOC_MMAP_THRESHOLD_ set so that every allocation above
64 KiB is returned to the system when freed; otherwise glibc keeps freed scratch in its arenas
and later calls would not show in the RSS at all.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import statistics
import time

import torch

from bench import MALLOC_ENV, reset_peak_rss, rss_kib
from entropy_kernels import reference
from entropy_kernels.ops import cpp


GRAD_OUTPUT = "uniform"


def step(impl, maps, args):
    u, m, ut, mt = maps
    d = impl.local_divergence(u, m, ut, mt, *args)
    # 'uniform' is what the 'mean' and 'sum' reductions send back (the cpp backend then reuses the
    # gradient its forward pass computed); 'random' forces its full backward pass.
    g = torch.ones_like(d) if GRAD_OUTPUT == "uniform" else torch.rand_like(d)
    d.backward(g)


def measure(impl, maps, args, repeats):
    step(impl, maps, args)  # warm-up (and the JIT build for cpp)
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        step(impl, maps, args)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    before = reset_peak_rss()
    step(impl, maps, args)
    peak = rss_kib("VmHWM") - before
    return statistics.median(times), statistics.median(cpu), peak / 1024


def main():
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)
        os.execv(sys.executable, [sys.executable] + sys.argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--bins", type=int, default=32)
    parser.add_argument("--window", type=int, default=11)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--reference-up-to", type=int, default=64)
    parser.add_argument("--grad-output", choices=("uniform", "random"), default="uniform")
    args = parser.parse_args()
    global GRAD_OUTPUT
    GRAD_OUTPUT = args.grad_output
    print(
        f"# {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"bins {args.bins}, window {args.window}, C {args.channels}, grad_output {args.grad_output}"
    )
    print("size  backend    fwd+bwd ms   cpu ms (all threads)   peak MiB   ms/Mpixel")
    for size in args.sizes:
        gen = torch.Generator().manual_seed(size)
        maps = [torch.rand(args.channels, size, size, generator=gen) * (args.bins - 1) for _ in range(4)]
        maps[0].requires_grad_()
        maps[1].requires_grad_()
        call = (args.window, args.window, False, args.bins, 0.5, "logistic", "kl", 1e-10)
        results = {}
        impls = [("cpp", cpp)] + ([("reference", reference)] if size <= args.reference_up_to else [])
        for name, impl in impls:
            repeats = 3 if name == "reference" else (10 if size <= 128 else 3)
            sec, cpu, mib = measure(impl, maps, call, repeats)
            results[name] = (sec, cpu, mib)
            mpix = args.channels * size * size / 1e6
            print(f"{size:4d}  {name:9s} {sec * 1e3:10.1f} {cpu * 1e3:22.1f} {mib:10.1f} {sec * 1e3 / mpix:11.1f}")
        if "reference" in results:
            (ts, cs, ms), (tr, cr, mr) = results["cpp"], results["reference"]
            print(
                f"      speed-up {tr / ts:.1f}x wall, {cr / cs:.1f}x cpu time; "
                f"peak memory ratio reference/cpp {mr / max(ms, 1e-3):.0f}"
            )


if __name__ == "__main__":
    main()
