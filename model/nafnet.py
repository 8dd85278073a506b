"""Conditional NAFNet: the noise network of IR-SDE / Refusion.

It sees concat(x_t - mu, mu) and the integer step t and predicts the noise eps_hat.
Every NAFBlock is modulated by the time vector (a shift and a scale for each of its
two branches); the U-Net pads its input to a multiple of 2^levels and crops back,
so any image size works.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# width, encoder blocks per level, middle blocks, decoder blocks per level (docs/model.md).
PRESETS = {
    "paper": dict(width=64, enc_blocks=(1, 1, 1, 1, 28), middle_blocks=1, dec_blocks=(1, 1, 1, 1, 1)),
    "refusion": dict(width=64, enc_blocks=(1, 1, 1, 28), middle_blocks=1, dec_blocks=(1, 1, 1, 1)),
    "tiny": dict(width=16, enc_blocks=(1, 1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1, 1)),
}


class SimpleGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of an (N, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal features of the integer step t, `dim // 2` frequencies (sin and cos)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        args = t.float().reshape(-1, 1) * freqs  # reshape, not squeeze: a batch of one stays (1, dim)
        return torch.cat([args.sin(), args.cos()], dim=1)


class NAFBlock(nn.Module):
    def __init__(self, channels: int, time_dim: int):
        super().__init__()
        c = channels
        self.time_mlp = nn.Sequential(SimpleGate(), nn.Linear(time_dim // 2, 4 * c))
        self.norm1 = LayerNorm2d(c)
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.conv2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.gate = SimpleGate()
        self.channel_attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.conv3 = nn.Conv2d(c, c, 1)
        self.norm2 = LayerNorm2d(c)
        self.conv4 = nn.Conv2d(c, 2 * c, 1)
        self.conv5 = nn.Conv2d(c, c, 1)
        # Residual scales start at zero: every block is the identity at initialisation.
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        shift1, scale1, shift2, scale2 = self.time_mlp(time)[:, :, None, None].chunk(4, dim=1)
        y = self.norm1(x) * (1 + scale1) + shift1
        y = self.gate(self.conv2(self.conv1(y)))
        y = self.conv3(y * self.channel_attention(y))
        x = x + y * self.beta
        y = self.norm2(x) * (1 + scale2) + shift2
        y = self.conv5(self.gate(self.conv4(y)))
        return x + y * self.gamma


class Stage(nn.Module):
    """A sequence of NAFBlocks sharing one time vector."""

    def __init__(self, channels: int, count: int, time_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(NAFBlock(channels, time_dim) for _ in range(count))

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, time)
        return x


class ConditionalNAFNet(nn.Module):
    """eps_hat = net(x_t, mu, t) for images (N, 3, H, W) of any size and integer steps t of shape (N,)."""

    def __init__(
        self,
        width: int = 64,
        enc_blocks: Sequence[int] = (1, 1, 1, 28),
        middle_blocks: int = 1,
        dec_blocks: Sequence[int] = (1, 1, 1, 1),
        in_channels: int = 3,
    ):
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(f"enc_blocks {list(enc_blocks)} and dec_blocks {list(dec_blocks)} need the same length")
        time_dim = 4 * width
        self.time_embedding = nn.Sequential(
            SinusoidalTimeEmbedding(width), nn.Linear(width, 2 * time_dim), SimpleGate(), nn.Linear(time_dim, time_dim)
        )
        self.intro = nn.Conv2d(2 * in_channels, width, 3, padding=1)
        self.ending = nn.Conv2d(width, in_channels, 3, padding=1)
        self.encoders, self.downs, self.ups, self.decoders = (nn.ModuleList() for _ in range(4))
        chan = width
        for count in enc_blocks:
            self.encoders.append(Stage(chan, count, time_dim))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle = Stage(chan, middle_blocks, time_dim)
        for count in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(Stage(chan, count, time_dim))
        self.multiple = 2 ** len(enc_blocks)
        self.preconditioned = False

    def set_preconditioning(self, c_in: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor) -> "ConditionalNAFNet":
        """Predict eps_hat = c_skip[t] (x_t - mu) + c_out[t] F(mu + c_in[t] (x_t - mu), mu, t), F being
        the network (tables indexed by t, from `IRSDE.preconditioning`). Not saved in the state dict:
        the tables follow from the configuration."""
        for name, table in (("c_in", c_in), ("c_skip", c_skip), ("c_out", c_out)):
            self.register_buffer(name, table.float(), persistent=False)
        self.preconditioned = True
        return self

    def _coefficient(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)[t].reshape(-1, 1, 1, 1)

    def forward(self, x_t: torch.Tensor, mu: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = x_t.shape[-2:]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        time = self.time_embedding(t)
        residual = x_t - mu
        scale = self._coefficient("c_in", t).to(residual.dtype) if self.preconditioned else 1
        x = torch.cat([residual * scale, mu], dim=1)
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")  # valid for any size, unlike reflect
        x = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x, time)
            skips.append(x)
            x = down(x)
        x = self.middle(x, time)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = decoder(up(x) + skip, time)
        out = self.ending(x)[..., :height, :width]
        if self.preconditioned:
            c_skip, c_out = (self._coefficient(name, t).to(out.dtype) for name in ("c_skip", "c_out"))
            out = c_skip * residual.to(out.dtype) + c_out * out
        return out


def build_noise_network(model_cfg: dict, sde) -> ConditionalNAFNet:
    """The network of a run's `model` configuration: `preset`, size overrides, and `sigma_data`
    (a number: preconditioned by `sde.preconditioning(sigma_data)`; absent or null: the plain
    noise network of the paper)."""
    model_cfg = dict(model_cfg)
    sigma_data = model_cfg.pop("sigma_data", None)
    network = build_network(model_cfg.pop("preset"), **model_cfg)
    if sigma_data is not None:
        if not float(sigma_data) > 0:
            raise ValueError(f"model.sigma_data must be a positive number or null, got {sigma_data!r}")
        network.set_preconditioning(*sde.preconditioning(float(sigma_data)))
    return network


def build_network(preset: str = "tiny", **overrides) -> ConditionalNAFNet:
    """A ConditionalNAFNet from a preset name, with any of its sizes overridden."""
    if preset not in PRESETS:
        raise ValueError(f"model preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return ConditionalNAFNet(**{**PRESETS[preset], **overrides})
