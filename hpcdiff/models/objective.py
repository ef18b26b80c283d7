"""The one interface the training and sampling loops see: a loss to minimise and a sampler.

Flow matching (flow.py) and DDPM (diffusion.py) implement it. Every random number is drawn from the
``torch.Generator`` passed in, so noise is a function of the generator's seed (seed, step, rank) and resume
can be exact.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hpcdiff.config import check

log = logging.getLogger(__name__)

Covariates = Mapping[str, Tensor]


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Which generative objective to train and sample with."""

    kind: Literal["flow", "ddpm"]
    """flow: flow matching on the conditional OT path; ddpm: denoising diffusion."""
    schedule: Literal["linear", "cosine"] = "cosine"
    """DDPM only: beta schedule (linear 1e-4..0.02, or cosine = diffusers' squaredcos_cap_v2)."""
    prediction: Literal["epsilon", "v"] = "epsilon"
    """DDPM only: the network predicts the noise (epsilon) or v = sqrt(abar) eps - sqrt(1-abar) x_0."""
    num_timesteps: int = 1000
    """DDPM only: length of the training schedule."""

    def __post_init__(self) -> None:
        check(self.kind in ("flow", "ddpm"), "objective.kind", f"{self.kind!r} is not flow|ddpm")
        check(self.schedule in ("linear", "cosine"), "objective.schedule", f"{self.schedule!r} is not linear|cosine")
        check(self.prediction in ("epsilon", "v"), "objective.prediction", f"{self.prediction!r} is not epsilon|v")
        check(self.num_timesteps >= 2, "objective.num_timesteps", f"must be >= 2, got {self.num_timesteps}")


class Objective(ABC):
    """A generative objective: ``loss`` for training, ``sample`` for generation."""

    samplers: tuple[str, ...]
    """Sampler names ``sample`` accepts."""
    default_sampler: str
    """Used when ``sample`` gets ``sampler=None``."""

    @abstractmethod
    def loss(
        self,
        model: nn.Module,
        x_data: Tensor,
        covariates: Covariates | None,
        generator: Generators,
        cond_drop_prob: float = 0.0,
    ) -> Tensor:
        """Mean squared error of the model's prediction on one batch, as a float32 scalar.

        Args:
            model (nn.Module): called as ``model(x_t, t, covariates, drop)``; a UNet, or DDP around one.
            x_data (Tensor): data batch, shape (batch, C, *spatial).
            covariates (dict[str, Tensor] | None): per name, shape (batch,).
            generator (Generators): the only source of randomness (time, noise, dropped conditions); one
                per sample makes each sample's draws independent of its batch.
            cond_drop_prob (float): probability of replacing a sample's covariates by the null embedding.
        """

    @abstractmethod
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
        """Generate a batch from noise.

        Args:
            model (nn.Module): the trained network (usually the EMA weights), in eval mode.
            shape (tuple[int, ...]): (batch, C, *spatial).
            covariates (dict[str, Tensor] | None): per name, shape (batch,); None samples unconditionally.
            generator (Generators): the only source of randomness; one per sample makes each sample depend
                on its own seed only.
            steps (int): number of sampler steps.
            sampler (str | None): one of ``samplers``; None picks ``default_sampler``.
            guidance (float): classifier-free guidance scale; 1 is plain conditional sampling.

        Returns:
            Tensor: shape ``shape``, float32, on the model's device.
        """

    def _resolve_sampler(self, sampler: str | None, steps: int) -> str:
        name = self.default_sampler if sampler is None else sampler
        if name not in self.samplers:
            raise ValueError(f"unknown sampler {name!r} for {type(self).__name__}; choose one of {self.samplers}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return name


Generators = torch.Generator | Sequence[torch.Generator]
"""One generator for the whole batch, or one per sample: then sample i's draws come from generator i only, so a
sample depends on its own seed and not on which batch, rank or task it landed in."""


def _per_sample(
    generator: Generators,
    batch: int,
    draw: Callable[[torch.Generator, tuple[int, ...]], Tensor],
    shape: tuple[int, ...],
    device: torch.device,
) -> Tensor:
    if isinstance(generator, torch.Generator):
        return draw(generator, shape).to(device)
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}: pass one per sample")
    return torch.stack([draw(g, shape[1:]) for g in generator]).to(device)


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device) -> Tensor:
    """Standard normal float32 noise drawn on the generator's device, then moved to ``device``."""
    return _per_sample(generator, shape[0], lambda g, s: torch.randn(s, generator=g, device=g.device), shape, device)


def rand(batch: int, generator: Generators, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 values, shape (batch,), one per sample."""
    return _per_sample(generator, batch, lambda g, s: torch.rand(s, generator=g, device=g.device), (batch,), device)


def randint(high: int, batch: int, generator: Generators, device: torch.device) -> Tensor:
    """Integers in [0, high), shape (batch,), one per sample."""
    return _per_sample(
        generator, batch, lambda g, s: torch.randint(0, high, s, generator=g, device=g.device), (batch,), device
    )


def drop_mask(
    batch: int, cond_drop_prob: float, covariates: Covariates | None, generator: Generators, device: torch.device
) -> Tensor | None:
    """Which samples train the unconditional model, shape (batch,) bool; None when nothing is dropped.

    No random number is drawn when ``cond_drop_prob`` is 0 or there are no covariates, so turning
    conditioning off does not shift the rest of the noise stream.
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    if covariates is None or cond_drop_prob == 0.0:
        return None
    return rand(batch, generator, device) < cond_drop_prob


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free callable)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def guided(model: nn.Module, x: Tensor, t: Tensor, covariates: Covariates | None, guidance: float) -> Tensor:
    """Model output with classifier-free guidance: ``out_u + guidance * (out_c - out_u)``.

    Two forward passes rather than one of twice the batch, so peak memory stays that of the batch.

    Args:
        x (Tensor): shape (batch, C, *spatial).
        t (Tensor): shape (batch,), the model's time input in [0, 1].
    """
    cond = model(x, t, covariates).float()
    if guidance == 1.0 or covariates is None:
        return cond
    uncond = model(x, t, None).float()
    return uncond + guidance * (cond - uncond)


def warn_unused_guidance(covariates: Covariates | None, guidance: float) -> None:
    """Guidance needs covariates; say so rather than silently sampling unguided."""
    if guidance != 1.0 and covariates is None:
        log.warning("guidance=%s is ignored: no covariates were given, sampling unconditionally", guidance)
