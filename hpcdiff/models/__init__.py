"""Maths on tensors: the UNet, the autoencoder, covariate conditioning, and the training objectives.

Nothing here knows about files, ranks or clusters (no torch.distributed, MPI, HDF5, dask or launchers).
"""

from hpcdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from hpcdiff.models.autoencoder_loss import AutoencoderLossConfig, AutoencoderObjective, kl_divergence
from hpcdiff.models.conditioning import CovariateEmbedding, CovariateSpec, covariate_specs
from hpcdiff.models.diffusion import DDPM, cosine_betas, linear_betas
from hpcdiff.models.factory import build_objective
from hpcdiff.models.flow import CondOTPath, FlowMatching
from hpcdiff.models.objective import Objective, ObjectiveConfig
from hpcdiff.models.ssim import ms_ssim, psnr, ssim
from hpcdiff.models.unet import UNet, UNetConfig

__all__ = [
    "DDPM",
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderLossConfig",
    "AutoencoderObjective",
    "CondOTPath",
    "CovariateEmbedding",
    "CovariateSpec",
    "FlowMatching",
    "Objective",
    "ObjectiveConfig",
    "UNet",
    "UNetConfig",
    "build_objective",
    "cosine_betas",
    "covariate_specs",
    "kl_divergence",
    "linear_betas",
    "ms_ssim",
    "psnr",
    "ssim",
]
