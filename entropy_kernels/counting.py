"""Counting (hard-histogram) entropies of the paper's Eqs. 1-4, for analysis.

They are not differentiable and not meant for training: the KDE loss is the
trainable relaxation of the joint histogram counted here.

Convention: intensities in [0, 1] are clamped and quantised to the nearest of
``bins`` levels (level k = round((bins - 1) * x), the bin centres of the loss);
the neighbour value is the plain mean of the in-image 8-neighbours, quantised the
same way. Entropies are in bits. Every leading index (image, channel) gets its own
entropy: the result has shape ``x.shape[:-2]``.
"""
from __future__ import annotations

import torch

from .options import RING_INDEX, neighbor_value


def _levels(x: torch.Tensor, bins: int) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * (bins - 1)).long()


def _check(x, bins):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (..., H, W) tensor, got shape {tuple(x.shape)}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")


def _shannon_bits(labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Entropy of the empirical distribution of each row of integer labels."""
    counts = torch.zeros(labels.shape[0], n_labels, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float64))
    p = counts / labels.shape[1]
    return -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(1)


def entropy(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Global 1-D Shannon entropy of the intensity histogram (Eqs. 1-2), in bits."""
    _check(x, bins)
    lead = x.shape[:-2]
    labels = _levels(x.detach().double(), bins).reshape(-1, x.shape[-2] * x.shape[-1])
    return _shannon_bits(labels, bins).reshape(lead)


def spatial_entropy(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Shannon entropy of the joint (intensity, 8-neighbour mean) histogram (Eqs. 3-4), in bits."""
    _check(x, bins)
    lead, (height, width) = x.shape[:-2], x.shape[-2:]
    planes = x.detach().double().clamp(0, 1).reshape(-1, height, width)
    ring = torch.full((len(RING_INDEX),), 1.0 / len(RING_INDEX), dtype=torch.float64, device=x.device)
    intensity = _levels(planes, bins)
    neighbour = _levels(neighbor_value(planes, ring), bins)
    labels = (intensity * bins + neighbour).reshape(planes.shape[0], -1)
    return _shannon_bits(labels, bins * bins).reshape(lead)
