"""Entropy loss against l1: the same small IR-SDE trained both ways, scored on held-out photographs.

    python benchmarks/ablation.py                      # CPU size: 3 seeds, ~30 min on 2 loaded cores
    python benchmarks/ablation.py --long               # GPU size: paper's crop/batch, longer runs

For every seed, `python -m train fit` trains the same network from the same initialisation on
the same crops (the seed fixes both) once with `loss.weights={l1: 1}` and once with
`loss.weights={entropy: 1}`; only the loss differs. Training data is the train package's demo
set: low-light pairs synthesised from scikit-image photographs. `python -m train evaluate` then
enhances a held-out set of photographs that no run trained on: the demo set's test split
(chelsea, coffee), matplotlib's grace_hopper and, where the Debian package mate-backgrounds is
installed, its nature photographs, all synthesised to low light the same way, with a fixed seed.
PSNR and SSIM always; LPIPS and NIQE when `train` reports them (their weights fetched).

Runs go two at a time (--jobs) with one thread each: on a shared 2-core machine one-thread
processes are several times faster than two-thread ones that fight over the cores.
Writes ablation.json (everything, per image), ablation.csv (one row per run) and each run's
outputs under --out; benchmarks/plots.py makes the figures.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, environment  # noqa: E402 - the shared environment record of the benchmarks

LOSSES = ("l1", "entropy")
HELDOUT_VERSION = "1"
MATE_NATURE = Path("/usr/share/backgrounds/mate/nature")
# Sizes: CPU fits 30 minutes on 2 shared cores; --long is the paper's crop and batch for a GPU.
PROFILES = {
    "cpu": dict(steps=600, crop=32, batch=4, bins=16, window=5, lr=1e-3, sample_steps=100, heldout_side=160,
                extra_photos=5),
    "long": dict(steps=20000, crop=128, batch=8, bins=32, window=11, lr=1e-4, sample_steps=100, heldout_side=400,
                 extra_photos=12),
}


# ---- held-out photographs ----

def heldout_photos(extra: int) -> dict:
    """name -> sRGB uint8 photograph, none of them in the demo training split."""
    from PIL import Image
    import matplotlib.cbook

    from train.data import DEMO_TEST, DEMO_TRAIN

    import skimage.data

    photos = {name: getattr(skimage.data, name)()[..., :3] for name in DEMO_TEST}
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        photos["grace_hopper"] = np.asarray(Image.open(fh).convert("RGB"))
    if MATE_NATURE.is_dir():
        for path in sorted(MATE_NATURE.glob("*.jpg"))[:extra]:
            with Image.open(path) as img:
                img.draft("RGB", (1024, 1024))  # JPEG decodes at a reduced scale: these are up to 2560 px
                photos[path.stem] = np.asarray(img.convert("RGB"))
    assert not set(photos) & set(DEMO_TRAIN)
    return photos


def make_heldout_set(root: Path, side: int, extra: int) -> Path:
    """Writes low/ and high/ PNG pairs (longest side `side`) under root once; returns root."""
    import torch
    from PIL import Image

    from train.data import synthesise_low_light, write_image

    marker = root / f".complete-v{HELDOUT_VERSION}"
    if marker.exists():
        return root
    rng = np.random.default_rng(20261126)
    for name, photo in heldout_photos(extra).items():
        img = Image.fromarray(photo)
        scale = side / max(img.size)
        high = np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS))
        low = synthesise_low_light(high, rng)
        for folder, array in (("high", high), ("low", low)):
            write_image(root / folder / f"{name}.png", torch.from_numpy(np.array(array)).permute(2, 0, 1) / 255)
    marker.touch()
    return root


# ---- one run: train, then evaluate ----

def fit_overrides(loss: str, seed: int, run_dir: Path, p: dict) -> list:
    return [
        f"seed={seed}", f"out_dir={run_dir}", "data.layout=demo", f"data.crop={p['crop']}",
        f"data.batch_size={p['batch']}", "model.preset=tiny", f"loss.weights={{{loss}: 1.0}}",
        f"loss.entropy={{bins: {p['bins']}, window: {p['window']}}}", f"train.steps={p['steps']}",
        f"train.lr={p['lr']}", "train.lr_min=1.0e-6", "train.ema=0.99", f"train.log_every={max(1, p['steps'] // 50)}",
        "train.val_every=0", f"train.checkpoint_every={p['steps']}", f"train.threads={p['threads']}",
        f"sample.steps={p['sample_steps']}", "evaluate_at_end=false",
    ]


def child_env(threads: int) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run_one(loss: str, seed: int, heldout: Path, out: Path, p: dict) -> dict:
    """Trains and evaluates one (loss, seed); returns its record (metrics per image and mean)."""
    run_dir = out / "runs" / f"{loss}_seed{seed}"
    env = child_env(p["threads"])
    log = open(out / "runs" / f"{loss}_seed{seed}.log", "w")
    started = time.time()
    subprocess.run([sys.executable, "-m", "train", "fit", *fit_overrides(loss, seed, run_dir, p)], cwd=ROOT, env=env,
                   stdout=log, stderr=subprocess.STDOUT, check=True)
    trained = time.time()
    subprocess.run([sys.executable, "-m", "train", "evaluate", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"),
                    "--data", str(heldout), "--out", str(run_dir / "heldout"), "--seed", "0"],
                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    log.close()
    with open(run_dir / "heldout" / "results.json") as fh:
        result = json.load(fh)
    per_image = {row["image"]: {"input": row["input"], "output": row["output"]} for row in result["images"]}
    extra = {k: v for k, v in result.get("extra", {}).items() if isinstance(v, (int, float))}
    return dict(loss=loss, seed=seed, train_seconds=trained - started, eval_seconds=time.time() - trained,
                final_loss=final_training_loss(run_dir), images=per_image,
                mean={**result["mean"]["output"], **extra}, input_mean=result["mean"]["input"])


def final_training_loss(run_dir: Path):
    try:
        with open(run_dir / "log.jsonl") as fh:
            losses = [json.loads(line).get("loss") for line in fh]
        return next((v for v in reversed(losses) if v is not None), None)
    except OSError:
        return None


# ---- statistics ----

def summarise(runs: list) -> dict:
    """Per loss: mean and sample std over seeds of each metric; and the paired entropy - l1
    difference per seed, with the count of (seed, image) cases where entropy is better."""
    higher_better = {"psnr": True, "ssim": True, "lpips": False, "niqe": False}
    metrics = sorted({k for r in runs for k in r["mean"]})
    out = {"per_loss": {}, "entropy_minus_l1": {}}
    for loss in LOSSES:
        chosen = [r for r in runs if r["loss"] == loss]
        out["per_loss"][loss] = {m: _mean_std([r["mean"][m] for r in chosen if m in r["mean"]]) for m in metrics}
        out["per_loss"][loss]["n_seeds"] = len(chosen)
    by_seed = {(r["loss"], r["seed"]): r for r in runs}
    seeds = sorted({s for (loss, s) in by_seed if ("l1", s) in by_seed and ("entropy", s) in by_seed})
    for m in metrics:
        diffs = [by_seed["entropy", s]["mean"][m] - by_seed["l1", s]["mean"][m] for s in seeds
                 if m in by_seed["entropy", s]["mean"] and m in by_seed["l1", s]["mean"]]
        wins = total = 0
        for s in seeds:
            for image, scores in by_seed["entropy", s]["images"].items():
                other = by_seed["l1", s]["images"].get(image)
                if other is None or m not in scores["output"]:
                    continue
                delta = scores["output"][m] - other["output"][m]
                wins += (delta > 0) if higher_better.get(m, True) else (delta < 0)
                total += 1
        out["entropy_minus_l1"][m] = {**_mean_std(diffs), "entropy_better_cases": wins, "cases": total,
                                      "higher_is_better": higher_better.get(m, True)}
    return out


def _mean_std(values: list) -> dict:
    if not values:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def format_summary(summary: dict) -> str:
    lines = []
    for loss, stats in summary["per_loss"].items():
        cells = [f"{m} {s['mean']:.4f} +- {s['std']:.4f}" for m, s in stats.items() if isinstance(s, dict)]
        lines.append(f"{loss:>8} ({stats['n_seeds']} seeds): " + ", ".join(cells))
    for m, s in summary["entropy_minus_l1"].items():
        lines.append(f"entropy - l1 {m}: {s['mean']:+.4f} +- {s['std']:.4f} over {s['n']} seeds; entropy better in "
                     f"{s['entropy_better_cases']}/{s['cases']} (seed, image) cases"
                     f" ({'higher' if s['higher_is_better'] else 'lower'} is better)")
    return "\n".join(lines)


def write_outputs(out: Path, record: dict) -> None:
    with open(out / "ablation.json", "w") as fh:
        json.dump(record, fh, indent=1)
    metrics = sorted({k for r in record["runs"] for k in r["mean"]})
    with open(out / "ablation.csv", "w", newline="") as fh:
        fh.write("# " + json.dumps(record["environment"]) + "\n")
        writer = csv.writer(fh)
        writer.writerow(["loss", "seed", *metrics, "train_seconds", "eval_seconds", "final_loss"])
        for r in record["runs"]:
            writer.writerow([r["loss"], r["seed"], *(r["mean"].get(m, "") for m in metrics),
                             round(r["train_seconds"], 1), round(r["eval_seconds"], 1), r["final_loss"]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="the GPU-sized profile instead of the CPU one")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    for key, value in PROFILES["cpu"].items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), help=f"default {value} ({PROFILES['long'][key]} with --long)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--heldout", help="held-out pairs folder (default: made under the cache)")
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "ablation"))
    args = parser.parse_args(argv)
    profile = dict(PROFILES["long" if args.long else "cpu"])
    profile.update({k: getattr(args, k) for k in PROFILES["cpu"] if getattr(args, k) is not None})
    profile["threads"] = args.threads
    out = Path(os.environ.get("OUT") or args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    from train.data import cache_dir

    heldout = Path(args.heldout) if args.heldout else make_heldout_set(
        cache_dir(f"ablation-heldout-{profile['heldout_side']}-{profile['extra_photos']}"),
        profile["heldout_side"], profile["extra_photos"])
    info = dict(environment("cuda" if args.long else "cpu"), load_average=os.getloadavg(),
                command="python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("# " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(f"# profile {profile}; held-out {sorted(p.stem for p in (heldout / 'high').glob('*.png'))}", flush=True)

    started = time.time()
    jobs = [(loss, seed) for seed in args.seeds for loss in LOSSES]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, loss, seed, heldout, out, profile) for loss, seed in jobs]
        runs = []
        for (loss, seed), future in zip(jobs, futures):
            run = future.result()
            runs.append(run)
            print(f"{loss:>8} seed {seed}: PSNR {run['mean']['psnr']:.3f} SSIM {run['mean']['ssim']:.4f} "
                  f"(train {run['train_seconds']:.0f} s, eval {run['eval_seconds']:.0f} s)", flush=True)
    summary = summarise(runs)
    info["wall_seconds"] = time.time() - started
    print(format_summary(summary))
    print(f"# wall {info['wall_seconds']:.0f} s")
    write_outputs(out, dict(environment=info, profile=profile, seeds=args.seeds, heldout_dir=str(heldout),
                            heldout=sorted(p.stem for p in (heldout / "high").glob("*.png")), runs=runs,
                            summary=summary))
    print(f"# wrote {out / 'ablation.json'} and {out / 'ablation.csv'}")


if __name__ == "__main__":
    main()
