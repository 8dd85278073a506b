"""A noise network evaluated on overlapping tiles, for images whose activations do not fit memory.

The SDE still samples the whole image (one x_t, one noise draw per step); only the network's
prediction is computed tile by tile and blended. Each tile's output is weighted by ramps that
rise linearly across its overlap with the tile before it and fall across its overlap with the
tile after it (image borders get no ramp), and the blend divides by the summed weights, so a
network that looks at one pixel at a time gives the whole-image prediction to rounding. NAFNet
does not: its convolutions see a neighbourhood and its channel attention pools over the whole
input, so a tile's prediction differs from the whole image's near the tile's edges and a little
everywhere; the ramps keep that from leaving seams. A step's peak memory is one tile's
activations plus two image-sized accumulators.
"""
from __future__ import annotations

import torch


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


class TiledNetwork:
    """``network(x_t, mu, t)`` computed on overlapping ``tile`` x ``tile`` crops and blended;
    neighbouring tiles share at least ``overlap`` pixels (default: `default_overlap`).

    Images no larger than one tile go through ``network`` whole, unchanged. ``tile`` works best as
    a multiple of the network's size multiple (16 for the 4-level presets): other sizes are padded
    by the network itself.
    """

    def __init__(self, network, tile: int, overlap: int = None):
        check_tiling(tile, overlap)
        self.network, self.tile = network, tile
        self.overlap = default_overlap(tile) if overlap is None else overlap

    def __call__(self, x_t: torch.Tensor, mu: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = x_t.shape[-2:]
        if height <= self.tile and width <= self.tile:
            return self.network(x_t, mu, t)
        rows, cols = (tile_starts(size, self.tile, self.overlap) for size in (height, width))
        out = total = None
        for top, w_row in zip(rows, axis_weights(height, self.tile, rows, torch.float64, x_t.device)):
            for left, w_col in zip(cols, axis_weights(width, self.tile, cols, torch.float64, x_t.device)):
                box = (..., slice(top, top + self.tile), slice(left, left + self.tile))
                pred = self.network(x_t[box], mu[box], t)
                if out is None:  # blended in float32, or float64 for a float64 network
                    blend = torch.promote_types(pred.dtype, torch.float32)
                    out = pred.new_zeros(pred.shape[:-2] + (height, width), dtype=blend)
                    total = torch.zeros(height, width, dtype=blend, device=x_t.device)
                weight = (w_row[:, None] * w_col[None, :]).to(blend)
                out[box] += pred.to(blend) * weight
                total[box[1:]] += weight
        return (out / total).to(pred.dtype)
