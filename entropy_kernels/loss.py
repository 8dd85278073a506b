"""Public loss API: :func:`spatial_entropy_loss` and :class:`SpatialEntropyLoss`.

Both take their keywords and defaults from :func:`entropy_kernels.options.make_options`, the one
definition of the loss's parameters (``inspect.signature`` shows them on both).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from . import backends
from .options import (
    LOSS_PARAMETERS, LossOptions, check_inputs, check_keywords, compute_dtype, draw_neighbor_weights, make_options,
    pixel_maps, warn_if_mostly_clamped,
)

_OPTION_DOCS = """
        bins: bins L per axis of the joint histograms, in [2, 1024] (cuda and triton serve <= 64).
        bandwidth: kernel bandwidth h in bin units, >= 1e-3.
        kernel: ``'logistic'`` or ``'gaussian'``.
        window: odd window side, a tuple of sides (averaged) or ``'global'``.
        neighbor_weights: ``'shuffled'`` (default: a shuffled 3x3 Gaussian, redrawn at every call),
            ``'random'``, ``'mean'`` (fixed 1/8), ``'randn'`` or a tensor of 8 (or 3x3) weights.
        divergence: ``'kl'`` (generalised KL(P || Q)) or ``'hellinger'``.
        padding: ``'same'`` (a window at every pixel, border windows renormalised) or ``'valid'``.
        data_range: the value range of the images, ``high`` or ``(low, high)``; it is mapped onto
            the bins, ``[low, high] -> [0, L - 1]``. ``255`` for 0-255 images, ``(-1, 1)`` for tanh outputs.
        clamp: clamp the inputs to ``data_range`` first (values outside get no gradient).
        eps: floor inside the logs and square roots.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        generator: the ``torch.Generator`` that draws random neighbour weights (None: torch's default).
        backend: ``'auto'``, ``'reference'``, ``'cpp'``, ``'cuda'`` or ``'triton'``.
"""
_SHAPE_DOCS = """
    Shape:
        - pred, target: (B, C, H, W) or (C, H, W).
        - output: a scalar for ``'mean'`` and ``'sum'``; for ``'none'`` the (B, C, Ho, Wo) map of D_c
          ((C, Ho, Wo) for 3-D input), Ho x Wo = H x W for ``'same'``, (H - s + 1) x (W - s + 1)
          for ``'valid'`` and 1 x 1 for ``'global'``.

    Determinism:
        The default ``neighbor_weights='shuffled'`` draws new weights at every call, so two calls on the
        same images give slightly different values (a regulariser while training). For a
        reproducible value pass a seeded ``generator`` (``SpatialEntropyLoss(seed=...)`` owns one), and
        for evaluation, where the value should not depend on a draw, ``neighbor_weights='mean'``.
"""


def _loss(pred: torch.Tensor, target: torch.Tensor, opts: LossOptions, _schedule=None) -> torch.Tensor:
    """_schedule (private, backend 'cuda' only): the kernels' launch schedule, entropy_kernels.ops.cuda._Schedule,
    for tools/cuda_variants.py; None: the library's policy."""
    pred, target, squeezed = check_inputs(pred, target, opts)
    warn_if_mostly_clamped(pred, opts)
    dtype = compute_dtype(pred.dtype)
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
            **({} if _schedule is None else {"_schedule": _schedule}),
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


def spatial_entropy_loss(pred: torch.Tensor, target: torch.Tensor, **options) -> torch.Tensor:
    """Divergence between the local joint (intensity x neighbour) KDE histograms of target and pred.

    Every channel of every image is binned, ``u = (L - 1) (clamp(x) - low) / (high - low)``, and
    paired with its neighbour value m, the weighted mean of u over the 8-neighbours. In the window
    c around every pixel (docs/spec.md has the exact definition):

    .. math::

        P_c(i, j) = \\frac{1}{N_c} \\sum_{p \\in c} \\frac{1}{h^2} K\\Big(\\frac{u_p - i}{h}\\Big)
        K\\Big(\\frac{m_p - j}{h}\\Big), \\qquad
        D_c = \\sum_{i,j} (P_c + \\epsilon) \\log \\frac{P_c + \\epsilon}{Q_c + \\epsilon} + Q_c - P_c

    with P from ``target`` and Q from ``pred``; the loss is the mean (or sum) of D_c over windows,
    channels and images. Half-precision inputs are computed in float32, float64 in float64.

    Args:
        pred: the prediction, (B, C, H, W) or (C, H, W), floating; the only input with a gradient.
        target: the reference image, same shape and device as ``pred``.{options}{shape}
    Returns:
        The loss, float32 (float64 for float64 ``pred``).

    Examples:
        >>> import torch
        >>> from entropy_kernels import spatial_entropy_loss
        >>> pred = torch.rand(2, 3, 32, 32, requires_grad=True)
        >>> target = torch.rand(2, 3, 32, 32)
        >>> loss = spatial_entropy_loss(pred, target, bins=16, window=5, neighbor_weights="mean")
        >>> loss.backward()
        >>> loss.shape, pred.grad.shape
        (torch.Size([]), torch.Size([2, 3, 32, 32]))
        >>> spatial_entropy_loss(pred, target, bins=16, reduction="none").shape
        torch.Size([2, 3, 32, 32])
        >>> unit = spatial_entropy_loss(pred, target, bins=16, neighbor_weights="mean")
        >>> # 0-255 images: say so, or they are clamped to [0, 1]
        >>> scaled = spatial_entropy_loss(255 * pred, 255 * target, bins=16, neighbor_weights="mean", data_range=255)
        >>> torch.allclose(unit, scaled)
        True
    """
    check_keywords("spatial_entropy_loss", options)
    return _loss(pred, target, make_options(**options))


# str.replace, not str.format: the formula's braces are LaTeX.
spatial_entropy_loss.__doc__ = spatial_entropy_loss.__doc__.replace("{options}", _OPTION_DOCS.rstrip()).replace(
    "{shape}", _SHAPE_DOCS)
spatial_entropy_loss.__signature__ = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor)
     for name in ("pred", "target")] + list(LOSS_PARAMETERS),
    return_annotation=torch.Tensor,
)


class SpatialEntropyLoss(nn.Module):
    """Module form of :func:`spatial_entropy_loss`: the same keywords, validated at construction.

    It computes exactly what the function computes (see there for the formula). One keyword more:
    ``seed`` gives the module its own ``torch.Generator`` (on the CPU, where the weights are drawn),
    seeded once, so that a run's sequence of random neighbour weights is reproducible without
    touching torch's global generator; it excludes ``generator``.

    Args:{options}
        seed: seed of a generator owned by the module (None: use ``generator``).
{shape}
    The owned generator is copied by ``copy.deepcopy`` (the copy continues the same sequence
    independently) and is not part of ``state_dict()``; to resume a run exactly, save
    ``loss.generator.get_state()`` beside the checkpoint and restore it with ``set_state``.
    ``torch.compile(fullgraph=True)`` cannot trace a ``torch.Generator``: there, draw the random
    weights from torch's global generator (``generator=None``, seeded by ``torch.manual_seed``) or
    use fixed ones.

    Examples:
        >>> import torch
        >>> from entropy_kernels import SpatialEntropyLoss
        >>> criterion = SpatialEntropyLoss(bins=16, window=5, seed=0)
        >>> criterion
        SpatialEntropyLoss(bins=16, window=5, seed=0)
        >>> pred, target = torch.rand(1, 3, 24, 24), torch.rand(1, 3, 24, 24)
        >>> first = criterion(pred, target)
        >>> first.item() == SpatialEntropyLoss(bins=16, window=5, seed=0)(pred, target).item()
        True
        >>> evaluation = SpatialEntropyLoss(bins=16, window=5, neighbor_weights="mean")
        >>> evaluation(pred, target).item() == evaluation(pred, target).item()
        True
    """

    def __init__(self, *, seed: Optional[int] = None, **options):
        super().__init__()
        check_keywords(type(self).__name__, options)
        if seed is not None:
            if options.get("generator") is not None:
                raise ValueError("SpatialEntropyLoss takes seed or generator, not both")
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise TypeError(f"seed must be an int or None, got {seed!r}")
            options["generator"] = torch.Generator().manual_seed(seed)
        self.options = make_options(**options)  # fail at construction, not at the first step
        self.seed = seed
        self._given = {k: v for k, v in options.items() if not (seed is not None and k == "generator")}

    @property
    def generator(self) -> Optional[torch.Generator]:
        return self.options.generator

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _loss(pred, target, self.options)

    def backend_for(self, device, dtype: torch.dtype = torch.float32) -> str:
        """The backend a call on ``device`` tensors of ``dtype`` runs on: the one named by
        ``backend``, or the one ``'auto'`` picks here (ValueError when the named one cannot serve).

        >>> SpatialEntropyLoss(backend="reference").backend_for("cpu")
        'reference'
        """
        return backends.resolve(self.options.backend, torch.device(device), compute_dtype(dtype),
                                self.options.bins, self.options.eps)

    def extra_repr(self) -> str:
        given = dict(self._given, **({"seed": self.seed} if self.seed is not None else {}))
        return ", ".join(f"{k}={v!r}" for k, v in given.items())


SpatialEntropyLoss.__doc__ = SpatialEntropyLoss.__doc__.replace("{options}", _OPTION_DOCS.rstrip()).replace(
    "{shape}", _SHAPE_DOCS)
SpatialEntropyLoss.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + list(LOSS_PARAMETERS)
    + [inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[int])]
)
