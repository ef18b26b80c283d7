"""sbatch scripts for hpcdiff jobs, rendered as a pure function of the options, and their submission.

Every value that comes from a user (paths, config overrides) reaches the script through ``shlex.quote``, and every
``#SBATCH`` value is checked to be one plain word; sbatch itself is run with an argument list. The only shell text
copied verbatim is ``setup`` (``module load ...``): trusted shell from the user, like their own ``.bashrc``.
The scripts requeue themselves after a clean stop (exit 75) or a crash, up to ``max_restarts``
(see sbatch_runner.sh), so they need nothing from the site's slurm.conf beyond ``--requeue`` being allowed.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from hpcdiff.config import check
from hpcdiff.errors import UsageError

Kind = Literal["train", "sample", "ingest", "encode", "stats", "randomise"]

# A #SBATCH value is read by sbatch, not by a shell: one word, no quotes, no comment sign, no backslash.
_WORD = re.compile(r"^[A-Za-z0-9_.,:+=@&|!*%/\[\]()-]+$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")


def _is_time_limit(text: str) -> bool:
    """Slurm's --time forms (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) with fields in range."""
    m = _TIME.match(text)
    if m is None:
        return False
    days, first, *rest = m.groups()
    given = [int(v) for v in rest if v is not None]
    if days is not None:
        return int(first) < 24 and all(v < 60 for v in given)
    return all(v < 60 for v in given)  # the leading field (minutes or hours) may be any size


_ABOUT: dict[Kind, str] = {
    "train": """\
# Training: one process (task) per GPU on every node, started by srun. The program checkpoints atomically,
# and on SIGUSR1/SIGUSR2/SIGTERM it checkpoints at the next step boundary and exits 75; this script then
# requeues the job, which resumes bit for bit from the newest valid checkpoint in the run directory.
# Alternative to srun (one torchrun per node; hpcdiff reads RANK/WORLD_SIZE/LOCAL_RANK from it):
#   LAUNCH=(srun --ntasks-per-node=1 torchrun --nnodes="$SLURM_NNODES" --nproc-per-node="$SLURM_GPUS_ON_NODE"
#           --rdzv-backend=c10d --rdzv-endpoint="$(hostname):29500")
#   STEP=(-m hpcdiff train ...)   # torchrun runs "python -m hpcdiff" itself""",
    "sample": """\
# Sampling as a job array: task I of T (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) writes its own slice of the
# output shards; ranks inside a task split it further (worker = task x ranks + rank). A shard already complete
# and verified is skipped, so a rerun task (requeued, or resubmitted with --array=I) only redoes what is missing.""",
    "ingest": """\
# Ingest as a job array: every task plans the same shards from the inputs; task I of T (SLURM_ARRAY_TASK_ID,
# SLURM_ARRAY_TASK_COUNT) conforms its own slice, and srun's ranks inside a task split it further (worker =
# task x ranks + rank). The task that finds every shard done writes quarantine.tsv and manifest.json. A shard
# already complete and verified is skipped, so a rerun task (requeued, or resubmitted with --array=I) only redoes
# what is missing.""",
    "encode": """\
# Encoding as a job array: every task plans the same latent shards from the image shards and the autoencoder's
# checkpoint; task I of T (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) encodes its own slice, and srun's ranks
# inside a task split it further (worker = task x ranks + rank). The task that finds every shard done writes
# manifest.json with the latents' scale factor. A shard already complete and verified is skipped, so a rerun task
# (requeued, or resubmitted with --array=I) only redoes what is missing.""",
    "stats": """\
# Statistics: one job whose dask workers are processes on this node (--backend local --workers N, N = CPUs).
# For more than one node, run the same command on a login node with --backend slurm --workers N instead: dask-jobqueue
# then submits N worker jobs itself (--partition, --walltime), and this script is not needed.""",
    "randomise": """\
# Permutation inference as a job array: every task plans the same batches of permutations; task I of T
# (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) computes its own batches, and srun's ranks inside a task split them
# further (worker = task x ranks + rank). Each batch is written atomically and recorded; the task that finds every
# batch done (the last to end) merges them and writes the maps and summary.json, the same bytes as one process.
# A rerun task (requeued, or resubmitted with --array=I) skips the batches already done.""",
}


@dataclass(kw_only=True)
class SlurmOptions:
    """What a site's Slurm needs to know about a job; None leaves the site's default."""

    partition: str | None = None
    """Partition (queue) to run in."""
    account: str | None = None
    """Account (allocation) to charge."""
    qos: str | None = None
    """Quality of service."""
    constraint: str | None = None
    """Node features, e.g. a100|h100."""
    time: str | None = None
    """Time limit: minutes, MM:SS, HH:MM:SS or D-HH:MM:SS."""
    nodes: int = 1
    """Nodes per job (per array task)."""
    ntasks_per_node: int | None = None
    """Processes per node; default: one per GPU, or 1 without GPUs."""
    gpus_per_node: int = 0
    """GPUs per node (0: none requested)."""
    cpus_per_task: int | None = None
    """CPU cores per process (data loading threads, dask workers)."""
    max_restarts: int = 3
    """Requeues after a clean stop (exit 75) or a crash before the job gives up."""
    signal_before_s: int = 300
    """Seconds before the time limit at which Slurm sends USR1 (Slurm's timer has ~60 s granularity)."""
    job_name: str | None = None
    """Name shown by squeue; default: hpcdiff-KIND."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run first (module load ..., conda activate ...): trusted shell, copied verbatim."""

    def __post_init__(self) -> None:
        for name in ("partition", "account", "qos", "constraint", "job_name"):
            value = getattr(self, name)
            check(
                value is None or bool(_WORD.match(value)),
                name,
                f"{value!r} must be one word of letters, digits and ,.:+=@&|!*%/[]()- (no spaces or quotes)",
            )
        check(
            self.time is None or _is_time_limit(self.time),
            "time",
            f"{self.time!r} is not a Slurm time limit: use minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]] "
            "(hours below 24 after a day count, minutes and seconds below 60)",
        )
        check(self.nodes >= 1, "nodes", "must be at least 1")
        check(self.ntasks_per_node is None or self.ntasks_per_node >= 1, "ntasks_per_node", "must be at least 1")
        check(self.gpus_per_node >= 0, "gpus_per_node", "must be 0 or more")
        check(self.cpus_per_task is None or self.cpus_per_task >= 1, "cpus_per_task", "must be at least 1")
        check(self.max_restarts >= 0, "max_restarts", "must be 0 or more")
        check(self.signal_before_s >= 1, "signal_before_s", "must be at least 1")
        for line in self.setup:
            check("\n" not in line, "setup", "give one shell line per entry")

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or max(self.gpus_per_node, 1)


@dataclass(kw_only=True)
class JobScript:
    """One sbatch script: which program runs, how, and where its events go."""

    kind: Kind
    command: list[str]
    """The program's argument list (quoted for the shell when rendered)."""
    options: SlurmOptions
    array: int | None = None
    """Number of array tasks (0..array-1); None: not an array."""
    use_srun: bool = True
    """Start ``ntasks`` copies of the command with srun (MPI via PMIx); False: run it once in the batch shell."""
    stage_log: Path | None = None
    """Pipeline stage log (one JSON line per start, requeue and exit); None: not part of a pipeline."""
    stage: str | None = None


_RECORD = r"""record() {  # one JSON line per start, requeue and exit: how 'hpcdiff status' tells which stage failed
  printf '{"time": %s, "stage": "%s", "job": "%s", "task": "%s", "event": "%s", "rc": "%s"}\n' \
    "$(date +%s)" "$STAGE" "$SLURM_JOB_ID" "${SLURM_ARRAY_TASK_ID:-}" "$1" "${2:-}" >>"$STAGE_LOG"
}"""


def _directives(job: JobScript) -> list[tuple[str, str]]:
    o = job.options
    rows: list[tuple[str, str | None, str]] = [
        ("job-name", o.job_name or f"hpcdiff-{job.kind}", "the name squeue shows"),
        ("partition", o.partition, "the queue to run in"),
        ("account", o.account, "the allocation charged for the time"),
        ("qos", o.qos, "quality of service"),
        ("constraint", o.constraint, "only nodes with these features"),
        ("time", o.time, "time limit; Slurm kills the job after it"),
        ("array", f"0-{job.array - 1}" if job.array else None, "one task per slice of the work"),
        ("nodes", str(o.nodes), "nodes per job" + (" (per array task)" if job.array else "")),
        ("ntasks-per-node", str(o.tasks_per_node), "processes (ranks) per node; one per GPU"),
        ("gpus-per-node", str(o.gpus_per_node) if o.gpus_per_node else None, "GPUs per node"),
        ("cpus-per-task", str(o.cpus_per_task) if o.cpus_per_task else None, "CPU cores per process"),
        ("requeue", "", "Slurm may requeue it (preemption, node failure) and so may this script"),
        ("open-mode", "append", "a requeued run appends to the same output file"),
        (
            "signal",
            f"B:USR1@{o.signal_before_s}",
            f"SIGUSR1 to this script {o.signal_before_s} s before the time limit",
        ),
    ]
    return [
        (f"#SBATCH --{flag}" + (f"={value}" if value else ""), why) for flag, value, why in rows if value is not None
    ]


def _words(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def render(job: JobScript) -> str:
    """The sbatch script text: a pure function of ``job`` (golden-file tested)."""
    o = job.options
    rows = _directives(job)
    width = max(len(d) for d, _ in rows) + 2
    lines = ["#!/bin/bash", f"# hpcdiff {job.kind} job, written by hpcdiff.launch.slurm.", _ABOUT[job.kind], "#"]
    lines += [f"{d.ljust(width)}# {why}" for d, why in rows]
    lines += ["", "set -uo pipefail  # no -e: the step's exit status is examined below", ""]
    lines += ["# ----- site setup: trusted shell lines given with --setup, copied verbatim -----"]
    lines += list(o.setup) or ["# (none: add e.g. 'module load cuda' or 'source /path/to/venv/bin/activate')"]
    lines += [
        "",
        "# ----- what runs (every word quoted for the shell) -----",
        f"STEP=({_words(job.command)})",
    ]
    if job.use_srun:
        lines += [
            "# srun starts one copy per task; PMIx gives them MPI; one failing task ends them all.",
            "LAUNCH=(srun --mpi=pmix --kill-on-bad-exit=1)",
        ]
    else:
        lines += ["LAUNCH=()  # the step is one process in this script's allocation"]
    lines += [
        f"MAX_RESTARTS={o.max_restarts}",
        "export HDF5_USE_FILE_LOCKING=FALSE  # HDF5 file locks fail on Lustre and NFS",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "",
    ]
    if job.stage_log is not None:
        lines += [f"STAGE={shlex.quote(job.stage or job.kind)}", f"STAGE_LOG={shlex.quote(str(job.stage_log))}"]
        lines += [_RECORD]
    else:
        lines += ["record() { :; }  # pipelines log each start, requeue and exit here"]
    lines += ["", _runner().rstrip("\n")]
    return "\n".join(lines) + "\n"


def _runner() -> str:
    return resources.files("hpcdiff.launch.slurm").joinpath("sbatch_runner.sh").read_text()


def hpcdiff_argv(*args: str | Path, python: str | None = None) -> list[str]:
    """``python -m hpcdiff ARGS`` with this interpreter (a venv on the shared file system reaches every node)."""
    return [python or sys.executable, "-m", "hpcdiff", *map(str, args)]


def train_job(
    config: Path, run_dir: Path, options: SlurmOptions, overrides: Sequence[str] = (), python: str | None = None
) -> JobScript:
    """The training job of ``config`` into ``run_dir`` (absolute paths: the job may start elsewhere)."""
    args: list[str | Path] = ["train", Path(config).absolute(), "--run-dir", Path(run_dir).absolute(), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    return JobScript(kind="train", command=hpcdiff_argv(*args, python=python), options=options)


# ---------------------------------------------------------------- submission
@dataclass(frozen=True)
class Submission:
    job_id: str
    script: Path
    output: str
    argv: list[str]


def output_pattern(directory: Path, name: str, array: bool) -> str:
    """sbatch --output for ``directory``: '%' in the path is escaped, %j (or %A_%a) names the job."""
    escaped = str(Path(directory).absolute()).replace("%", "%%")
    return f"{escaped}/{name}-{'%A_%a' if array else '%j'}.out"


def sbatch_argv(script: Path, output: str, dependency: str | None = None) -> list[str]:
    argv = ["sbatch", "--parsable", f"--output={output}"]
    if dependency:
        # Without --kill-on-invalid-dep a job whose dependency failed would stay pending forever.
        argv += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    return [*argv, str(script)]


def write_script(job: JobScript, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(job))
    path.chmod(0o755)
    return path


def submit(script: Path, output: str, dependency: str | None = None, timeout: float = 120) -> Submission:
    """Submit ``script`` with sbatch; a refusal raises UsageError carrying Slurm's own message and a hint."""
    argv = sbatch_argv(script, output, dependency)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise UsageError("sbatch not found: run this on a Slurm login node (or `module load slurm`)") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"sbatch did not answer within {timeout:.0f} s: is slurmctld reachable (sinfo)?") from None
    job_id = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job_id.isdigit():
        message = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").replace("\n", "\n  ")
        raise UsageError(f"sbatch refused {script}:\n  {message}\n{_hint(message)}")
    return Submission(job_id, script, output, argv)


def _hint(message: str) -> str:
    low = message.lower()
    if "partition" in low:
        hint = "check --partition against `sinfo -s` (names and limits)"
    elif "account" in low or "association" in low:
        hint = "check --account against `sacctmgr show assoc user=$USER` (or ask your admins)"
    elif "qos" in low:
        hint = "check --qos against `sacctmgr show qos` and your association"
    elif "time limit" in low:
        hint = "lower --time to the partition's MaxTime (`sinfo -o '%P %l'`)"
    elif "gres" in low or "gpu" in low:
        hint = "check --gpus-per-node against the nodes' GPUs (`sinfo -o '%P %G'`)"
    elif "node" in low or "cpu" in low or "configuration" in low:
        hint = "ask for fewer nodes, tasks or CPUs (`sinfo -N -l` shows what the nodes have)"
    else:
        hint = "see `man sbatch`; `hpcdiff submit ... --dry-run` prints the script without submitting"
    return f"hint: {hint}"


def submit_train(
    config: Path,
    run_dir: Path,
    options: SlurmOptions,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
) -> tuple[str, Submission | None]:
    """Render the training job; unless ``dry_run``, write it to RUN/slurm/train.sbatch, submit it, record the id.

    Returns the script text and the submission (None for a dry run).
    """
    from hpcdiff.launch.slurm.query import is_final, job_summary
    from hpcdiff.runstate import RunDir

    job = train_job(config, run_dir, options, overrides)
    text = render(job)
    if dry_run:
        return text, None
    run = RunDir(run_dir)
    previous = run.read_status()
    for job_id in previous.get("job_ids", [])[-1:]:
        live = job_summary(str(job_id))
        if live is not None and not is_final(str(live["state"])):
            raise UsageError(
                f"{run.root} already has Slurm job {job_id} ({live['state']}): wait for it or `scancel {job_id}` first"
            )
    run.create()
    script = write_script(job, run.root / "slurm" / "train.sbatch")
    sub = submit(script, output_pattern(run.root / "slurm", "train", array=False))
    job_ids = [*previous.get("job_ids", []), sub.job_id]
    state = previous.get("state") if previous.get("state") == "completed" else "pending"
    run.update_status(state=state, backend="slurm", job_ids=job_ids, slurm_script=str(script), slurm_output=sub.output)
    run.event("submitted", backend="slurm", job_id=sub.job_id, script=str(script), argv=sub.argv)
    return text, sub
