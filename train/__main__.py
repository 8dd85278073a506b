"""Command line: python -m train fit | enhance | evaluate | fetch-metric-weights."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from model.tiling import POOLINGS

from .data import DataError, pair_folders

# Folder pairs that `evaluate --data DIR` recognises, tried in order (DIR itself, then LOL test splits).
EVALUATION_LAYOUTS = (("low", "high"), ("Low", "Normal"), ("low", "normal"), ("eval15/low", "eval15/high"),
                      ("Test/Low", "Test/Normal"), ("test/low", "test/high"))


def evaluation_pairs(folder) -> list:
    folder = Path(folder)
    for low, high in EVALUATION_LAYOUTS:
        if (folder / low).is_dir() and (folder / high).is_dir():
            return pair_folders(folder / low, folder / high)
    raise DataError(f"{folder} has none of the paired layouts {[f'{a}+{b}' for a, b in EVALUATION_LAYOUTS]}")


def _device(name):
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_enhancer(parser, args):
    """The Enhancer of enhance/evaluate: weights loaded, sampling settled, threads set (default: the
    run's train.threads). A file problem is a DataError (`error: <path>: ...`); a bad option a usage error."""
    from .inference import load_enhancer, set_threads

    sample = {key: getattr(args, key) for key in ("steps", "method", "tile", "tile_overlap", "tile_pooling")}
    try:
        enhancer = load_enhancer(args.checkpoint, _device(args.device), seed=args.seed, **sample)
        set_threads(args.threads, enhancer.config)
    except DataError:
        raise
    except ValueError as exc:
        parser.error(str(exc))
    return enhancer


def default_evaluation_folder(checkpoint, data) -> Path:
    """./eval/<run>_<checkpoint stem>_<data folder>: in the working directory, never in the run's
    folder (which `fit` writes, and which may be read-only or shared)."""
    checkpoint = Path(checkpoint)
    label = checkpoint.stem
    if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent.name:
        label = f"{checkpoint.parent.parent.name}_{label}"
    return Path("eval") / f"{label}_{Path(data).resolve().name}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    fit_p = commands.add_parser("fit", help="train an IR-SDE from a YAML config")
    fit_p.add_argument("--config", help="YAML preset, e.g. configs/demo.yaml")
    fit_p.add_argument("--resume", help="checkpoint to continue from exactly")
    fit_p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=200")

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--checkpoint", required=True, help="a training checkpoint (runs/<run>/checkpoints/*.pt: "
                          "only its EMA weights and config are read) or exported weights (.safetensors)")
    sampling.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's sample.steps)")
    sampling.add_argument("--method", choices=("posterior", "sde"))
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--tile", type=int, help="run the network on overlapping tiles of this side, to bound the "
                          "memory of large images (default: the checkpoint's sample.tile, whole images)")
    sampling.add_argument("--tile-overlap", type=int, help="pixels shared by neighbouring tiles (default: a quarter of the tile)")
    sampling.add_argument("--tile-pooling", choices=POOLINGS,
                          help="what the network's global pools see on a tile: the image's means (default; two "
                          "passes over the tiles per step) or the tile's (one pass)")
    sampling.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    sampling.add_argument("--threads", type=int, help="CPU threads (default: the checkpoint's train.threads, "
                          "else torch's choice; on a busy machine fewer threads can be much faster)")

    enh = commands.add_parser("enhance", parents=[sampling],
                              help="enhance a low-light image or folder (PNG, JPEG or TIFF by the output's extension)")
    enh.add_argument("input")
    enh.add_argument("output", help="an image file (.png, .jpg, .jpeg, .tif, .tiff) or a folder for <stem>.png files")
    enh.add_argument("--bits", type=int, choices=(8, 16),
                     help="bits per channel of PNG/TIFF outputs (default: the input's, 16 for 16-bit PNG/TIFF)")

    ev = commands.add_parser("evaluate", parents=[sampling], help="PSNR/SSIM/LPIPS/NIQE on a paired folder")
    ev.add_argument("--data", required=True, help="folder with low/high (or LOL) pairs")
    ev.add_argument("--out", default=None, help="where results.json, grid.png and outputs go "
                    "(default: ./eval/<run>_<checkpoint stem>_<data folder>)")

    fetch = commands.add_parser("fetch-metric-weights", help="download and convert the LPIPS and NIQE weights")
    fetch.add_argument("--cache", default=None, help="folder for the converted weights (default: the user cache)")

    args = parser.parse_args(argv)
    try:
        if args.command == "fit":
            from .config import load_config
            from .fit import fit

            summary = fit(load_config(args.config, args.overrides), resume=args.resume)
            print(json.dumps({k: summary[k] for k in ("steps", "final_loss", "train_seconds", "checkpoint")}))
        elif args.command == "enhance":
            from .inference import enhance_paths

            enhancer = _load_enhancer(parser, args)
            written = enhance_paths(enhancer, args.input, args.output, args.bits, progress=True)
            print(f"wrote {len(written)} image(s) to {args.output}")
        elif args.command == "evaluate":
            from .inference import run_evaluation

            pairs = evaluation_pairs(args.data)
            enhancer = _load_enhancer(parser, args)
            out = Path(args.out) if args.out else default_evaluation_folder(args.checkpoint, args.data)
            run_evaluation(enhancer.network, enhancer.sde, pairs, out, enhancer.device, enhancer.sample, args.seed)
            print(f"results in {out}")
        else:
            from .metrics import fetch_metric_weights

            for name, path in fetch_metric_weights(args.cache).items():
                print(f"{name}: {path}")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
