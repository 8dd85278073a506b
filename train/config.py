"""Run configuration: YAML presets merged over the defaults, with `key.sub=value` overrides.

Configuration is data. Unknown keys are an error (a typo must not silently train the default),
except inside `model` (sizes passed to the network) and `loss.entropy` (keywords passed to
`entropy_kernels.spatial_entropy_loss`, validated there).
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from model.tiling import POOLINGS, check_tiling

from .presets import resolve

DEFAULTS = {
    "seed": 0,
    "out_dir": "runs/default",
    "data": {
        "layout": "demo",  # demo | lol_v1 | lol_v2_real | folders
        "root": None,  # the dataset folder of lol_v1 / lol_v2_real
        "train": None,  # folders: {low: DIR, high: DIR}
        "test": None,
        "match": "name",  # how low and high files pair up: name | order
        "crop": 128,
        "batch_size": 8,  # per process
        "workers": 0,
        "val_images": 2,  # the first test pairs, sampled at every val_every steps
    },
    "model": {"preset": "tiny"},
    "sde": {"steps": 100, "max_sigma": 50 / 255, "eps": 0.005},
    # weights of the terms compared between x_hat_{t-1} and x*_{t-1}; entropy: keywords of the loss.
    "loss": {"weights": {"entropy": 1.0}, "entropy": {}},
    "train": {
        "steps": 1000,
        "lr": 1e-4,
        "lr_min": 1e-6,
        "betas": [0.9, 0.99],
        "weight_decay": 0.0,
        "ema": 0.995,
        "amp": True,  # bfloat16 autocast, on CUDA only
        "log_every": 10,
        "val_every": 0,  # 0: no validation during training
        "checkpoint_every": 500,
        "threads": None,  # CPU threads (torch.set_num_threads); None leaves torch's choice
    },
    # tile: evaluate the network on overlapping tiles of this side (None: whole images), to bound
    # the memory of enhancing large images; tile_overlap: pixels shared by neighbouring tiles
    # (None: a quarter of the tile); tile_pooling: what the network's global pools see on a tile,
    # the image's means ('image', two passes over the tiles) or the tile's ('tile'), model/tiling.py.
    "sample": {"steps": 100, "method": "posterior", "tile": None, "tile_overlap": None, "tile_pooling": "image"},
    "evaluate_at_end": True,  # enhance the test split after training and print PSNR/SSIM
}
OPEN_SECTIONS = ("model", "loss.entropy", "loss.weights")
REPLACED = ("loss.weights",)  # a new set of terms replaces the default one, it does not add to it
LOSS_TERMS = ("entropy", "l1")


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base and prefix.rstrip(".") not in OPEN_SECTIONS:
            raise ValueError(f"unknown config key {name!r}")
        if isinstance(value, dict) and isinstance(base.get(key), dict) and name not in REPLACED:
            out[key] = _merge(base[key], value, f"{name}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """'train.steps=20' -> {'train': {'steps': 20}} (the value is read as YAML)."""
    if "=" not in text:
        raise ValueError(f"override must look like key.sub=value, got {text!r}")
    key, value = text.split("=", 1)
    out = yaml.safe_load(value)
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path=None, overrides=()) -> dict:
    """`path`: a preset name (train/presets) or a YAML file; None: the defaults alone."""
    config = DEFAULTS
    if path is not None:
        with open(resolve(path)) as f:
            config = _merge(config, yaml.safe_load(f) or {})
    for text in overrides:
        config = _merge(config, parse_override(text))
    config = normalise_loss(config)
    check_sample(config["sample"])
    return config


def check_sample(sample: dict) -> None:
    """ValueError naming the key when `sample.tile` / `sample.tile_overlap` / `sample.tile_pooling`
    cannot tile an image."""
    if sample.get("tile_pooling", "image") not in POOLINGS:
        raise ValueError(f"sample.tile_pooling must be one of {POOLINGS}, got {sample['tile_pooling']!r}")
    if sample.get("tile") is not None:
        try:
            check_tiling(sample["tile"], sample.get("tile_overlap"))
        except ValueError as exc:
            raise ValueError(f"sample.tile / sample.tile_overlap: {exc}") from None


def normalise_loss(config: dict) -> dict:
    """`loss: entropy` / `loss: l1` are shorthands for a single term of weight 1."""
    loss = config["loss"]
    if isinstance(loss, str):
        loss = {"weights": {loss: 1.0}, "entropy": {}}
    unknown = set(loss["weights"]) - set(LOSS_TERMS)
    if unknown or not loss["weights"]:
        raise ValueError(f"loss.weights must name terms among {LOSS_TERMS}, got {loss['weights']!r}")
    return {**config, "loss": loss}


def save_config(config: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
