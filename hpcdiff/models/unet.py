"""A UNet for 2D slices and 3D volumes, conditioned on time and covariates.

The DDPM/ADM layout: residual blocks with GroupNorm and SiLU whose features are scaled and shifted by the
(time + covariate) embedding, optional self-attention at chosen levels, strided-conv downsampling and
nearest-neighbour upsampling, skip connections from every block of the way down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hpcdiff.config import check
from hpcdiff.models.conditioning import CovariateEmbedding, CovariateSpec

TIME_SCALE = 1000.0  # t in [0,1] is spread over the frequencies a 1000-step DDPM timestep would use


@dataclass(kw_only=True)
class UNetConfig:
    """Shape of the network; the number of levels is ``len(channel_mults)``."""

    dims: Literal[2, 3]
    """2 for slices (B,C,H,W), 3 for volumes (B,C,D,H,W)."""
    in_channels: int = 1
    """Image channels; the output has as many."""
    base_channels: int = 32
    """Channels at the first level; level i has base_channels * channel_mults[i]."""
    channel_mults: tuple[int, ...] = (1, 2, 2)
    """Channel multiplier per level; each level after the first halves every spatial size."""
    num_res_blocks: int = 1
    """Residual blocks per level on the way down (one more on the way up, for the skips)."""
    attention_levels: tuple[int, ...] = ()
    """Levels (0 = full resolution) with self-attention; the last level also puts one in the middle block.
    Attention is over all spatial positions of that level, so keep it to coarse levels in 3D."""
    dropout: float = 0.0
    """Dropout inside residual blocks."""
    covariates: list[CovariateSpec] = field(default_factory=list)
    """Conditioning variables; empty for an unconditional model. Dicts are turned into CovariateSpec."""
    attention_head_channels: int = 32
    """Channels per attention head (one head when a level has fewer channels or does not divide evenly)."""
    checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less memory, ~30% more
    compute."""

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        self.attention_levels = tuple(self.attention_levels)
        self.covariates = [CovariateSpec(**c) if isinstance(c, Mapping) else c for c in self.covariates]
        check(self.dims in (2, 3), "model.dims", f"must be 2 or 3, got {self.dims!r}")
        check(self.in_channels >= 1, "model.in_channels", f"must be >= 1, got {self.in_channels}")
        check(self.base_channels >= 1, "model.base_channels", f"must be >= 1, got {self.base_channels}")
        check(len(self.channel_mults) >= 1, "model.channel_mults", "needs at least one level")
        check(all(m >= 1 for m in self.channel_mults), "model.channel_mults", f"must be >= 1: {self.channel_mults}")
        check(self.num_res_blocks >= 1, "model.num_res_blocks", f"must be >= 1, got {self.num_res_blocks}")
        levels = range(len(self.channel_mults))
        check(
            all(a in levels for a in self.attention_levels),
            "model.attention_levels",
            f"{self.attention_levels} must be level indices 0..{len(self.channel_mults) - 1}",
        )
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.attention_head_channels >= 1, "model.attention_head_channels", "must be >= 1")
        names = [c.name for c in self.covariates]
        check(len(set(names)) == len(names), "model.covariates", f"repeated covariate name in {names}")


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of continuous time (Vaswani et al.; DDPM).

    Args:
        t (Tensor): shape (batch,), in [0, 1].
        dim (int): embedding size.

    Returns:
        Tensor: shape (batch, dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * TIME_SCALE)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _groups(channels: int) -> int:
    return math.gcd(channels, 32)


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding as a per-channel scale and shift in between (FiLM)."""

    def __init__(self, dims: int, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        conv = _conv(dims)
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1)
        self.skip = conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb)).view(*emb.shape[:1], -1, *[1] * (x.ndim - 2)).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the flattened spatial positions.

    ``scaled_dot_product_attention`` picks a fused kernel (flash / memory-efficient where available) rather
    than materialising the (positions x positions) matrix when it can.
    """

    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        divisible = channels % head_channels == 0 and channels >= head_channels
        self.heads = channels // head_channels if divisible else 1
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (b, n, c)
        q, k, v = self.qkv(h).view(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, c/heads)
        h = self.proj(h.transpose(1, 2).reshape(b, -1, c))
        return x + h.transpose(1, 2).reshape(b, c, *spatial)


class Level(nn.Module):
    """The residual blocks (each optionally followed by attention) of one resolution level."""

    def __init__(self, blocks: list[ResBlock], attend: bool, head_channels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(
            [Attention(b.conv2.out_channels, head_channels) if attend else nn.Identity() for b in blocks]
        )


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        self.conv = _conv(dims)(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """Noise/velocity predictor for 2D or 3D images of any size.

    Sizes that the ``len(channel_mults) - 1`` halvings do not divide are zero-padded at the high end inside
    ``forward`` and cropped back, so the output always has the input's shape.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims, base, n = cfg.dims, cfg.base_channels, cfg.num_res_blocks
        conv = _conv(dims)
        emb_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond = CovariateEmbedding(cfg.covariates, emb_dim) if cfg.covariates else None
        self.conv_in = conv(cfg.in_channels, base, 3, padding=1)

        widths = [base * m for m in cfg.channel_mults]
        last = len(widths) - 1
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, ch = [base], base
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(n):
                blocks.append(ResBlock(dims, ch, w, emb_dim, cfg.dropout))
                ch = w
                skips.append(ch)
            self.down.append(Level(blocks, i in cfg.attention_levels, cfg.attention_head_channels))
            if i < last:
                self.downsample.append(conv(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)

        self.mid = Level(
            [ResBlock(dims, ch, ch, emb_dim, cfg.dropout), ResBlock(dims, ch, ch, emb_dim, cfg.dropout)],
            last in cfg.attention_levels,
            cfg.attention_head_channels,
        )

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(n + 1):
                blocks.append(ResBlock(dims, ch + skips.pop(), widths[i], emb_dim, cfg.dropout))
                ch = widths[i]
            self.up.append(Level(blocks, i in cfg.attention_levels, cfg.attention_head_channels))
            if i > 0:
                self.upsample.append(Upsample(dims, ch))

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = conv(ch, cfg.in_channels, 3, padding=1)
        # Zero output at start: the first steps fit the data's mean target instead of undoing random noise.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes divisible by this need no padding."""
        return 2 ** (len(self.cfg.channel_mults) - 1)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        covariates: Mapping[str, Tensor] | None = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        """Predict the objective's target (noise, v or velocity).

        Args:
            x (Tensor): shape (batch, in_channels, *spatial) with 2 or 3 spatial dims as configured.
            t (Tensor): shape (batch,) or scalar, float in [0, 1] (DDPM passes timestep / num_timesteps).
            covariates (dict[str, Tensor] | None): per covariate name, shape (batch,); see CovariateEmbedding.
                Ignored by an unconditional model.
            drop (Tensor | None): bool, shape (batch,); True replaces that sample's covariates by the null
                embedding (classifier-free guidance).

        Returns:
            Tensor: the same shape as ``x``.
        """
        self._check_input(x)
        batch, spatial = x.shape[0], x.shape[2:]
        t = t.to(x.device).float().expand(batch) if t.ndim == 0 else t.to(x.device).float()
        if t.shape != (batch,):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected ({batch},) or a scalar")

        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        if self.cond is not None:
            emb = emb + self.cond(covariates, drop, batch)

        m = self.size_multiple
        pad = [p for s in reversed(spatial) for p in (0, (-s) % m)]
        h = self.conv_in(F.pad(x, pad) if any(pad) else x)
        hs = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attn):
                h = self._block(block, attn, h, emb)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        for block, attn in zip(self.mid.blocks, self.mid.attn):
            h = self._block(block, attn, h, emb)
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attn):
                h = self._block(block, attn, torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[(..., *(slice(0, s) for s in spatial))]

    def _block(self, block: ResBlock, attn: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.cfg.checkpointing and torch.is_grad_enabled():
            # Non-reentrant: works under DDP and replays the dropout RNG, so results equal the plain path.
            return checkpoint(lambda a, b: attn(block(a, b)), h, emb, use_reentrant=False)
        return attn(block(h, emb))

    def _check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        if x.ndim != cfg.dims + 2 or x.shape[1] != cfg.in_channels:
            layout = "(batch, C, H, W)" if cfg.dims == 2 else "(batch, C, D, H, W)"
            raise ValueError(
                f"UNet(dims={cfg.dims}, in_channels={cfg.in_channels}) expects {layout} with C={cfg.in_channels}, "
                f"got shape {tuple(x.shape)}; set model.dims/in_channels to match the data"
            )
