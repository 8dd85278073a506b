"""Entropy loss against l1: the same small IR-SDE trained both ways, scored on held-out photographs.

    python benchmarks/ablation.py                      # CPU size: 3 arms x 3 seeds, ~27 min on 2 cores
    python benchmarks/ablation.py --long               # GPU size: paper's crop/batch, longer runs

For every seed, `python -m train fit` trains the same network from the same initialisation on
the same crops (the seed fixes both) with `loss.weights={l1: 1}`, with `loss.weights={entropy: 1}`
and with both at 1:1 (the default arms; --arms picks others, among them `entropy-released`, the
released code's window=(1, 3, 5), Hellinger and N(0, 1) neighbour weights); only the loss differs. The network
is preconditioned (`model.sigma_data`, as the demo; --sigma-data 0 trains the paper's plain one).
Training data is the train package's demo set: low-light pairs synthesised from scikit-image
photographs. `python -m train evaluate` then
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

sys.path.insert(1, str(ROOT))  # the train package, when run as a script from anywhere

# The training loss of each arm (the train config's `loss` section); everything else is shared.
# 'entropy-noclamp' separates one effect: with clamp=True (the default) pixels outside [0, 1] get no
# gradient, and in IR-SDE training on dark images a quarter of x*_{t-1} is below 0 at large t.
ARMS = {
    "l1": {"weights": {"l1": 1.0}},
    "entropy": {"weights": {"entropy": 1.0}},
    "entropy-noclamp": {"weights": {"entropy": 1.0}, "entropy": {"clamp": False}},
    "l1+entropy": {"weights": {"l1": 1.0, "entropy": 1.0}},
    "l1+entropy-noclamp": {"weights": {"l1": 1.0, "entropy": 1.0}, "entropy": {"clamp": False}},
    # The released code's own setting (docs/spec.md, "What the released code did differently"): the
    # closest this library comes to it; the 'entropy' arm is the paper's setting (the loss's defaults).
    "entropy-released": {"weights": {"entropy": 1.0},
                         "entropy": {"window": [1, 3, 5], "divergence": "hellinger", "neighbor_weights": "randn"}},
}
DEFAULT_ARMS = ("l1", "entropy", "l1+entropy")
HELDOUT_VERSION = "1"
MATE_NATURE = Path("/usr/share/backgrounds/mate/nature")
# Sizes: CPU fits 30 minutes on 2 shared cores; --long is the paper's crop and batch for a GPU.
# sigma_data: the noise network's preconditioning (the train config's model.sigma_data; 0 gives the
# paper's plain noise network), as in the demo preset (train/presets/demo.yaml).
PROFILES = {
    "cpu": dict(steps=1000, crop=32, batch=4, bins=32, window=11, lr=1e-3, sample_steps=100, heldout_side=160,
                extra_photos=5, niqe=False, sigma_data=0.3),
    "long": dict(steps=5000, crop=128, batch=8, bins=32, window=11, lr=5e-4, sample_steps=100, heldout_side=400,
                 extra_photos=12, niqe=True, sigma_data=0.3),
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

def entropy_backend(name: str, bins: int, device: str) -> str:
    """The backend `name` resolves to; importing it here builds a JIT extension once, before
    parallel runs would each wait for it."""
    import torch

    from entropy_kernels import backends

    return backends.select(name, torch.device(device), torch.float32, bins).__name__.rsplit(".", 1)[-1]


def _yaml_flow(mapping: dict) -> str:
    return "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in mapping.items()) + "}"


def fit_overrides(arm: str, seed: int, run_dir: Path, p: dict) -> list:
    entropy = {"bins": p["bins"], "window": p["window"], "backend": p["entropy_backend"],
               **ARMS[arm].get("entropy", {})}
    return [
        f"seed={seed}", f"out_dir={run_dir}", "data.layout=demo", f"data.crop={p['crop']}",
        f"data.batch_size={p['batch']}", "model.preset=tiny", f"model.sigma_data={p['sigma_data'] or 'null'}",
        f"loss.weights={_yaml_flow(ARMS[arm]['weights'])}",
        f"loss.entropy={_yaml_flow(entropy)}", f"train.steps={p['steps']}",
        f"train.lr={p['lr']}", "train.lr_min=1.0e-6", "train.ema=0.99", f"train.log_every={max(1, p['steps'] // 50)}",
        "train.val_every=0", f"train.checkpoint_every={p['steps']}", f"train.threads={p['threads']}",
        f"sample.steps={p['sample_steps']}", "evaluate_at_end=false",
    ]


def child_env(threads: int, cache=None) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if cache is not None:
        env["ENTROPY_KERNELS_CACHE"] = str(cache)
    return env


def metrics_cache(out: Path, niqe: bool) -> Path:
    """A cache root for the runs: the demo set and the LPIPS weights of the user cache, and the NIQE
    parameters only when asked (NIQE needs many 96-px patches: on the CPU profile's 160-px images its
    covariance is singular and train's niqe fails with 'SVD did not converge')."""
    from train.data import cache_dir
    from train.metrics import LPIPS_FILE, NIQE_FILE

    root = (out / "cache").resolve()
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    links = {root / "demo": cache_dir("demo")}
    for name in (LPIPS_FILE, NIQE_FILE) if niqe else (LPIPS_FILE,):
        links[root / "metrics" / name] = cache_dir("metrics", name)
    for link, target in links.items():
        if target.exists() and not link.exists():
            link.symlink_to(target.resolve())
    return root


def finished_training(run_dir: Path, overrides: list):
    """Seconds a finished earlier run of exactly this configuration took, or None (then train it)."""
    import torch

    from train.config import load_config

    try:
        state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        with open(run_dir / "log.jsonl") as fh:
            seconds = [json.loads(line)["train_seconds"] for line in fh if "train_seconds" in line]
    except (OSError, RuntimeError, KeyError, ValueError):
        return None
    config = load_config(None, overrides)
    if state["config"] != config or state["step"] != config["train"]["steps"] or not seconds:
        return None
    return seconds[-1]


def run_one(arm: str, seed: int, heldout: Path, out: Path, p: dict) -> dict:
    """Trains (unless an identical finished run is there; an unfinished or different one is replaced)
    and evaluates one (arm, seed); returns its record (metrics per image and mean)."""
    run_dir = out / "runs" / f"{arm}_seed{seed}"
    env = child_env(p["threads"], p.get("cache"))
    overrides = fit_overrides(arm, seed, run_dir, p)
    train_seconds = finished_training(run_dir, overrides)
    with open(out / "runs" / f"{arm}_seed{seed}.log", "a") as log:
        if train_seconds is None:
            started = time.time()
            subprocess.run([sys.executable, "-m", "train", "fit", "--overwrite", *overrides], cwd=ROOT, env=env,
                           stdout=log, stderr=subprocess.STDOUT, check=True)
            train_seconds = time.time() - started
        started = time.time()
        checkpoint = run_dir / "checkpoints" / "last.pt"
        subprocess.run([sys.executable, "-m", "train", "evaluate", "--checkpoint", str(checkpoint),
                        "--data", str(heldout), "--out", str(run_dir / "heldout"), "--seed", "0"],
                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    with open(run_dir / "heldout" / "results.json") as fh:
        result = json.load(fh)
    per_image = {row["image"]: {"input": row["input"], "output": row["output"]} for row in result["images"]}
    extra = {k: v for k, v in result.get("extra", {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return dict(arm=arm, seed=seed, train_seconds=train_seconds, eval_seconds=time.time() - started,
                final_loss=final_training_loss(run_dir), images=per_image,
                mean={**result["mean"]["output"], **extra}, input_mean=result["mean"]["input"])


def final_training_loss(run_dir: Path):
    try:
        with open(run_dir / "log.jsonl") as fh:
            losses = [json.loads(line).get("loss") for line in fh]
        return next((v for v in reversed(losses) if v is not None), None)
    except OSError:
        return None


# ---- why clamping matters: how much of the training target lies below 0 ----

def below_zero_fraction(crop: int, steps=(1, 10, 30, 60, 100), crops: int = 64, seed: int = 0) -> dict:
    """Fraction of x*_{t-1} pixels below 0 on demo training crops at several t: with clamp=True the
    entropy loss gives them no gradient."""
    import torch

    from model import IRSDE
    from train.data import RandomCrops, split_pairs

    dataset = RandomCrops(split_pairs({"layout": "demo"}, "train"), crop, crops, seed)
    low, high = (torch.stack(x) for x in zip(*(dataset[i] for i in range(crops))))
    sde, generator = IRSDE(), torch.Generator().manual_seed(seed)
    out = {}
    for t in steps:
        t_vec = torch.full((crops,), t)
        x_t, _ = sde.sample_marginal(high, low, t_vec, generator)
        out[t] = float((sde.optimal_previous(x_t, high, low, t_vec) < 0).float().mean())
    return out


# ---- statistics ----

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "niqe": False}


def summarise(runs: list, baseline: str = "l1") -> dict:
    """Per arm: mean and sample std over seeds of each metric. Per other arm: the paired difference
    arm - baseline over the seeds both ran, and the count of (seed, image) cases where it is better."""
    metrics = sorted({k for r in runs for k in r["mean"]})
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    out = {"per_arm": {}, "minus_" + baseline: {}}
    for arm in arms:
        chosen = [r for r in runs if r["arm"] == arm]
        out["per_arm"][arm] = {m: _mean_std([r["mean"][m] for r in chosen if m in r["mean"]]) for m in metrics}
        out["per_arm"][arm]["n_seeds"] = len(chosen)
    by_seed = {(r["arm"], r["seed"]): r for r in runs}
    for arm in arms:
        if arm == baseline:
            continue
        seeds = sorted(s for (a, s) in by_seed if a == arm and (baseline, s) in by_seed)
        table = {}
        for m in metrics:
            pairs = [(by_seed[arm, s], by_seed[baseline, s]) for s in seeds]
            diffs = [a["mean"][m] - b["mean"][m] for a, b in pairs if m in a["mean"] and m in b["mean"]]
            sign = 1 if HIGHER_IS_BETTER.get(m, True) else -1
            cases = [sign * (scores["output"][m] - b["images"][image]["output"][m])
                     for a, b in pairs for image, scores in a["images"].items()
                     if m in scores["output"] and image in b["images"]]
            table[m] = {**_mean_std(diffs), "better_cases": sum(c > 0 for c in cases), "cases": len(cases),
                        "higher_is_better": HIGHER_IS_BETTER.get(m, True)}
        out["minus_" + baseline][arm] = table
    return out


def _mean_std(values: list) -> dict:
    if not values:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def format_summary(summary: dict, baseline: str = "l1") -> str:
    lines = []
    for arm, stats in summary["per_arm"].items():
        cells = [f"{m} {v['mean']:.4f} +- {v['std']:.4f}" for m, v in stats.items() if isinstance(v, dict)]
        lines.append(f"{arm:>15} ({stats['n_seeds']} seeds): " + ", ".join(cells))
    for arm, table in summary["minus_" + baseline].items():
        for m, v in table.items():
            per_image = f"; better in {v['better_cases']}/{v['cases']} (seed, image) cases" if v["cases"] else ""
            lines.append(f"{arm} - {baseline} {m}: {v['mean']:+.4f} +- {v['std']:.4f} over {v['n']} seeds{per_image}"
                         f" ({'higher' if v['higher_is_better'] else 'lower'} is better)")
    return "\n".join(lines)


def write_outputs(out: Path, record: dict) -> None:
    with open(out / "ablation.json", "w") as fh:
        json.dump(record, fh, indent=1)
    metrics = sorted({k for r in record["runs"] for k in r["mean"]})
    with open(out / "ablation.csv", "w", newline="") as fh:
        fh.write("# " + json.dumps(record["environment"]) + "\n")
        writer = csv.writer(fh)
        writer.writerow(["arm", "seed", *metrics, "train_seconds", "eval_seconds", "final_loss"])
        for r in record["runs"]:
            writer.writerow([r["arm"], r["seed"], *(r["mean"].get(m, "") for m in metrics),
                             round(r["train_seconds"], 1), round(r["eval_seconds"], 1), r["final_loss"]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="the GPU-sized profile instead of the CPU one")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    for key, value in PROFILES["cpu"].items():
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(value, bool) else dict(type=type(value))
        parser.add_argument("--" + key.replace("_", "-"), **kind,
                            help=f"default {value} ({PROFILES['long'][key]} with --long)")
    parser.add_argument("--entropy-backend", default="auto", help="backend of the entropy loss (auto: cpp on CPU)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--heldout", help="held-out pairs folder (default: made under the cache)")
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "ablation"))
    parser.add_argument("--below-zero", action="store_true",
                        help="only print the fraction of training targets x*_{t-1} below 0 per t, and exit")
    args = parser.parse_args(argv)
    if args.below_zero:
        crop = args.crop or PROFILES["cpu"]["crop"]
        for t, fraction in below_zero_fraction(crop).items():
            print(f"t = {t:3d}: {100 * fraction:5.1f}% of x*_(t-1) below 0 (64 demo crops of {crop} px)")
        return
    profile = dict(PROFILES["long" if args.long else "cpu"])
    profile.update({k: getattr(args, k) for k in PROFILES["cpu"] if getattr(args, k) is not None})
    profile["threads"] = args.threads
    out = Path(os.environ.get("OUT") or args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    from train.data import cache_dir, make_demo_dataset

    make_demo_dataset()  # once, here: parallel runs would race to write it
    profile["cache"] = str(metrics_cache(out, profile["niqe"]))
    profile["entropy_backend"] = entropy_backend(args.entropy_backend, profile["bins"], "cuda" if args.long else "cpu")
    heldout = Path(args.heldout) if args.heldout else make_heldout_set(
        cache_dir(f"ablation-heldout-{profile['heldout_side']}-{profile['extra_photos']}"),
        profile["heldout_side"], profile["extra_photos"])
    info = dict(environment("cuda" if args.long else "cpu"), load_average=os.getloadavg(),
                command="python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    info["threads"] = args.threads  # per run; the launcher's own count is irrelevant
    print("# " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(f"# profile {profile}; held-out {sorted(p.stem for p in (heldout / 'high').glob('*.png'))}", flush=True)

    started = time.time()
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    record = dict(environment=info, profile=profile, seeds=args.seeds, arms=args.arms, loss_of_arm=ARMS,
                  heldout_dir=str(heldout), heldout=sorted(p.stem for p in (heldout / "high").glob("*.png")))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, arm, seed, heldout, out, profile) for arm, seed in jobs]
        runs, failed = [], []
        for (arm, seed), future in zip(jobs, futures):
            try:
                run = future.result()
            except subprocess.CalledProcessError as exc:  # one broken run must not lose the others
                failed.append(dict(arm=arm, seed=seed, error=str(exc)))
                print(f"{arm:>15} seed {seed}: FAILED ({exc}); see runs/{arm}_seed{seed}.log", flush=True)
                continue
            runs.append(run)
            print(f"{arm:>15} seed {seed}: PSNR {run['mean']['psnr']:.3f} SSIM {run['mean']['ssim']:.4f} "
                  f"(train {run['train_seconds']:.0f} s, eval {run['eval_seconds']:.0f} s)", flush=True)
            info["wall_seconds"] = time.time() - started
            # written after every run, so an interrupted ablation keeps what it finished
            write_outputs(out, dict(record, runs=runs, failed=failed, summary=summarise(runs),
                                    complete=len(runs) == len(jobs)))
    print(format_summary(summarise(runs)))
    print(f"# wall {info['wall_seconds']:.0f} s; wrote {out / 'ablation.json'} and {out / 'ablation.csv'}")


if __name__ == "__main__":
    main()
