"""Structural similarity (SSIM, Wang et al. 2004) of 2D or 3D images over a uniform window.

Used as the autoencoder's structural loss term, as a reconstruction metric and (multi-scale) for the diversity of
synthetic cohorts; images are compared in float32.
The uniform 7-voxel window is scikit-image's default; a box filter is an average pool, which costs no more memory
than its output on any device (a depthwise Gaussian convolution on one channel is padded to 8 or 16 channels by
CPU convolution libraries).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

K1, K2 = 0.01, 0.03  # the paper's stabilising constants, relative to the data range


def _mean_filter(x: Tensor, window: int, separable: bool = False) -> Tensor:
    """Valid (unpadded) mean over window^dims boxes; x has shape (N, C, *spatial).

    ``separable`` pools one axis at a time: the same box mean at ~3 x window instead of window^3 operations per
    voxel (minutes to seconds for a 1 mm pair), with one more temporary of the input's size.
    """
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    if not separable:
        return pool(x, window, stride=1)
    for axis in range(x.ndim - 2):
        kernel = [1] * (x.ndim - 2)
        kernel[axis] = window
        x = pool(x, kernel, stride=1)
    return x


def _ssim_terms(x: Tensor, y: Tensor, data_range: float, window: int, separable: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sample means of the SSIM map and of its contrast-structure part, each shape (batch,)."""
    if x.shape != y.shape or x.ndim not in (4, 5):
        raise ValueError(f"ssim needs two (batch, C, *spatial) tensors of one shape, got {x.shape} and {y.shape}")
    x, y = x.float(), y.float()
    size = min(window, *x.shape[2:])
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    # One filtering pass over the five moments stacked along the batch axis.
    n = x.shape[0]
    moments = _mean_filter(torch.cat([x, y, x * x, y * y, x * y]), size, separable)
    mu_x, mu_y, xx, yy, xy = moments.split(n)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    full = cs * (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return full.flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window: int = 7, reduce: bool = True) -> Tensor:
    """Mean SSIM between ``x`` and ``y`` over valid window positions and channels.

    The window shrinks to the smallest spatial size when an image is smaller than it.

    Args:
        x (Tensor): shape (batch, C, *spatial) with 2 or 3 spatial dims.
        y (Tensor): same shape as ``x``.
        data_range (float): max - min of the intensity scale (1 for images normalised to [0, 1]).
        window (int): box size in voxels.
        reduce (bool): one scalar for the batch; else one value per sample, shape (batch,).

    Returns:
        Tensor: float32, a scalar or shape (batch,).
    """
    per_sample = _ssim_terms(x, y, data_range, window)[0]
    return per_sample.mean() if reduce else per_sample


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Scale weights of Wang et al. 2003, finest first."""


def ms_ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window: int = 7) -> Tensor:
    """Multi-scale SSIM (Wang et al. 2003) per sample, shape (batch,), in 2D or 3D.

    Contrast-structure terms at each scale and the full SSIM at the coarsest, halving every axis between scales
    (2x average pooling). Small volumes get fewer than five scales: as many as keep every axis at least ``window``
    voxels, with the first weights renormalised to sum to 1. Negative terms are clipped to 0 before the powers.
    """
    if x.shape != y.shape or x.ndim not in (4, 5):
        raise ValueError(f"ms_ssim needs two (batch, C, *spatial) tensors of one shape, got {x.shape} and {y.shape}")
    smallest = min(x.shape[2:])
    scales = max(1, min(len(MS_SSIM_WEIGHTS), 1 + int(math.log2(max(smallest / window, 1)))))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales])
    weights = weights / weights.sum()
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    x, y = x.float(), y.float()
    out = torch.ones(x.shape[0])
    for i, w in enumerate(weights):
        full, cs = _ssim_terms(x, y, data_range, window, separable=True)
        out = out * (full if i == scales - 1 else cs).clamp_min(0) ** w
        if i < scales - 1:
            x, y = pool(x, 2), pool(y, 2)
    return out


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample, shape (batch,): 10 log10(range^2 / MSE)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))
