"""Figures for docs/results.md from the CSV/JSON the benchmarks write.

    python benchmarks/plots.py --max-crop docs/results/max_crop_cpu --bench docs/results/bench_cpu.csv \
        --ablation bench_out/ablation --out docs/img

- max_crop_memory.png / max_crop_time.png: peak memory and step time of one training step against
  the crop side, per loss backend (every probe of max_crop.py), the budget as a line.
- bench_loss.png: the loss alone (benchmarks/bench.py): forward+backward time and peak memory
  against the image side, per backend.
- ablation.png: held-out PSNR, SSIM (LPIPS, NIQE) of every (arm, seed) run, with mean and spread.
- ablation_grid.png: input | each arm (l1, entropy, ...) | target for a few held-out photographs (seed 0).
PNGs are kept under 300 KB (photo grids are palette-quantised when needed).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

MAX_PNG_BYTES = 300_000
COLOURS = {"reference": "tab:red", "cpp": "tab:blue", "triton": "tab:green", "cuda": "tab:purple", "l1": "tab:gray",
           "entropy": "tab:orange", "entropy-noclamp": "tab:brown", "l1+entropy": "tab:olive"}


def read_csv(path) -> tuple:
    """(environment dict from the '# {json}' first line, rows as dicts with numbers parsed)."""
    with open(path) as fh:
        first = fh.readline()
        info = json.loads(first[2:]) if first.startswith("# ") else {}
        if not first.startswith("# "):
            fh.seek(0)
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    return info, rows


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _caption(info: dict) -> str:
    # The runs' own thread count (--threads of the command), not the launching process's.
    threads = re.search(r"--threads (\d+)", info.get("command", ""))
    threads = threads.group(1) if threads else info.get("threads", "?")
    load = info.get("load_average")
    where = info.get("gpu") or (f"{info.get('cpu', '?')} CPU, {threads} thread(s) per run"
                                + (f", load average {load[0]:.1f} at start" if load else ""))
    date = str(info.get("date", "?"))[:10]
    return f"{where}, torch {info.get('torch', '?')}, {date}, commit {info.get('commit', '?')}"


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_max_crop(folders: list, out: Path) -> list:
    """Probes of one or more max_crop.py runs (same machine and budget) on one set of axes; a backend
    measured again in a later folder replaces its probes from the earlier ones."""
    probes, summary, captions = [], [], []
    for folder in folders:
        info, more = read_csv(folder / "max_crop_probes.csv")
        captions.append(f"{folder.name}: " + _caption(info))
        again = {p["backend"] for p in more}
        probes = [p for p in probes if p["backend"] not in again] + more
        summary += read_csv(folder / "max_crop.csv")[1]
    budget_mib = summary[0]["budget_GiB"] * 1024 if summary else None
    written = []
    for key, label, name in (("peak_MiB", "peak memory of one training step (MiB)", "max_crop_memory.png"),
                             ("step_s", "time of the first training step (s)", "max_crop_time.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for backend in dict.fromkeys(p["backend"] for p in probes):
            points = sorted((p["side"], p[key]) for p in probes
                            if p["backend"] == backend and p["status"] == "ok" and isinstance(p[key], float))
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o--" if backend == "l1" else "o-", color=COLOURS.get(backend), label=backend,
                        zorder=3 if backend == "l1" else 2)
            over = [p["side"] for p in probes if p["backend"] == backend and p["status"] != "ok"]
            if over and key == "peak_MiB" and budget_mib:
                ax.plot(over, [budget_mib] * len(over), "x", color=COLOURS.get(backend))
        if key == "peak_MiB" and budget_mib:
            ax.axhline(budget_mib, color="k", ls="--", lw=1, label=f"budget {budget_mib / 1024:g} GiB (x: over)")
        ax.set(xscale="log", yscale="log", xlabel="square crop side (px)", ylabel=label)
        sides = [16, 32, 64, 128, 256, 512, 1024, 2048]
        ax.set_xticks([x for x in sides if x <= max(p["side"] for p in probes)], minor=False)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        row = summary[0] if summary else {}
        ax.set_title(f"B={row.get('B', '?'):g}, bins {row.get('bins', '?'):g}, window {row.get('window', '?'):g}, "
                     f"model {row.get('model', '?')}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.text(0.01, -0.02 - 0.03 * (len(captions) - 1), "\n".join(captions), fontsize=7)
        written.append(save(fig, out / name))
    return written


def _window_text(window) -> str:
    """11.0 (a CSV number) as '11'; '1,3,5' unchanged."""
    return f"{window:g}" if isinstance(window, float) else str(window)


def plot_bench(paths: list, out: Path) -> list:
    rows = []
    for path in paths:
        info, more = read_csv(path)
        rows += more
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        ok = sorted((r["H"], r["fwd_bwd_ms"], r["peak_extra_MiB"]) for r in rows
                    if r["backend"] == backend and r["status"] == "ok")
        if not ok:
            continue
        sides, times, peaks = zip(*ok)
        axes[0].plot(sides, times, "o-", color=COLOURS.get(backend), label=backend)
        axes[1].plot(sides, peaks, "o-", color=COLOURS.get(backend), label=backend)
    first = rows[0] if rows else {}
    for ax, label in zip(axes, ("loss forward+backward (ms)", "peak memory increase (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="image side (px)", ylabel=label)
        sides_all = sorted({r["H"] for r in rows})
        ax.set_xticks(sides_all, [f"{v:g}" for v in sides_all])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"the loss alone: B={first.get('B', '?'):g}, C={first.get('C', '?'):g}, "
                 f"bins {first.get('bins', '?'):g}, "
                 f"window {_window_text(first.get('window', '?'))}", fontsize=10)
    fig.text(0.01, -0.02, _caption(info), fontsize=7)
    return [save(fig, out / "bench_loss.png")]


def plot_ablation(folder: Path, out: Path, grid_images: int) -> list:
    with open(folder / "ablation.json") as fh:
        record = json.load(fh)
    runs, info, profile = record["runs"], record["environment"], record["profile"]
    metrics = [m for m in ("psnr", "ssim", "lpips", "niqe") if any(m in r["mean"] for r in runs)]
    arms = record["arms"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.2 + 1.1 * len(arms) * len(metrics), 3.8))
    axes = np.atleast_1d(axes)
    inputs = [r["input_mean"] for r in runs]
    for ax, metric in zip(axes, metrics):
        for x, arm in enumerate(arms):
            values = [r["mean"][metric] for r in runs if r["arm"] == arm and metric in r["mean"]]
            if not values:
                continue
            ax.plot([x] * len(values), values, "o", color=COLOURS.get(arm), alpha=0.6)
            ax.errorbar(x + 0.15, np.mean(values), yerr=np.std(values, ddof=1) if len(values) > 1 else 0,
                        fmt="s", color="k", capsize=4)
        if metric in inputs[0]:
            ax.axhline(np.mean([i[metric] for i in inputs]), color="k", ls=":", lw=1, label="low-light input")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
        ax.set_xlim(-0.5, len(arms) - 0.5)
        ax.set_title(metric.upper() + (" (higher better)" if metric in ("psnr", "ssim") else " (lower better)"),
                     fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    seeds = {arm: len({r["seed"] for r in runs if r["arm"] == arm}) for arm in arms}
    seed_text = f"{seeds[arms[0]]} seeds" if len(set(seeds.values())) == 1 else \
        "seeds " + ", ".join(f"{arm} {n}" for arm, n in seeds.items()) + " (incomplete run)"
    fig.suptitle(f"held-out photographs ({len(record['heldout'])}), {seed_text}, "
                 f"{profile['steps']} steps, crop {profile['crop']}, B={profile['batch']}, "
                 f"entropy bins {profile['bins']} window {profile['window']}", fontsize=9)
    fig.text(0.01, -0.03, _caption(info), fontsize=7)
    fig.tight_layout()
    written = [save(fig, out / "ablation.png")]
    written.append(ablation_grid(record, folder, out / "ablation_grid.png", grid_images))
    return written


def ablation_grid(record: dict, folder: Path, path: Path, count: int) -> Path:
    """Rows of input | each arm | target from the first seed's runs, labelled with each tile's PSNR."""
    seed, arms = record["seeds"][0], record["arms"]
    heldout = Path(record["heldout_dir"])
    by_arm = {r["arm"]: r for r in record["runs"] if r["seed"] == seed}
    names = record["heldout"][:count]
    sizes = [Image.open(heldout / "high" / f"{name}.png").size for name in names]
    aspect = max(height / width for width, height in sizes)
    columns = len(arms) + 2
    fig, axes = plt.subplots(len(names), columns, figsize=(2 * columns, (2 * aspect + 0.3) * len(names) + 0.3),
                             squeeze=False)
    for row, name in zip(axes, names):
        first = by_arm[arms[0]]["images"][f"{name}.png"]
        tiles = [("low-light input", heldout / "low" / f"{name}.png", first["input"])]
        for arm in arms:
            tiles.append((arm, folder / "runs" / f"{arm}_seed{seed}" / "heldout" / "outputs" / f"{name}.png",
                          by_arm[arm]["images"][f"{name}.png"]["output"]))
        tiles.append(("target", heldout / "high" / f"{name}.png", None))
        for ax, (label, tile, scores) in zip(row, tiles):
            ax.imshow(np.asarray(Image.open(tile).convert("RGB")))
            ax.set_axis_off()
            ax.set_title(label + (f"  {scores['psnr']:.2f} dB" if scores else ""), fontsize=8)
    fig.suptitle(f"held-out photographs, seed {seed}", fontsize=9)
    fig.tight_layout()
    save(fig, path)
    if path.stat().st_size > MAX_PNG_BYTES:
        Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-crop", nargs="+", help="folders with max_crop.csv and max_crop_probes.csv")
    parser.add_argument("--bench", nargs="+", help="CSVs written by benchmarks/bench.py (one machine)")
    parser.add_argument("--ablation", help="folder with ablation.json and runs/")
    parser.add_argument("--grid-images", type=int, default=4)
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args(argv)
    out = Path(args.out)
    written = []
    if args.max_crop:
        written += plot_max_crop([Path(p) for p in args.max_crop], out)
    if args.bench:
        written += plot_bench([Path(p) for p in args.bench], out)
    if args.ablation:
        written += plot_ablation(Path(args.ablation), out, args.grid_images)
    for path in written:
        size = path.stat().st_size
        print(f"wrote {path} ({size / 1000:.0f} KB)" + ("  OVER 300 KB" if size > MAX_PNG_BYTES else ""))


if __name__ == "__main__":
    main()
