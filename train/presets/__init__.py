"""The shipped training configurations (the YAML files next to this module), found by name.

`--config demo` is this folder's demo.yaml wherever the package is installed; anything that looks
like a path (it has a folder separator or a .yaml / .yml suffix) is read as a path, relative to the
working directory, so that a file of the user's never shadows a preset by its name, nor a preset a file.
"""
from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def names() -> list:
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def resolve(config) -> Path:
    """The YAML file of a preset name, or a path as given; ValueError naming the presets for an
    unknown name."""
    text = str(config)
    is_path = isinstance(config, Path) or "/" in text or "\\" in text or text.endswith((".yaml", ".yml"))
    if is_path:
        return Path(config)
    if text not in names():
        raise ValueError(f"unknown preset {text!r}: the presets are {', '.join(names())}, or give a path to a YAML file")
    return FOLDER / f"{text}.yaml"

