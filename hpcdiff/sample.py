"""Sampling as a batch job: synthetic subjects from a run's EMA weights into shards, sliced and resumable.

Subject i's covariates and noise depend only on (seed, i): its generator is seeded by ``seed_for(seed, i)`` and
the sampler draws each sample's noise from its own generator. Subjects are cut into shards of K; worker
``task * W + rank`` of ``T * W`` writes shards ``worker, worker + T*W, ...``, so the same subjects come out at any
number of ranks or array tasks. A shard that is complete, verified and made by the same plan (weights, sampler,
steps, guidance, seed, covariates) is skipped on a rerun; anything else is written again. The manifest is written
by whichever worker finds every shard done after finishing its own, and its content is a function of the plan and
the shards, so two workers racing to write it write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdiff import __version__, checkpoint
from hpcdiff.config import build
from hpcdiff.data.covariates import draw_cohort, read_cohort_tsv, schema_of
from hpcdiff.data.shards import (
    MANIFEST,
    ShardInfo,
    ShardSet,
    file_sha256,
    looks_done,
    remove_stale_tmp,
    shard_name,
    verified_shard,
    write_manifest,
    write_shard,
)
from hpcdiff.data.slicing import Worker
from hpcdiff.errors import CheckpointError, DataError, ShardError, UsageError
from hpcdiff.models import ObjectiveConfig, UNet, UNetConfig, build_objective
from hpcdiff.train import seed_for

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SampleOptions:
    """What to sample and how to cut it into shards."""

    n: int | None = None
    """Number of subjects; may be left out when ``covariates`` (a TSV) gives one row per subject."""
    covariates: Path | None = None
    """Cohort TSV (one column per trained covariate); None draws rows of the training subjects table."""
    steps: int = 50
    """Sampler steps."""
    guidance: float = 1.0
    """Classifier-free guidance scale (1 = plain conditional sampling)."""
    sampler: str | None = None
    """Sampler name of the run's objective; None takes its default."""
    seed: int = 0
    """With the subject index, fixes each subject's covariates (when drawn) and noise."""
    subjects_per_shard: int = 64
    """K, subjects per shard file (the unit of work and of resume)."""
    batch_size: int = 8
    """Subjects sampled together; changes speed and memory, not which subject is which."""

    def __post_init__(self) -> None:
        for key in ("steps", "subjects_per_shard", "batch_size"):
            if getattr(self, key) < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.n is not None and self.n < 1:
            raise UsageError(f"--n must be at least 1, got {self.n}")
        if self.n is None and self.covariates is None:
            raise UsageError("give --n N (covariates drawn from the training cohort) or --covariates FILE.tsv")


@dataclass
class SampleResult:
    out: Path
    num_subjects: int
    num_shards: int
    shards_written: int
    shards_skipped: int
    manifest_written: bool


@dataclass
class _Generator:
    """A run's EMA network and objective, with the grid and covariate schema it was trained on."""

    model: UNet
    objective: Any
    info: checkpoint.CheckpointInfo
    state: dict[str, Any]
    grid: dict[str, Any]
    schema: dict[str, dict]

    @property
    def training_shards(self) -> str:
        return str(self.state["config"]["data"]["shards"])


def _training_shards(state: dict[str, Any], what: str) -> ShardSet:
    path = state["config"]["data"]["shards"]
    try:
        return ShardSet.open(path)
    except ShardError as e:
        raise DataError(f"{what} needs the run's training shards at {path}, which cannot be read ({e})") from e


def load_generator(run_dir: Path, device: torch.device) -> _Generator:
    """EMA weights of the newest valid checkpoint in ``run_dir``, ready to sample."""
    info = checkpoint.latest_valid(Path(run_dir) / "checkpoints")
    if info is None:
        raise UsageError(f"no valid checkpoint in {Path(run_dir) / 'checkpoints'}: train the run first")
    state = checkpoint.load(info, map_location="cpu")
    for key in ("ema", "model_config", "objective_config", "covariates", "config"):
        if key not in state:
            raise CheckpointError(f"{info.path}: checkpoint has no {key!r}; it was written by an older hpcdiff")
    if state.get("model_kind", "unet") != "unet":
        raise UsageError(
            f"{run_dir} trained model.kind {state['model_kind']!r}, which does not generate on its own: "
            "sample from a diffusion run (model.kind unet)"
        )
    model = UNet(build(UNetConfig, state["model_config"], "model_config"))
    model.load_state_dict(state["ema"])
    model.to(device).eval().requires_grad_(False)
    objective = build_objective(build(ObjectiveConfig, state["objective_config"], "objective"))
    grid = state.get("grid") or _training_shards(state, "a checkpoint without its grid").grid
    return _Generator(model, objective, info, state, grid, dict(state["covariates"]))


def _cohort(gen: _Generator, opts: SampleOptions) -> tuple[dict[str, list], str]:
    """Covariates of every subject (same on every worker) and a description of where they came from."""
    if not gen.schema:
        if opts.covariates is not None:
            raise UsageError(f"--covariates {opts.covariates}: the model was trained without covariates")
        return {}, "none (unconditional model)"
    if opts.covariates is not None:
        columns = read_cohort_tsv(opts.covariates, gen.schema, opts.n)
        return columns, f"{Path(opts.covariates).resolve()} (sha256 {file_sha256(Path(opts.covariates))})"
    assert opts.n is not None
    table = _training_shards(gen.state, "drawing covariates without --covariates FILE.tsv").subjects()
    return draw_cohort(table, list(gen.schema), opts.n, opts.seed), f"rows of {gen.training_shards}, seed {opts.seed}"


def _tensors(columns: dict[str, list], schema: dict[str, dict], rows: range, device: torch.device) -> dict | None:
    """Covariates of ``rows`` as the model takes them: raw float32 (NaN missing), level index int64 (-1 missing)."""
    if not schema:
        return None
    out = {}
    for name, spec in schema.items():
        values = [columns[name][i] for i in rows]
        if spec["kind"] == "categorical":
            index = {level: i for i, level in enumerate(spec["levels"])}
            out[name] = torch.tensor([index.get(v, -1) for v in values], dtype=torch.int64, device=device)
        else:
            out[name] = torch.tensor(values, dtype=torch.float32, device=device)
    return out


def _output_grid(gen: _Generator) -> tuple[list[int], list[float], np.ndarray, int | None]:
    """Shape, spacing and affine the samples are stored on, and the slice axis of a 2D model (else None).

    A 2D model's sample is one slice: stored as a volume one voxel thick at the middle of the slice axis.
    """
    shape = [int(s) for s in gen.grid["shape"]]
    affine = np.asarray(gen.grid["affine"], dtype=np.float64)
    if gen.model.cfg.dims == 3:
        return shape, list(gen.grid["spacing"]), affine, None
    axis = int(gen.state["config"]["data"].get("slice_axis", 0))
    affine = affine.copy()
    affine[:3, 3] += affine[:3, axis] * (shape[axis] // 2)
    shape[axis] = 1
    return shape, list(gen.grid["spacing"]), affine, axis


def _draw(gen: _Generator, opts: SampleOptions, sampler: str, rows: range, cov: dict | None, device) -> np.ndarray:
    """Sample subjects ``rows``; shape (len(rows), 1, D, H, W) float32 (a 2D model's slice axis has size 1)."""
    shape, _, _, axis = _output_grid(gen)
    spatial = [s for a, s in enumerate(shape) if a != axis] if axis is not None else shape
    generators = [torch.Generator(device=device).manual_seed(seed_for(opts.seed, i)) for i in rows]
    x = gen.objective.sample(
        gen.model, (len(rows), 1, *spatial), cov, generators, opts.steps, sampler=sampler, guidance=opts.guidance
    )
    x = x.float().cpu().numpy()
    if not np.isfinite(x).all():
        raise FloatingPointError(f"subjects {rows.start}..{rows.stop - 1}: the sampler produced NaN/Inf")
    return x if axis is None else np.expand_dims(x, 2 + axis)


def _plan_digest(gen: _Generator, opts: SampleOptions, sampler: str, columns: dict[str, list], rows: range) -> str:
    """What a shard's bytes depend on (not paths, ranks or batch size): a shard made from another plan is redone."""
    key = {
        "weights_sha256": gen.info.weights_sha256,
        "objective": gen.state["objective_config"],
        "sampler": sampler,
        "steps": opts.steps,
        "guidance": opts.guidance,
        "seed": opts.seed,
        "rows": [rows.start, rows.stop],
        "covariates": {name: [columns[name][i] for i in rows] for name in columns},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def sample(
    run_dir: str | Path,
    out: str | Path,
    opts: SampleOptions,
    worker: Worker,
    device: torch.device | None = None,
) -> SampleResult:
    """Write this worker's shards of the synthetic cohort; write the manifest if every shard is then done.

    Args:
        run_dir: training run directory (its newest valid checkpoint is used).
        out: shard directory to create or complete.
        opts: what to sample.
        worker: this process's place among array tasks and ranks.
        device: where to run the network; default the GPU of the local rank if any, else the CPU.
    """
    run_dir, out = Path(run_dir).resolve(), Path(out)
    device = device or torch.device("cpu")
    gen = load_generator(run_dir, device)
    sampler = gen.objective.default_sampler if opts.sampler is None else opts.sampler
    if sampler not in gen.objective.samplers:
        raise UsageError(f"--sampler {sampler!r}: this run's objective offers {list(gen.objective.samplers)}")
    columns, source = _cohort(gen, opts)
    n = len(next(iter(columns.values()))) if columns else opts.n
    assert n is not None
    k = opts.subjects_per_shard
    shard_rows = [range(s, min(s + k, n)) for s in range(0, n, k)]
    shape, spacing, affine, axis = _output_grid(gen)
    provenance = {
        "tool": "hpcdiff sample",
        "version": __version__,
        "run_dir": str(run_dir),
        "checkpoint": str(gen.info.path),
        "step": int(gen.state["step"]),
        "weights_sha256": gen.info.weights_sha256,
        "objective": gen.state["objective_config"],
        "sampler": sampler,
        "steps": opts.steps,
        "guidance": opts.guidance,
        "seed": opts.seed,
        "subjects_per_shard": k,
        "covariates_source": source,
        "training_shards": gen.training_shards,
        "slice_axis": axis,
    }
    out.mkdir(parents=True, exist_ok=True)
    _drop_stale_manifest(out, provenance)
    digests = [_plan_digest(gen, opts, sampler, columns, rows) for rows in shard_rows]
    written = skipped = 0
    mine = worker.shards(len(shard_rows))
    for index in mine:
        path, rows = out / shard_name(index), shard_rows[index]
        remove_stale_tmp(path)
        if looks_done(path, digests[index]) and verified_shard(path, expected=len(rows)) is not None:
            skipped += 1
            continue
        t0 = time.perf_counter()
        images = np.concatenate(
            [
                _draw(gen, opts, sampler, b, _tensors(columns, gen.schema, b, device), device)
                for b in (range(s, min(s + opts.batch_size, rows.stop)) for s in rows[:: opts.batch_size])
            ]
        )
        table: dict[str, list] = {
            "id": [f"synth-{i:06d}" for i in rows],
            "session": [""] * len(rows),
            "source_path": [f"{run_dir}@{gen.state['step']}"] * len(rows),
            "source_sha256": [gen.info.weights_sha256 or ""] * len(rows),
            **{name: [columns[name][i] for i in rows] for name in columns},
        }
        write_shard(path, images, table, attrs={"plan_sha256": digests[index]})
        written += 1
        seconds = time.perf_counter() - t0
        log.info("sample: worker %d wrote %s (%d subjects, %.1f s)", worker.index, path.name, len(rows), seconds)
    manifest = _finish(out, shard_rows, digests, shape, spacing, affine, columns, gen.schema, provenance)
    return SampleResult(out, n, len(shard_rows), written, skipped, manifest)


def _drop_stale_manifest(out: Path, provenance: dict[str, Any]) -> None:
    """A manifest of another plan would describe shards about to be rewritten: remove it first."""
    path = out / MANIFEST
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("provenance")
    except (OSError, json.JSONDecodeError):
        old = None
    if path.exists() and old != json.loads(json.dumps(provenance)):
        log.warning("sample: %s describes another sampling plan; it is removed and rewritten when done", path)
        path.unlink(missing_ok=True)


def _finish(
    out: Path,
    shard_rows: list[range],
    digests: list[str],
    shape: list[int],
    spacing: list[float],
    affine: np.ndarray,
    columns: dict[str, list],
    schema: dict[str, dict],
    provenance: dict[str, Any],
) -> bool:
    """Write the manifest if every shard is done; False when some other worker's shards are still missing."""
    paths = [out / shard_name(i) for i in range(len(shard_rows))]
    if not all(looks_done(p, d) for p, d in zip(paths, digests)):
        return False
    infos: list[ShardInfo] = []
    for path, rows in zip(paths, shard_rows):
        info = verified_shard(path, expected=len(rows))
        if info is None:
            return False
        infos.append(info)
    kinds = {name: spec["kind"] for name, spec in schema.items()}
    covariates = schema_of(columns, kinds)
    for name, spec in schema.items():
        if spec["kind"] == "categorical":
            covariates[name] = {"kind": "categorical", "levels": list(spec["levels"])}  # the model's level order
    write_manifest(
        out, shape=shape, spacing=spacing, affine=affine, covariates=covariates, shards=infos, provenance=provenance
    )
    log.info("sample: all %d shards done; wrote %s", len(paths), out / MANIFEST)
    return True


def default_device(local_rank: int) -> torch.device:
    """The GPU of this local rank when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
