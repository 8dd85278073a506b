"""The largest square training crop each loss backend allows under a memory budget.

    python benchmarks/max_crop.py --device cpu --budget-gib 6 --model tiny --backends l1 reference cpp
    python benchmarks/max_crop.py --device cuda --model refusion --backends l1 reference triton cuda

A probe is one full training step of the IR-SDE (network forward, loss forward and backward,
AdamW step) at B x 3 x side x side, run in a fresh subprocess so that a probe which runs out of
memory costs only itself and its memory is measured alone:

- CPU: the increase of the child's resident set over its level after the imports, read by
  this process from /proc/<pid>/status (VmHWM, the kernel's own high-water mark) every few
  milliseconds; a child whose increase passes the budget is killed on the spot. Pages are
  faulted in at a few GB/s, so the overshoot before the kill is tens of MB at most.
- CUDA: torch.cuda.max_memory_allocated; the budget (the card's memory unless --budget-gib)
  is enforced with set_per_process_memory_fraction and an out-of-memory error fails the probe.

The side is searched on multiples of --multiple (16: the network pads to a multiple of 2^levels)
by doubling and then bisection. A side whose memory, extrapolated linearly in pixels from the
probes that fitted, exceeds 1.5 x the budget is marked over budget without running it.
Then, at the largest side and at 128 x 128, the step is timed (median of --repeats steps after
a warm-up) and so is the loss alone (forward + backward on tensors of the same shape), giving
the share of the step spent in the loss.

`l1` is not an entropy backend: it is the step with the l1 loss, the ceiling set by the network
alone. Writes max_crop_probes.csv and max_crop.csv (first line: '# ' + the environment as JSON)
under --out (or $OUT).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, environment  # noqa: E402 - the shared environment record of the benchmarks
from measure import PeakMemory, median_seconds, status_kib  # noqa: E402

sys.path.insert(1, str(ROOT))  # entropy_kernels and model, when run as a script from anywhere

GIB = 2**30
PROBE_FIELDS = ["backend", "side", "status", "peak_MiB", "step_s"]
SUMMARY_FIELDS = [
    "backend", "device", "model", "B", "bins", "window", "budget_GiB", "max_side", "searched", "peak_MiB_at_max",
    "status_at_max", "step_s_at_max", "loss_s_at_max", "loss_share_at_max", "status_128", "peak_MiB_128", "step_s_128",
    "loss_s_128", "loss_share_128",
]


# ---- inside the child: one training step ----

def make_step(case: dict):
    """(step, loss_only) closures for one backend and shape; `step` is one training step of `fit`."""
    import torch
    import torch.nn.functional as F

    import entropy_kernels as ek
    from model import IRSDE, build_network

    device = torch.device(case["device"])
    gen = torch.Generator(device=device).manual_seed(0)
    side, batch = case["side"], case["B"]
    high = torch.rand((batch, 3, side, side), generator=gen, device=device)
    low = high * 0.15
    sde = IRSDE(steps=100, device=device)
    network = build_network(case["model"]).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    amp = case["amp"] and device.type == "cuda"

    if case["backend"] == "l1":
        def loss_fn(pred, target):
            return F.l1_loss(pred, target)
    else:
        loss_gen = torch.Generator().manual_seed(0)

        def loss_fn(pred, target):
            return ek.spatial_entropy_loss(pred, target, bins=case["bins"], window=case["window"],
                                           backend=case["backend"], generator=loss_gen)

    def forward():
        t = torch.randint(1, sde.T + 1, (batch,), device=device, generator=gen)
        x_t, _ = sde.sample_marginal(high, low, t, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            noise_pred = network(x_t, low, t)
        return sde.predicted_previous(x_t, low, noise_pred.float(), t), sde.optimal_previous(x_t, high, low, t)

    def step():
        pred, target = forward()
        loss = loss_fn(pred, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    with torch.no_grad():
        pred0, target0 = forward()

    def loss_only():
        pred = pred0.detach().requires_grad_(True)
        loss_fn(pred, target0).backward()

    return step, loss_only


def run_probe(case: dict) -> dict:
    """Executed in the child. Prints 'BASE <bytes>' as soon as the imports are done, then the result."""
    import torch

    import entropy_kernels  # noqa: F401 - imported before the base line so it is not counted
    import model  # noqa: F401

    torch.set_num_threads(case["threads"])
    cuda = case["device"] == "cuda"
    if cuda:
        torch.cuda.init()
        total = torch.cuda.get_device_properties(0).total_memory
        if case["budget"] < total:
            torch.cuda.set_per_process_memory_fraction(case["budget"] / total)
    peak = PeakMemory(case["device"])
    print(f"BASE {peak.start()}", flush=True)

    try:
        step, loss_only = make_step(case)
        result = dict(status="ok", step_s=median_seconds(step, 1, cuda), peak_MiB=peak.extra() / 2**20)
        if peak.extra() > case["budget"]:
            result["status"] = "over budget"
        elif case["time"]:
            result["step_s"] = median_seconds(step, case["repeats"], cuda)
            loss_only()  # warm-up of the loss alone
            result["loss_s"] = median_seconds(loss_only, case["repeats"], cuda)
            result["loss_share"] = result["loss_s"] / result["step_s"]
    except torch.OutOfMemoryError:
        return dict(status="over budget", peak_MiB=peak.extra() / 2**20)
    return result


# ---- in the parent: probes under a watch, the search, the report ----

def watch_probe(case: dict, timeout: float, poll: float = 0.005) -> dict:
    """Runs one probe in a child; on CPU kills it once its resident set grows past the budget."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(case)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    lines, errors = [], []
    readers = [threading.Thread(target=lambda s=s, out=out: out.extend(s), daemon=True)
               for s, out in ((child.stdout, lines), (child.stderr, errors))]
    for reader in readers:
        reader.start()
    started, killed = time.monotonic(), None
    while child.poll() is None:
        if time.monotonic() - started > timeout:
            killed = f"timeout > {timeout:.0f}s"
        elif case["device"] == "cpu":
            base = next((int(ln.split()[1]) for ln in list(lines) if ln.startswith("BASE ")), None)
            try:
                hwm = status_kib("VmHWM", child.pid) * 1024
            except (OSError, RuntimeError):  # the child is exiting
                hwm = 0
            if base is not None and hwm - base > case["budget"]:
                killed = "over budget"
        if killed:
            child.kill()
            break
        time.sleep(poll)
    child.wait()
    for reader in readers:
        reader.join()
    if killed:
        return dict(status=killed)
    results = [ln for ln in lines if ln.startswith("{")]
    if child.returncode == 0 and results:
        return json.loads(results[-1])
    tail = ([ln.strip() for ln in errors if ln.strip()] or [f"exit {child.returncode}"])[-1]
    return dict(status=("over budget" if "out of memory" in tail.lower() else "failed: ") + tail[:160])


def predicted_bytes(fitted: list, side: int):
    """Memory at `side` extrapolated linearly in pixels from the two largest fitted (side, bytes) probes.

    None before two probes have fitted: one point cannot separate the fixed part (weights, allocator
    pools) from the part that grows with the pixels, and scaling it all would skip sides that fit."""
    if len(fitted) < 2:
        return None
    (s0, m0), (s1, m1) = sorted(fitted)[-2:]
    slope = (m1 - m0) / (s1**2 - s0**2)
    return m1 + max(slope, 0.0) * (side**2 - s1**2)


def search_max_side(fits, multiple: int = 16, max_side: int = 4096) -> int:
    """Largest multiple of `multiple` up to `max_side` with fits(side) true, by doubling then bisection.

    Assumes fitting is monotone in the side; returns 0 when even `multiple` does not fit."""
    lo, hi, side = 0, None, multiple
    while hi is None:
        side = min(side, max_side)
        if fits(side):
            lo = side
            if side == max_side:
                return lo
            side *= 2
        else:
            hi = side
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_crop(backend: str, args, probe=watch_probe) -> tuple:
    """(summary row, probe rows) for one backend."""
    budget = int(args.budget_gib * GIB) if args.budget_gib else None
    if budget is None:
        if args.device != "cuda":
            raise SystemExit("--budget-gib is required on CPU")
        import torch

        budget = torch.cuda.get_device_properties(0).total_memory
    base_case = dict(backend=backend, device=args.device, model=args.model, B=args.batch, bins=args.bins,
                     window=args.window, budget=budget, threads=args.threads, amp=args.amp, repeats=args.repeats)
    probes, fitted = [], []

    def fits(side):
        guess = predicted_bytes(fitted, side)
        if args.predict and guess is not None and guess > 1.5 * budget:
            result = dict(status=f"over budget (predicted {guess / GIB:.1f} GiB, not run)")
        else:
            result = probe(dict(base_case, side=side, time=False), args.timeout)
        probes.append(dict(backend=backend, side=side, **{k: result.get(k, "") for k in PROBE_FIELDS[2:]}))
        print(f"  {backend:>9} {side:5d}  {result['status']:<40} peak {result.get('peak_MiB', float('nan')):9.1f} MiB"
              f"  step {result.get('step_s', float('nan')):8.3f} s", flush=True)
        if result["status"] == "ok":
            fitted.append((side, result["peak_MiB"] * 2**20))
        return result["status"] == "ok"

    best = args.time_at or search_max_side(fits, args.multiple, args.max_side)
    row = dict(backend=backend, device=args.device, model=args.model, B=args.batch, bins=args.bins,
               window=args.window, budget_GiB=round(budget / GIB, 2), max_side=best, searched=not args.time_at,
               peak_MiB_at_max=dict(fitted)[best] / 2**20 if best in dict(fitted) else "")
    for side, suffix in ((best, "at_max"), (128, "128")):
        if side == 0:
            continue
        if suffix == "128" and best == 128:  # timed just above (--time-at 128)
            for key in ("status", "step_s", "loss_s", "loss_share"):
                if f"{key}_at_max" in row:
                    row[f"{key}_128"] = row[f"{key}_at_max"]
            row["peak_MiB_128"] = row["peak_MiB_at_max"]
            continue
        # The timing run repeats the step and also runs the loss alone, which holds a little more
        # memory than the single step that decided the fit: it may go 50% over before it is stopped.
        timing = dict(base_case, side=side, time=True, budget=budget * (1.5 if suffix == "at_max" else 1))
        result = probe(timing, args.timeout)
        row[f"status_{suffix}"] = result["status"]
        if suffix == "128" or not row["peak_MiB_at_max"]:
            row[f"peak_MiB_{suffix}"] = result.get("peak_MiB", "")
        if result["status"] == "ok":
            for key in ("step_s", "loss_s", "loss_share"):
                row[f"{key}_{suffix}"] = result[key]
    return row, probes


def unavailable(backend: str, args) -> str:
    """Why a backend cannot run here ('' when it can); importing it here also JIT-builds it once,
    outside the timed probes."""
    if backend == "l1":
        return ""
    import torch

    from entropy_kernels import backends

    return "; ".join(backends.not_supported_reasons(backend, torch.device(args.device), torch.float32, args.bins))


def format_summary(rows: list) -> str:
    def cell(row, key, fmt):
        value = row.get(key, "")
        return format(value, fmt) if isinstance(value, (int, float)) and value != "" else "-"

    lines = [f"{'backend':>9} {'max side':>8} {'peak MiB':>9} {'step s':>8} {'loss s':>8} {'loss %':>7} | "
             f"{'128: step s':>11} {'loss s':>8} {'loss %':>7}  status 128"]
    for r in rows:
        share_max = r["loss_share_at_max"] * 100 if isinstance(r.get("loss_share_at_max"), float) else ""
        share_128 = r["loss_share_128"] * 100 if isinstance(r.get("loss_share_128"), float) else ""
        lines.append(
            f"{r['backend']:>9} {r['max_side']:8d} {cell(r, 'peak_MiB_at_max', '9.1f')} "
            f"{cell(r, 'step_s_at_max', '8.3f')} "
            f"{cell(r, 'loss_s_at_max', '8.3f')} {cell({'v': share_max}, 'v', '7.1f')} | "
            f"{cell(r, 'step_s_128', '11.3f')} {cell(r, 'loss_s_128', '8.3f')} {cell({'v': share_128}, 'v', '7.1f')}"
            f"  {r.get('status_128', '-')}")
    return "\n".join(lines)


def write_csv(path: Path, info: dict, fields: list, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        fh.write("# " + json.dumps(info) + "\n")
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["l1", "reference", "cpp"],
                        help="entropy backends, and 'l1' for the network-only ceiling")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budget-gib", type=float, help="memory budget (CPU: required; CUDA: default the card's)")
    parser.add_argument("--model", default="tiny", help="network preset: tiny, refusion, paper")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bins", type=int, default=32)
    parser.add_argument("--window", type=int, default=11)
    parser.add_argument("--multiple", type=int, default=16)
    parser.add_argument("--max-side", type=int, default=2048)
    parser.add_argument("--time-at", type=int, help="skip the search: time at this side (found by an earlier run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median) after a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in each probe")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast of the network on CUDA, as `fit` does")
    parser.add_argument("--predict", action=argparse.BooleanOptionalAction, default=True,
                        help="skip sides extrapolated to exceed 1.5 x the budget")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per probe")
    parser.add_argument("--out", default=str(ROOT / "bench_out"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_probe(json.loads(args.child))), flush=True)
        return
    info = dict(environment(args.device), load_average=os.getloadavg(), threads=args.threads,
                command="python benchmarks/max_crop.py " + " ".join(argv or sys.argv[1:]))
    print("# " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    out = Path(os.environ.get("OUT") or args.out)
    rows, probes = [], []
    for backend in args.backends:
        reasons = unavailable(backend, args)
        if reasons:
            print(f"  {backend:>9} unavailable: {reasons}", flush=True)
            rows.append(dict(backend=backend, device=args.device, max_side=0, status_128=f"unavailable: {reasons}"))
            continue
        row, backend_probes = max_crop(backend, args)
        rows.append(row)
        probes.extend(backend_probes)
        # written after every backend, so an interrupted run keeps the backends it finished
        write_csv(out / "max_crop.csv", info, SUMMARY_FIELDS, rows)
        write_csv(out / "max_crop_probes.csv", info, PROBE_FIELDS, probes)
    print(format_summary(rows))
    print(f"# wrote {out / 'max_crop.csv'} and {out / 'max_crop_probes.csv'}")


if __name__ == "__main__":
    main()
