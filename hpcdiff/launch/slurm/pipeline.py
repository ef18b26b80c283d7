"""Pipelines: ingest -> [autoencoder -> encode ->] train -> sample -> stats -> randomise as dependent Slurm jobs,
and which stage failed.

A pipeline YAML (jobs/pipeline.yaml) names a folder and the stages to run; each stage is a resumable hpcdiff job
with its own sbatch script, started only when the one before it ended well (``--dependency=afterok``). A stage
that fails makes Slurm cancel the ones after it (``--kill-on-invalid-dep=yes``) rather than leave them pending
forever. The latent road adds an autoencoder stage (a training job into DIR/autoencoder) and an encode stage
(image shards -> DIR/latents, a job array); the train stage then trains on DIR/latents, and sampling decodes.
Every stage appends a line per start, requeue and exit to DIR/stages.jsonl, so ``hpcdiff status DIR``
says which stage failed from the folder alone; ``scontrol`` adds the live state while Slurm still knows the jobs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpcdiff.atomic import atomic_write
from hpcdiff.config import apply_overrides, build, check, load_yaml
from hpcdiff.errors import UsageError
from hpcdiff.launch.slurm.query import job_summary
from hpcdiff.launch.slurm.sbatch import (
    JobScript,
    SlurmOptions,
    hpcdiff_argv,
    output_pattern,
    render,
    submit,
    train_job,
    write_script,
)

ORDER = ("ingest", "autoencoder", "encode", "train", "sample", "stats", "randomise")
STATE_FILE = "pipeline.json"
STAGE_LOG = "stages.jsonl"


@dataclass(kw_only=True)
class IngestStage:
    """BIDS -> shards in DIR/shards."""

    bids: str
    """BIDS root (``hpcdiff cohort --out BIDS`` makes a synthetic one)."""
    shape: list[int] = field(default_factory=lambda: [48, 56, 48])
    """Voxel grid D H W."""
    subjects_per_shard: int = 64
    """Subjects per shard."""
    strict: bool = False
    """Fail the stage (and so the pipeline) if any input is quarantined."""
    tasks: int = 1
    """Array tasks sharing the work."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Slurm options of this stage (override the pipeline's)."""

    def __post_init__(self) -> None:
        check(len(self.shape) == 3 and min(self.shape) > 0, "stages.ingest.shape", "needs three positive sizes")
        check(self.tasks >= 1, "stages.ingest.tasks", "must be at least 1")


@dataclass(kw_only=True)
class TrainStage:
    """Training into DIR/run (data.shards is DIR/shards when the pipeline ingests)."""

    config: str
    """Training job YAML (see jobs/)."""
    set: list[str] = field(default_factory=list)
    """Overrides key=value, as with --set."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Slurm options of this stage (override the pipeline's)."""


@dataclass(kw_only=True)
class AutoencoderStage(TrainStage):
    """The latent road's first training: the autoencoder (model.kind autoencoder) into DIR/autoencoder
    (data.shards is DIR/shards when the pipeline ingests)."""


@dataclass(kw_only=True)
class EncodeStage:
    """Image shards -> latent shards in DIR/latents through the autoencoder, as a job array; the train stage then
    trains on DIR/latents."""

    run_dir: str | None = None
    """An autoencoder run trained before; default: the autoencoder stage's DIR/autoencoder."""
    shards: str | None = None
    """Image shards to encode; default: the ingest stage's DIR/shards, else the autoencoder's data.shards."""
    subjects_per_shard: int = 64
    """Subjects per latent shard."""
    tasks: int = 1
    """Array tasks sharing the work."""
    args: list[str] = field(default_factory=list)
    """More ``hpcdiff encode`` options, e.g. [--checkpoint, '100000', --threads, '4']."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Slurm options of this stage (override the pipeline's)."""

    def __post_init__(self) -> None:
        check(self.subjects_per_shard >= 1, "stages.encode.subjects_per_shard", "must be at least 1")
        check(self.tasks >= 1, "stages.encode.tasks", "must be at least 1")
        for flag in ("--run-dir", "--out", "--subjects-per-shard", "--task", "--num-tasks"):
            check(flag not in self.args, "stages.encode.args", f"{flag} is set by the pipeline; leave it out")


@dataclass(kw_only=True)
class SampleStage:
    """Synthetic subjects from DIR/run into DIR/synth, as a job array."""

    n: int
    """Number of synthetic subjects."""
    tasks: int = 1
    """Array tasks sharing the work."""
    args: list[str] = field(default_factory=list)
    """More ``hpcdiff sample`` options, e.g. [--steps, '20', --seed, '1']."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Slurm options of this stage (override the pipeline's)."""

    def __post_init__(self) -> None:
        check(self.n >= 1, "stages.sample.n", "must be at least 1")
        check(self.tasks >= 1, "stages.sample.tasks", "must be at least 1")


@dataclass(kw_only=True)
class StatsStage:
    """Statistics into DIR/stats: compare real and synthetic shards, or describe the real ones."""

    action: Literal["compare", "template", "groupdiff", "gamma"] = "compare"
    """hpcdiff stats action; compare needs a sample stage."""
    backend: Literal["local", "synchronous"] = "local"
    """dask on the stage's node: worker processes (local) or one thread (synchronous, for tiny data)."""
    workers: int = 2
    """dask worker processes (backend local)."""
    args: list[str] = field(default_factory=list)
    """More ``hpcdiff stats ACTION`` options, e.g. [--group, group]."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Slurm options of this stage (override the pipeline's)."""


@dataclass(kw_only=True)
class RandomiseStage:
    """Permutation inference (``hpcdiff stats randomise``) into DIR/randomise, as a job array: each task computes
    its own batches of permutations and the task that finds every batch done writes the maps."""

    group: str
    """Categorical column whose two levels are compared (--group)."""
    permutations: int
    """Random permutations N (--permutations)."""
    covariates: list[str] = field(default_factory=list)
    """Nuisance columns (--covariates)."""
    shards: str | None = None
    """Shards to test; default: the ingest stage's DIR/shards, else the training data."""
    tasks: int = 1
    """Array tasks sharing the batches of permutations."""
    args: list[str] = field(default_factory=list)
    """More ``hpcdiff stats randomise`` options, e.g. [--tfce, --seed, '1', --batch-size, '50']."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """Slurm options of this stage (override the pipeline's)."""

    def __post_init__(self) -> None:
        check(self.permutations >= 1, "stages.randomise.permutations", "must be at least 1")
        check(self.tasks >= 1, "stages.randomise.tasks", "must be at least 1")
        for flag in ("--out", "--task", "--num-tasks"):
            check(flag not in self.args, "stages.randomise.args", f"{flag} is set by the pipeline; leave it out")


@dataclass(kw_only=True)
class Stages:
    """The stages to run, in the order ingest, autoencoder, encode, train, sample, stats, randomise; leave out what
    is not needed."""

    ingest: IngestStage | None = None
    autoencoder: AutoencoderStage | None = None
    encode: EncodeStage | None = None
    train: TrainStage | None = None
    sample: SampleStage | None = None
    stats: StatsStage | None = None
    randomise: RandomiseStage | None = None


@dataclass(kw_only=True)
class Pipeline:
    """A whole pipeline: where it writes, Slurm defaults, and its stages."""

    dir: str
    """Folder of every output: shards/, autoencoder/, latents/, run/, synth/, stats/, randomise/, slurm/,
    pipeline.json, stages.jsonl."""
    stages: Stages
    slurm: dict[str, Any] = field(default_factory=dict)
    """Slurm options for every stage (SlurmOptions keys: partition, account, time, gpus_per_node, ...)."""


def is_pipeline(data: dict[str, Any]) -> bool:
    return "stages" in data


def load_pipeline(path: Path, overrides: Sequence[str] = (), run_dir: str | None = None) -> Pipeline:
    """Read and check a pipeline YAML; relative paths are taken from the current directory."""
    data = apply_overrides(load_yaml(path), list(overrides))
    if run_dir:
        data["dir"] = run_dir
    pipe = build(Pipeline, data)
    present = [name for name in ORDER if getattr(pipe.stages, name) is not None]
    if not present:
        raise UsageError(f"{path}: 'stages' is empty: give at least one of {', '.join(ORDER)}")
    if pipe.stages.sample and not pipe.stages.train:
        raise UsageError(f"{path}: stages.sample needs stages.train (it samples from the trained run)")
    if pipe.stages.stats and pipe.stages.stats.action == "compare" and not pipe.stages.sample:
        raise UsageError(f"{path}: stats action 'compare' needs stages.sample; use template, groupdiff or gamma")
    if pipe.stages.stats and not (pipe.stages.ingest or pipe.stages.train):
        raise UsageError(f"{path}: stages.stats needs stages.ingest or stages.train (where the real shards are)")
    e = pipe.stages.encode
    if e and not (e.run_dir or pipe.stages.autoencoder):
        raise UsageError(f"{path}: stages.encode needs stages.autoencoder, or 'run_dir' (an autoencoder run)")
    if e and e.run_dir and pipe.stages.autoencoder:
        raise UsageError(f"{path}: stages.encode.run_dir: leave it out with stages.autoencoder (encode uses its run)")
    if e and not (e.shards or pipe.stages.ingest or pipe.stages.autoencoder):
        raise UsageError(f"{path}: stages.encode needs 'shards', or stages.ingest or stages.autoencoder to read them")
    if pipe.stages.autoencoder and pipe.stages.train and not e:
        raise UsageError(f"{path}: stages.train after stages.autoencoder needs stages.encode (the latents it learns)")
    r = pipe.stages.randomise
    if r and not (r.shards or pipe.stages.ingest or pipe.stages.train):
        raise UsageError(f"{path}: stages.randomise needs 'shards', or stages.ingest or stages.train to take them from")
    pipe.dir = str(Path(pipe.dir).expanduser().absolute())
    for name in present:
        options(pipe, name)  # refuse bad Slurm options now, not after hours in the queue
    from hpcdiff.train_config import load_job

    if pipe.stages.autoencoder:
        job = load_job(pipe.stages.autoencoder.config, _train_sets(pipe, "autoencoder"))
        kind = job.model.get("kind", "unet")
        if kind != "autoencoder":
            raise UsageError(f"{path}: stages.autoencoder.config: {kind!r} is not model.kind autoencoder")
    if pipe.stages.train:
        load_job(pipe.stages.train.config, _train_sets(pipe))
    return pipe


def options(pipe: Pipeline, stage: str) -> SlurmOptions:
    return build(SlurmOptions, {**pipe.slurm, **getattr(pipe.stages, stage).slurm}, f"stages.{stage}.slurm")


def _real_shards(pipe: Pipeline, root: Path) -> Path:
    """The image shards: the ingest stage's, else those the encode stage reads, else the training data."""
    if pipe.stages.ingest:
        return root / "shards"
    from hpcdiff.train_config import load_job

    if pipe.stages.encode:
        if pipe.stages.encode.shards:
            return Path(pipe.stages.encode.shards).absolute()
        assert pipe.stages.autoencoder is not None  # load_pipeline checked it
        return Path(load_job(pipe.stages.autoencoder.config, pipe.stages.autoencoder.set).data.shards)
    assert pipe.stages.train is not None  # load_pipeline checked it
    return Path(load_job(pipe.stages.train.config, pipe.stages.train.set).data.shards)


def _train_sets(pipe: Pipeline, stage: Literal["autoencoder", "train"] = "train") -> list[str]:
    """The stage's --set overrides, and data.shards from the stage before it: latents for train after encode."""
    train = getattr(pipe.stages, stage)
    assert train is not None
    root = Path(pipe.dir)
    if stage == "train" and pipe.stages.encode:
        return [*train.set, f"data.shards={root / 'latents'}"]
    return [*train.set, *([f"data.shards={root / 'shards'}"] if pipe.stages.ingest else [])]


def jobs(pipe: Pipeline) -> list[tuple[str, JobScript]]:
    """The sbatch job of every stage, in order: a pure function of the pipeline."""
    root = Path(pipe.dir)
    log = root / STAGE_LOG
    s = pipe.stages
    out: list[tuple[str, JobScript]] = []
    if s.ingest:
        cmd = hpcdiff_argv("ingest", Path(s.ingest.bids).absolute(), "--out", root / "shards", "--shape")
        cmd += [str(v) for v in s.ingest.shape] + ["--subjects-per-shard", str(s.ingest.subjects_per_shard)]
        cmd += ["--strict"] if s.ingest.strict else []
        array = s.ingest.tasks if s.ingest.tasks > 1 else None
        out.append(("ingest", JobScript(kind="ingest", command=cmd, options=options(pipe, "ingest"), array=array)))
    if s.autoencoder:
        sets = _train_sets(pipe, "autoencoder")
        ae = train_job(Path(s.autoencoder.config), root / "autoencoder", options(pipe, "autoencoder"), sets)
        out.append(("autoencoder", ae))
    if s.encode:
        e = s.encode
        ae_run = Path(e.run_dir).absolute() if e.run_dir else root / "autoencoder"
        images = Path(e.shards).absolute() if e.shards else _real_shards(pipe, root)
        cmd = hpcdiff_argv("encode", images, "--run-dir", ae_run, "--out", root / "latents")
        cmd += ["--subjects-per-shard", str(e.subjects_per_shard), *e.args]
        array = e.tasks if e.tasks > 1 else None
        out.append(("encode", JobScript(kind="encode", command=cmd, options=options(pipe, "encode"), array=array)))
    if s.train:
        out.append(("train", train_job(Path(s.train.config), root / "run", options(pipe, "train"), _train_sets(pipe))))
    if s.sample:
        cmd = hpcdiff_argv("sample", "--run-dir", root / "run", "--out", root / "synth", "--n", str(s.sample.n))
        cmd += s.sample.args
        array = s.sample.tasks if s.sample.tasks > 1 else None
        out.append(("sample", JobScript(kind="sample", command=cmd, options=options(pipe, "sample"), array=array)))
    if s.stats:
        real = _real_shards(pipe, root)
        inputs = [real, root / "synth"] if s.stats.action == "compare" else [real]
        cmd = hpcdiff_argv("stats", s.stats.action, *inputs, "--out", root / "stats")
        cmd += ["--backend", s.stats.backend, "--workers", str(s.stats.workers), *s.stats.args]
        opts = options(pipe, "stats")
        if opts.cpus_per_task is None:
            opts.cpus_per_task = s.stats.workers
        out.append(("stats", JobScript(kind="stats", command=cmd, options=opts, use_srun=False)))
    if s.randomise:
        r = s.randomise
        shards = Path(r.shards).absolute() if r.shards else _real_shards(pipe, root)
        cmd = hpcdiff_argv("stats", "randomise", shards, "--out", root / "randomise", "--group", r.group)
        cmd += ["--permutations", str(r.permutations)]
        cmd += ["--covariates", ",".join(r.covariates)] if r.covariates else []
        cmd += r.args
        array = r.tasks if r.tasks > 1 else None
        job = JobScript(kind="randomise", command=cmd, options=options(pipe, "randomise"), array=array)
        out.append(("randomise", job))
    for name, job in out:
        job.stage, job.stage_log = name, log
        job.options.job_name = job.options.job_name or f"hpcdiff-{name}"
    return out


def submit_pipeline(pipe: Pipeline, dry_run: bool = False) -> str:
    """Submit every stage, each depending on the one before; return what to tell the user."""
    stages = jobs(pipe)
    if dry_run:
        return "\n".join(f"# ===== stage {name} =====\n{render(job)}" for name, job in stages)
    root = Path(pipe.dir)
    root.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"dir": str(root), "submitted": time.time(), "stages": []}
    previous: str | None = None
    lines = []
    for name, job in stages:
        script = write_script(job, root / "slurm" / f"{name}.sbatch")
        sub = submit(script, output_pattern(root / "slurm", name, array=job.array is not None), _after(previous))
        record["stages"].append(
            {"name": name, "job_id": sub.job_id, "array": job.array, "script": str(script), "output": sub.output}
        )
        atomic_write(root / STATE_FILE, json.dumps(record, indent=1).encode())  # after each: a partial submit shows
        lines.append(f"{name:11s} job {sub.job_id}" + (f" (after {previous})" if previous else ""))
        previous = sub.job_id
    lines.append(f"follow it from any shell: hpcdiff status {root}")
    return "\n".join(lines)


def _after(job_id: str | None) -> str | None:
    return f"afterok:{job_id}" if job_id else None


# ---------------------------------------------------------------- status
def is_pipeline_dir(path: Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def _task_states(events: list[dict[str, Any]]) -> dict[str, str]:
    last: dict[str, str] = {}
    for e in events:
        kind, rc = e.get("event"), e.get("rc", "")
        if kind == "exit":
            last[e.get("task", "")] = "completed" if rc == "0" else f"failed (exit {rc})"
        else:
            last[e.get("task", "")] = "running" if kind == "start" else f"requeued (exit {rc})"
    return last


def pipeline_status(path: Path) -> dict[str, Any]:
    """Each stage's state from DIR/stages.jsonl (and scontrol while it knows), and the first failed stage."""
    root = Path(path).absolute()
    record = json.loads((root / STATE_FILE).read_text())
    events: list[dict[str, Any]] = []
    if (root / STAGE_LOG).exists():
        for line in (root / STAGE_LOG).read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    failed = None
    stages = []
    for st in record["stages"]:
        tasks = _task_states([e for e in events if e.get("stage") == st["name"]])
        live = job_summary(st["job_id"])
        expected = st["array"] or 1
        states = list(tasks.values())
        if any(s.startswith("failed") for s in states):
            state = next(s for s in states if s.startswith("failed"))
        elif states.count("completed") == expected:
            state = "completed"
        elif failed is not None:
            state = f"cancelled ({failed} failed)"
        elif states:
            state = "running"
        else:
            state = "pending"
        live_state = str(live["state"]) if live else None
        # A job killed outright (or cancelled) writes no exit line: only Slurm can tell, while it remembers.
        if live_state and state in ("running", "pending") and live_state in ("FAILED", "CANCELLED", "TIMEOUT"):
            state = f"{live_state.lower()} (slurm)"
        if failed is None and not state.startswith(("completed", "running", "pending")):
            failed = st["name"]
        stages.append({**st, "state": state, "tasks": tasks, "slurm": live})
    return {"dir": str(root), "stages": stages, "failed_stage": failed}


def describe_pipeline(status: dict[str, Any]) -> str:
    lines = [f"pipeline {status['dir']}"]
    for st in status["stages"]:
        live = st["slurm"]
        extra = f"  [slurm: {live['state']}]" if live else ""
        lines.append(f"  {st['name']:11s} job {st['job_id']:>8s}  {st['state']}{extra}")
    if status["failed_stage"]:
        lines.append(
            f"failed stage: {status['failed_stage']} (see {status['dir']}/slurm/{status['failed_stage']}-*.out)"
        )
    return "\n".join(lines)
