"""Denoising diffusion (Ho et al. 2020) with DDIM sampling (Song et al. 2021).

Symbols of DDPM and diffusers: x_0 is data, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, timesteps
t = 0..T-1. The network sees t / T in [0, 1) and predicts eps or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
(Salimans & Ho 2022).

Sampling with fewer steps than T walks the evenly spaced "trailing" timesteps of diffusers
(``round(T - i*T/steps) - 1``: the first step starts from pure noise at t = T-1) and ends at abar = 1.
Both samplers are one update rule, DDIM's, on that respaced schedule: ``ddim`` is its deterministic eta = 0
case; ``ancestral`` is eta = 1, which equals DDPM ancestral sampling on the respaced betas
beta'_t = 1 - abar_t / abar_prev with the posterior ("fixed_small") variance.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcdiff.models.objective import (
    Covariates,
    Generators,
    Objective,
    drop_mask,
    guided,
    model_device,
    randint,
    randn,
    warn_unused_guidance,
)

MAX_BETA = 0.999


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule (diffusers ``beta_schedule="linear"``), shape (num_timesteps,) float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, max_beta: float = MAX_BETA) -> Tensor:
    """Nichol & Dhariwal's cosine schedule (diffusers ``squaredcos_cap_v2``), shape (num_timesteps,) float64."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def _per_sample(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values[t] shaped (batch, 1, ...) to broadcast against an ndim-dimensional batch."""
    return values.to(t.device)[t].view(-1, *[1] * (ndim - 1))


class DDPM(Objective):
    """Epsilon- or v-prediction diffusion with ancestral and DDIM sampling."""

    samplers = ("ancestral", "ddim")
    default_sampler = "ddim"

    def __init__(
        self,
        schedule: Literal["linear", "cosine"] = "cosine",
        prediction: Literal["epsilon", "v"] = "epsilon",
        num_timesteps: int = 1000,
    ) -> None:
        if schedule not in _SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(_SCHEDULES)}")
        if prediction not in ("epsilon", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; choose epsilon or v")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
        self.schedule, self.prediction, self.num_timesteps = schedule, prediction, num_timesteps
        self.betas = _SCHEDULES[schedule](num_timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        """abar_t, shape (num_timesteps,) float64."""
        self._sqrt_abar = self.alphas_cumprod.sqrt().float()
        self._sqrt_1m_abar = (1 - self.alphas_cumprod).sqrt().float()

    def add_noise(self, x_0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

        Args:
            x_0 (Tensor): data, shape (batch, C, *spatial).
            noise (Tensor): eps, same shape.
            t (Tensor): int64 timesteps, shape (batch,).
        """
        n = x_0.ndim
        return _per_sample(self._sqrt_abar, t, n) * x_0 + _per_sample(self._sqrt_1m_abar, t, n) * noise

    def velocity(self, x_0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target sqrt(abar_t) eps - sqrt(1 - abar_t) x_0; shapes as in ``add_noise``."""
        n = x_0.ndim
        return _per_sample(self._sqrt_abar, t, n) * noise - _per_sample(self._sqrt_1m_abar, t, n) * x_0

    def timesteps(self, steps: int) -> list[int]:
        """The ``steps`` descending timesteps a sampler visits, evenly spaced and starting at T-1."""
        T = self.num_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in 1..num_timesteps={T}, got {steps!r}")
        return [round(T * (steps - i) / steps) - 1 for i in range(steps)]

    def step(self, model_output: Tensor, t: int, t_prev: int, x_t: Tensor, eta: float, generator: Generators) -> Tensor:
        """One DDIM update from timestep ``t`` to ``t_prev`` (-1 means the end, abar = 1).

        Args:
            model_output (Tensor): predicted eps or v, shape (batch, C, *spatial).
            t (int): current timestep.
            t_prev (int): next (smaller) timestep, or -1.
            x_t (Tensor): current sample, same shape as ``model_output``.
            eta (float): 0 for deterministic DDIM, 1 for DDPM ancestral sampling on the respaced schedule.
            generator (torch.Generator): source of the fresh noise when eta > 0.

        Returns:
            Tensor: x at ``t_prev``.
        """
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        a, b = math.sqrt(abar_t), math.sqrt(1 - abar_t)
        out = model_output.float()
        if self.prediction == "epsilon":
            eps = out
            x_0 = (x_t - b * eps) / a
        else:
            x_0 = a * x_t - b * out
            eps = b * x_t + a * out
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x_prev = math.sqrt(abar_prev) * x_0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * randn(tuple(x_t.shape), generator, x_t.device)
        return x_prev

    def loss(
        self,
        model: nn.Module,
        x_data: Tensor,
        covariates: Covariates | None,
        generator: Generators,
        cond_drop_prob: float = 0.0,
    ) -> Tensor:
        """||model(x_t, t/T) - target||^2, t uniform over 0..T-1, target eps or v; see Objective.loss."""
        batch, device = x_data.shape[0], x_data.device
        t = randint(self.num_timesteps, batch, generator, device)
        eps = randn(tuple(x_data.shape), generator, device)
        x_0 = x_data.float()
        x_t = self.add_noise(x_0, eps, t)
        target = eps if self.prediction == "epsilon" else self.velocity(x_0, eps, t)
        drop = drop_mask(batch, cond_drop_prob, covariates, generator, device)
        return F.mse_loss(model(x_t, t.float() / self.num_timesteps, covariates, drop).float(), target)

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        shape: tuple[int, ...],
        covariates: Covariates | None,
        generator: Generators,
        steps: int,
        sampler: str | None = None,
        guidance: float = 1.0,
    ) -> Tensor:
        """Denoise x_T ~ N(0, I) over ``timesteps(steps)``; see Objective.sample and the module docstring."""
        eta = 1.0 if self._resolve_sampler(sampler, steps) == "ancestral" else 0.0
        warn_unused_guidance(covariates, guidance)
        device = model_device(model)
        ts = self.timesteps(steps)
        x = randn(tuple(shape), generator, device)
        for i, t in enumerate(ts):
            t_model = torch.full((shape[0],), t / self.num_timesteps, device=device)
            out = guided(model, x, t_model, covariates, guidance)
            x = self.step(out, t, ts[i + 1] if i + 1 < len(ts) else -1, x, eta, generator)
        return x
