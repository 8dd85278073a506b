"""Backend registry and the explainable 'auto' choice.

Each backend is a module exposing

    not_supported_reasons(device, dtype, bins) -> list[str]   # empty when it can serve
    local_divergence(...)                                       # the contract in reference.py

Modules are imported lazily, and an import failure becomes the reason that
backend is unavailable, so a missing compiler or Triton never breaks the package.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

MODULES = {
    "reference": "entropy_kernels.reference",
    "triton": "entropy_kernels.ops.triton_kde",
    "cpp": "entropy_kernels.ops.cpp",
    "cuda": "entropy_kernels.ops.cuda",
}
# Preference of backend='auto' per device type, fastest measured first; the reference serves
# everything. On an H100 (docs/results.md, B=8, C=3, 128^2, bins 32, window 11, fwd+bwd) the CUDA
# extension took 58.8 ms, the reference 122 ms and Triton 147 ms, so 'cuda' leads while it is built.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
# The fused backends slide their window sums (add what enters, subtract what leaves), which leaves
# an absolute error of ~1e-17 in cells that the reference sums directly; eps keeps that error
# out of the logs. Measured in float64 (bins 12, window 5, both kernels): relative error of D and
# its gradient ~3e-9 at eps = 1e-10, ~2e-7 at 1e-12, ~1e-5 at 1e-14, and NaN windows at eps = 0
# (Gaussian kernel). Below this eps they decline, and backend='auto' takes the reference.
FUSED_MIN_EPS = 1e-12
FUSED = ("cpp", "cuda", "triton")


_LOADED = {}


def _load(name: str):
    # A plain dict, not lru_cache: torch.compile traces a hit of this dict but not the import.
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(MODULES[name]), None
        except Exception as exc:  # noqa: BLE001 - any import failure is a reason, reported to the user
            _LOADED[name] = None, f"could not import {MODULES[name]}: {type(exc).__name__}: {exc}"
    return _LOADED[name]


def not_supported_reasons(name: str, device: torch.device, dtype: torch.dtype, bins: int,
                          eps: Optional[float] = None):
    """Why backend `name` cannot serve the call (empty when it can); eps: the loss's, when known."""
    module, error = _load(name)
    if module is None:
        return [error]
    reasons = list(module.not_supported_reasons(torch.device(device), dtype, bins))
    if name in FUSED and eps is not None and eps < FUSED_MIN_EPS:
        reasons.append(f"needs eps >= {FUSED_MIN_EPS:g} (its sliding window sums carry ~1e-17 absolute error), "
                       f"got eps={eps:g}")
    return reasons


_warned = set()


def resolve(name: str, device: torch.device, dtype: torch.dtype, bins: int, eps: Optional[float] = None) -> str:
    """The name of the backend a call runs on; raises when an explicitly named backend cannot serve it."""
    return _resolve(name, device.type, dtype, bins, eps)


def select(name: str, device: torch.device, dtype: torch.dtype, bins: int, eps: Optional[float] = None):
    """The backend module for a call; raises when an explicitly named backend cannot serve it."""
    return _load(resolve(name, device, dtype, bins, eps))[0]


# torch.compile runs this at trace time and keeps its result (a name) as a constant: the imports and
# extension loads it may do on a first call cannot be traced, and its answer is fixed per process.
@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, dtype: torch.dtype, bins: int, eps: Optional[float]) -> str:
    device = torch.device(device_type)
    if name != "auto":
        reasons = not_supported_reasons(name, device, dtype, bins, eps)
        if reasons:
            raise ValueError(f"backend={name!r} cannot serve {device_type} {dtype} input: " + "; ".join(reasons))
        return name
    skipped = []
    for candidate in AUTO_ORDER.get(device_type, ("reference",)):
        reasons = not_supported_reasons(candidate, device, dtype, bins, eps)
        if not reasons:
            key = (device_type, candidate, tuple(n for n, _ in skipped))
            if skipped and key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"entropy_kernels: backend='auto' uses {candidate!r} for {device_type} tensors; "
                    + "; ".join(f"{n} unavailable ({', '.join(r)})" for n, r in skipped),
                    stacklevel=5,  # the caller of spatial_entropy_loss
                )
            return candidate
        skipped.append((candidate, reasons))
    raise ValueError(f"no backend serves {device_type} tensors: {skipped}")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can serve a device type here and, when it cannot, why.

    Printed as ``available`` or ``unavailable: <reason>``; true in a boolean context when available.
    """

    available: bool
    reason: Optional[str] = None

    def __bool__(self) -> bool:
        return self.available

    def __str__(self) -> str:
        return "available" if self.available else f"unavailable: {self.reason}"

    __repr__ = __str__


def available_backends(bins: int = 32, dtype: torch.dtype = torch.float32):
    """For 'cpu' and 'cuda': each backend's :class:`BackendStatus` on this machine (for ``bins`` and ``dtype``).

    >>> from entropy_kernels import available_backends
    >>> status = available_backends()
    >>> status["cpu"]["reference"]
    available
    >>> bool(status["cpu"]["reference"]), status["cpu"]["reference"].reason
    (True, None)
    """
    table = {}
    for device_type in ("cpu", "cuda"):
        row = {}
        for name in MODULES:
            if device_type == "cuda" and not torch.cuda.is_available():
                row[name] = BackendStatus(False, "no CUDA device on this machine")
                continue
            reasons = not_supported_reasons(name, torch.device(device_type), dtype, bins)
            row[name] = BackendStatus(not reasons, "; ".join(reasons) or None)
        table[device_type] = row
    return table
