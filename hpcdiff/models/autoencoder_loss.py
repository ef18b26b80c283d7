"""The autoencoder's training objective: L1 + a structural (SSIM) term + a small KL term.

It fits the loop's objective interface (``loss(model, x, covariates, generator, cond_drop_prob)``) so the training
loop, DDP, EMA and checkpoints serve it unchanged; it has no sampler (an autoencoder does not generate on its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hpcdiff.config import check
from hpcdiff.models.objective import Covariates, Generators
from hpcdiff.models.ssim import ssim


@dataclass(kw_only=True)
class AutoencoderLossConfig:
    """Weights of the reconstruction loss terms."""

    kind: Literal["autoencoder"]
    """Selects this objective (with model.kind: autoencoder)."""
    ssim_weight: float = 0.2
    """Weight of the structural term 1 - SSIM (3D, uniform 7-voxel window, data range 1) beside the mean L1 error."""
    kl_weight: float = 1e-6
    """Weight of the KL divergence to N(0, I), summed over latent elements and averaged over the batch."""

    def __post_init__(self) -> None:
        check(self.kind == "autoencoder", "objective.kind", f"{self.kind!r} is not autoencoder")
        check(self.ssim_weight >= 0, "objective.ssim_weight", f"must be >= 0, got {self.ssim_weight}")
        check(self.kl_weight >= 0, "objective.kl_weight", f"must be >= 0, got {self.kl_weight}")


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, per sample: shape (batch,)."""
    kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float())
    return kl.flatten(1).sum(1)


class AutoencoderObjective:
    """Reconstruction loss of a KL autoencoder; all randomness (the latent draw) comes from the generators."""

    def __init__(self, cfg: AutoencoderLossConfig) -> None:
        self.cfg = cfg

    def loss(
        self,
        model: nn.Module,
        x_data: Tensor,
        covariates: Covariates | None,
        generator: Generators,
        cond_drop_prob: float = 0.0,
    ) -> Tensor:
        """L1 + ssim_weight (1 - SSIM) + kl_weight KL, a float32 scalar.

        Args:
            model (nn.Module): an Autoencoder (or DDP around one), called as ``model(x, generator)``.
            x_data (Tensor): images in [0, 1], shape (batch, C, D, H, W).
            covariates: ignored: the autoencoder is unconditional.
            generator (Generators): the source of the latent noise.
            cond_drop_prob (float): ignored.
        """
        recon, mean, logvar = model(x_data, generator)
        recon = recon.float()
        loss = (recon - x_data.float()).abs().mean()
        if self.cfg.ssim_weight:
            loss = loss + self.cfg.ssim_weight * (1.0 - ssim(recon, x_data))
        if self.cfg.kl_weight:
            loss = loss + self.cfg.kl_weight * kl_divergence(mean, logvar).mean()
        return loss.to(torch.float32)
