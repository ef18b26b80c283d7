"""Encoding as a batch job: image shards -> latent shards through a trained autoencoder, sliced and resumable.

Output shard i holds the latents of input subjects ``i*K .. i*K+K-1`` (K = ``--subjects-per-shard``), each the
posterior mean of the autoencoder (no sampling noise: the bytes are a function of the plan), stored as float16 with
C channels, with the subjects' rows (ids, covariates) copied from the input table. The plan pins the autoencoder
checkpoint by its EMA digest (hpcdiff.pinning), the input manifest by its sha256, and the intra-op thread count.
Each output's record keeps the latents' moments per channel (count, sum, sum of squares); the finisher adds them
up in index order into the manifest's scale factor (1 / std of the latents) without reading a latent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdiff import __version__
from hpcdiff.atomic import file_sha256
from hpcdiff.batch import Marker, Record, Worker, digest, plan_once, run
from hpcdiff.data.shards import (
    LAYOUT_COLUMNS,
    MANIFEST,
    SUBJECTS_TABLE,
    ShardInfo,
    ShardSet,
    shard_name,
    write_manifest,
    write_shard,
)
from hpcdiff.errors import DataError, UsageError
from hpcdiff.latent import autoencoder_state, build_autoencoder, combine, latent_grid, moments
from hpcdiff.models import Autoencoder
from hpcdiff.pinning import Pin, check_copy, keep_copy, pinned_path, read_copy

log = logging.getLogger(__name__)

_FINISH_FILES = (SUBJECTS_TABLE, MANIFEST)


@dataclass(kw_only=True)
class EncodeOptions:
    """Which autoencoder checkpoint, and how to cut the latents into shards."""

    subjects_per_shard: int = 64
    """K, subjects per latent shard (the unit of work and of resume)."""
    checkpoint: int | None = None
    """Training step of the autoencoder checkpoint; None pins the newest valid one when the plan is made."""
    threads: int = 1
    """Intra-op threads of every worker: part of the plan, since the order of float sums (so the bytes) follows it."""

    def __post_init__(self) -> None:
        for key in ("subjects_per_shard", "threads"):
            if getattr(self, key) < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")


@dataclass
class EncodeResult:
    out: Path
    num_subjects: int
    num_shards: int
    shards_written: int
    shards_skipped: int
    manifest_written: bool  # by this worker
    finished: bool  # by this worker or another
    step: int  # of the pinned autoencoder checkpoint


@dataclass
class _EncodePlan:
    """Everything an encoding worker needs and the bytes depend on; made once on rank 0 and broadcast."""

    shards: Path
    run_dir: Path
    out: Path
    opts: EncodeOptions
    pin: Pin
    manifest_sha256: str
    manifest: dict[str, Any]
    table: dict[str, list]
    channels: int
    factor: int
    grid: dict[str, list]  # the latent grid
    plan_sha256: str = field(init=False)

    def __post_init__(self) -> None:
        o = self.opts
        self.plan_sha256 = digest(
            {
                "command": "encode",
                "shards": str(self.shards),
                "manifest_sha256": self.manifest_sha256,
                "run_dir": str(self.run_dir),
                "pin": self.pin.__dict__,
                "subjects_per_shard": o.subjects_per_shard,
                "threads": o.threads,
            }
        )

    @property
    def num_subjects(self) -> int:
        return int(self.manifest["num_subjects"])

    @property
    def num_outputs(self) -> int:
        return -(-self.num_subjects // self.opts.subjects_per_shard)

    def rows(self, index: int) -> range:
        k = self.opts.subjects_per_shard
        return range(index * k, min((index + 1) * k, self.num_subjects))

    def marker(self) -> Marker:
        names = [shard_name(i) for i in range(self.num_outputs)]
        return Marker("encode", "shards", self.plan_sha256, (*names, *_FINISH_FILES))

    def latent_block(self, records: list[Record]) -> dict[str, Any]:
        """The manifest's ``latent`` entry: scale factor and moments, source grid, and the pinned autoencoder."""
        return {
            **combine([r.data["moments"] for r in records]),
            "encoding": "posterior mean",
            "source": {k: self.manifest[k] for k in ("shape", "spacing", "affine")},
            "source_shards": str(self.shards),
            "source_data_sha256": self.manifest["subjects"]["data_sha256"],
            "autoencoder": {
                "run_dir": str(self.run_dir),
                "step": self.pin.step,
                "checkpoint": self.pin.checkpoint,
                "weights_sha256": self.pin.weights_sha256,
                "ema_sha256": self.pin.ema_sha256,
                "downsample": self.factor,
                "latent_channels": self.channels,
            },
        }


def _make_plan(shards: Path, run_dir: Path, out: Path, opts: EncodeOptions, overwrite: bool) -> _EncodePlan:
    """Pin the autoencoder (reusing the folder's own copy on a resume) and read the input's manifest and table."""
    if not overwrite and pinned_path(out).is_file():
        pin, state = read_copy(out)
        state["from_copy"] = True
        if opts.checkpoint is not None and opts.checkpoint != pin.step:
            pin, state = autoencoder_state(run_dir, opts.checkpoint)
    else:
        pin, state = autoencoder_state(run_dir, opts.checkpoint)
    with ShardSet.open(shards) as s:
        s.require_images("hpcdiff encode")
        if s.num_subjects == 0:
            raise DataError(f"{shards} holds no subjects: nothing to encode")
        full = s.subjects()
        table = {name: full[name].tolist() for name in full if name not in LAYOUT_COLUMNS}
        manifest = s.manifest
    model_cfg = state["model_config"]
    channels = int(model_cfg["latent_channels"])
    factor = 2 ** (len(model_cfg["channel_mults"]) - 1)
    plan = _EncodePlan(
        shards, run_dir, out, opts, pin, file_sha256(shards / MANIFEST), manifest, table, channels, factor,
        latent_grid(manifest, factor),
    )  # fmt: skip
    plan.state = state  # type: ignore[attr-defined]  # on rank 0 only, for _keep_copy; never broadcast
    return plan


def _keep_copy(plan: _EncodePlan) -> None:
    state = plan.__dict__.pop("state", None)
    if state is None or state.pop("from_copy", False):
        return
    path = keep_copy(plan.out, state, plan.pin)
    log.info(
        "encode: pinned autoencoder step %d (ema sha256 %s...) in %s", plan.pin.step, plan.pin.ema_sha256[:12], path
    )


@dataclass
class _EncodeJob:
    """One worker's view of the plan: the outputs are latent shards, finishing writes subjects.json and the manifest."""

    plan: _EncodePlan
    model: Autoencoder
    device: torch.device
    finish_files = _FINISH_FILES

    @property
    def out(self) -> Path:
        return self.plan.out

    @property
    def plan_sha256(self) -> str:
        return self.plan.plan_sha256

    @property
    def num_outputs(self) -> int:
        return self.plan.num_outputs

    def files(self, index: int) -> list[str]:
        return [shard_name(index)]

    def write(self, index: int) -> dict[str, Any]:
        plan, rows = self.plan, self.plan.rows(index)
        t0 = time.perf_counter()
        with ShardSet.open(plan.shards) as source:
            # One subject at a time: a subject's latent does not depend on which others share its batch.
            latents = np.concatenate([self._encode(source.read_many([i])) for i in rows]).astype(np.float16)
        table = {name: [values[i] for i in rows] for name, values in plan.table.items()}
        attrs = {"plan_sha256": plan.plan_sha256, "ema_sha256": plan.pin.ema_sha256, "step": plan.pin.step}
        info = write_shard(plan.out / shard_name(index), latents, table, attrs=attrs)
        log.info("encode: wrote %s (%d subjects, %.1f s)", info.file, len(rows), time.perf_counter() - t0)
        return {"info": info.to_json(), "subjects": table, "moments": moments(latents)}

    @torch.no_grad()
    def _encode(self, volume: np.ndarray) -> np.ndarray:
        mean, _ = self.model.encode(torch.from_numpy(volume).to(self.device))
        z = mean.float().cpu().numpy()
        if not np.isfinite(z).all():
            raise DataError(f"the autoencoder of step {self.plan.pin.step} encodes a volume to NaN/Inf")
        return z

    def finish(self, records: list[Record]) -> None:
        plan = self.plan
        table: dict[str, list] = {}
        for r in records:
            for name, values in r.data["subjects"].items():
                table.setdefault(name, []).extend(values)
        write_manifest(
            plan.out,
            shape=plan.grid["shape"],
            spacing=plan.grid["spacing"],
            affine=plan.grid["affine"],
            covariates=plan.manifest["covariates"],
            shards=[ShardInfo(**r.data["info"]) for r in records],
            provenance={
                "tool": "hpcdiff encode",
                "version": __version__,
                "threads": plan.opts.threads,
                "subjects_per_shard": plan.opts.subjects_per_shard,
                "plan_sha256": plan.plan_sha256,
            },
            subjects=table,
            channels=plan.channels,
            latent=plan.latent_block(records),
        )
        log.info("encode: all %d shards done; wrote %s", len(records), plan.out / MANIFEST)


def encode(
    shards: str | Path,
    run_dir: str | Path,
    out: str | Path,
    opts: EncodeOptions,
    task: int = 0,
    num_tasks: int = 1,
    device: torch.device | None = None,
    overwrite: bool = False,
) -> EncodeResult:
    """Write this worker's latent shards of ``shards``; write the manifest if every shard is then done.

    Args:
        shards: image shard directory to encode.
        run_dir: autoencoder run directory (model.kind autoencoder).
        out: latent shard directory to create or complete.
        opts: which checkpoint, subjects per shard, threads.
        task: this process's array task, 0..num_tasks-1 (its ranks come from the launcher).
        num_tasks: array tasks sharing the shards.
        device: where to run the autoencoder; default the GPU of the local rank if any, else the CPU.
        overwrite: replace the shards of another encoding plan in ``out`` (only those its marker lists).
    """
    from hpcdiff import dist

    shards, run_dir, out = Path(shards).resolve(), Path(run_dir).resolve(), Path(out)
    Worker(task, num_tasks, 0, 1)  # refuse a bad --task before bringing up the ranks
    ctx = dist.init(device="cpu")
    try:
        worker = Worker(task, num_tasks, ctx.rank, ctx.world_size)
        device = device or dist.pick_device(ctx.topology.local_rank)
        make = lambda: _make_plan(shards, run_dir, out, opts, overwrite)  # noqa: E731
        plan = plan_once(ctx, make, _EncodePlan.marker, out, overwrite, _keep_copy)
        torch.set_num_threads(plan.opts.threads)
        _, state = read_copy(plan.out)
        check_copy(plan.out, plan.pin, state["ema"])
        outcome = run(_EncodeJob(plan, build_autoencoder(state, device), device), worker)
        return EncodeResult(
            out,
            plan.num_subjects,
            plan.num_outputs,
            outcome.written,
            outcome.skipped,
            outcome.finished_here,
            outcome.finished,
            plan.pin.step,
        )
    finally:
        ctx.close()
