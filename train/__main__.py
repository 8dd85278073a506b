"""Command line: entropy-sde (or python -m train) fit | export | enhance | evaluate | fetch-metric-weights."""
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

from .config import ConfigError  # noqa: E402
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


def main(argv=None, prog=None) -> int:
    """`prog`: the name in usage lines; None is the console script's (`entropy-sde`)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    fit_p = commands.add_parser("fit", help="train an IR-SDE from a YAML config")
    fit_p.add_argument("--config", help=f"a preset by name ({', '.join(presets.names())}) or a YAML file; its "
                       "out_dir and data paths are relative to the working directory (with --resume: only the keys "
                       "that may change on resume may differ from the checkpoint's)")
    fit_p.add_argument("--resume", metavar="CKPT|auto", help="continue the run of a checkpoint exactly, with its own "
                       "config and out_dir; 'auto': continue the run in out_dir if it holds one, else start it")
    fit_p.add_argument("--overwrite", action="store_true", help="replace the run that out_dir holds")
    fit_p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=200")

    export = commands.add_parser("export", help="write a checkpoint's EMA weights and config as a safetensors file")
    export.add_argument("--checkpoint", required=True, help="a training checkpoint, e.g. runs/demo/checkpoints/best.pt")
    export.add_argument("output", help="the weights file to write, e.g. demo.safetensors")

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
            from .fit import fit

            config, resume, overwrite = fit_request(args)
            summary = fit(config, resume=resume, overwrite=overwrite)
            print(json.dumps({k: summary[k] for k in ("steps", "final_loss", "train_seconds", "checkpoint")}))
        elif args.command == "export":
            from .checkpoint import export_weights

            metadata = export_weights(args.checkpoint, args.output)
            print(f"wrote the EMA weights of step {metadata['step']} to {args.output}")
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
    except (DataError, ConfigError) as exc:
        return fail(exc)
    return 0


def fail(exc: Exception) -> int:
    """A problem the user can fix (its message names the key or path): one `error:` line, exit status 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def fit_request(args):
    """(config, checkpoint or None, overwrite) of a `fit` command line. A resumed run starts from
    the checkpoint's own config (its run folder as out_dir), with --config and overrides on top;
    fit() refuses the changes a resumed run cannot make."""
    from .checkpoint import load_training_state
    from .config import load_config

    resume, overwrite = args.resume, args.overwrite
    if resume in (None, "auto"):
        config = load_config(args.config, args.overrides)
        if resume is None:
            return config, None, overwrite
        checkpoints = Path(config["out_dir"]) / "checkpoints"
        if not (checkpoints / "last.pt").is_file():
            # Without a checkpoint the folder's log and config describe steps nothing kept: start again.
            return config, None, overwrite or not any(checkpoints.glob("*.pt"))
        resume = checkpoints / "last.pt"
    stored = load_training_state(resume, mmap=True)["config"]
    if Path(resume).parent.name == "checkpoints":
        stored = {**stored, "out_dir": str(Path(resume).parent.parent)}  # the run folder it sits in
    if args.config is not None:
        return load_config(args.config, args.overrides), resume, overwrite
    return load_config(None, args.overrides, base=stored), resume, overwrite

if __name__ == "__main__":
    sys.exit(main(prog="python -m train"))
