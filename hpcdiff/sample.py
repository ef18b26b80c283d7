"""Sampling as a batch job: synthetic subjects from a run's EMA weights into shards, sliced and resumable.

Subject i's covariates and noise depend only on (seed, i): its generator is seeded by ``seed_for(seed, i)`` and
the sampler draws each sample's noise from its own generator. Subjects are cut into shards of K, the outputs of a
job on the sliced-job core (hpcdiff.batch). The plan pins everything the bytes depend on: the checkpoint (given by
``--checkpoint STEP``, else the newest valid one when the plan is first made) with its weights digest, the sampler
settings, the cohort and the intra-op thread count (float sums depend on it). The pinned EMA weights are copied
into ``OUT/.hpcdiff/weights.pt``: every worker of the plan samples from that copy, so tasks that start hours apart
while training goes on (and prunes checkpoints) use the same weights, and 1 process, N ranks and array tasks give
the same bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdiff import __version__, checkpoint
from hpcdiff.atomic import file_sha256
from hpcdiff.batch import Marker, Record, Worker, digest, plan_once, run
from hpcdiff.config import build
from hpcdiff.data.covariates import draw_cohort, read_cohort_tsv, schema_of
from hpcdiff.data.shards import MANIFEST, SUBJECTS_TABLE, ShardInfo, ShardSet, shard_name, write_manifest, write_shard
from hpcdiff.errors import CheckpointError, DataError, DivergedError, ShardError, UsageError
from hpcdiff.latent import build_autoencoder, decoder_for
from hpcdiff.models import Autoencoder, ObjectiveConfig, UNet, UNetConfig, build_objective
from hpcdiff.pinning import Pin, check_copy, keep_copy, pin_of, pinned_path, read_copy, resolve
from hpcdiff.seeds import seed_for

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
    checkpoint: int | None = None
    """Training step of the checkpoint to sample from; None pins the newest valid one when the plan is made."""
    threads: int = 1
    """Intra-op threads of every worker: part of the plan, since the order of float sums (so the bytes) follows it."""

    def __post_init__(self) -> None:
        for key in ("steps", "subjects_per_shard", "batch_size", "threads"):
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
    manifest_written: bool  # by this worker
    finished: bool  # by this worker or another
    step: int  # of the pinned checkpoint


_FINISH_FILES = (SUBJECTS_TABLE, MANIFEST)
_SAMPLING_KEYS = ("ema", "model_config", "objective_config", "covariates", "config", "step")


@dataclass
class _Generator:
    """A run's EMA network and objective, with the grid and covariate schema it was trained on."""

    model: UNet
    objective: Any
    state: dict[str, Any]
    grid: dict[str, Any]
    schema: dict[str, dict]
    decoder: Autoencoder | None = None  # a latent run's autoencoder: samples are latents, decoded into images

    @property
    def training_shards(self) -> str:
        return str(self.state["config"]["data"]["shards"])


def _training_shards(state: dict[str, Any], what: str) -> ShardSet:
    path = state["config"]["data"]["shards"]
    try:
        return ShardSet.open(path)
    except ShardError as e:
        raise DataError(f"{what} needs the run's training shards at {path}, which cannot be read ({e})") from e


def _sampling_state(info: checkpoint.CheckpointInfo) -> dict[str, Any]:
    """What sampling needs from a checkpoint (EMA weights, configs, grid), and nothing else."""
    state = checkpoint.load(info, map_location="cpu")
    for key in _SAMPLING_KEYS:
        if key not in state:
            raise CheckpointError(f"{info.path}: checkpoint has no {key!r}; it was written by an older hpcdiff")
    if state.get("model_kind", "unet") != "unet":
        raise UsageError(
            f"{info.path} holds a model.kind {state['model_kind']!r} network, which does not generate on its own: "
            "sample from a diffusion run (model.kind unet)"
        )
    kept = {key: state[key] for key in _SAMPLING_KEYS}
    kept["grid"] = state.get("grid") or _training_shards(state, "a checkpoint without its grid").grid
    if state.get("latent"):
        kept["latent"] = state["latent"]
        kept["decoder"] = decoder_for(state["latent"])  # refuses an autoencoder changed since the encode
    return kept


def _generator(state: dict[str, Any], device: torch.device) -> _Generator:
    model = UNet(build(UNetConfig, state["model_config"], "model_config"))
    model.load_state_dict(state["ema"])
    model.to(device).eval().requires_grad_(False)
    objective = build_objective(build(ObjectiveConfig, state["objective_config"], "objective"))
    decoder = build_autoencoder(state["decoder"], device) if state.get("latent") else None
    return _Generator(model, objective, state, state["grid"], dict(state["covariates"]), decoder)


def load_generator(run_dir: Path, device: torch.device, step: int | None = None) -> _Generator:
    """EMA weights of checkpoint ``step`` (default: the newest valid one) in ``run_dir``, ready to sample."""
    return _generator(_sampling_state(resolve(run_dir, step)), device)


def _pin(run_dir: Path, out: Path, step: int | None, reuse: bool) -> tuple[Pin, dict[str, Any]]:
    """The checkpoint this plan samples from: the folder's own copy when it has one of that step (and ``reuse``),
    else the run's."""
    if reuse and pinned_path(out).is_file():
        pin, state = read_copy(out)
        if step is None or step == pin.step:
            return pin, {**state, "from_copy": True}
    info = resolve(run_dir, step)
    state = _sampling_state(info)
    return pin_of(info, state["ema"]), state


def _cohort(state: dict[str, Any], schema: dict[str, dict], opts: SampleOptions) -> tuple[dict[str, list], str]:
    """Covariates of every subject and a description of where they came from."""
    if not schema:
        if opts.covariates is not None:
            raise UsageError(f"--covariates {opts.covariates}: the model was trained without covariates")
        return {}, "none (unconditional model)"
    if opts.covariates is not None:
        columns = read_cohort_tsv(opts.covariates, schema, opts.n)
        return columns, f"{Path(opts.covariates).resolve()} (sha256 {file_sha256(Path(opts.covariates))})"
    assert opts.n is not None
    table = _training_shards(state, "drawing covariates without --covariates FILE.tsv").subjects()
    shards = state["config"]["data"]["shards"]
    return draw_cohort(table, list(schema), opts.n, opts.seed), f"rows of {shards}, seed {opts.seed}"


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


def _output_grid(state: dict[str, Any]) -> tuple[list[int], list[float], list[list[float]], int | None]:
    """Shape, spacing and affine the samples are stored on, and the slice axis of a 2D model (else None).

    A 2D model's sample is one slice: stored as a volume one voxel thick at the middle of the slice axis.
    """
    grid = state["latent"]["source"] if state.get("latent") else state["grid"]
    shape = [int(s) for s in grid["shape"]]
    affine = np.asarray(grid["affine"], dtype=np.float64)
    spacing = [float(s) for s in grid["spacing"]]
    if build(UNetConfig, state["model_config"], "model_config").dims == 3:
        return shape, spacing, affine.tolist(), None
    axis = int(state["config"]["data"].get("slice_axis", 0))
    affine = affine.copy()
    affine[:3, 3] += affine[:3, axis] * (shape[axis] // 2)
    shape[axis] = 1
    return shape, spacing, affine.tolist(), axis


@dataclass
class _SamplePlan:
    """Everything a sampling worker needs and the bytes depend on; made once on rank 0 and broadcast."""

    run_dir: Path
    out: Path
    opts: SampleOptions
    pin: Pin
    sampler: str
    objective: dict[str, Any]
    columns: dict[str, list]
    source: str
    schema: dict[str, dict]
    shape: list[int]
    spacing: list[float]
    affine: list[list[float]]
    axis: int | None
    training_shards: str
    num_subjects: int
    latent: dict[str, Any] | None = None  # a latent run's block: scale factor, autoencoder, source grid
    plan_sha256: str = field(init=False)

    def __post_init__(self) -> None:
        o = self.opts
        self.plan_sha256 = digest(
            {
                "command": "sample",
                "run_dir": str(self.run_dir),
                "pin": self.pin.__dict__,
                "objective": self.objective,
                "sampler": self.sampler,
                "steps": o.steps,
                "guidance": o.guidance,
                "seed": o.seed,
                "subjects_per_shard": o.subjects_per_shard,
                "threads": o.threads,
                "covariates": self.columns,
                "num_subjects": self.num_subjects,
                "grid": [self.shape, self.spacing, self.affine, self.axis],
                **({"latent": self.latent} if self.latent else {}),
            }
        )

    @property
    def decoder_pin(self) -> Pin:
        """The autoencoder a latent run decodes through, as the encode pinned it."""
        assert self.latent is not None
        ae = self.latent["autoencoder"]
        return Pin(int(ae["step"]), str(ae["checkpoint"]), ae.get("weights_sha256"), str(ae["ema_sha256"]))

    @property
    def num_outputs(self) -> int:
        return -(-self.num_subjects // self.opts.subjects_per_shard)

    def rows(self, index: int) -> range:
        k = self.opts.subjects_per_shard
        return range(index * k, min((index + 1) * k, self.num_subjects))

    def marker(self) -> Marker:
        names = [shard_name(i) for i in range(self.num_outputs)]
        return Marker("sample", "shards", self.plan_sha256, (*names, *_FINISH_FILES))

    def provenance(self) -> dict[str, Any]:
        o = self.opts
        return {
            "tool": "hpcdiff sample",
            "version": __version__,
            "run_dir": str(self.run_dir),
            "checkpoint": self.pin.checkpoint,
            "step": self.pin.step,
            "weights_sha256": self.pin.weights_sha256,
            "ema_sha256": self.pin.ema_sha256,
            "objective": self.objective,
            "sampler": self.sampler,
            "steps": o.steps,
            "guidance": o.guidance,
            "seed": o.seed,
            "threads": o.threads,
            "subjects_per_shard": o.subjects_per_shard,
            "covariates_source": self.source,
            "training_shards": self.training_shards,
            "slice_axis": self.axis,
            "plan_sha256": self.plan_sha256,
            **({"latent": _latent_provenance(self.latent)} if self.latent else {}),
        }


def _make_plan(run_dir: Path, out: Path, opts: SampleOptions, overwrite: bool) -> _SamplePlan:
    """Pin the checkpoint and draw the cohort (rank 0 of each task); the copy of the weights is written next."""
    pin, state = _pin(run_dir, out, opts.checkpoint, reuse=not overwrite)
    objective = build_objective(build(ObjectiveConfig, state["objective_config"], "objective"))
    sampler = objective.default_sampler if opts.sampler is None else opts.sampler
    if sampler not in objective.samplers:
        raise UsageError(f"--sampler {sampler!r}: this run's objective offers {list(objective.samplers)}")
    schema = dict(state["covariates"])
    columns, source = _cohort(state, schema, opts)
    n = len(next(iter(columns.values()))) if columns else opts.n
    assert n is not None
    shape, spacing, affine, axis = _output_grid(state)
    plan = _SamplePlan(
        run_dir, out, opts, pin, sampler, state["objective_config"], columns, source, schema,
        shape, spacing, affine, axis, str(state["config"]["data"]["shards"]), n, state.get("latent"),
    )  # fmt: skip
    plan.state = state  # type: ignore[attr-defined]  # on rank 0 only, for _keep_copy; never broadcast
    return plan


def _latent_provenance(latent: dict[str, Any]) -> dict[str, Any]:
    """What a sampled set records of a latent run: the autoencoder it was decoded through and the scale factor."""
    return {key: latent[key] for key in ("scale_factor", "autoencoder", "source_shards")}


def _keep_copy(plan: _SamplePlan) -> None:
    """Write the plan's own copy of the pinned weights into the output folder, unless it is there already."""
    state = plan.__dict__.pop("state", None)
    if state is None or state.pop("from_copy", False):
        return
    path = keep_copy(plan.out, state, plan.pin)
    log.info("sample: pinned step %d (ema sha256 %s...) in %s", plan.pin.step, plan.pin.ema_sha256[:12], path)


def _load_pinned(plan: _SamplePlan, device: torch.device) -> _Generator:
    """The plan's copy of the weights, checked against the plan's digest of them."""
    _, state = read_copy(plan.out)
    check_copy(plan.out, plan.pin, state["ema"])
    if state.get("latent"):
        check_copy(plan.out, plan.decoder_pin, state["decoder"]["ema"])
    return _generator(state, device)


@dataclass
class _SampleJob:
    """One worker's view of the plan: the outputs are shards, finishing writes subjects.json and the manifest."""

    plan: _SamplePlan
    gen: _Generator
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
        plan, opts, rows = self.plan, self.plan.opts, self.plan.rows(index)
        t0 = time.perf_counter()
        batches = (range(s, min(s + opts.batch_size, rows.stop)) for s in rows[:: opts.batch_size])
        images = np.concatenate([self._draw(b) for b in batches])
        table: dict[str, list] = {
            "id": [f"synth-{i:06d}" for i in rows],
            "session": [""] * len(rows),
            "source_path": [f"{plan.run_dir}@{plan.pin.step}"] * len(rows),
            "source_sha256": [plan.pin.weights_sha256 or ""] * len(rows),
            **{name: [plan.columns[name][i] for i in rows] for name in plan.columns},
        }
        attrs = {"plan_sha256": plan.plan_sha256, "ema_sha256": plan.pin.ema_sha256, "step": plan.pin.step}
        info = write_shard(plan.out / shard_name(index), images, table, attrs=attrs)
        log.info("sample: wrote %s (%d subjects, %.1f s)", info.file, len(rows), time.perf_counter() - t0)
        return {"info": info.to_json(), "subjects": table}

    def _draw(self, rows: range) -> np.ndarray:
        """Sample subjects ``rows``; shape (len(rows), 1, D, H, W) float32 (a 2D model's slice axis has size 1)."""
        plan, device = self.plan, self.device
        axis = plan.axis
        spatial = [s for a, s in enumerate(plan.shape) if a != axis] if axis is not None else plan.shape
        if self.gen.decoder is not None:
            spatial = self.gen.grid["shape"]  # the latent grid; decoded onto plan.shape below
        cov = _tensors(plan.columns, plan.schema, rows, device)
        generators = [torch.Generator(device=device).manual_seed(seed_for(plan.opts.seed, i)) for i in rows]
        x = self.gen.objective.sample(
            self.gen.model,
            (len(rows), self.gen.model.cfg.in_channels, *spatial),
            cov,
            generators,
            plan.opts.steps,
            sampler=plan.sampler,
            guidance=plan.opts.guidance,
        )
        if self.gen.decoder is not None:
            x = self._decode(x)
        x = x.float().cpu().numpy()
        if not np.isfinite(x).all():
            raise DivergedError(
                f"subjects {rows.start}..{rows.stop - 1}: the sampler produced NaN/Inf from step {plan.pin.step}'s "
                "EMA weights; sample another --checkpoint"
            )
        return x if axis is None else np.expand_dims(x, 2 + axis)

    @torch.no_grad()
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (n, C, d, h, w) back to the image scale and through the autoencoder, one subject at a time (a
        subject's image does not depend on the batch it was sampled in)."""
        assert self.gen.decoder is not None and self.plan.latent is not None
        z = z / float(self.plan.latent["scale_factor"])
        return torch.cat([self.gen.decoder.decode(z[i : i + 1]) for i in range(z.shape[0])])

    def finish(self, records: list[Record]) -> None:
        plan = self.plan
        table: dict[str, list] = {}
        for shard, r in enumerate(records):
            for name, values in r.data["subjects"].items():
                table.setdefault(name, []).extend(values)
            count = len(r.data["subjects"]["id"])
            table.setdefault("shard", []).extend([shard] * count)
            table.setdefault("row", []).extend(range(count))
        kinds = {name: spec["kind"] for name, spec in plan.schema.items()}
        covariates = schema_of(plan.columns, kinds)
        for name, spec in plan.schema.items():
            if spec["kind"] == "categorical":
                covariates[name] = {"kind": "categorical", "levels": list(spec["levels"])}  # the model's level order
        write_manifest(
            plan.out,
            shape=plan.shape,
            spacing=plan.spacing,
            affine=plan.affine,
            covariates=covariates,
            shards=[ShardInfo(**r.data["info"]) for r in records],
            provenance=plan.provenance(),
            subjects=table,
        )
        log.info("sample: all %d shards done; wrote %s", len(records), plan.out / MANIFEST)


def sample(
    run_dir: str | Path,
    out: str | Path,
    opts: SampleOptions,
    task: int = 0,
    num_tasks: int = 1,
    device: torch.device | None = None,
    overwrite: bool = False,
) -> SampleResult:
    """Write this worker's shards of the synthetic cohort; write the manifest if every shard is then done.

    Args:
        run_dir: training run directory.
        out: shard directory to create or complete.
        opts: what to sample (and from which checkpoint).
        task: this process's array task, 0..num_tasks-1 (its ranks come from the launcher).
        num_tasks: array tasks sharing the shards.
        device: where to run the network; default the GPU of the local rank if any, else the CPU.
        overwrite: replace the shards of another sampling plan in ``out`` (only those its marker lists).
    """
    from hpcdiff import dist

    run_dir, out = Path(run_dir).resolve(), Path(out)
    Worker(task, num_tasks, 0, 1)  # refuse a bad --task before bringing up the ranks
    ctx = dist.init(device="cpu")
    try:
        worker = Worker(task, num_tasks, ctx.rank, ctx.world_size)
        device = device or dist.pick_device(ctx.topology.local_rank)
        make = lambda: _make_plan(run_dir, out, opts, overwrite)  # noqa: E731
        plan = plan_once(ctx, make, _SamplePlan.marker, out, overwrite, _keep_copy)
        torch.set_num_threads(plan.opts.threads)
        job = _SampleJob(plan, _load_pinned(plan, device), device)
        outcome = run(job, worker)
        return SampleResult(
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
