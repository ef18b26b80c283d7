"""A 3D KL-regularised convolutional autoencoder: the first stage of latent diffusion.

The layout of Rombach et al. 2022 and MONAI's AutoencoderKL without attention: residual blocks (GroupNorm, SiLU,
conv) at each level, strided-conv downsampling, nearest-neighbour upsampling, and an encoder head that outputs the
mean and log-variance of a diagonal Gaussian over the latent. Each level after the first halves every spatial size,
so three levels compress 4x per axis and four levels 8x.

Residual autoencoding (Chen et al. 2025, DC-AE): a parameter-free shortcut moves each f^3 block of voxels into
channels and averages them in groups down to the latent channels (the encoder adds it to the latent mean); the
decoder repeats each latent channel back over its group and moves channels back into space, added to its output.
At initialisation the autoencoder is then already a block-average codec, and the networks learn only the residual:
with a short training budget this is the difference between far below and above a trilinear baseline (see
docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hpcdiff.config import check
from hpcdiff.models.objective import Generators, randn
from hpcdiff.models.unet import Upsample, _groups

LOGVAR_RANGE = (-30.0, 20.0)  # clamp as in latent diffusion: exp() stays finite in float32 and bf16
LOGVAR_INIT = -6.0  # start with little posterior noise: at logvar 0 the draw drowns the shortcut's codes (std ~0.3)


@dataclass(kw_only=True)
class AutoencoderConfig:
    """Shape of the autoencoder; the downsampling factor per axis is 2 ** (len(channel_mults) - 1)."""

    in_channels: int = 1
    """Image channels; the reconstruction has as many."""
    base_channels: int = 32
    """Channels at full resolution; level i has base_channels * channel_mults[i]."""
    channel_mults: tuple[int, ...] = (1, 2, 2)
    """Channel multiplier per level: 3 levels compress 4x per axis, 4 levels 8x."""
    latent_channels: int = 4
    """Channels of the latent (3 to 8)."""
    num_res_blocks: int = 1
    """Residual blocks per level, in the encoder and in the decoder."""
    shortcut: bool = True
    """Parameter-free space-to-channel shortcuts around encoder and decoder (residual autoencoding); false gives the
    plain networks."""
    checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less memory, ~30% more
    compute."""

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        check(self.in_channels >= 1, "model.in_channels", f"must be >= 1, got {self.in_channels}")
        check(self.base_channels >= 1, "model.base_channels", f"must be >= 1, got {self.base_channels}")
        check(
            len(self.channel_mults) in (3, 4),
            "model.channel_mults",
            f"{list(self.channel_mults)} has {len(self.channel_mults)} levels; give 3 (4x downsampling per axis) "
            "or 4 (8x)",
        )
        check(all(m >= 1 for m in self.channel_mults), "model.channel_mults", f"must be >= 1: {self.channel_mults}")
        check(3 <= self.latent_channels <= 8, "model.latent_channels", f"must be 3 to 8, got {self.latent_channels}")
        check(self.num_res_blocks >= 1, "model.num_res_blocks", f"must be >= 1, got {self.num_res_blocks}")

    @property
    def downsample(self) -> int:
        """Size reduction per axis from image to latent."""
        return 2 ** (len(self.channel_mults) - 1)


class _Block(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual connection (1x1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def space_to_channel(x: Tensor, f: int) -> Tensor:
    """(n, c, D, H, W) -> (n, c * f^3, D/f, H/f, W/f): each f^3 block of voxels becomes channels."""
    n, c, d, h, w = x.shape
    x = x.reshape(n, c, d // f, f, h // f, f, w // f, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(n, c * f**3, d // f, h // f, w // f)


def channel_to_space(z: Tensor, f: int) -> Tensor:
    """The inverse of ``space_to_channel``: (n, c * f^3, d, h, w) -> (n, c, f d, f h, f w)."""
    n, cf, d, h, w = z.shape
    c = cf // f**3
    z = z.reshape(n, c, f, f, f, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return z.reshape(n, c, d * f, h * f, w * f)


def _group_sizes(total: int, groups: int) -> list[int]:
    """``total`` channels cut into ``groups`` contiguous groups of near-equal size (the first ones one larger)."""
    return [total // groups + (i < total % groups) for i in range(groups)]


class _Stack(nn.Module):
    """A sequence of stages, each optionally recomputed in the backward pass (activation checkpointing)."""

    def __init__(self, stages: list[nn.Module], checkpointing: bool) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.checkpointing = checkpointing

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = self._run(stage, x)
        return x

    def _run(self, stage: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # Non-reentrant: works under DDP and keeps RNG state, so results equal the plain path bit for bit.
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)


class Autoencoder(nn.Module):
    """Image (batch, C, D, H, W) <-> latent (batch, latent_channels, D/f, H/f, W/f) with f = cfg.downsample."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        down: list[nn.Module] = [nn.Conv3d(cfg.in_channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                down.append(_Block(ch, w))
                ch = w
            if i < len(widths) - 1:
                down.append(nn.Conv3d(ch, ch, 3, stride=2, padding=1))
        down += [
            _Block(ch, ch),
            nn.GroupNorm(_groups(ch), ch),
            nn.SiLU(),
            nn.Conv3d(ch, 2 * cfg.latent_channels, 3, padding=1),
        ]
        self.encoder = _Stack(down, cfg.checkpointing)

        up: list[nn.Module] = [nn.Conv3d(cfg.latent_channels, ch, 3, padding=1), _Block(ch, ch)]
        for i in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks):
                up.append(_Block(ch, widths[i]))
                ch = widths[i]
            if i > 0:
                up.append(Upsample(3, ch))
        up += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv3d(ch, cfg.in_channels, 3, padding=1)]
        self.decoder = _Stack(up, cfg.checkpointing)
        self._groups = _group_sizes(cfg.in_channels * cfg.downsample**3, cfg.latent_channels)
        if cfg.shortcut:
            self._start_at_the_shortcut()

    @torch.no_grad()
    def _start_at_the_shortcut(self) -> None:
        """Zero the last layers, so that at initialisation the autoencoder is exactly the shortcut codec and
        training only adds to it (random residuals would first have to be unlearned)."""
        head, tail = self.encoder.stages[-1], self.decoder.stages[-1]
        for conv in (head, tail):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        head.bias[self.cfg.latent_channels :] = LOGVAR_INIT

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of the latent Gaussian.

        Args:
            x (Tensor): images, shape (batch, in_channels, D, H, W), each size divisible by ``cfg.downsample``.

        Returns:
            tuple[Tensor, Tensor]: mean and logvar, each (batch, latent_channels, D/f, H/f, W/f).
        """
        self._check_input(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        if self.cfg.shortcut:
            blocks = space_to_channel(x, self.cfg.downsample).split(self._groups, dim=1)
            mean = mean + torch.cat([b.mean(1, keepdim=True) for b in blocks], dim=1).to(mean.dtype)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """Images from latents: (batch, latent_channels, d, h, w) -> (batch, in_channels, f*d, f*h, f*w)."""
        if z.ndim != 5 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(
                f"decode expects (batch, {self.cfg.latent_channels}, d, h, w) latents, got shape {tuple(z.shape)}"
            )
        out = self.decoder(z)
        if self.cfg.shortcut:
            sizes = torch.tensor(self._groups, device=z.device)
            # output_size lets the memory plan run this on the meta device, where sizes has no values.
            repeated = z.repeat_interleave(sizes, dim=1, output_size=sum(self._groups))
            out = out + channel_to_space(repeated, self.cfg.downsample).to(out.dtype)
        return out

    @staticmethod
    def sample_latent(mean: Tensor, logvar: Tensor, generator: Generators) -> Tensor:
        """Reparameterised draw z = mean + exp(logvar / 2) * eps, eps from ``generator`` only (exact resume)."""
        eps = randn(tuple(mean.shape), generator, mean.device).to(mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def forward(self, x: Tensor, generator: Generators) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, draw a latent, decode: what a training step needs.

        Args:
            x (Tensor): shape (batch, in_channels, D, H, W).
            generator (Generators): one generator for the batch, or one per sample.

        Returns:
            tuple[Tensor, Tensor, Tensor]: reconstruction (shape of ``x``), latent mean and logvar.
        """
        mean, logvar = self.encode(x)
        return self.decode(self.sample_latent(mean, logvar, generator)), mean, logvar

    def _check_input(self, x: Tensor) -> None:
        f, c = self.cfg.downsample, self.cfg.in_channels
        if x.ndim != 5 or x.shape[1] != c or any(s % f for s in x.shape[2:]):
            raise ValueError(
                f"the autoencoder expects (batch, {c}, D, H, W) with D, H and W divisible by {f} (its downsampling "
                f"per axis), got shape {tuple(x.shape)}; choose a patch size or grid divisible by {f}"
            )
