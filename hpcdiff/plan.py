"""``hpcdiff plan``: a training job's memory before it is submitted, and whether it fits a GPU.

The numbers come from ``memplan.measure_step`` (two training steps simulated on the meta device), once with the
configured ``model.checkpointing`` and once with the other setting, so the saving is measured, not guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import ConfigError, ShardError, UsageError
from hpcdiff.memplan import StepMemory, input_shape, measure_step
from hpcdiff.models import covariate_specs
from hpcdiff.networks import build_model_config, model_kind
from hpcdiff.train_config import JobConfig

GIB = 2**30
MARGIN_BYTES = GIB
"""Added before comparing with the GPU: the CUDA context and kernel workspaces, which no tensor holds."""
MARGIN_FRACTION = 0.10
"""Also added, as a share of the peak: the caching allocator's fragmentation."""


@dataclass
class Plan:
    """Memory of one rank's training step (bytes), as measured for the job."""

    model_kind: str
    precision: str
    batch_size: int
    sample_shape: tuple[int, ...]
    parameters: int
    checkpoint_bytes: int
    state_bytes: int
    checkpointing: bool
    peak_bytes: int
    other_peak_bytes: int
    """The peak with model.checkpointing flipped."""
    gpu_bytes: int | None

    @property
    def activation_bytes(self) -> int:
        return self.peak_bytes - self.state_bytes

    @property
    def needed_bytes(self) -> int:
        """The peak plus the margin for what no tensor holds."""
        return needed(self.peak_bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.needed_bytes <= self.gpu_bytes

    @property
    def other_fits(self) -> bool | None:
        return None if self.gpu_bytes is None else needed(self.other_peak_bytes) <= self.gpu_bytes

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(activation_bytes=self.activation_bytes, needed_bytes=self.needed_bytes, fits=self.fits)
        return out


def needed(peak_bytes: int) -> int:
    return int(peak_bytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def volume_shape(job: JobConfig, shape: Sequence[int] | None) -> tuple[tuple[int, ...], dict[str, Any]]:
    """(D, H, W) and covariate schema: from ``--shape``, else from the shards' manifest (metadata only)."""
    try:
        shards = ShardSet.open(job.data.shards)
    except ShardError as e:
        if shape is None:
            raise UsageError(f"{e}; or give the volume size with --shape D H W") from e
        return tuple(shape), {}
    return (tuple(shape) if shape else shards.shape), shards.covariates


def make_plan(job: JobConfig, shape: Sequence[int] | None = None, gpu_memory_gib: float | None = None) -> Plan:
    """Measure the job's step with and without activation checkpointing."""
    kind = model_kind(job)
    build_model_config(job, [])  # a bad model section is the error to report, before any missing shards
    vol, schema = volume_shape(job, shape)
    try:
        specs = covariate_specs(schema, job.data.covariates) if schema and kind == "unet" else []
    except ConfigError as e:
        raise ConfigError(f"data.covariates: {e}") from e
    configured = bool(job.model.get("checkpointing", False))
    mine: StepMemory = measure_step(job, vol, specs, checkpointing=configured)
    other = measure_step(job, vol, specs, checkpointing=not configured)
    return Plan(
        model_kind=kind,
        precision=job.train.precision,
        batch_size=job.data.batch_size,
        sample_shape=input_shape(job, vol),
        parameters=mine.parameters,
        checkpoint_bytes=mine.checkpoint_bytes,
        state_bytes=mine.state_bytes,
        checkpointing=configured,
        peak_bytes=mine.peak_bytes,
        other_peak_bytes=other.peak_bytes,
        gpu_bytes=None if gpu_memory_gib is None else int(gpu_memory_gib * GIB),
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def format_plan(p: Plan) -> str:
    """The plan as lines for people."""
    on, off = (p.peak_bytes, p.other_peak_bytes) if p.checkpointing else (p.other_peak_bytes, p.peak_bytes)
    sample = "x".join(map(str, p.sample_shape[1:]))
    lines = [
        f"model            {p.model_kind}, {p.parameters:,} parameters",
        f"checkpoint       {_gib(p.checkpoint_bytes)} (weights, EMA, AdamW state)",
        f"per rank         batch {p.batch_size} of {sample}, {p.precision}",
        f"  state          {_gib(p.state_bytes)} (weights, EMA, AdamW state, gradients)",
        f"  activations    {_gib(p.activation_bytes)} ({_gib(p.activation_bytes / p.batch_size)} per sample)",
        f"  peak           {_gib(p.peak_bytes)} with model.checkpointing: {str(p.checkpointing).lower()}",
        f"checkpointing    true: {_gib(on)}, false: {_gib(off)} (saves {_gib(off - on)}, "
        f"{100 * (off - on) / max(off, 1):.0f}%)",
        f"needs            {_gib(p.needed_bytes)} (peak + 10% + 1 GiB for the CUDA context and workspaces)",
    ]
    if p.gpu_bytes is not None:
        verdict = "fits" if p.fits else "does not fit"
        line = f"{verdict} in {_gib(p.gpu_bytes)} per GPU"
        if not p.fits and p.other_fits and not p.checkpointing:
            line += "; with model.checkpointing: true it fits"
        elif not p.fits:
            line += "; lower data.batch_size" + (" or data.patch_size" if p.model_kind == "autoencoder" else "")
        lines.append(line)
    return "\n".join(lines)
