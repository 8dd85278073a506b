"""Training, enhancement and evaluation of the IR-SDE low-light model (`entropy-sde ...`).

From Python: ``load_enhancer(path)`` returns a callable that enhances (3, H, W) image tensors,
``enhance_file(path, input, output)`` enhances image files; ``read_image`` / ``write_image`` read
and write PNG, JPEG and TIFF (8 or 16 bits).

The names are imported on first use, so that the command line (``python -m train``) can say which
extra is missing before anything imports it.
"""
import importlib

_HOMES = {"DataError": "data", "read_image": "data", "write_image": "data",
          "Enhancer": "inference", "enhance_file": "inference", "load_enhancer": "inference"}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
