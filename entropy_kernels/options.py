"""Parameters of the spatial entropy loss: validation, neighbour weights and the
per-pixel inputs that every backend shares.

This module is the single home of docs/spec.md's parameter rules. Every backend
receives the same already-validated :class:`LossOptions` and the same
``(u, m)`` maps (bin units and neighbour value per pixel), so the backends
differ only in how they compute the windowed histograms and the divergence.
"""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

KERNELS = ("logistic", "gaussian")
DIVERGENCES = ("kl", "hellinger")
PADDINGS = ("same", "valid")
REDUCTIONS = ("mean", "sum", "none")
WEIGHT_MODES = ("shuffled", "random", "mean", "randn")
BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")

# Ring positions inside a row-major 3x3 stencil, the centre (index 4) skipped:
# offsets (row, col) = (-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1).
RING_INDEX = (0, 1, 2, 3, 5, 6, 7, 8)
SHUFFLED_SIGMA = 1.5
# The joint histogram has bins^2 cells per window: the C++ backend keeps a few of them per thread
# and the reference materialises B*C*H*W*bins^2 values, so bins=10000 grew to gigabytes before any
# backend refused it. cuda and triton serve bins <= 64 (their tiles live in registers).
MAX_BINS = 1024
# In bin units (docs/spec.md, Decisions 13). A value half-way between two bin centres contributes
# K(0.5/h)/h to its nearest bins (logistic: about e^-500 at h = 1e-3), so narrower kernels make the
# loss and its gradient vanish for almost every image, and from ~1e-20 (float32) or ~1e-160 (float64)
# on, the kernels' 1/h^2 overflows into NaN.
MIN_BANDWIDTH = 1e-3
# Share of pred's pixels outside data_range above which clamp=True warns (once per process): their
# gradient is zero, which is what an image in the wrong range looks like.
CLAMPED_SHARE_WARNING = 0.25

WindowSpec = Union[int, Tuple[int, ...], str]


@dataclass(frozen=True)
class LossOptions:
    """Validated loss parameters, made by :func:`make_options` (docs/spec.md for their meaning)."""

    bins: int
    bandwidth: float
    kernel: str
    window: Union[Tuple[int, ...], str]
    neighbor_weights: Union[str, torch.Tensor]
    divergence: str
    padding: str
    clamp: bool
    eps: float
    reduction: str
    generator: Optional[torch.Generator]
    backend: str
    data_range: Tuple[float, float]

    @property
    def is_global(self) -> bool:
        return self.window == "global"

    def window_shapes(self, height: int, width: int):
        """(window height, window width, valid) for each window side."""
        if self.is_global:
            return [(height, width, True)]
        valid = self.padding == "valid"
        return [(s, s, valid) for s in self.window]


def _choice(name, value, allowed):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {allowed}, got {value!r} of type {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _window(window) -> Union[Tuple[int, ...], str]:
    if isinstance(window, str):
        if window != "global":
            raise ValueError(f"window must be an odd int, a tuple of odd ints or 'global', got {window!r}")
        return window
    sides = (window,) if _is_int(window) else window
    if not isinstance(sides, (tuple, list)) or len(sides) == 0:
        raise TypeError(f"window must be an odd int, a tuple of odd ints or 'global', got {window!r}")
    for s in sides:
        if not _is_int(s):
            raise TypeError(f"window sides must be ints, got {s!r} in window={window!r}")
        if s < 1 or s % 2 == 0:
            raise ValueError(f"window sides must be odd and >= 1, got {s} in window={window!r}")
    return tuple(int(s) for s in sides)


def _neighbor_weights(value):
    if isinstance(value, str):
        return _choice("neighbor_weights", value, WEIGHT_MODES)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"neighbor_weights must be one of {WEIGHT_MODES} or a tensor of 8 (or 3x3) values, "
            f"got {type(value).__name__}"
        )
    if value.is_complex():
        raise TypeError(f"neighbor_weights must be real, got a {value.dtype} tensor")
    if value.is_meta:
        raise ValueError("neighbor_weights must hold values (a CPU or CUDA tensor), got a tensor on the meta device")
    if value.numel() not in (8, 9) or (value.numel() == 9 and tuple(value.shape) != (3, 3)):
        raise ValueError(f"neighbor_weights tensor must have 8 values or shape (3, 3), got shape {tuple(value.shape)}")
    ring = value.detach().to("cpu", torch.float64).reshape(-1)
    if ring.numel() == 9:
        ring = ring[list(RING_INDEX)]
    if not torch.isfinite(ring).all():
        raise ValueError(f"neighbor_weights must be finite, got {ring.tolist()}")
    total = ring.sum()
    if total == 0:
        raise ValueError(f"neighbor_weights must not sum to zero (they are renormalised), got {ring.tolist()}")
    normalised = ring / total
    if not (torch.isfinite(total) and torch.isfinite(normalised).all()):
        raise ValueError(f"neighbor_weights are renormalised by their sum, which is {total.item():g} in float64; "
                         f"scale them into a smaller range, got {ring.tolist()}")
    return normalised


def _data_range(value) -> Tuple[float, float]:
    pair = (0.0, value) if _is_real(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_real(v) for v in pair)):
        raise TypeError(f"data_range must be a real number high or a pair (low, high), got {value!r}")
    low, high = float(pair[0]), float(pair[1])
    if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(high - low) and high > low):
        raise ValueError(f"data_range must be finite with low < high, got {value!r}")
    return low, high


def make_options(
    *,
    bins: int = 32,
    bandwidth: float = 0.5,
    kernel: str = "logistic",
    window: WindowSpec = 11,
    neighbor_weights: Union[str, torch.Tensor] = "shuffled",
    divergence: str = "kl",
    padding: str = "same",
    data_range: Union[float, Tuple[float, float]] = (0.0, 1.0),
    clamp: bool = True,
    eps: float = 1e-10,
    reduction: str = "mean",
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> LossOptions:
    """Check every parameter against docs/spec.md and return them as :class:`LossOptions`.

    This signature is the one definition of the loss's keywords and defaults: the public
    function and module take theirs from it (:data:`LOSS_PARAMETERS`).
    """
    if not _is_int(bins):
        raise TypeError(f"bins must be an int, got {bins!r} of type {type(bins).__name__}")
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be in [2, {MAX_BINS}], got {bins} (the joint histogram has bins^2 cells per "
                         f"window; the cuda and triton backends serve bins <= 64)")
    if not _is_real(bandwidth):
        raise TypeError(f"bandwidth must be a real number, got {bandwidth!r}")
    if not (math.isfinite(bandwidth) and bandwidth >= MIN_BANDWIDTH):
        raise ValueError(f"bandwidth must be finite and >= {MIN_BANDWIDTH:g} (in bin units; narrower kernels put no "
                         f"mass between the bin centres), got {bandwidth}")
    if not _is_real(eps):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp must be a bool, got {clamp!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    window = _window(window)
    padding = _choice("padding", padding, PADDINGS)
    reduction = _choice("reduction", reduction, REDUCTIONS)
    if reduction == "none" and padding == "valid" and not isinstance(window, str) and len(set(window)) > 1:
        raise ValueError(
            f"reduction='none' with padding='valid' needs a single window side (the maps differ in size), "
            f"got window={window}"
        )
    return LossOptions(
        bins=int(bins),
        bandwidth=float(bandwidth),
        kernel=_choice("kernel", kernel, KERNELS),
        window=window,
        neighbor_weights=_neighbor_weights(neighbor_weights),
        divergence=_choice("divergence", divergence, DIVERGENCES),
        padding=padding,
        clamp=clamp,
        eps=float(eps),
        reduction=reduction,
        generator=generator,
        backend=_choice("backend", backend, BACKENDS),
        data_range=_data_range(data_range),
    )


LOSS_PARAMETERS = tuple(inspect.signature(make_options).parameters.values())


def check_keywords(caller: str, kwargs) -> None:
    """A TypeError naming the public ``caller`` for keywords that are not loss parameters."""
    valid = [p.name for p in LOSS_PARAMETERS]
    for name in kwargs:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint}; "
                            f"valid keywords: {', '.join(valid)}")


def check_inputs(pred, target, opts: LossOptions):
    """Validate the image pair; return both as (B, C, H, W) and whether the input was 3-D."""
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on the same device, got {pred.device} and {target.device}")
    squeezed = pred.dim() == 3
    if squeezed:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    height, width = pred.shape[-2:]
    if not opts.is_global and opts.padding == "valid":
        largest = max(opts.window)
        if largest > height or largest > width:
            raise ValueError(
                f"padding='valid' needs images at least as large as the window, "
                f"got window={largest} for an image of {height}x{width}"
            )
    return pred, target, squeezed


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def draw_neighbor_weights(opts: LossOptions, device, dtype) -> torch.Tensor:
    """The 8 ring weights for one loss call, summing to 1 (docs/spec.md step 2)."""
    mode = opts.neighbor_weights
    if isinstance(mode, torch.Tensor):
        ring = mode
    else:
        gen = opts.generator
        rng_device = gen.device if gen is not None else torch.device("cpu")
        kw = dict(generator=gen, device=rng_device, dtype=torch.float64)
        if mode == "shuffled":
            offsets = torch.arange(-1, 2, dtype=torch.float64, device=rng_device)
            r2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
            gauss = torch.exp(-r2 / (2 * SHUFFLED_SIGMA**2)).reshape(-1)
            perm = torch.randperm(9, generator=gen, device=rng_device)
            ring = gauss[perm][list(RING_INDEX)]
        elif mode == "random":
            ring = torch.rand(8, **kw)
        elif mode == "randn":
            ring = torch.randn(8, **kw)
        else:
            ring = torch.ones(8, dtype=torch.float64)
        ring = ring / ring.sum()
    return ring.to(device=device, dtype=dtype)


def bin_units(x: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """u = (L - 1) * (clamp(x, low, high) - low) / (high - low) (docs/spec.md step 1).

    Non-finite inputs become NaN even when clamping would turn +-inf into low or high, so that
    a NaN or Inf anywhere always yields a NaN loss instead of a plausible number.
    """
    low, high = opts.data_range
    v = x.clamp(low, high) if opts.clamp else x
    v = torch.where(torch.isfinite(x), v, torch.full_like(v, float("nan")))
    # For the default (0, 1) both steps are exact, so the result is bit for bit (L - 1) * clamp(x, 0, 1).
    return (v - low) * ((opts.bins - 1) / (high - low))


class ClampWarning(UserWarning):
    """Clamping to data_range takes the gradient of a large share of pred's pixels."""


_clamp_warned = False


def warn_if_mostly_clamped(pred: torch.Tensor, opts: LossOptions) -> None:
    """Warn (once per process) when clamping takes the gradient of a large share of pred's pixels.

    One reduction and a host sync per call until it has warned; skipped inside torch.compile, where
    a data-dependent branch would break the graph.
    """
    global _clamp_warned
    if _clamp_warned or not opts.clamp or not pred.requires_grad or torch.compiler.is_compiling():
        return
    low, high = opts.data_range
    with torch.no_grad():
        lowest, highest = pred.detach().aminmax()
        outside = ((pred < low) | (pred > high)).float().mean().item()
    if outside <= CLAMPED_SHARE_WARNING:
        return
    _clamp_warned = True
    lowest, highest = lowest.item(), highest.item()
    fits = [r for r in ((0, 1), (-1, 1), (0, 255)) if r[0] <= lowest and highest <= r[1]]
    suggestion = f"data_range={fits[0]}" if fits else f"data_range=({lowest:.3g}, {highest:.3g})"
    warnings.warn(
        f"entropy_kernels: {outside:.0%} of pred's values lie outside data_range={opts.data_range} (pred spans "
        f"[{lowest:.3g}, {highest:.3g}]); clamp=True gives them no gradient. Pass the range of your images, "
        f"here {suggestion}, or clamp=False. (Warned once per process.)",
        ClampWarning,
        stacklevel=4,  # the caller of spatial_entropy_loss
    )


def neighbor_value(u: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """m(p): ring-weighted mean of the in-image 8-neighbours of p (docs/spec.md step 2).

    u is (N, H, W). Out-of-image neighbours are skipped and the remaining weights
    renormalised. A pixel with no neighbour at all (a 1x1 image) takes its own value.
    """
    n, height, width = u.shape
    stencil = torch.zeros(9, dtype=u.dtype, device=u.device)
    stencil[list(RING_INDEX)] = ring
    stencil = stencil.view(1, 1, 3, 3)
    num = F.conv2d(u.unsqueeze(1), stencil, padding=1).squeeze(1)
    den = F.conv2d(torch.ones(1, 1, height, width, dtype=u.dtype, device=u.device), stencil, padding=1)[0, 0]
    lonely = den == 0
    # The safe denominator keeps 0/0 out of the graph: torch.where would still send NaN back.
    return torch.where(lonely, u, num / torch.where(lonely, torch.ones_like(den), den))


def pixel_maps(x: torch.Tensor, ring: torch.Tensor, opts: LossOptions):
    """(u, m) of a (B, C, H, W) batch, each (B*C, H, W) in ring's dtype, contiguous."""
    b, c, height, width = x.shape
    u = bin_units(x.to(ring.dtype).reshape(b * c, height, width), opts)
    return u.contiguous(), neighbor_value(u, ring).contiguous()
