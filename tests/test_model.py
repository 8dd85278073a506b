"""The IR-SDE equations against closed forms and simulation, and the Conditional NAFNet's shapes and sizes."""
import math

import pytest
import torch

from model import IRSDE, build_network, build_noise_network


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
