"""The IR-SDE equations against closed forms and simulation, the Conditional NAFNet's shapes and sizes,
and its tiled evaluation."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import IRSDE, TiledNetwork, build_network, build_noise_network
from model.tiling import _stride, axis_weights, tile_starts


@pytest.fixture(scope="module")
def sde():
    return IRSDE(steps=100, max_sigma=50 / 255, eps=0.005)


def test_terminal_decay_is_eps(sde):
    assert math.exp(-float(sde.thetabar[-1]) * sde.dt) == pytest.approx(0.005, rel=1e-12)
    assert float(sde.thetabar[0]) == 0.0
    assert sde.theta.shape == (101,)


def test_optimal_step_coefficients_at_t1_are_0_and_1(sde):
    c_t, c_0 = sde.optimal_previous_coefficients(torch.tensor([1]))
    assert float(c_t) == pytest.approx(0.0, abs=1e-7)
    assert float(c_0) == pytest.approx(1.0, abs=1e-6)
    x_t, x0, mu = torch.rand(3, 2, 3, 5, 7).unbind(0)
    torch.testing.assert_close(sde.optimal_previous(x_t, x0, mu, torch.tensor([1, 1])), x0, atol=1e-6, rtol=0)
    assert float(sde.posterior_std(torch.tensor([1]))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("t,s", [(2, 1), (37, 36), (100, 99), (80, 40)])
def test_optimal_step_is_the_gaussian_posterior(sde, t, s):
    """x_s | x_t, x_0 by Bayes from the two OU transitions, computed here in float64."""
    lam2 = sde.max_sigma**2
    decay_s = math.exp(-float(sde.thetabar[s]) * sde.dt)  # x_s | x_0
    decay_ts = math.exp(-float(sde.thetabar[t] - sde.thetabar[s]) * sde.dt)  # x_t | x_s
    var_s, var_ts = lam2 * (1 - decay_s**2), lam2 * (1 - decay_ts**2)
    x_t, x0, mu = 0.7, 0.2, 0.05
    precision = 1 / var_s + decay_ts**2 / var_ts
    mean = ((mu + decay_s * (x0 - mu)) / var_s + decay_ts * (x_t - mu + decay_ts * mu) / var_ts) / precision
    full = lambda v: torch.full((1, 1, 1, 1), v)  # noqa: E731
    got = sde.optimal_previous(full(x_t), full(x0), full(mu), torch.tensor([t]), torch.tensor([s]))
    assert float(got) == pytest.approx(mean, rel=1e-5)
    assert float(sde.posterior_std(torch.tensor([t]), torch.tensor([s]))) == pytest.approx(math.sqrt(1 / precision), rel=1e-4)


@pytest.mark.parametrize("t", [5, 100])
def test_marginal_matches_simulated_forward_sde(sde, t):
    """Euler-Maruyama on dx = theta (mu - x) dt + sqrt(2 lambda^2 theta) dw against the closed-form marginal."""
    gen = torch.Generator().manual_seed(t)
    n, sub = 20000, 5
    x0, mu = 0.8, 0.1
    x = torch.full((n,), x0, dtype=torch.float64)
    h = sde.dt / sub
    for i in range(1, t + 1):
        theta = float(sde.theta[i])
        for _ in range(sub):
            x = x + theta * (mu - x) * h + math.sqrt(2 * sde.max_sigma**2 * theta * h) * torch.randn(n, generator=gen, dtype=torch.float64)
    mean = float(sde.marginal_mean(torch.tensor(x0), torch.tensor(mu), torch.tensor([t])))
    std = float(sde.marginal_std(torch.tensor([t])))
    assert float(x.mean()) == pytest.approx(mean, abs=4 * std / math.sqrt(n) + 2e-3)
    assert float(x.std()) == pytest.approx(std, rel=0.03)


def oracle(sde, x0):
    """A network that knows x_0: its noise makes x0_hat exactly x_0."""
    def network(x_t, mu, t):
        decay = torch.exp(-sde._at("thetabar", t) * sde.dt)
        return (x_t - mu - (x0 - mu) * decay) / sde.marginal_std(t)
    return network


@pytest.mark.parametrize("steps", [100, 7])
def test_posterior_sampling_with_oracle_noise_returns_x0(sde, steps):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 9, 11, generator=gen) * 0.8 + 0.1
    mu = x0 * 0.2
    out = sde.sample(oracle(sde, x0), mu, steps=steps, generator=gen)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_reverse_sde_with_oracle_noise_ends_near_x0(sde):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 16, 16, generator=gen) * 0.8 + 0.1
    out = sde.sample(oracle(sde, x0), x0 * 0.2, method="sde", generator=gen)
    assert float((out - x0).abs().mean()) < 0.03  # Euler-Maruyama leaves noise of order sigma_1 sqrt(dt)


def test_sampling_rejects_bad_arguments(sde):
    mu = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="sampling steps"):
        sde.sample(oracle(sde, mu), mu, steps=101)
    with pytest.raises(ValueError, match="method"):
        sde.sample(oracle(sde, mu), mu, method="ddim")


@pytest.mark.parametrize("batch,height,width", [(1, 17, 23), (3, 8, 8), (2, 33, 1)])
def test_network_shapes_for_odd_sizes_and_batch_one(batch, height, width):
    torch.manual_seed(0)
    net = build_network("tiny", width=8, enc_blocks=(1, 1, 1), dec_blocks=(1, 1, 1))
    for p in net.parameters():  # leave the zero-initialised residual scales: every path must carry signal
        torch.nn.init.normal_(p, std=0.1)
    x_t, mu = torch.rand(2, batch, 3, height, width).unbind(0)
    assert net(x_t, mu, 5).shape == (batch, 3, height, width)
    out = net(x_t, mu, torch.arange(batch) + 1)
    assert out.shape == (batch, 3, height, width)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_time_changes_the_output():
    torch.manual_seed(0)
    net = build_network("tiny", width=8)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x_t, mu = torch.rand(2, 1, 3, 16, 16).unbind(0)
    assert not torch.allclose(net(x_t, mu, torch.tensor([1])), net(x_t, mu, torch.tensor([90])))


@pytest.mark.parametrize("preset,millions", [("paper", 288.0), ("refusion", 76.6)])
def test_preset_parameter_counts(preset, millions):
    with torch.device("meta"):
        net = build_network(preset)
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(millions, rel=0.005)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="paper"):
        build_network("huge")


@pytest.mark.parametrize("t", [1, 10, 50, 100])
def test_preconditioning_is_the_linear_estimate_of_the_noise(sde, t):
    """With x_t - mu = B r + sigmabar eps, r of RMS sigma_data: c_in (x_t - mu) has unit RMS, c_skip (x_t - mu)
    is the least-squares linear estimate of eps, and what it leaves has RMS c_out."""
    sigma_data = 0.3
    c_in, c_skip, c_out = (float(c[t]) for c in sde.preconditioning(sigma_data))
    b, sigmabar = math.exp(-float(sde.thetabar[t]) * sde.dt), float(sde.sigmabar[t])
    gen = torch.Generator().manual_seed(t)
    r = sigma_data * torch.randn(400_000, generator=gen, dtype=torch.float64)
    eps = torch.randn(400_000, generator=gen, dtype=torch.float64)
    y = b * r + sigmabar * eps
    assert float((c_in * y).pow(2).mean().sqrt()) == pytest.approx(1.0, rel=0.01)
    best = float((y * eps).mean() / (y * y).mean())  # least squares fit of eps on y
    standard_error = c_out / (c_in**-1 * math.sqrt(y.numel()))  # of that fit's slope
    assert abs(c_skip - best) < 5 * standard_error
    assert float((eps - c_skip * y).pow(2).mean().sqrt()) == pytest.approx(c_out, rel=0.01)


def test_preconditioned_network_wraps_the_plain_one(sde):
    torch.manual_seed(0)
    plain = build_noise_network({"preset": "tiny", "width": 8}, sde)
    wrapped = build_noise_network({"preset": "tiny", "width": 8, "sigma_data": 0.4}, sde)
    wrapped.load_state_dict(plain.state_dict())  # the tables are not in the state dict
    assert set(plain.state_dict()) == set(wrapped.state_dict())
    for p in plain.parameters():  # the zero-initialised residual scales would hide the blocks
        p.data.add_(0.1 * torch.randn_like(p))
    wrapped.load_state_dict(plain.state_dict())
    x_t, mu = torch.rand(2, 2, 3, 13, 9).unbind(0)
    t = torch.tensor([3, 97])
    c_in, c_skip, c_out = (c[t].reshape(-1, 1, 1, 1).float() for c in sde.preconditioning(0.4))
    with torch.no_grad():
        expected = c_skip * (x_t - mu) + c_out * plain(mu + c_in * (x_t - mu), mu, t)
        got = wrapped(x_t, mu, t)
    assert float((expected - c_skip * (x_t - mu)).abs().max()) > 0.01  # the network's part is not negligible
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sigma_data_must_be_positive(sde):
    with pytest.raises(ValueError, match="model.sigma_data must be a positive number or null, got -1"):
        build_noise_network({"preset": "tiny", "sigma_data": -1}, sde)


# Tiled evaluation of the noise network (model/tiling.py).

def pointwise_network(x_t, mu, t):
    """A stand-in noise network that looks at one pixel at a time (and at t): tiling must not change it."""
    return torch.tanh(1.7 * x_t - mu) * (1 + t.to(x_t.dtype)).reshape(-1, 1, 1, 1) + mu**2


@pytest.mark.parametrize("size,tile,overlap", [(37, 16, 5), (53, 16, 15), (17, 16, 0), (200, 64, 32), (49, 16, 5)])
def test_tile_starts_cover_the_axis_with_the_fewest_tiles(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == size - tile
    shared = [a + tile - b for a, b in zip(starts, starts[1:])]
    assert all(overlap <= n < tile for n in shared), shared
    assert (len(starts) - 2) * (tile - overlap) + tile < size  # one tile fewer cannot cover the axis


def test_blend_weights_cross_fade_where_tiles_overlap_evenly():
    size, tile, overlap = 49, 16, 5  # starts 0, 11, 22, 33: every overlap is exactly 5 pixels
    starts = tile_starts(size, tile, overlap)
    assert starts == [0, 11, 22, 33]
    total = torch.zeros(size, dtype=torch.float64)
    for start, w in zip(starts, axis_weights(size, tile, starts, torch.float64, "cpu")):
        assert w.shape == (tile,) and bool((w > 0).all()) and bool((w <= 1).all())
        total[start:start + tile] += w
    torch.testing.assert_close(total, torch.ones(size, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("height,width,tile,overlap", [(37, 53, 16, 5), (19, 64, 16, 0), (40, 23, 24, 23)])
def test_tiled_pointwise_network_is_the_whole_image_one(height, width, tile, overlap):
    generator = torch.Generator().manual_seed(height * width + tile)
    x_t, mu = torch.rand(2, 2, 3, height, width, dtype=torch.float64, generator=generator).unbind(0)
    t = torch.tensor([3, 71])
    tiled = TiledNetwork(pointwise_network, tile, overlap)(x_t, mu, t)
    assert tiled.dtype == torch.float64
    torch.testing.assert_close(tiled, pointwise_network(x_t, mu, t), rtol=1e-14, atol=1e-14)


def test_tiled_network_visits_tiles_of_the_given_size():
    seen = []

    def recording(x_t, mu, t):
        seen.append(tuple(x_t.shape[-2:]))
        return x_t.clone()

    x = torch.rand(1, 3, 37, 53)
    out = TiledNetwork(recording, 16, 5)(x, x, torch.tensor([1]))
    assert len(seen) == len(tile_starts(37, 16, 5)) * len(tile_starts(53, 16, 5))
    assert set(seen) == {(16, 16)}
    torch.testing.assert_close(out, x, rtol=1e-6, atol=0)


def test_an_image_within_one_tile_goes_through_the_network_unchanged():
    network = build_network("tiny", width=8, enc_blocks=(1, 1), dec_blocks=(1, 1)).eval()
    x_t, mu = torch.rand(2, 1, 3, 21, 32).unbind(0)
    with torch.no_grad():
        assert torch.equal(TiledNetwork(network, 32)(x_t, mu, torch.tensor([9])), network(x_t, mu, torch.tensor([9])))


@pytest.mark.parametrize("tile,overlap,message", [
    (0, 0, "tile must be a positive integer, got 0"),
    (16.0, 4, "tile must be a positive integer, got 16.0"),
    (16, 16, r"tile overlap must be an integer in \[0, tile\) = \[0, 16\), got 16"),
    (16, -1, "got -1"),
])
def test_tiling_rejects_bad_sizes(tile, overlap, message):
    with pytest.raises(ValueError, match=message):
        TiledNetwork(pointwise_network, tile, overlap)


def test_tiles_cross_fade_linearly_in_both_directions():
    """Tile (i, j) predicts the constant 10 i + j; where tiles overlap the blend must ramp linearly
    from one to the next, rows and columns each on their own: 10 fade(y over rows) + fade(x over columns)."""
    tile, overlap = 16, 5
    height, width = 38, 49  # rows: starts 0, 11, 22 (overlaps 5, 5); columns: 0, 11, 22, 33
    row_starts, col_starts = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    assert (row_starts, col_starts) == ([0, 11, 22], [0, 11, 22, 33])

    def constant_per_tile(x_t, mu, t):
        call = constant_per_tile.calls
        constant_per_tile.calls += 1
        i, j = divmod(call, len(col_starts))
        return torch.full_like(x_t, 10.0 * i + j)
    constant_per_tile.calls = 0

    def fade(size, starts):
        """The tile index, blended linearly across each `overlap`-pixel overlap."""
        out = torch.zeros(size, dtype=torch.float64)
        for x in range(size):
            inside = [k for k, s in enumerate(starts) if s <= x < s + tile]
            if len(inside) == 1:
                out[x] = inside[0]
            else:  # x is the (d + 1)-th of the overlap's pixels: weight (d + 1) / (overlap + 1) on the later tile
                k = inside[1]
                out[x] = k - 1 + (x - starts[k] + 1) / (overlap + 1)
        return out

    x = torch.zeros(1, 3, height, width, dtype=torch.float64)
    out = TiledNetwork(constant_per_tile, tile, overlap)(x, x, torch.tensor([1]))
    expected = 10 * fade(height, row_starts)[:, None] + fade(width, col_starts)[None, :]
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(out[0, 2], expected, rtol=0, atol=1e-13)


class GlobalAttention(torch.nn.Module):
    """Pointwise but for a channel attention that pools over the whole input, as NAFNet's does."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.mix = torch.nn.Conv2d(3, 3, 1).double()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.mix.weight.copy_(torch.randn(3, 3, 1, 1, generator=generator, dtype=torch.float64))
            self.mix.bias.copy_(torch.randn(3, generator=generator, dtype=torch.float64))

    def forward(self, x_t, mu, t):
        return x_t * torch.sigmoid(4 * self.mix(self.pool(x_t))) + mu


@torch.no_grad()
def test_image_pooling_gives_the_tiles_the_image_means():
    network = GlobalAttention()
    calls = []
    network.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[-2:]))
    generator = torch.Generator().manual_seed(11)
    x_t, mu = torch.rand(2, 2, 3, 37, 53, dtype=torch.float64, generator=generator).unbind(0)
    t = torch.tensor([5, 6])
    whole = network(x_t, mu, t)
    tiles = len(tile_starts(37, 16, 12)) * len(tile_starts(53, 16, 12))
    # Overlaps of 12-13 pixels in 16-pixel tiles: a tile's two ramps meet, so the tiles' weights
    # sum to 1-1.58 per pixel, and only divided by that sum do they count every pixel once.
    calls.clear()
    by_tile = TiledNetwork(network, 16, 12, pooling="tile")(x_t, mu, t)
    assert len(calls) == tiles and float((by_tile - whole).abs().max()) > 1e-2  # the tiles' own means
    calls.clear()
    tiled = TiledNetwork(network, 16, 12)
    torch.testing.assert_close(tiled(x_t, mu, t), whole, rtol=1e-12, atol=1e-12)  # the pooled input is x_t itself
    assert len(calls) == 2 * tiles  # one pass gathers the means, one uses them
    assert not network.pool._forward_hooks  # the hooks live for one pass only
    first = next(iter(tiled.image_means.values()))
    torch.testing.assert_close(first, x_t.mean((-2, -1), keepdim=True), rtol=1e-13, atol=0)
    # Another image (here a batch of one) starts afresh.
    torch.testing.assert_close(tiled(x_t[1:], mu[1:], t[1:]), whole[1:], rtol=1e-12, atol=1e-12)


class PaddedGlobalAttention(GlobalAttention):
    """GlobalAttention whose pool sees features at half resolution of an input padded to a
    multiple of 4, as NAFNet's deeper blocks do."""

    def forward(self, x_t, mu, t):
        height, width = x_t.shape[-2:]
        padded = F.pad(x_t, (0, -width % 4, 0, -height % 4), mode="replicate")
        features = F.avg_pool2d(padded, 2)
        return x_t * torch.sigmoid(4 * self.mix(self.pool(features))) + mu


def test_image_pooling_follows_the_network_s_padding_and_strides():
    network = PaddedGlobalAttention()
    x_t, mu = torch.rand(2, 2, 3, 45, 38, dtype=torch.float64, generator=torch.Generator().manual_seed(12)).unbind(0)
    x_t = x_t + torch.linspace(0, 1, 38, dtype=torch.float64)  # a gradient across the image: tiles' means differ
    t = torch.tensor([1, 2])
    errors = {}
    with torch.no_grad():
        # The attention of the image's own mean (the whole-image call would also count its padding).
        expected = x_t * torch.sigmoid(4 * network.mix(x_t.mean((-2, -1), keepdim=True))) + mu
        for pooling in ("tile", "image"):
            tiled = TiledNetwork(network, 18, 5, pooling=pooling)  # tiles padded to 20, pooled at 10
            tiled(x_t, mu, t)
            errors[pooling] = float((tiled(x_t, mu, t) - expected).abs().max())
    # Half-resolution features of tiles that start at odd pixels are not the image's: close, not equal.
    assert errors["image"] < 0.01 * errors["tile"], errors


@pytest.mark.parametrize("size,features,stride", [(16, 16, 1), (37, 48, 1), (37, 24, 2), (37, 3, 16), (17, 2, 16), (24, 6, 4)])
def test_stride_of_a_padded_tile(size, features, stride):
    assert _stride(size, features) == stride
