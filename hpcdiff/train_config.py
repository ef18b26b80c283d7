"""The training job's config: the sections of a ``jobs/*.yaml`` file, each a checked dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpcdiff.config import apply_overrides, build, check, load_yaml, to_dict

MAX_BATCH_SIZE = 65536
"""More subjects per rank per micro-batch than any accelerator holds: a typo (1e9), refused before allocating."""


@dataclass(kw_only=True)
class DataConfig:
    """Where training data comes from and how it is batched."""

    shards: str
    """Folder of HDF5 shards written by ``hpcdiff ingest`` (relative paths are taken from the working directory)."""
    mode: Literal["3d", "2d"] = "3d"
    """Whole volumes, or 2D slices drawn deterministically from each volume."""
    slice_axis: int = 0
    """Axis the 2D slices cut across (0, 1 or 2)."""
    batch_size: int
    """Subjects per rank per micro-batch; the global batch is batch_size x ranks x grad_accum."""
    covariates: list[str] | None = None
    """Covariates the model is conditioned on; null takes every covariate in the manifest, [] none."""
    prefetch: int = 2
    """Batches read ahead in a background thread."""
    patch_size: tuple[int, int, int] | None = None
    """3d mode: train on a random (D, H, W) patch of each volume, so memory does not depend on the volume size;
    null takes whole volumes. The patch of a sample is a function of (seed, stream position): resume stays exact."""

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "data.batch_size", f"must be at least 1, got {self.batch_size}")
        check(
            self.batch_size <= MAX_BATCH_SIZE,
            "data.batch_size",
            f"must be at most {MAX_BATCH_SIZE} (subjects per rank per micro-batch), got {self.batch_size}; "
            "for a bigger global batch raise optim.grad_accum or the number of ranks",
        )
        check(self.slice_axis in (0, 1, 2), "data.slice_axis", f"must be 0, 1 or 2, got {self.slice_axis}")
        check(0 <= self.prefetch <= 64, "data.prefetch", f"must lie in [0, 64], got {self.prefetch}")
        if self.patch_size is not None:
            check(self.mode == "3d", "data.patch_size", f"needs data.mode 3d, got {self.mode!r}")
            check(all(p >= 1 for p in self.patch_size), "data.patch_size", f"must be >= 1: {list(self.patch_size)}")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, gradient clipping and accumulation, EMA of the weights."""

    lr: float = 2e-4
    """Peak learning rate, reached after warmup_steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment decay rates."""
    warmup_steps: int = 100
    """Steps of linear warm-up from 0 to lr."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr x min_lr_ratio at the last step."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights used for sampling."""

    def __post_init__(self) -> None:
        check(0 < self.lr < math.inf, "optim.lr", f"must be a positive finite number, got {self.lr}")
        check(0 <= self.weight_decay < math.inf, "optim.weight_decay", f"must be 0 or more, got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must both lie in [0, 1), got {list(self.betas)}")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be 0 or more")
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
        check(self.grad_accum >= 1, "optim.grad_accum", "must be at least 1")
        check(0 <= self.ema_decay < 1, "optim.ema_decay", "must lie in [0, 1)")
        check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "must be positive or null")


@dataclass(kw_only=True)
class LoopConfig:
    """How long to train and how often to log and checkpoint."""

    steps: int
    """Optimizer steps in the whole run (across restarts)."""
    seed: int = 0
    """Seeds data order, initial weights and every noise draw: (seed, step, rank) fixes a step exactly."""
    log_every: int = 10
    """Write a metrics line every this many steps (the loss of every step is logged regardless)."""
    checkpoint_every: int = 100
    """Checkpoint every this many steps."""
    checkpoint_every_s: float | None = None
    """Also checkpoint when this many seconds passed since the last one; null disables it."""
    keep_last: int = 3
    """Valid checkpoints kept (older ones are deleted once a newer one is verified)."""
    keep_every: int | None = None
    """Also keep every checkpoint whose step is a multiple of this."""
    cond_drop_prob: float = 0.1
    """Probability of dropping the covariates of a sample (classifier-free guidance training)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast on GPU; on CPU fp32 is used and a warning says so."""
    deterministic: bool = False
    """Deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN, cuBLAS workspace): needed for bitwise
    resume on a GPU, at some speed; CPU training is deterministic without it."""
    collective_timeout_s: float = 300.0
    """A collective waiting longer than this for a peer fails the job instead of hanging it."""
    stop_margin_s: float = 120.0
    """Checkpoint and stop this many seconds before a known job time limit."""
    heartbeat_s: float = 10.0
    """How often status.json's heartbeat is refreshed."""
    tensorboard: bool | Literal["auto"] = "auto"
    """Log scalars and previews to RUN/tensorboard/; auto: when the tensorboard package is installed."""
    preview_every: int | None = 1000
    """Draw the preview set from the EMA weights every this many steps; null disables it."""
    preview_subjects: int = 8
    """Subjects in the preview set (fixed noise, covariates spanning their trained range)."""
    preview_sampler_steps: int = 10
    """Sampler steps of a preview: few, so it costs little."""

    def __post_init__(self) -> None:
        check(self.steps >= 1, "train.steps", f"must be at least 1, got {self.steps}")
        check(self.seed >= 0, "train.seed", f"must be 0 or more, got {self.seed}")
        check(self.keep_every is None or self.keep_every >= 1, "train.keep_every", "must be at least 1 or null")
        check(
            self.checkpoint_every_s is None or self.checkpoint_every_s > 0,
            "train.checkpoint_every_s",
            "must be positive or null",
        )
        check(self.stop_margin_s >= 0, "train.stop_margin_s", f"must be 0 or more, got {self.stop_margin_s}")
        check(self.heartbeat_s > 0, "train.heartbeat_s", f"must be positive, got {self.heartbeat_s}")
        check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be at least 1")
        check(self.keep_last >= 1, "train.keep_last", "must be at least 1 (the last valid one is always kept)")
        check(self.log_every >= 1, "train.log_every", "must be at least 1")
        check(0 <= self.cond_drop_prob < 1, "train.cond_drop_prob", "must lie in [0, 1)")
        check(self.collective_timeout_s > 0, "train.collective_timeout_s", "must be positive")
        check(self.preview_every is None or self.preview_every >= 1, "train.preview_every", "must be 1+ or null")
        check(self.preview_subjects >= 1, "train.preview_subjects", "must be at least 1")
        check(self.preview_sampler_steps >= 1, "train.preview_sampler_steps", "must be at least 1")


@dataclass(kw_only=True)
class JobConfig:
    """A whole training job: data, model, objective, optimizer and loop."""

    data: DataConfig
    train: LoopConfig
    model: dict[str, Any] = field(default_factory=dict)
    """``kind: unet`` (default; hpcdiff.models.UNetConfig without dims and covariates, which come from data) or
    ``kind: autoencoder`` (hpcdiff.models.AutoencoderConfig)."""
    objective: dict[str, Any] = field(default_factory=lambda: {"kind": "flow"})
    """Objective options: hpcdiff.models.ObjectiveConfig (flow, ddpm) or AutoencoderLossConfig (autoencoder)."""
    optim: OptimConfig = field(default_factory=OptimConfig)


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job YAML, apply ``--set`` overrides, and check every key and value."""
    data = apply_overrides(load_yaml(path), list(overrides))
    job = build(JobConfig, data)
    job.data.shards = str(Path(job.data.shards).expanduser().absolute())
    from hpcdiff.networks import build_model_config, build_objective_from  # torch: only for a config worth checking

    # The model and objective sections are built for real only at training time (they need the data's
    # covariates); checking them now refuses a bad key before a submission waits in a queue.
    build_model_config(job, [])
    build_objective_from(job)
    return job


def job_to_dict(job: JobConfig) -> dict[str, Any]:
    return to_dict(job)
