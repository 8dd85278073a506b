"""A noise network evaluated on overlapping tiles, for images whose activations do not fit memory.

The SDE still samples the whole image (one x_t, one noise draw per step); only the network's
prediction is computed tile by tile and blended. Each tile's output is weighted by ramps that
rise linearly across its overlap with the tile before it and fall across its overlap with the
tile after it (image borders get no ramp), and the blend divides by the summed weights, so a
network that looks at one pixel at a time gives the whole-image prediction to rounding. A step's
peak memory is one tile's activations plus two image-sized maps (the blend and its weights).

NAFNet is not pointwise: its convolutions see a neighbourhood (the overlap covers that) and its
channel attention pools each block's features over the whole input, which for a low-light image
carries image-wide facts (how dark, what colour cast); pooled over one tile, they differ from
tile to tile and the output becomes a patchwork. So by default (``pooling='image'``) every global
average pool (``nn.AdaptiveAvgPool2d(1)``, each called once per forward) inside the network
returns the image's mean instead, at the price of two passes over the tiles per call: in the
first, forward hooks accumulate each pool's input over the whole image (every pixel counted once:
tile weights divided by their sum) while the pools return the previous call's means (the
sampler's previous step on the same image; none at the first call: the tile's own); the second
pass, whose predictions are blended, uses the first's means. A pool deep in the network thus sees
the means of features that were computed with the first pass's means upstream, not exactly the
whole image's; measured on the demo network (docs/training.md), tiled outputs come within 57 dB
of the whole-image one at tiles of 256 and 512 pixels, against 28-32 dB when each tile pools over
itself (one pass) and 37 dB with the previous step's means alone (one pass).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tile_starts(size: int, tile: int, overlap: int) -> list:
    """First index of each tile along an axis of ``size``: the fewest tiles that overlap by at
    least ``overlap``, spread evenly from 0 to ``size - tile``."""
    if size <= tile:
        return [0]
    count = -(-(size - overlap) // (tile - overlap))
    return [i * (size - tile) // (count - 1) for i in range(count)]


def axis_weights(size: int, tile: int, starts: list, dtype, device) -> list:
    """For each tile along an axis, its (length,) blend weights: positive, rising as
    (k + 1) / (n + 1) across the n pixels it shares with the previous tile, falling likewise
    across those it shares with the next one, 1 elsewhere."""
    weights = []
    for i, start in enumerate(starts):
        length = min(tile, size - start)
        k = torch.arange(length, dtype=torch.float64)
        w = torch.ones(length, dtype=torch.float64)
        if i > 0:
            before = starts[i - 1] + tile - start
            w = torch.minimum(w, (k + 1) / (before + 1))
        if i + 1 < len(starts):
            after = start + tile - starts[i + 1]
            w = torch.minimum(w, (length - k) / (after + 1))
        weights.append(w.to(device=device, dtype=dtype))
    return weights


def default_overlap(tile: int) -> int:
    """A quarter of the tile: it costs no more tiles than 32 pixels would at tile 256 or 512 on a
    1024-pixel side, and blends over more context (docs/training.md, measured)."""
    return tile // 4


def check_tiling(tile, overlap=None) -> None:
    """ValueError unless ``tile`` is a positive integer and ``overlap`` (None: the default) an
    integer in [0, tile)."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    if overlap is None:
        return
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be an integer in [0, tile) = [0, {tile}), got {overlap!r}")


POOLINGS = ("image", "tile")


class TiledNetwork:
    """``network(x_t, mu, t)`` computed on overlapping ``tile`` x ``tile`` crops and blended;
    neighbouring tiles share at least ``overlap`` pixels (default: `default_overlap`).

    ``pooling``: 'image' (default) gives the network's global average pools the whole image's
    means, for two passes over the tiles per call (see the module's docstring; one instance per
    image being sampled), 'tile' lets them pool over each tile in one pass. Images no larger than
    one tile go through ``network`` whole, unchanged. ``tile`` works best as a multiple of the
    network's size multiple (16 for the 4-level presets): other sizes are padded by the network.
    """

    def __init__(self, network, tile: int, overlap: int = None, pooling: str = "image"):
        check_tiling(tile, overlap)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.network, self.tile, self.pooling = network, tile, pooling
        self.overlap = default_overlap(tile) if overlap is None else overlap
        self._pools = _global_pools(network) if pooling == "image" else []
        self.image_means, self._key = {}, None

    def __call__(self, x_t: torch.Tensor, mu: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = x_t.shape[-2:]
        if height <= self.tile and width <= self.tile:
            return self.network(x_t, mu, t)
        if self._key != (x_t.shape, x_t.device):  # another image: its statistics start afresh
            self.image_means, self._key = {}, (x_t.shape, x_t.device)
        rows, cols = (tile_starts(size, self.tile, self.overlap) for size in (height, width))
        row_weights = axis_weights(height, self.tile, rows, torch.float64, x_t.device)
        col_weights = axis_weights(width, self.tile, cols, torch.float64, x_t.device)
        boxes = [((..., slice(top, top + self.tile), slice(left, left + self.tile)), w_row[:, None] * w_col[None, :])
                 for top, w_row in zip(rows, row_weights) for left, w_col in zip(cols, col_weights)]
        coverage = torch.zeros(height, width, dtype=torch.float64, device=x_t.device)
        for box, weight in boxes:
            coverage[box[1:]] += weight
        if self._pools:  # a first pass gathers the image's means
            self._run(boxes, coverage, x_t, mu, t, blend=False)
        return self._run(boxes, coverage, x_t, mu, t, blend=True)

    def _run(self, boxes, coverage, x_t, mu, t, blend: bool):
        """The network on every tile; with ``blend``, their blended prediction. With 'image'
        pooling, the pools get ``image_means`` and the means of this pass replace them."""
        pools = _ImagePools(self._pools, self.image_means) if self._pools else None
        out = None
        try:
            for box, weight in boxes:
                if pools is not None:
                    pools.share = weight / coverage[box[1:]]  # this tile's part of each pixel
                pred = self.network(x_t[box], mu[box], t)
                if not blend:
                    continue
                if out is None:  # blended in float32, or float64 for a float64 network
                    dtype = torch.promote_types(pred.dtype, torch.float32)
                    out = pred.new_zeros(pred.shape[:-2] + coverage.shape, dtype=dtype)
                out[box] += pred.to(dtype) * weight.to(dtype)
        finally:
            if pools is not None:
                self.image_means = pools.close()
        return (out / coverage.to(dtype)).to(pred.dtype) if blend else None


class _ImagePools:
    """Forward hooks on a network's global average pools for one pass over the tiles: each returns
    ``means[pool]`` (the image's mean from the previous pass) when there is one, and its input,
    weighted by ``share`` (the current tile's part of each pixel, brought to the pool's resolution
    by area averaging), is summed towards the next pass's means."""

    def __init__(self, pools: list, means: dict):
        self.means, self.share, self.sums = means, None, {}
        self.handles = [pool.register_forward_hook(self.hook) for pool in pools]

    def hook(self, pool, inputs, output):
        x = inputs[0]
        share = self.share[None, None].to(torch.promote_types(x.dtype, torch.float32))  # sums in float32 under autocast
        (height, width), (rows, cols) = share.shape[-2:], x.shape[-2:]
        padded = [_stride(height, rows) * rows - height, _stride(width, cols) * cols - width]
        share = F.pad(share, (0, padded[1], 0, padded[0]))  # the network pads its input: padding counts 0
        share = F.interpolate(share, size=(rows, cols), mode="area")
        total, weight = self.sums.get(pool, (0, 0))
        self.sums[pool] = (total + (x * share).sum((-2, -1), keepdim=True), weight + share.sum())
        mean = self.means.get(pool)
        return None if mean is None else mean.to(output.dtype)

    def close(self) -> dict:
        for handle in self.handles:
            handle.remove()
        return {pool: total / weight for pool, (total, weight) in self.sums.items()}


def _global_pools(network) -> list:
    """The ``nn.AdaptiveAvgPool2d(1)`` modules of a network (none for a plain function)."""
    modules = network.modules() if isinstance(network, nn.Module) else ()
    return [m for m in modules if isinstance(m, nn.AdaptiveAvgPool2d) and _size(m.output_size) == (1, 1)]


def _size(output_size):
    return tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size, output_size)


def _stride(size: int, features: int) -> int:
    """The power-of-two stride that took a tile side ``size``, padded by the network to
    ``stride * features``, to ``features`` feature rows (the smallest that covers the tile)."""
    stride = 1
    while stride * features < size:
        stride *= 2
    return stride
