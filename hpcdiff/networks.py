"""Which network and objective a training job names: a UNet with flow matching or DDPM, or the autoencoder of latent
diffusion with its reconstruction loss. Kept out of train.py so the loop does not grow with each model family."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from hpcdiff.config import build
from hpcdiff.errors import ConfigError
from hpcdiff.models import (
    Autoencoder,
    AutoencoderConfig,
    AutoencoderLossConfig,
    AutoencoderObjective,
    CovariateSpec,
    ObjectiveConfig,
    UNet,
    UNetConfig,
    build_objective,
)

if TYPE_CHECKING:  # the config module checks jobs through this one at load time
    from hpcdiff.train_config import JobConfig

log = logging.getLogger(__name__)

MODEL_KINDS = ("unet", "autoencoder")
ModelConfig = UNetConfig | AutoencoderConfig


def model_kind(job: JobConfig) -> str:
    """``model.kind`` (default unet), checked against the objective it needs."""
    kind = job.model.get("kind", "unet")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
    objective = job.objective.get("kind")
    if (kind == "autoencoder") != (objective == "autoencoder"):
        raise ConfigError(
            f"model.kind {kind!r} cannot train with objective.kind {objective!r}: an autoencoder trains with "
            "objective.kind autoencoder, a unet with flow or ddpm"
        )
    return kind


def build_model_config(job: JobConfig, specs: list[CovariateSpec], channels: int | None = None) -> ModelConfig:
    """The network's config from the job's ``model`` section; dims and covariates come from ``data``.

    ``channels`` (given when the shards are open: C of latent shards, 1 for images) sets the UNet's in/out channels;
    a ``model.in_channels`` that disagrees with the data is refused.
    """
    kind = model_kind(job)
    options = {k: v for k, v in job.model.items() if k != "kind"}
    if channels is not None:
        given = options.get("in_channels", channels)
        if given != channels:
            raise ConfigError(
                f"model.in_channels is {given}, but the shards in {job.data.shards} hold {channels} channel(s); "
                f"set it to {channels} or remove it (it is taken from the data)"
            )
        options["in_channels"] = channels
    if kind == "autoencoder":
        if job.data.mode != "3d":
            raise ConfigError(f"model.kind autoencoder is 3D: set data.mode: 3d (got {job.data.mode!r})")
        if job.data.covariates:
            log.warning("data.covariates %s ignored: the autoencoder is unconditional", job.data.covariates)
        return build(AutoencoderConfig, options, "model")
    for key in ("dims", "covariates"):
        if key in options:
            raise ConfigError(f"model.{key} is set from data (data.mode and data.covariates); remove it")
    dims = 3 if job.data.mode == "3d" else 2
    cfg = build(UNetConfig, {**options, "dims": dims}, "model")
    cfg.covariates = specs
    return cfg


def build_network(cfg: ModelConfig) -> nn.Module:
    """The network a model config describes (weights drawn from the global generator)."""
    return Autoencoder(cfg) if isinstance(cfg, AutoencoderConfig) else UNet(cfg)


def build_objective_from(job: JobConfig) -> Any:
    """The training objective of the job's ``objective`` section."""
    if model_kind(job) == "autoencoder":
        return AutoencoderObjective(build(AutoencoderLossConfig, job.objective, "objective"))
    return build_objective(build(ObjectiveConfig, job.objective, "objective"))


def check_latent_data(job: JobConfig, latent: bool) -> None:
    """Latent shards train a 3D diffusion UNet on whole latents: refuse what does not apply to them."""
    if not latent:
        return
    where = f"{job.data.shards} holds latent shards (hpcdiff encode)"
    if model_kind(job) == "autoencoder":
        raise ConfigError(f"model.kind autoencoder: {where}; train the autoencoder on image shards")
    if job.data.mode != "3d" or job.data.patch_size is not None:
        raise ConfigError(f"data.mode/data.patch_size: {where}, which train whole: set data.mode 3d, no patch_size")


def check_input_size(job: JobConfig, cfg: ModelConfig, volume_shape: Sequence[int]) -> None:
    """Refuse, before training starts, a patch larger than the volumes or a size the autoencoder cannot halve."""
    patch = job.data.patch_size
    if patch is not None and any(p > s for p, s in zip(patch, volume_shape)):
        raise ConfigError(
            f"data.patch_size: {list(patch)} is larger than the volumes in {job.data.shards} "
            f"({list(volume_shape)}); choose a patch that fits"
        )
    if isinstance(cfg, AutoencoderConfig) and job.data.mode == "3d":
        size, key = (patch, "data.patch_size") if patch is not None else (volume_shape, "the volume shape")
        f = cfg.downsample
        if any(s % f for s in size):
            raise ConfigError(
                f"{key} {list(size)} must be divisible by {f}, the autoencoder's downsampling per axis "
                f"(model.channel_mults has {len(cfg.channel_mults)} levels); set data.patch_size to multiples of {f}"
            )
