"""Flow matching on the conditional optimal-transport (rectified) path (Lipman et al. 2023; Liu et al. 2023).

Symbols of facebookresearch/flow_matching: x_0 ~ N(0, I) is noise, x_1 is data, t runs from 0 (noise) to 1
(data), x_t = t x_1 + (1 - t) x_0 and the network regresses the velocity u_t = dx_t/dt = x_1 - x_0.
"""

from __future__ import annotations

from collections.abc import Callable

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
    rand,
    randn,
    warn_unused_guidance,
)

Velocity = Callable[[Tensor, float], Tensor]


class CondOTPath:
    """The straight line from noise to data."""

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Point and velocity on the path.

        Args:
            x_0 (Tensor): noise, shape (batch, C, *spatial).
            x_1 (Tensor): data, same shape.
            t (Tensor): shape (batch,), in [0, 1].

        Returns:
            tuple[Tensor, Tensor]: x_t and dx_t = x_1 - x_0, each of the data's shape.
        """
        t = t.view(-1, *[1] * (x_1.ndim - 1)).to(x_1.dtype)
        return t * x_1 + (1 - t) * x_0, x_1 - x_0


def euler(velocity: Velocity, x: Tensor, steps: int) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t=0 to 1 in ``steps`` equal explicit Euler steps."""
    dt = 1.0 / steps
    for i in range(steps):
        x = x + dt * velocity(x, i * dt)
    return x


def heun(velocity: Velocity, x: Tensor, steps: int) -> Tensor:
    """Integrate from t=0 to 1 with Heun's second-order method (two velocity calls per step)."""
    dt = 1.0 / steps
    for i in range(steps):
        v_0 = velocity(x, i * dt)
        v_1 = velocity(x + dt * v_0, (i + 1) * dt)
        x = x + 0.5 * dt * (v_0 + v_1)
    return x


_INTEGRATORS = {"euler": euler, "heun": heun}


class FlowMatching(Objective):
    """Velocity prediction on the conditional OT path; ODE sampling from noise to data."""

    samplers = ("euler", "heun")
    default_sampler = "heun"

    def __init__(self) -> None:
        self.path = CondOTPath()

    def loss(
        self,
        model: nn.Module,
        x_data: Tensor,
        covariates: Covariates | None,
        generator: Generators,
        cond_drop_prob: float = 0.0,
    ) -> Tensor:
        """||model(x_t, t) - (x_1 - x_0)||^2 with t ~ U[0, 1) and x_0 ~ N(0, I); see Objective.loss."""
        batch, device = x_data.shape[0], x_data.device
        t = rand(batch, generator, device)
        x_0 = randn(tuple(x_data.shape), generator, device)
        x_t, u_t = self.path.sample(x_0, x_data.float(), t)
        drop = drop_mask(batch, cond_drop_prob, covariates, generator, device)
        return F.mse_loss(model(x_t, t, covariates, drop).float(), u_t)

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
        """Integrate the learned velocity from x_0 ~ N(0, I) at t=0 to t=1; see Objective.sample."""
        integrate = _INTEGRATORS[self._resolve_sampler(sampler, steps)]
        warn_unused_guidance(covariates, guidance)
        device = model_device(model)
        batch = shape[0]

        def velocity(x: Tensor, t: float) -> Tensor:
            return guided(model, x, torch.full((batch,), t, device=device), covariates, guidance)

        return integrate(velocity, randn(tuple(shape), generator, device), steps)
