"""The spatial entropy loss beside l1 in your own training loop.

A small convolutional network learns to brighten dark, noisy images (synthetic here; use your data
loader). The objective is ``l1 + weight * spatial entropy``; the entropy term compares the local
joint histograms of intensities and neighbour values, which l1 alone does not see.

- The network outputs [-1, 1] (tanh), so the loss is told ``data_range=(-1, 1)``; without it the
  negative half would be clamped to 0 and get no gradient (the loss warns when that happens).
- On CUDA the forward runs under autocast (float16) with a GradScaler; the loss accepts float16
  inputs and computes in float32.
- The objective module is compiled with ``torch.compile(fullgraph=True)``; the network is left eager
  (compile it too if you like).
- Training weights ``neighbor_weights='shuffled'`` (the default) are redrawn at every call, from
  torch's global generator (seeded by ``torch.manual_seed``), which a compiled graph can draw from;
  ``SpatialEntropyLoss(seed=...)`` owns a generator instead, which ``fullgraph=True`` cannot trace.
  Validation uses ``neighbor_weights='mean'``, whose value does not depend on a draw.

DDP: the loss has no parameters or buffers, so wrap only the network in
``DistributedDataParallel``; each rank computes the loss on its own batch ('mean' per rank, and DDP
averages the gradients). Give every rank the same ``seed`` to draw the same neighbour weights on all
ranks, or ``seed + rank`` for independent draws.

    python examples/loss_in_your_loop.py            # 200 steps on 64x64 crops
    python examples/loss_in_your_loop.py --tiny     # a few steps on 16x16 crops (CI)
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from entropy_kernels import SpatialEntropyLoss, available_backends


class Objective(nn.Module):
    """l1 plus the weighted spatial entropy loss, for images in [-1, 1]."""

    def __init__(self, entropy_weight: float, **entropy_options):
        super().__init__()
        self.entropy_weight = entropy_weight
        self.entropy = SpatialEntropyLoss(data_range=(-1, 1), **entropy_options)

    def forward(self, pred: torch.Tensor, target: torch.Tensor):
        l1 = F.l1_loss(pred, target)
        entropy = self.entropy(pred, target)
        return l1 + self.entropy_weight * entropy, l1.detach(), entropy.detach()


def make_network(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
        nn.Conv2d(width, 3, 3, padding=1), nn.Tanh(),
    )


def batch(count: int, crop: int, generator: torch.Generator, device: torch.device):
    """(dark noisy input, clean target), both in [-1, 1]: smooth random images, darkened, plus noise."""
    coarse = torch.rand(count, 3, crop // 4, crop // 4, generator=generator)
    clean = F.interpolate(coarse, scale_factor=4, mode="bilinear", align_corners=False)
    dark = 0.25 * clean + 0.03 * torch.randn(clean.shape, generator=generator)
    return (2 * dark - 1).to(device), (2 * clean - 1).to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps on tiny crops (for CI)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-compile", action="store_true", help="run the objective eagerly")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.crop, args.width, bins, window = 3, 2, 16, 8, 8, 3
    else:
        args.batch, args.crop, args.width, bins, window = 8, 64, 32, 32, 11
    device = torch.device(args.device)
    print("backends:", available_backends()[device.type])

    torch.manual_seed(0)
    network = make_network(args.width).to(device)
    train_objective = Objective(0.1, bins=bins, window=window)
    val_objective = Objective(0.1, bins=bins, window=window, neighbor_weights="mean")
    if not args.no_compile:
        train_objective = torch.compile(train_objective, fullgraph=True)
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    data = torch.Generator().manual_seed(1)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        low, high = batch(args.batch, args.crop, data, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            pred = network(low)
        # The loss runs outside autocast: half inputs are computed in float32 either way.
        total, l1, entropy = train_objective(pred, high)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimiser)
        scaler.update()
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {total.item():.4f}  l1 {l1.item():.4f}  entropy {entropy.item():.4f}  "
                  f"({time.perf_counter() - start:.1f} s)")

    network.eval()
    with torch.no_grad():
        low, high = batch(args.batch, args.crop, data, device)
        _, l1, entropy = val_objective(network(low), high)
    print(f"validation  l1 {l1.item():.4f}  entropy {entropy.item():.4f} (neighbor_weights='mean')")


if __name__ == "__main__":
    main()
