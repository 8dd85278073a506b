"""IR-SDE: the mean-reverting SDE dx = theta_t (mu - x) dt + sigma_t dw with sigma_t^2 = 2 lambda^2 theta_t.

mu is the low-light image, x_0 the normal-light image, lambda = max_sigma. The schedule is
held as tensors indexed by the integer step t = 0..T; every equation of docs/model.md is one
method. Step tensors ``t`` are (N,) integer tensors; per-image coefficients are shaped
(N, 1, 1, 1) so they broadcast over images. Coefficients are computed in float64 and cast to
the images' dtype only when applied: near t = 1 they involve 1 - exp(-2 theta dt) ~ 1e-3,
where float32 loses four digits.
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm


def cosine_theta_schedule(steps: int, s: float = 0.008) -> torch.Tensor:
    """theta_0..theta_T (T + 1 values) from the cosine abar on x = 0..T+2, normalised by abar(0)."""
    x = torch.arange(steps + 3, dtype=torch.float64)
    abar = torch.cos(((x / (steps + 2)) + s) / (1 + s) * math.pi / 2) ** 2
    abar = abar / abar[0]
    return 1 - abar[1:-1]


class IRSDE:
    def __init__(self, steps: int = 100, max_sigma: float = 50 / 255, eps: float = 0.005, device="cpu"):
        self.T = steps
        self.max_sigma = max_sigma
        self.theta = cosine_theta_schedule(steps)
        # thetabar_t = sum_{i=1..t} theta_i: theta_0 is never part of the sum, so thetabar_0 = 0.
        self.thetabar = torch.cumsum(self.theta, 0) - self.theta[0]
        self.dt = -math.log(eps) / float(self.thetabar[-1])
        # sigmabar_t = lambda sqrt(1 - exp(-2 thetabar_t dt)): the marginal std at step t.
        self.sigmabar = max_sigma * torch.sqrt(1 - torch.exp(-2 * self.thetabar * self.dt))
        self.to(device)

    def to(self, device):
        """Moves the float64 schedule to ``device``."""
        self.device = torch.device(device)
        for name in ("theta", "thetabar", "sigmabar"):
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def _at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        table = getattr(self, name)
        t = torch.as_tensor(t, device=table.device).reshape(-1)  # never 0-d: a batch of one works
        return table[t].reshape(-1, 1, 1, 1)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt(2 lambda^2 theta_t)."""
        return torch.sqrt(2 * self.max_sigma**2 * self._at("theta", t))

    def marginal_mean(self, x0: torch.Tensor, mu: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x_t | x_0] = mu + (x_0 - mu) exp(-thetabar_t dt)."""
        return mu + (x0 - mu) * torch.exp(-self._at("thetabar", t) * self.dt).to(x0.dtype)

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return self._at("sigmabar", t)

    def sample_marginal(self, x0, mu, t, generator=None):
        """(x_t, noise) with x_t = marginal_mean + sigmabar_t * noise."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.marginal_mean(x0, mu, t) + self.marginal_std(t).to(x0.dtype) * noise, noise

    def score_from_noise(self, noise_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """score = -eps_hat / sigmabar_t."""
        return -noise_pred / self.marginal_std(t).to(noise_pred.dtype)

    def drift(self, x_t, mu, noise_pred, t) -> torch.Tensor:
        """(theta_t (mu - x_t) - sigma_t^2 score) dt: the reverse-SDE drift over one step."""
        score = self.score_from_noise(noise_pred, t)
        theta, sigma2 = self._at("theta", t).to(x_t.dtype), (self.sigma(t) ** 2).to(x_t.dtype)
        return (theta * (mu - x_t) - sigma2 * score) * self.dt

    def predicted_previous(self, x_t, mu, noise_pred, t) -> torch.Tensor:
        """x_hat_{t-1} = x_t - drift: what the training loss compares with the optimal step."""
        return x_t - self.drift(x_t, mu, noise_pred, t)

    def _transition(self, t, s):
        """A = exp(-(thetabar_t - thetabar_s) dt), B = exp(-thetabar_t dt), C = exp(-thetabar_s dt)."""
        bar_t, bar_s = self._at("thetabar", t), self._at("thetabar", s)
        return torch.exp(-(bar_t - bar_s) * self.dt), torch.exp(-bar_t * self.dt), torch.exp(-bar_s * self.dt)

    def optimal_previous_coefficients(self, t, s=None):
        """(c_t, c_0) with x*_s = mu + c_t (x_t - mu) + c_0 (x_0 - mu); s = t - 1 unless given.

        For s = t - 1, A = exp(-theta_t dt) and these are docs/model.md's A (1 - C^2)/(1 - B^2) and
        C (1 - A^2)/(1 - B^2); a larger jump t -> s < t - 1 is the same posterior of the OU process.
        """
        t = torch.as_tensor(t).reshape(-1)
        s = t - 1 if s is None else torch.as_tensor(s).reshape(-1)
        a, b, c = self._transition(t, s)
        return a * (1 - c**2) / (1 - b**2), c * (1 - a**2) / (1 - b**2)

    def optimal_previous(self, x_t, x0, mu, t, s=None) -> torch.Tensor:
        """x*_s: the mean of x_s given x_t and x_0 (the maximum-likelihood training target for s = t - 1)."""
        c_t, c_0 = (c.to(x_t.dtype) for c in self.optimal_previous_coefficients(t, s))
        return mu + c_t * (x_t - mu) + c_0 * (x0 - mu)

    def posterior_std(self, t, s=None) -> torch.Tensor:
        """lambda sqrt((1 - A^2)(1 - C^2)/(1 - B^2)): the std of x_s given x_t and x_0."""
        t = torch.as_tensor(t).reshape(-1)
        s = t - 1 if s is None else torch.as_tensor(s).reshape(-1)
        a, b, c = self._transition(t, s)
        return self.max_sigma * torch.sqrt((1 - a**2) * (1 - c**2) / (1 - b**2))

    def x0_from_noise(self, x_t, mu, noise_pred, t) -> torch.Tensor:
        """x0_hat = mu + (x_t - mu - sigmabar_t eps_hat) exp(thetabar_t dt)."""
        sigmabar, growth = self.marginal_std(t), torch.exp(self._at("thetabar", t) * self.dt)
        return mu + (x_t - mu - sigmabar.to(x_t.dtype) * noise_pred) * growth.to(x_t.dtype)

    def preconditioning(self, sigma_data: float):
        """(c_in, c_skip, c_out), each (T + 1,) float64, for a network that predicts the noise as
        eps_hat = c_skip (x_t - mu) + c_out F(mu + c_in (x_t - mu), mu, t).

        x_t - mu = B r + sigmabar eps with B = exp(-thetabar_t dt) and r = x_0 - mu, whose RMS is
        taken to be ``sigma_data``. c_in scales x_t - mu to unit RMS; c_skip is the best linear
        estimate of eps from x_t - mu (sigmabar / v^2, v^2 = B^2 sigma_data^2 + sigmabar^2); c_out is
        the RMS of what that estimate leaves (B sigma_data / v), so F's target has unit RMS at every t
        (EDM's preconditioning, applied to the IR-SDE's noise). At t = T the skip alone is almost the
        answer and F's errors are scaled down by c_out ~ B sigma_data / lambda; the plain noise network
        must learn the factor 1 / sigmabar_t itself. t = 0 (never an input) gets zeros.
        """
        b = torch.exp(-self.thetabar * self.dt)
        v = torch.sqrt(b**2 * sigma_data**2 + self.sigmabar**2)
        c_in = 1 / v
        c_skip = self.sigmabar / v**2
        c_out = b * sigma_data / v
        c_skip[0] = c_out[0] = 0.0
        return c_in, c_skip, c_out

    def noisy_start(self, mu: torch.Tensor, generator=None) -> torch.Tensor:
        """x_T = mu + lambda * N(0, I)."""
        return mu + self.max_sigma * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)

    def posterior_step(self, x_t, mu, noise_pred, t, s=None, generator=None) -> torch.Tensor:
        """One step of posterior sampling: draw x_s from N(x*_s(x_t, x0_hat), posterior_std^2)."""
        x0_hat = self.x0_from_noise(x_t, mu, noise_pred, t)
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return self.optimal_previous(x_t, x0_hat, mu, t, s) + self.posterior_std(t, s).to(x_t.dtype) * z

    def reverse_sde_step(self, x_t, mu, noise_pred, t, generator=None) -> torch.Tensor:
        """Euler-Maruyama step of the reverse SDE: x_{t-1} = x_t - drift - sigma_t sqrt(dt) z."""
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return x_t - self.drift(x_t, mu, noise_pred, t) - self.sigma(t).to(x_t.dtype) * math.sqrt(self.dt) * z

    def timesteps(self, count: int):
        """`count` decreasing steps from T to 0 (as even as the integers allow) for sampling."""
        if not 1 <= count <= self.T:
            raise ValueError(f"sampling steps must be in 1..{self.T}, got {count}")
        points = torch.linspace(self.T, 0, count + 1).round().long().tolist()
        return list(zip(points[:-1], points[1:]))

    @torch.no_grad()
    def sample(self, network, mu: torch.Tensor, steps: int = None, method: str = "posterior", generator=None,
               progress: bool = False):
        """Enhanced image from low-light mu: x_T -> x_0 by posterior sampling (default) or the reverse SDE.

        ``steps`` < T jumps between steps with the exact OU posterior (posterior sampling only).
        The result is clamped to [0, 1]. ``progress`` shows a bar over the steps."""
        steps = steps or self.T
        if method not in ("posterior", "sde"):
            raise ValueError(f"sampling method must be 'posterior' or 'sde', got {method!r}")
        if method == "sde" and steps != self.T:
            raise ValueError(f"the reverse SDE runs all {self.T} steps, got steps={steps}")
        x = self.noisy_start(mu, generator)
        batch = mu.shape[0]
        for t, s in tqdm(self.timesteps(steps), desc="steps", leave=False, disable=not progress):
            t_vec = torch.full((batch,), t, device=mu.device, dtype=torch.long)
            noise_pred = network(x, mu, t_vec).float()
            if method == "posterior":
                x = self.posterior_step(x, mu, noise_pred, t_vec, torch.full_like(t_vec, s), generator)
            else:
                x = self.reverse_sde_step(x, mu, noise_pred, t_vec, generator)
        return x.clamp(0, 1)
