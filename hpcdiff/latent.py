"""What latent diffusion shares between encoding and sampling: the autoencoder a latent shard set was made with,
the latent grid, and the scale factor that gives the diffusion model unit-variance latents.

A latent shard set records its autoencoder (run directory, step, EMA digest) in the manifest's ``latent`` block;
a diffusion run trained on it keeps that block in every checkpoint, and sampling decodes through the same
autoencoder, refusing one whose weights changed since the encode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdiff import checkpoint
from hpcdiff.config import build
from hpcdiff.errors import CheckpointError, UsageError
from hpcdiff.models import Autoencoder, AutoencoderConfig
from hpcdiff.pinning import Pin, pin_of, resolve

_AE_KEYS = ("ema", "model_config", "step")


def autoencoder_state(run_dir: Path, step: int | None) -> tuple[Pin, dict[str, Any]]:
    """The EMA weights and config of an autoencoder run's checkpoint ``step`` (default: the newest valid one)."""
    info = resolve(run_dir, step)
    state = checkpoint.load(info, map_location="cpu")
    kind = state.get("model_kind", "unet")
    if kind != "autoencoder":
        raise UsageError(
            f"{info.path} holds a model.kind {kind!r} network: --run-dir must be an autoencoder run "
            "(model.kind autoencoder, objective.kind autoencoder)"
        )
    missing = [k for k in _AE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{info.path}: checkpoint has no {missing}; it was written by an older hpcdiff")
    kept = {key: state[key] for key in _AE_KEYS}
    return pin_of(info, kept["ema"]), kept


def build_autoencoder(state: dict[str, Any], device: torch.device) -> Autoencoder:
    """The autoencoder of a pinned state, in eval mode without gradients."""
    model = Autoencoder(build(AutoencoderConfig, state["model_config"], "model_config"))
    model.load_state_dict(state["ema"])
    return model.to(device).eval().requires_grad_(False)


def latent_grid(grid: dict[str, Any], factor: int) -> dict[str, list]:
    """Shape, spacing and affine of the latent grid: latent voxel i covers image voxels f*i .. f*i+f-1.

    Its centre is image voxel f*i + (f-1)/2, so the affine is the image's scaled by f and shifted by (f-1)/2 voxels.
    """
    shape = [int(s) for s in grid["shape"]]
    bad = [s for s in shape if s % factor]
    if bad:
        raise UsageError(
            f"the shards' grid {shape} is not divisible by {factor}, the autoencoder's downsampling per axis; "
            f"ingest onto a grid of multiples of {factor} (--shape)"
        )
    to_image = np.diag([factor, factor, factor, 1.0])
    to_image[:3, 3] = (factor - 1) / 2
    affine = np.asarray(grid["affine"], dtype=np.float64) @ to_image
    return {
        "shape": [s // factor for s in shape],
        "spacing": [float(s) * factor for s in grid["spacing"]],
        "affine": affine.tolist(),
    }


def moments(latents: np.ndarray) -> dict[str, list[float]]:
    """Per-channel count, sum and sum of squares (float64) of latents shaped (k, C, d, h, w)."""
    x = latents.astype(np.float64)
    return {
        "count": [float(x[:, c].size) for c in range(x.shape[1])],
        "sum": [float(x[:, c].sum()) for c in range(x.shape[1])],
        "sumsq": [float(np.square(x[:, c]).sum()) for c in range(x.shape[1])],
    }


def combine(parts: Sequence[dict[str, list[float]]]) -> dict[str, Any]:
    """The scale factor (1/std of every latent value) and per-channel mean and std, from the slices' moments.

    Summed in the order given (output index order), so the result does not depend on who wrote which slice.
    """
    channels = len(parts[0]["count"])
    n, s, q = (np.zeros(channels) for _ in range(3))
    for part in parts:
        n += np.asarray(part["count"])
        s += np.asarray(part["sum"])
        q += np.asarray(part["sumsq"])
    mean = s / np.maximum(n, 1)
    std = np.sqrt(np.maximum(q / np.maximum(n, 1) - mean**2, 0.0))
    total = float(n.sum())
    all_mean = float(s.sum()) / max(total, 1.0)
    all_std = math.sqrt(max(float(q.sum()) / max(total, 1.0) - all_mean**2, 0.0))
    return {
        "scale_factor": 1.0 / all_std if all_std > 0 else 1.0,
        "std": all_std,
        "mean": all_mean,
        "channel_mean": mean.tolist(),
        "channel_std": std.tolist(),
        "count": total,
    }


def decoder_for(latent: dict[str, Any]) -> dict[str, Any]:
    """The autoencoder a latent run decodes through, loaded from its run and checked against the encode's digest.

    Raises:
        UsageError: the checkpoint is gone or its EMA weights are not those the latents were encoded with.
    """
    ae = latent["autoencoder"]
    run_dir, step, want = Path(ae["run_dir"]), int(ae["step"]), str(ae["ema_sha256"])
    why = (
        "the latent diffusion run was trained on latents of that autoencoder, and decoding them with other "
        "weights gives wrong images. Restore that autoencoder run, or encode again with the new autoencoder "
        "(hpcdiff encode) and train the diffusion model on the new latents"
    )
    try:
        pin, state = autoencoder_state(run_dir, step)
    except UsageError as e:
        raise UsageError(f"cannot load the autoencoder the latents were encoded with ({e}); {why}") from e
    if pin.ema_sha256 != want:
        raise UsageError(
            f"the autoencoder in {run_dir} (step {step}) has changed: its EMA weights digest is "
            f"{pin.ema_sha256[:12]}..., the latents were encoded with {want[:12]}...; {why}"
        )
    return state
