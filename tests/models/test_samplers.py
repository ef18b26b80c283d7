"""Samplers and objectives against closed forms: exact integration, a point-mass denoiser, guidance, errors."""

import math

import pytest
import torch
from torch import nn

from hpcdiff.config import build
from hpcdiff.errors import ConfigError
from hpcdiff.models import DDPM, FlowMatching, ObjectiveConfig, build_objective

SHAPE = (3, 1, 4, 5, 6)


def _noise(seed):
    """The x_0 / x_T a sampler draws first from a generator seeded with ``seed``."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


class VelocityOfTime(nn.Module):
    """v(x, t) = a + b t (+ cond if covariates are given), whatever x: integrable in closed form."""

    def __init__(self, a, b=0.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, t, covariates=None, drop=None):
        v = self.a + self.b * t.view(-1, *[1] * (x.ndim - 1))
        if covariates is not None:
            v = v + covariates["c"].view(-1, *[1] * (x.ndim - 1))
        return v.expand_as(x)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 7])
def test_constant_velocity_integrates_exactly(sampler, steps):
    x_1 = FlowMatching().sample(VelocityOfTime(0.75), SHAPE, None, torch.Generator().manual_seed(5), steps, sampler)
    torch.testing.assert_close(x_1, _noise(5) + 0.75)


@pytest.mark.parametrize("steps", [1, 4])
def test_heun_is_exact_for_velocity_linear_in_time_and_euler_is_first_order(steps):
    a, b = 0.5, 2.0  # x_1 = x_0 + a + b/2 exactly
    model = VelocityOfTime(a, b)
    heun = FlowMatching().sample(model, SHAPE, None, torch.Generator().manual_seed(6), steps, "heun")
    euler = FlowMatching().sample(model, SHAPE, None, torch.Generator().manual_seed(6), steps, "euler")
    torch.testing.assert_close(heun, _noise(6) + a + b / 2)
    torch.testing.assert_close(euler, _noise(6) + a + b / 2 - b / (2 * steps))  # left Riemann sum of b t


def test_flow_guidance_extrapolates_from_unconditional_velocity():
    cond = {"c": torch.tensor([1.0, -2.0, 0.5])}
    g = 3.0
    x_1 = FlowMatching().sample(VelocityOfTime(0.25), SHAPE, cond, torch.Generator().manual_seed(7), 3, guidance=g)
    # v = v_u + g (v_c - v_u) = 0.25 + g * c
    torch.testing.assert_close(x_1, _noise(7) + 0.25 + g * cond["c"].view(-1, 1, 1, 1, 1))


class PointMassDenoiser(nn.Module):
    """The exact eps (or v) predictor when all data equals ``x_star``."""

    def __init__(self, ddpm, x_star):
        super().__init__()
        self.ddpm, self.x_star = ddpm, x_star

    def forward(self, x_t, t, covariates=None, drop=None):
        steps = torch.round(t * self.ddpm.num_timesteps).long()
        x_0 = self.x_star.expand_as(x_t)
        a = self.ddpm.alphas_cumprod[steps].sqrt().float().view(-1, 1, 1, 1, 1)
        eps = (x_t - a * x_0) / (1 - a**2).sqrt()
        return eps if self.ddpm.prediction == "epsilon" else self.ddpm.velocity(x_0, eps, steps)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_ideal_denoiser_of_a_point_mass_returns_the_point(schedule, prediction, sampler):
    ddpm = DDPM(schedule=schedule, prediction=prediction)
    x_star = torch.linspace(-1, 1, math.prod(SHAPE[1:])).view(1, *SHAPE[1:])
    out = ddpm.sample(PointMassDenoiser(ddpm, x_star), SHAPE, None, torch.Generator().manual_seed(8), 20, sampler)
    torch.testing.assert_close(out, x_star.expand(SHAPE), rtol=0, atol=1e-5)


def test_ddim_is_deterministic_in_its_noise_and_ancestral_adds_noise():
    ddpm = DDPM(num_timesteps=100)
    model = VelocityOfTime(0.1, 0.2)
    runs = [ddpm.sample(model, SHAPE, None, torch.Generator().manual_seed(s), 10, "ddim") for s in (9, 9)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    # with the same x_T, ancestral differs from DDIM only through the extra noise it draws
    anc = ddpm.sample(model, SHAPE, None, torch.Generator().manual_seed(9), 10, "ancestral")
    assert (anc - runs[0]).abs().max() > 1e-2


def test_timesteps_are_trailing_and_strictly_decreasing():
    ddpm = DDPM(num_timesteps=1000)
    assert ddpm.timesteps(4) == [999, 749, 499, 249]
    for steps in (1, 3, 7, 999, 1000):
        ts = ddpm.timesteps(steps)
        assert len(ts) == steps and ts[0] == 999 and all(a > b >= 0 for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("objective", [FlowMatching(), DDPM(num_timesteps=10)])
def test_bad_sampler_or_steps_raise_naming_the_choices(objective):
    model = VelocityOfTime(0.0)
    with pytest.raises(ValueError, match="unknown sampler 'rk4'.*" + objective.samplers[0]):
        objective.sample(model, SHAPE, None, torch.Generator(), 4, "rk4")
    with pytest.raises(ValueError, match="steps"):
        objective.sample(model, SHAPE, None, torch.Generator(), 0)
    if isinstance(objective, DDPM):
        with pytest.raises(ValueError, match="num_timesteps=10"):
            objective.sample(model, SHAPE, None, torch.Generator(), 11)


def test_build_objective_and_config_validation(caplog):
    assert isinstance(build_objective(ObjectiveConfig(kind="flow")), FlowMatching)
    ddpm = build_objective(build(ObjectiveConfig, {"kind": "ddpm", "schedule": "linear", "prediction": "v"}))
    assert isinstance(ddpm, DDPM) and ddpm.schedule == "linear" and ddpm.prediction == "v"
    with pytest.raises(ConfigError, match="objective.kind"):
        ObjectiveConfig(kind="score")
    with pytest.raises(ConfigError, match="did you mean 'schedule'"):
        build(ObjectiveConfig, {"kind": "ddpm", "schedul": "linear"})
    with caplog.at_level("WARNING"):
        build_objective(ObjectiveConfig(kind="flow", schedule="linear"))
    assert "objective.schedule ignored" in caplog.text
