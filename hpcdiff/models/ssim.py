"""Structural similarity (SSIM, Wang et al. 2004) of 2D or 3D images with a separable Gaussian window.

Used as the autoencoder's structural loss term and as a reconstruction metric; images are compared in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

K1, K2 = 0.01, 0.03  # the paper's stabilising constants, relative to the data range


def _gaussian(size: int, sigma: float, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _blur(x: Tensor, kernel: Tensor) -> Tensor:
    """Valid (unpadded) separable Gaussian filter over every spatial axis; x has shape (N, C, *spatial)."""
    dims = x.ndim - 2
    conv = F.conv2d if dims == 2 else F.conv3d
    channels = x.shape[1]
    for axis in range(dims):
        shape = [1] * dims
        shape[axis] = kernel.numel()
        x = conv(x, kernel.view(1, 1, *shape).expand(channels, 1, *shape), groups=channels)
    return x


def ssim(
    x: Tensor, y: Tensor, data_range: float = 1.0, window: int = 7, sigma: float = 1.5, reduce: bool = True
) -> Tensor:
    """Mean SSIM between ``x`` and ``y`` over valid window positions and channels.

    The window shrinks to the smallest spatial size when an image is smaller than it.

    Args:
        x (Tensor): shape (batch, C, *spatial) with 2 or 3 spatial dims.
        y (Tensor): same shape as ``x``.
        data_range (float): max - min of the intensity scale (1 for images normalised to [0, 1]).
        window (int): Gaussian window size (odd).
        sigma (float): Gaussian standard deviation in voxels.
        reduce (bool): one scalar for the batch; else one value per sample, shape (batch,).

    Returns:
        Tensor: float32, a scalar or shape (batch,).
    """
    if x.shape != y.shape or x.ndim not in (4, 5):
        raise ValueError(f"ssim needs two (batch, C, *spatial) tensors of one shape, got {x.shape} and {y.shape}")
    x, y = x.float(), y.float()
    size = min(window, *x.shape[2:])
    kernel = _gaussian(size, sigma, x.device)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    # One filtering pass over the five moments stacked along the batch axis.
    n = x.shape[0]
    moments = _blur(torch.cat([x, y, x * x, y * y, x * y]), kernel)
    mu_x, mu_y, xx, yy, xy = moments.split(n)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    per_sample = s.flatten(1).mean(1)
    return per_sample.mean() if reduce else per_sample


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample, shape (batch,): 10 log10(range^2 / MSE)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))
