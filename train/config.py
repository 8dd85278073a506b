"""Run configuration: YAML presets merged over the defaults, with `key.sub=value` overrides.

Configuration is data, checked when it is loaded: unknown keys are an error naming the closest
known one (a typo must not silently train the default), values must have the type of their
default and a sensible range, `model.*` must be parameters of the network and `loss.entropy.*`
keywords the loss accepts (its own validation runs at load). Every problem is a
:class:`ConfigError` naming the key, which the command line prints as one `error:` line.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import re
from pathlib import Path

import torch
import yaml

from entropy_kernels import SpatialEntropyLoss
from model import IRSDE, PRESETS, ConditionalNAFNet, build_noise_network
from model.tiling import POOLINGS, check_tiling

from . import presets


class ConfigError(ValueError):
    """A configuration, checkpoint or run-folder problem the user can fix. `where` is the config
    key (or keys) or the path; the message reads `where: reason`."""

    def __init__(self, where, reason: str):
        self.where, self.reason = str(where), reason
        super().__init__(f"{where}: {reason}")

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
        "log_every": 10,  # also the interval of the progress lines when output is not a terminal
        "val_every": 0,  # 0: no validation during training
        "checkpoint_every": 500,  # checkpoints/last.pt
        "snapshot_every": 500,  # checkpoints/step_NNNNNNN.pt kept beside last.pt; 0: none
        "keep_snapshots": 3,  # the newest snapshots kept; null: all
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
LAYOUTS = ("demo", "lol_v1", "lol_v2_real", "folders")
# The type of a set value where the default is None.
OPTIONAL_TYPES = {"data.root": str, "data.train": dict, "data.test": dict, "train.threads": int,
                  "train.keep_snapshots": int, "sample.tile": int, "sample.tile_overlap": int}
CHOICES = {"data.layout": LAYOUTS, "data.match": ("name", "order"), "sample.method": ("posterior", "sde"),
           "sample.tile_pooling": POOLINGS}
POSITIVE = ("data.crop", "data.batch_size", "sde.steps", "sde.max_sigma", "train.steps", "train.lr",
            "train.log_every", "train.checkpoint_every", "train.threads", "train.keep_snapshots", "sample.steps")
NON_NEGATIVE = ("data.workers", "data.val_images", "train.lr_min", "train.weight_decay", "train.val_every",
                "train.snapshot_every")
# Keys a resumed run may change: how long it runs and what it reports, never what it computes.
RESUMABLE = ("out_dir", "train.steps", "train.log_every", "train.val_every", "train.checkpoint_every",
             "train.snapshot_every", "train.keep_snapshots", "train.threads", "data.workers", "data.val_images",
             "sample", "evaluate_at_end")


def _closest(name: str, known) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else f"; known keys: {', '.join(sorted(known))}"


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    if not isinstance(update, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"must be a mapping of keys, got {update!r}")
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base and prefix.rstrip(".") not in OPEN_SECTIONS:
            raise ConfigError(name, "unknown key" + _closest(name, (f"{prefix}{k}" for k in base)))
        if isinstance(value, dict) and isinstance(base.get(key), dict) and name not in REPLACED:
            out[key] = _merge(base[key], value, f"{name}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """'train.steps=20' -> {'train': {'steps': 20}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(text, f"an override needs a value: write {text}=VALUE")
    key, value = text.split("=", 1)
    try:
        out = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"value {value!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def read_yaml(path) -> dict:
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(path, f"no such config file (the presets by name are {', '.join(presets.names())})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read the config file ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML: {' '.join(str(exc).split())}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(path, f"a config file holds a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


def load_config(path=None, overrides=(), base=None) -> dict:
    """`base` (default: the defaults) with the YAML file at `path` (a preset name, see
    train/presets, or a file) and the overrides merged over it, checked (:func:`check_config`)."""
    config = DEFAULTS if base is None else _merge(DEFAULTS, base)
    if path is not None:
        try:
            path = presets.resolve(path)
        except ValueError as exc:
            raise ConfigError("--config", str(exc)) from None
        config = _merge(config, read_yaml(path))
    for text in overrides:
        config = _merge(config, parse_override(text))
    return check_config(normalise_loss(config))


def normalise_loss(config: dict) -> dict:
    """`loss: entropy` / `loss: l1` are shorthands for a single term of weight 1."""
    loss = config["loss"]
    if isinstance(loss, str):
        loss = {"weights": {loss: 1.0}, "entropy": {}}
    if not isinstance(loss, dict):
        raise ConfigError("loss", f"must be a term name {LOSS_TERMS} or a mapping, got {loss!r}")
    weights = loss["weights"]
    if not isinstance(weights, dict) or not weights or set(weights) - set(LOSS_TERMS):
        raise ConfigError("loss.weights", f"must map terms among {LOSS_TERMS} to weights, got {weights!r}")
    return {**config, "loss": loss}


# ---- checks ----

def _typed(key: str, value, expected: type):
    """`value` as the type `expected`, or a ConfigError naming the key."""
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    kinds = {float: (int, float), int: (int,), bool: (bool,), str: (str,), list: (list, tuple), dict: (dict,)}[expected]
    if isinstance(value, bool) and expected is not bool or not isinstance(value, kinds):
        names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", list: "a list",
                 dict: "a mapping"}
        raise ConfigError(key, f"must be {names[expected]}, got {value!r} ({type(value).__name__})")
    return float(value) if expected is float else value


def _check_types(config: dict, defaults: dict, prefix: str = "") -> dict:
    out = dict(config)
    for key, default in defaults.items():
        name = f"{prefix}{key}"
        if name in OPEN_SECTIONS or name == "loss":
            continue
        value = config[key]
        if isinstance(default, dict):
            out[key] = _check_types(_typed(name, value, dict), default, f"{name}.")
        elif value is not None or default is not None:
            expected = OPTIONAL_TYPES.get(name) if default is None else type(default)
            out[key] = _typed(name, value, expected)
    return out


def _get(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _blame(section: str, keys, exc: Exception) -> str:
    """The config key an error message of a section's own validation is about: the first of the
    section's keys the message names, else the section."""
    found = [(m.start(), k) for k in keys if (m := re.search(rf"\b{re.escape(str(k))}\b", str(exc)))]
    return f"{section}.{min(found)[1]}" if found else section


def check_model(model: dict, sde: dict) -> None:
    """`model.*` against the network's constructor; the network is built on the meta device."""
    parameters = {name: p.default for name, p in inspect.signature(ConditionalNAFNet.__init__).parameters.items()
                  if name != "self"}
    known = {"preset", "sigma_data", *parameters}
    for key in model:
        if key not in known:
            raise ConfigError(f"model.{key}", "not a parameter of the network" + _closest(key, known))
    if model.get("preset") not in PRESETS:
        raise ConfigError("model.preset", f"must be one of {sorted(PRESETS)}, got {model.get('preset')!r}")
    if model.get("sigma_data") is not None:
        _typed("model.sigma_data", model["sigma_data"], float)
    for key, default in parameters.items():
        if key in model:
            value = _typed(f"model.{key}", model[key], list if isinstance(default, tuple) else type(default))
            least = 0 if key.endswith("blocks") else 1  # a stage may have no blocks; a width may not be 0
            if any(isinstance(n, bool) or not isinstance(n, int) or n < least for n in (value if isinstance(value, list) else [value])):
                raise ConfigError(f"model.{key}", f"must be {'integers' if isinstance(value, list) else 'an integer'} "
                                  f">= {least}, got {value!r}")
    try:
        schedule = IRSDE(**sde)
        with torch.device("meta"):
            build_noise_network(model, schedule)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(_blame("model", model, exc), str(exc).replace("model.sigma_data ", "")) from None


def check_entropy_loss(entropy: dict) -> None:
    """`loss.entropy.*` through the loss's own validation, reported under the config key."""
    if not isinstance(entropy, dict):
        raise ConfigError("loss.entropy", f"must be a mapping of the loss's keywords, got {entropy!r}")
    try:
        SpatialEntropyLoss(**entropy)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_blame("loss.entropy", entropy, exc), str(exc)) from None


def check_data(data: dict, needs_test: bool) -> None:
    splits = ("train", "test") if needs_test else ("train",)
    if data["layout"] == "folders":
        for split in splits:
            folders = data[split]
            if not (isinstance(folders, dict) and set(folders) == {"low", "high"}
                    and all(isinstance(v, str) for v in folders.values())):
                raise ConfigError(f"data.{split}", f"data.layout=folders needs data.{split}: {{low: DIR, high: DIR}}, "
                                  f"got {folders!r}")
    elif data["layout"] != "demo" and data["root"] is None:
        raise ConfigError("data.root", f"data.layout={data['layout']} needs data.root, the dataset's folder")


def check_sample(sample: dict) -> None:
    """ConfigError naming the key when `sample.tile` / `sample.tile_overlap` / `sample.tile_pooling`
    cannot tile an image."""
    if sample.get("tile_pooling", "image") not in POOLINGS:
        raise ConfigError("sample.tile_pooling", f"must be one of {POOLINGS}, got {sample['tile_pooling']!r}")
    if sample.get("tile") is not None:
        try:
            check_tiling(sample["tile"], sample.get("tile_overlap"))
        except ValueError as exc:
            raise ConfigError("sample.tile / sample.tile_overlap", str(exc)) from None


def check_config(config: dict) -> dict:
    """The config with every value checked against its default's type and range (numbers given as
    strings by YAML 1.1, like 1e-4, become floats); ConfigError naming the first bad key."""
    config = _check_types(config, DEFAULTS)
    for key, choices in CHOICES.items():
        if _get(config, key) not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {_get(config, key)!r}")
    for key in POSITIVE + NON_NEGATIVE:
        value = _get(config, key)
        if value is not None and not (math.isfinite(value) and (value > 0 if key in POSITIVE else value >= 0)):
            raise ConfigError(key, f"must be {'> 0' if key in POSITIVE else '>= 0'}, got {value!r}")
    train = config["train"]
    if not 0 <= train["ema"] <= 1:
        raise ConfigError("train.ema", f"must be in [0, 1], got {train['ema']!r}")
    if train["lr_min"] > train["lr"]:
        raise ConfigError("train.lr_min", f"must be <= train.lr ({train['lr']!r}), got {train['lr_min']!r}")
    betas = train["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise ConfigError("train.betas", f"must be two numbers in [0, 1), got {betas!r}")
    if not 0 < config["sde"]["eps"] < 1:
        raise ConfigError("sde.eps", f"must be in (0, 1), got {config['sde']['eps']!r}")
    for term, weight in config["loss"]["weights"].items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(f"loss.weights.{term}", f"must be a number >= 0, got {weight!r}")
    check_entropy_loss(config["loss"]["entropy"])
    check_model(config["model"], config["sde"])
    check_data(config["data"], needs_test=bool(train["val_every"]) or config["evaluate_at_end"])
    check_sample(config["sample"])
    return config


# ---- resume ----

def _leaves(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name not in ("data.train", "data.test"):
            out.update(_leaves(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_changes(old: dict, new: dict) -> list:
    """(key, old value, new value) for every leaf that differs, in key order."""
    a, b = _leaves(old), _leaves(new)
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def resumable(key: str) -> bool:
    return any(key == safe or key.startswith(f"{safe}.") for safe in RESUMABLE)


def check_resume_changes(stored: dict, config: dict) -> list:
    """The changes from a checkpoint's config to `config`; ConfigError naming every key that a
    resumed run cannot change (the model, SDE, loss, data and optimiser define what it computes)."""
    changes = config_changes(load_config(base=stored), config)
    refused = [c for c in changes if not resumable(c[0])]
    if refused:
        detail = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} requested" for key, old, new in refused)
        raise ConfigError(", ".join(key for key, _, _ in refused),
                          f"cannot change when resuming ({detail}); keep the checkpoint's values, or start a "
                          "fresh run (another out_dir, or --overwrite)")
    return changes


def save_config(config: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
