"""One call on a lent GPU: build the Triton kernels, check them against the reference, then time
forward, backward and both, and peak memory, for the reference and the Triton backend over the
sweep of the Triton issue (crops 64..1024, bins 16/32/64, B 1 and 8, C 3, window 11 and (1, 3, 5)).

    python tools/gpu_sweep.py                     # full sweep, stops at --budget-s
    python tools/gpu_sweep.py --quick             # the two target cases only
    python tools/gpu_sweep.py --commit <sha>      # when the copy has no .git

Times are medians from triton.testing.do_bench (cases slower than --single-shot-s are timed once,
after one warm-up run). "bwd" times autograd.grad on a retained graph, "fwd+bwd" the whole step.
The inputs require grad and the loss is a mean, so the fused backends (cuda, triton 'slide', cpp)
compute the gradient in the forward already: their "fwd" is most of the step and "bwd" a rescale.
Peak memory is torch.cuda.max_memory_allocated during one forward+backward over what the inputs
already held. The reference is not attempted where its predicted peak (28 tensors of
B*C*H*W*bins^2 floats, docs/triton.md) exceeds the card's memory; where it is attempted and fails,
the row says OOM. Prints a table with the device, versions and commit and writes CSV and a Markdown
table to --out (default $OUT, else bench_out/).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import entropy_kernels as ek  # noqa: E402
from entropy_kernels import backends as backends_module  # noqa: E402
from entropy_kernels import testing  # noqa: E402

FIELDS = ["backend", "B", "C", "H", "W", "bins", "window", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_extra_MiB",
          "floor_ms", "over_floor", "status"]
TARGETS = [(8, 128, 32, "11"), (8, 1024, 32, "11")]
# Small enough for the reference; reduction 'none' so the error-bound rule sees a whole map.
PARITY_CASES = [
    ((2, 3, 48, 40), dict(bins=32, window=11, reduction="none")),
    ((1, 1, 33, 29), dict(bins=17, window=(1, 3, 5), divergence="hellinger", kernel="gaussian", reduction="none")),
    ((2, 3, 20, 24), dict(bins=64, window=31, reduction="none")),
    ((1, 3, 30, 26), dict(bins=20, window="global", reduction="none")),
]
ATOMICS_SHAPE = (8, 3, 64, 64)
NAIVE_PEAK_TENSORS = 28  # peak of the materialising reference in units of B*C*H*W*L^2 floats (docs/results.md)


def chip_rates():
    """FP32 FMA/s, MUFU op/s and DRAM bytes/s of GPU 0, for the floor (docs/triton.md)."""
    props = torch.cuda.get_device_properties(0)
    try:
        mhz = float(subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
                                   capture_output=True, text=True, timeout=20).stdout.split()[0])
    except Exception:  # noqa: BLE001 - fall back to the H100 SXM boost clock
        mhz = 1980.0
    hz = mhz * 1e6
    name = props.name
    dram = 3.35e12 if "H100" in name and "PCIe" not in name else (4.8e12 if "H200" in name else 2.0e12)
    # Hopper SM: 128 FP32 lanes and 16 MUFU lanes per clock.
    return dict(fma=props.multi_processor_count * 128 * hz, mufu=props.multi_processor_count * 16 * hz, dram=dram,
                sm_mhz=mhz, sms=props.multi_processor_count)


def floor_ms(batch, channels, height, width, bins, sides, rates):
    """Lower bound for forward+backward of the fused loss ('same' padding), per docs/triton.md."""
    total = 0.0
    windows = batch * channels * height * width
    for s in sides:
        fma = windows * (10 * s + 2) * bins * bins
        mufu = windows * 3 * bins * bins
        dram = windows * 48
        total += max(fma / rates["fma"], mufu / rates["mufu"], dram / rates["dram"])
    return total * 1e3


def window_arg(text):
    sides = tuple(int(s) for s in text.split(","))
    return sides[0] if len(sides) == 1 else sides


def add_case_arguments(parser):
    """--batch, --channels, --size, --bins, --window of one case, by default the issue's first target
    (B=8, C=3, 128^2, bins 32, window 11)."""
    batch, size, bins, window = TARGETS[0]
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--bins", type=int, default=bins)
    parser.add_argument("--window", type=int, default=int(window))


def make_inputs(batch, channels, height, width, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(batch, channels, height, width, generator=gen, dtype=dtype).cuda().requires_grad_()
    target = torch.rand(batch, channels, height, width, generator=gen, dtype=dtype).cuda()
    return pred, target


def loss_fn(pred, target, backend, bins, window, **kwargs):
    def run():
        return ek.spatial_entropy_loss(pred, target, bins=bins, window=window, backend=backend,
                                       generator=torch.Generator().manual_seed(1), **kwargs)
    return run


def parity(log, backend="triton"):
    """A backend vs the float64 reference on small cases: float64 to 1e-9 of the largest value (stricter than
    entropy_kernels.testing's tolerance: an alarm on these cases), float32 by entropy_kernels.testing's rule."""
    ok = True
    for shape, kwargs in PARITY_CASES:
        refused = backends_module.not_supported_reasons(backend, torch.device("cuda"), torch.float32, kwargs["bins"])
        if refused:
            log(f"parity {backend} {shape} {kwargs}: not run, the backend refuses it ({'; '.join(refused)})")
            continue
        pred64, target64 = make_inputs(*shape, seed=2, dtype=torch.float64)
        pred64 = pred64.detach().float().double().requires_grad_()
        target64 = target64.float().double()
        results = {}
        for name, backend, dtype in (("exact", "reference", torch.float64), ("ref32", "reference", torch.float32),
                                     ("tri32", backend, torch.float32), ("tri64", backend, torch.float64)):
            pred = pred64.detach().to(dtype).requires_grad_()
            value = loss_fn(pred, target64.to(dtype), backend, **kwargs)()
            grad_out = torch.linspace(0.5, 1.5, value.numel(), device=value.device, dtype=dtype).reshape(value.shape)
            (grad,) = torch.autograd.grad(value, pred, grad_out)
            results[name] = (value.double(), grad.double())
        exact = results["exact"]
        err = {k: [(a - e).norm().item() for a, e in zip(v, exact)] for k, v in results.items()}
        rel64 = max((a - e).abs().max().item() / max(e.abs().max().item(), 1e-300)
                    for a, e in zip(results["tri64"], exact))
        rule = not any(testing.float32_rule_violation(t, r, e, backend)
                       for t, r, e in zip(results["tri32"], results["ref32"], exact))
        case_ok = rel64 < 1e-9 and rule
        ok &= case_ok
        log(f"parity {backend} {shape} {kwargs}: float64 max rel err {rel64:.1e}; float32 RMS err (loss, grad) triton "
            f"{err['tri32'][0]:.2e}, {err['tri32'][1]:.2e} vs reference {err['ref32'][0]:.2e}, {err['ref32'][1]:.2e}"
            f" -> {'PASS' if case_ok else 'FAIL'}")
    pred, target = make_inputs(*ATOMICS_SHAPE, seed=3)
    grads = [torch.autograd.grad(loss_fn(pred, target, backend, 32, 11)(), pred)[0] for _ in range(3)]
    spread = max((g - grads[0]).abs().max().item() for g in grads) / grads[0].abs().max().item()
    log(f"atomics {backend}: max relative run-to-run gradient difference {spread:.1e} (rounding only expected)")
    return ok


def measure(backend, batch, channels, size, bins, window, single_shot_s, rates):
    row = dict(backend=backend, B=batch, C=channels, H=size, W=size, bins=bins, window=window)
    row["floor_ms"] = floor_ms(batch, channels, size, size, bins, [int(s) for s in window.split(",")], rates)
    naive_bytes = NAIVE_PEAK_TENSORS * batch * channels * size * size * bins * bins * 4
    if backend == "reference" and naive_bytes > torch.cuda.get_device_properties(0).total_memory:
        row["status"] = f"OOM (predicted {naive_bytes / 2**30:.0f} GiB)"
        return row
    pred = target = None
    try:
        pred, target = make_inputs(batch, channels, size, size)
        run = loss_fn(pred, target, backend, bins, window_arg(window))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(run(), pred)  # also compiles the kernels for a new shape class
        torch.cuda.synchronize()
        row["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20

        def step():
            torch.autograd.grad(run(), pred)

        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        once = time.perf_counter() - start

        if once > single_shot_s:
            def timed(fn):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                return begin.elapsed_time(end)
            row["fwd_ms"] = timed(run)
            row["fwd_bwd_ms"] = timed(step)
            loss = run()
            row["bwd_ms"] = timed(lambda: torch.autograd.grad(loss, pred))
            row["status"] = "ok (single run)"
        else:
            row["fwd_ms"] = do_bench(run, return_mode="median")
            row["fwd_bwd_ms"] = do_bench(step, return_mode="median")
            loss = run()
            row["bwd_ms"] = do_bench(lambda: torch.autograd.grad(loss, pred, retain_graph=True), return_mode="median")
            row["status"] = "ok"
        if backend != "reference":
            row["over_floor"] = row["fwd_bwd_ms"] / row["floor_ms"]
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as exc:  # noqa: BLE001 - a failing case is a row of the table, not the end of the sweep
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    finally:
        del pred, target
        torch.cuda.empty_cache()
    return row


def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def write(out, rows, lines):
    """gpu_sweep.csv, .md and .log under out; returns the Markdown table's lines."""
    with open(out / "gpu_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in FIELDS})
    table = ["| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    done = [r for r in rows if not str(r.get("status", "")).startswith("skipped")]
    table += ["| " + " | ".join(fmt(r.get(k)) for k in FIELDS) + " |" for r in done]
    if len(done) < len(rows):
        table.append(f"\n{len(rows) - len(done)} rows skipped (time budget); the CSV lists them.")
    (out / "gpu_sweep.md").write_text("\n".join(lines[:2] + [""] + table) + "\n")
    (out / "gpu_sweep.log").write_text("\n".join(lines) + "\n")
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the two target cases of the issue")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting new cases after this")
    parser.add_argument("--single-shot-s", type=float, default=1.0)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--backends", nargs="+", default=["reference", "triton", "cuda"],
                        help="backends to time (unavailable ones are reported and left out)")
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench_out")))
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "unknown"
        except Exception:  # noqa: BLE001
            commit = "unknown"
    rates = chip_rates()
    log(f"# {torch.cuda.get_device_name(0)} ({rates['sms']} SMs, max SM clock {rates['sm_mhz']:.0f} MHz), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}, commit {commit}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    log(f"floor rates: FP32 FMA {rates['fma']:.3g}/s, MUFU {rates['mufu']:.3g}/s, DRAM {rates['dram']:.3g} B/s")
    backends = []
    for backend in args.backends:
        reasons = backends_module.not_supported_reasons(backend, torch.device("cuda"), torch.float32, 64)
        if reasons:
            log(f"backend {backend} left out: {'; '.join(reasons)}")
        else:
            backends.append(backend)
    ok = True
    for backend in backends:
        if backend != "reference":
            try:
                ok &= parity(log, backend)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next backend
                ok = False
                log(f"parity {backend} FAILED to run: {type(exc).__name__}: {exc}")

    cases = list(TARGETS)
    if not args.quick:
        sweep = [(b, s, L, w) for s in (64, 128, 256, 512, 1024) for L in (16, 32, 64) for b in (1, 8)
                 for w in ("11", "1,3,5")]
        cases += [c for c in sweep if c not in cases]
    rows = []
    for batch, size, bins, window in cases:
        for backend in backends:
            if time.monotonic() > deadline:
                row = dict(backend=backend, B=batch, C=3, H=size, W=size, bins=bins, window=window,
                           status="skipped (time budget)")
            else:
                row = measure(backend, batch, 3, size, bins, window, args.single_shot_s, rates)
            rows.append(row)
            log(" ".join(f"{k}={fmt(row.get(k))}" for k in FIELDS))
        case_rows = dict(zip(backends, rows[-len(backends):]))
        ref = case_rows.get("reference", {})
        for backend, row in case_rows.items():
            if backend != "reference" and ref.get("fwd_bwd_ms") and row.get("fwd_bwd_ms"):
                log(f"  {backend} speed-up fwd+bwd {ref['fwd_bwd_ms'] / row['fwd_bwd_ms']:.1f}x")
        write(out, rows, lines)  # after every case, so a run cut short keeps what it measured
    print("\n".join(write(out, rows, lines)))
    print(f"parity {'PASS' if ok else 'FAIL'}; wrote {out}/gpu_sweep.csv, gpu_sweep.md, gpu_sweep.log")
    return 0 if ok else 1


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_sweep.py needs a CUDA GPU")
    sys.exit(main())
