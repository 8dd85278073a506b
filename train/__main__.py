"""Command line: entropy-sde (or python -m train) fit | enhance | evaluate | fetch-metric-weights."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import presets
from .extra import exit_without_train_extra

exit_without_train_extra()  # before the imports below need the extra

from model.tiling import POOLINGS  # noqa: E402

from .data import DataError, pair_folders  # noqa: E402

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


def _sample_cfg(parser, args, config):
    """The checkpoint's `sample` settings over the defaults (older checkpoints have no tile keys),
    with the command line's on top."""
    from .config import DEFAULTS, check_sample

    sample = {**DEFAULTS["sample"], **config["sample"]}
    for key in ("steps", "method", "tile", "tile_overlap", "tile_pooling"):
        if getattr(args, key) is not None:
            sample[key] = getattr(args, key)
    try:
        check_sample(sample)
    except ValueError as exc:
        parser.error(str(exc))
    return sample


def main(argv=None, prog=None) -> int:
    """`prog`: the name in usage lines; None is the console script's (`entropy-sde`)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    fit_p = commands.add_parser("fit", help="train an IR-SDE from a YAML config")
    fit_p.add_argument("--config", type=presets.config_argument, help=f"a preset by name ({', '.join(presets.names())}) "
                       "or a YAML file; its out_dir and data paths are relative to the working directory")
    fit_p.add_argument("--resume", help="checkpoint to continue from exactly")
    fit_p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=200")

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--checkpoint", required=True)
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

    enh = commands.add_parser("enhance", parents=[sampling], help="enhance a low-light image or folder into PNGs")
    enh.add_argument("input")
    enh.add_argument("output")

    ev = commands.add_parser("evaluate", parents=[sampling], help="PSNR/SSIM/LPIPS/NIQE on a paired folder")
    ev.add_argument("--data", required=True, help="folder with low/high (or LOL) pairs")
    ev.add_argument("--out", default=None, help="where results.json, grid.png and outputs go")

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
            from .inference import enhance_paths, load_for_sampling

            device = _device(args.device)
            network, sde, config = load_for_sampling(args.checkpoint, device)
            written = enhance_paths(network, sde, args.input, args.output, device, _sample_cfg(parser, args, config), args.seed)
            print(f"wrote {len(written)} image(s) to {args.output}")
        elif args.command == "evaluate":
            from .inference import load_for_sampling, run_evaluation

            device = _device(args.device)
            network, sde, config = load_for_sampling(args.checkpoint, device)
            out = Path(args.out or Path(args.checkpoint).parent.parent / "eval")
            run_evaluation(network, sde, evaluation_pairs(args.data), out, device, _sample_cfg(parser, args, config), args.seed)
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
    sys.exit(main(prog="python -m train"))
