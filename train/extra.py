"""The `train` extra: what `model` and `train` import beyond torch, checked before they are imported.

The core install (`entropy-kernels` without extras) is the loss alone and needs torch only; a training
command run without the extra prints one line naming it instead of a traceback from deep inside.
"""
from __future__ import annotations

import importlib.util
import sys

# import name -> distribution in pyproject.toml's `train` extra (tests/test_packaging.py checks they agree)
MODULES = {"numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm", "PIL": "pillow", "scipy": "scipy",
           "skimage": "scikit-image", "safetensors": "safetensors", "png": "pypng",
           "tifffile": "tifffile"}
INSTALL = "pip install 'entropy-kernels[train]' (from a checkout: pip install --no-build-isolation -e '.[train]')"


def missing() -> list:
    return [dist for module, dist in MODULES.items() if importlib.util.find_spec(module) is None]


def exit_without_train_extra() -> None:
    absent = missing()
    if absent:
        print(f"error: the training commands need the train extra ({', '.join(absent)} not installed): {INSTALL}",
              file=sys.stderr)
        raise SystemExit(2)
