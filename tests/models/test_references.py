"""Schedules, noising, DDIM/DDPM steps and the flow path against diffusers and facebookresearch/flow_matching."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from flow_matching.path import CondOTProbPath

from hpcdiff.models import DDPM, CondOTPath

DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [1000, 37])
def test_alphas_cumprod_equal_diffusers(schedule, num_timesteps):
    ref = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule=DIFFUSERS_SCHEDULE[schedule])
    ours = DDPM(schedule=schedule, num_timesteps=num_timesteps)
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-6, atol=1e-9)
    # diffusers multiplies 1000 float32 factors; we keep float64, so allow float32 round-off only.
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_add_noise_and_velocity_equal_diffusers(schedule):
    ref = DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[schedule])
    ours = DDPM(schedule=schedule)
    g = torch.Generator().manual_seed(1)
    x_0, eps = torch.randn(6, 1, 5, 6, 7, generator=g), torch.randn(6, 1, 5, 6, 7, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    # At t=0 diffusers forms 1 - abar in float32 (abar = 0.9999), losing ~3e-4 of sqrt(1 - abar): atol 1e-5.
    torch.testing.assert_close(ours.add_noise(x_0, eps, t), ref.add_noise(x_0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.velocity(x_0, eps, t), ref.get_velocity(x_0, eps, t), rtol=1e-5, atol=1e-5)


def _fixed_model(x, t):
    """A deterministic stand-in for a network: any smooth function of (x, t) will do."""
    return torch.tanh(0.7 * x) + 0.3 * torch.cos(7.0 * t)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_trajectory_equals_diffusers(schedule, prediction):
    steps = 10
    ours = DDPM(schedule=schedule, prediction=prediction)
    ref = DDIMScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE[schedule],
        prediction_type="v_prediction" if prediction == "v" else "epsilon",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    ref.set_timesteps(steps)
    ts = ours.timesteps(steps)
    assert ts == ref.timesteps.tolist()

    x_ref = x_ours = torch.randn(3, 1, 4, 5, 6, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ts):
        tt = torch.tensor(t / 1000.0)
        x_ref = ref.step(_fixed_model(x_ref, tt), t, x_ref, eta=0.0).prev_sample
        x_ours = ours.step(_fixed_model(x_ours, tt), t, ts[i + 1] if i + 1 < steps else -1, x_ours, 0.0, g)
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize(("num_timesteps", "steps"), [(50, 50), (1000, 10)])
def test_ancestral_steps_equal_diffusers_ddpm(prediction, num_timesteps, steps):
    ref = DDPMScheduler(
        num_train_timesteps=num_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction" if prediction == "v" else "epsilon",
        clip_sample=False,
        timestep_spacing="trailing",
    )
    ref.set_timesteps(steps)
    ours = DDPM(schedule="cosine", num_timesteps=num_timesteps, prediction=prediction)
    ts = ours.timesteps(steps)
    assert ts == ref.timesteps.tolist()
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(ts):
        out = _fixed_model(x, torch.tensor(t / num_timesteps))
        expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        got = ours.step(out, t, ts[i + 1] if i + 1 < steps else -1, x, 1.0, torch.Generator().manual_seed(t))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        x = expected


def test_cond_ot_path_equals_flow_matching():
    g = torch.Generator().manual_seed(4)
    x_0, x_1 = torch.randn(5, 1, 4, 5, 6, generator=g), torch.randn(5, 1, 4, 5, 6, generator=g)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    ref = CondOTProbPath().sample(x_0=x_0, x_1=x_1, t=t)
    x_t, dx_t = CondOTPath().sample(x_0, x_1, t)
    torch.testing.assert_close(x_t, ref.x_t)
    torch.testing.assert_close(dx_t, ref.dx_t)
