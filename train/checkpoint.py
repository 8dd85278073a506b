"""Checkpoints: written atomically, loaded with weights_only=True, and every random state in them.

A run folder's `checkpoints/` holds `last.pt` (the latest state), `step_NNNNNNN.pt` snapshots
(copies of last.pt at `train.snapshot_every`, the newest `train.keep_snapshots` kept) and `best.pt`
(the state at the best validation PSNR). :func:`export_weights` writes the EMA weights alone.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

WEIGHTS_FORMAT = "entropy-sde-weights/1"
TRAINING_KEYS = ("model", "ema", "optimizer", "scheduler", "rng", "step", "config")
SNAPSHOT = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(path, state: dict) -> None:
    """Written to a temporary file and renamed over the old one: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu", mmap: bool = False) -> dict:
    """What :func:`save_checkpoint` wrote; ConfigError naming the path when the file is missing,
    truncated or holds more than tensors and plain data. mmap: map the file instead of reading it
    (to look at a few entries of a large checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "no such checkpoint" if not path.exists() else "is not a file")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(exc).__name__)
        raise ConfigError(path, f"cannot load the checkpoint (truncated, or not written by this tool?): {detail}") from None


def load_training_state(path, device="cpu", mmap: bool = False) -> dict:
    """A checkpoint written by `fit` (model, EMA, optimiser, scheduler, random states, step, config)."""
    state = load_checkpoint(path, device, mmap)
    missing = [key for key in TRAINING_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ConfigError(path, f"not a training checkpoint of `fit`: it lacks {', '.join(missing)}")
    return state


def checkpoint_step(path) -> int:
    """The step a training checkpoint was written at, read without loading its tensors."""
    return int(load_training_state(path, mmap=True)["step"])


def remove_temporaries(folder) -> list:
    """Deletes the `*.tmp` files a killed write left in `folder`; returns them."""
    stale = sorted(Path(folder).glob("*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink()
    return stale


def snapshots(folder) -> list:
    """(step, path) of the snapshots in a checkpoints folder, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("step_*.pt") if (m := SNAPSHOT.match(p.name))]
    return sorted(found)


def save_snapshot(last, step: int, keep) -> Path:
    """Copies `last` (atomically) to step_NNNNNNN.pt beside it and deletes all but the newest `keep`
    snapshots (None: keeps all)."""
    last = Path(last)
    target = last.with_name(f"step_{step:07d}.pt")
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(last, tmp)
    os.replace(tmp, target)
    if keep is not None:
        for _, old in snapshots(last.parent)[:-keep]:
            old.unlink()
    return target


def export_weights(checkpoint, out) -> dict:
    """Writes the EMA weights of a training checkpoint as a weights-only safetensors file with the
    resolved config in its metadata; returns the metadata."""
    from safetensors.torch import save_file

    from .config import load_config

    state = load_training_state(checkpoint)
    config = load_config(base=state["config"])  # older checkpoints lack newer keys: the defaults fill them
    metadata = {"format": WEIGHTS_FORMAT, "config": json.dumps(config), "step": str(int(state["step"]))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({name: tensor.contiguous() for name, tensor in state["ema"].items()}, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return metadata


def rng_state(generators: dict) -> dict:
    state = {name: g.get_state() for name, g in generators.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    state["python"] = random.getstate()
    return state


def set_rng_state(state: dict, generators: dict) -> None:
    for name, g in generators.items():
        g.set_state(state[name])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
