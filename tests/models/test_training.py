"""A short Adam run on blurred blobs: the loss falls clearly for flow matching and DDPM, in 2D and 3D."""

import pytest
import torch

from hpcdiff.models import CovariateSpec, ObjectiveConfig, UNet, UNetConfig, build_objective

pytestmark = pytest.mark.slow  # trains models: left out of `make test-quick`

COVARIATES = [
    CovariateSpec(name="age", kind="continuous", mean=60.0, std=10.0),
    CovariateSpec(name="sex", kind="categorical", levels=["F", "M"]),
]


def blobs(dims, num, size, seed):
    """Gaussian blobs in [-1, 1] whose width follows 'age' and whose position follows 'sex'."""
    g = torch.Generator().manual_seed(seed)
    age = 40.0 + 40.0 * torch.rand(num, generator=g)
    sex = torch.randint(0, 2, (num,), generator=g)
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    grids = torch.meshgrid(*[axis] * dims, indexing="ij")
    centre = (sex.float() - 0.5) * size / 3
    r2 = sum(((grid[None] - (centre.view(-1, *[1] * dims) if i == 0 else 0)) ** 2) for i, grid in enumerate(grids))
    width = (age / 20.0).view(-1, *[1] * dims)
    x = 2 * torch.exp(-r2 / (2 * width**2)) - 1
    return x[:, None], {"age": age, "sex": sex}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "objective",
    [
        ObjectiveConfig(kind="flow"),
        ObjectiveConfig(kind="ddpm", schedule="cosine", prediction="v"),
        ObjectiveConfig(kind="ddpm", schedule="linear", prediction="epsilon"),
    ],
    ids=["flow", "ddpm-cosine-v", "ddpm-linear-eps"],
)
def test_loss_falls_over_a_short_run(dims, objective):
    size, num, steps = (16, 16, 60) if dims == 2 else (16, 4, 40)
    data, covariates = blobs(dims, num, size, seed=0)
    torch.manual_seed(0)
    model = UNet(UNetConfig(dims=dims, base_channels=8, channel_mults=(1, 2), covariates=COVARIATES))
    obj = build_objective(objective)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        loss = obj.loss(model, data, covariates, torch.Generator().manual_seed(step), cond_drop_prob=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}"
