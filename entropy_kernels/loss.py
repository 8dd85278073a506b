"""Public loss API: :func:`spatial_entropy_loss` and :class:`SpatialEntropyLoss`."""
from __future__ import annotations

import torch
from torch import nn

from . import backends
from .options import check_inputs, compute_dtype, draw_neighbor_weights, make_options, pixel_maps


def spatial_entropy_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    bins: int = 32,
    bandwidth: float = 0.5,
    kernel: str = "logistic",
    window=11,
    neighbor_weights="shuffled",
    divergence: str = "kl",
    padding: str = "same",
    clamp: bool = True,
    eps: float = 1e-10,
    reduction: str = "mean",
    generator=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Divergence between the local joint (intensity x neighbour) KDE histograms of target and pred.

    ``pred`` and ``target`` are (B, C, H, W) or (C, H, W) images in [0, 1]; only ``pred``
    gets a gradient. Every channel of every image has its own histograms; D_c is
    KL(P_c || Q_c) (or the Hellinger distance) between the target's density P_c and the
    prediction's Q_c in the window centred on pixel c. Returns the mean (or sum) of D_c
    over windows, channels, images and window sides, or with ``reduction='none'`` the
    (B, C, Ho, Wo) map averaged over window sides. Half-precision inputs are computed in
    float32 and the loss is float32; float64 inputs are computed in float64.
    The parameters are documented in docs/spec.md.
    """
    opts = make_options(
        bins=bins, bandwidth=bandwidth, kernel=kernel, window=window, neighbor_weights=neighbor_weights,
        divergence=divergence, padding=padding, clamp=clamp, eps=eps, reduction=reduction,
        generator=generator, backend=backend,
    )
    pred, target, squeezed = check_inputs(pred, target, opts)
    dtype = compute_dtype(pred)
    impl = backends.select(opts.backend, pred.device, dtype, opts.bins, opts.eps)

    ring = draw_neighbor_weights(opts, pred.device, dtype)
    u_pred, m_pred = pixel_maps(pred, ring, opts)
    with torch.no_grad():
        u_tgt, m_tgt = pixel_maps(target, ring, opts)

    batch, channels, height, width = pred.shape
    results = []
    for win_h, win_w, valid in opts.window_shapes(height, width):
        d = impl.local_divergence(
            u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid,
            opts.bins, opts.bandwidth, opts.kernel, opts.divergence, opts.eps,
        )
        if opts.reduction == "mean":
            d = d.mean()
        elif opts.reduction == "sum":
            d = d.sum()
        else:
            d = d.reshape(batch, channels, *d.shape[-2:])
        results.append(d)
    # Several window sides are averaged with equal weight, whatever the reduction.
    out = results[0] if len(results) == 1 else torch.stack(results).mean(0)
    return out[0] if squeezed and opts.reduction == "none" else out


class SpatialEntropyLoss(nn.Module):
    """Module form of :func:`spatial_entropy_loss`; keywords as there, validated at construction."""

    def __init__(self, **kwargs):
        super().__init__()
        make_options(**kwargs)  # fail at construction, not at the first step
        self.kwargs = kwargs

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return spatial_entropy_loss(pred, target, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
