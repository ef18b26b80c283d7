"""The ``hpcdiff`` command: one sub-command per job; each parses, validates and calls one library function.

Nothing below this module knows the command line. Library exceptions become the exit codes of DESIGN.md:
0 done, 2 usage or config error, 3 bad input data, 75 stopped on a signal after a checkpoint (requeue me).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hpcdiff.dist import abort_peers
from hpcdiff.errors import EXIT_REQUEUE, EXIT_USAGE, HpcdiffError

log = logging.getLogger("hpcdiff")

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that says what was expected and exits 2 (its own convention, kept)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def _shape(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {value}")
    return value


# ---------------------------------------------------------------- doctor
def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="what is available: MPI, Slurm, GPUs, HDF5 filters, versions")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(handler=_run_doctor)


def _run_doctor(args: argparse.Namespace) -> int:
    from hpcdiff.doctor import diagnose, render

    report = diagnose()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


# ---------------------------------------------------------------- cohort
def _add_cohort(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cohort", help="synthetic multi-subject BIDS dataset with planted group effects")
    p.add_argument("--out", required=True, help="BIDS directory to create (a rerun completes it)")
    p.add_argument("--subjects", required=True, type=_shape, metavar="N", help="number of subjects")
    p.add_argument("--shape", nargs=3, type=_shape, default=[48, 56, 48], metavar=("D", "H", "W"), help="grid")
    p.add_argument("--seed", type=int, default=0, help="with the subject index, fixes each subject")
    p.set_defaults(handler=_run_cohort)


def _run_cohort(args: argparse.Namespace) -> int:
    from hpcdiff.data.cohort import TRUTH_DIR, make_cohort
    from hpcdiff.dist import detect_topology

    subjects = make_cohort(Path(args.out), args.subjects, tuple(args.shape), args.seed)
    if detect_topology().is_main:
        print(f"cohort: {len(subjects)} subjects in {args.out}; ground truth in {Path(args.out) / TRUTH_DIR}")
    return 0


# ---------------------------------------------------------------- ingest
def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="BIDS T1w images -> conformed HDF5 shards (resumable, sliced across ranks)")
    p.add_argument("bids_dir", help="root of a BIDS dataset (participants.tsv, sub-*/[ses-*/]anat/*_T1w.nii[.gz])")
    p.add_argument("--out", required=True, help="shard directory to create (a rerun completes it)")
    p.add_argument("--shape", nargs=3, type=_shape, default=[48, 56, 48], metavar=("D", "H", "W"), help="grid")
    p.add_argument("--spacing", type=float, default=None, metavar="MM", help="isotropic voxel size (mm)")
    p.add_argument("--subjects-per-shard", type=_shape, default=64, metavar="K", help="subjects per shard")
    p.add_argument("--strict", action="store_true", help="exit 3 if any input is quarantined")
    _add_task_options(p)
    p.set_defaults(handler=_run_ingest)


def _add_task_options(p: argparse.ArgumentParser) -> None:
    """--task/--num-tasks of a data job spread over a Slurm array (see hpcdiff.data.slicing)."""
    p.add_argument("--task", type=int, help="array task index (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN)")
    p.add_argument("--num-tasks", type=_positive, help="array tasks (default: $SLURM_ARRAY_TASK_COUNT, else 1)")


def _run_ingest(args: argparse.Namespace) -> int:
    import os

    from hpcdiff.data.ingest import ingest
    from hpcdiff.data.shards import QUARANTINE
    from hpcdiff.data.slicing import task_of
    from hpcdiff.dist import detect_topology

    task, num_tasks = task_of(args.task, args.num_tasks, os.environ)
    r = ingest(
        Path(args.bids_dir),
        Path(args.out),
        tuple(args.shape),
        args.spacing,
        args.subjects_per_shard,
        args.strict,
        task=task,
        num_tasks=num_tasks,
    )
    if not detect_topology().is_main:
        return 0
    counts = f"{r.shards_written} written, {r.shards_skipped} already complete"
    if r.manifest_written:
        print(
            f"ingest: {r.num_subjects} subjects in {r.num_shards} shards in {r.out} ({counts}); "
            f"{len(r.quarantined)} quarantined, listed in {r.out / QUARANTINE}"
        )
    else:
        print(f"ingest: task {task} of {num_tasks} in {r.out}: {counts}; other tasks' shards still missing")
    return 0


# ---------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="whole pipeline on a built-in cohort, minutes on a laptop")
    p.add_argument("--out", default="demo-out", help="folder for every output (default: demo-out)")
    p.add_argument("--ranks", type=_positive, default=2, help="MPI ranks for the parallel stages")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from hpcdiff.demo import run_demo

    return run_demo(Path(args.out), ranks=args.ranks)


# ---------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model; resumes from the newest valid checkpoint in --run-dir")
    p.add_argument("config", help="job config YAML (see jobs/)")
    p.add_argument("--run-dir", required=True, help="run directory: checkpoints, status, logs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--allow-config-change", action="store_true", help="resume although the config changed")
    p.add_argument("--quiet", action="store_true", help="plain periodic log lines, no progress bar")
    p.set_defaults(handler=_run_train)


def _setup_rank_logging(log_file: Path, rank: int, quiet: bool) -> None:
    """One log file per rank; only rank 0 also talks to the terminal."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s rank%(rank)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RankFilter(rank))
    root.addHandler(handler)
    if rank != 0:
        for h in root.handlers:
            if h is not handler:
                h.setLevel(logging.WARNING)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def _run_train(args: argparse.Namespace) -> int:
    import os

    from hpcdiff import dist
    from hpcdiff.launch.slurm_env import job_deadline
    from hpcdiff.runstate import RunDir
    from hpcdiff.train import train
    from hpcdiff.train_config import load_job

    job = load_job(args.config, args.set)
    run = RunDir(args.run_dir)
    topology = dist.detect_topology()
    _setup_rank_logging(run.rank_log(topology.rank), topology.rank, args.quiet)
    ctx = dist.init(timeout_s=job.train.collective_timeout_s, topology=topology)
    try:
        return train(
            job,
            run,
            ctx,
            deadline=job_deadline(os.environ),
            allow_config_change=args.allow_config_change,
            progress=not args.quiet,
        )
    finally:
        ctx.close()


# ---------------------------------------------------------------- submit
def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="run a training job (or a pipeline YAML) in the background: local supervisor or Slurm",
        description="Submit CONFIG.yaml (a training job) to the local supervisor or to Slurm; a pipeline YAML "
        "(with a 'stages' section, see jobs/pipeline.yaml) submits its stages as dependent Slurm jobs.",
    )
    p.add_argument("config", help="job config YAML, or a pipeline YAML")
    p.add_argument("--run-dir", help="run directory (required for a training job; overrides a pipeline's 'dir')")
    p.add_argument("--backend", choices=("local", "slurm"), default="local")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts after a crash or a clean stop")
    local = p.add_argument_group("local backend")
    local.add_argument("--ranks", type=_positive, default=1, help="mpirun ranks")
    slurm = p.add_argument_group("slurm backend")
    slurm.add_argument("--partition", help="partition (queue)")
    slurm.add_argument("--account", help="account charged")
    slurm.add_argument("--qos", help="quality of service")
    slurm.add_argument("--constraint", help="node features, e.g. a100")
    slurm.add_argument("--time", help="time limit (minutes, HH:MM:SS or D-HH:MM:SS)")
    slurm.add_argument("--nodes", type=_positive, default=1)
    slurm.add_argument("--ntasks-per-node", type=_positive, help="ranks per node (default: one per GPU, else 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=0)
    slurm.add_argument("--cpus-per-task", type=_positive)
    slurm.add_argument("--signal-before", type=_positive, default=300, metavar="S", help="USR1 S seconds before --time")
    slurm.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run first, e.g. 'module load cuda' (trusted: copied into the script verbatim; repeatable)",
    )
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.set_defaults(handler=_run_submit)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_submit(args: argparse.Namespace) -> int:
    from hpcdiff.config import load_yaml
    from hpcdiff.errors import UsageError
    from hpcdiff.launch.pipeline import is_pipeline

    if is_pipeline(load_yaml(args.config)):
        return _run_submit_pipeline(args)
    if not args.run_dir:
        raise UsageError("--run-dir is required to submit a training job (where checkpoints, status and logs go)")
    if args.backend == "slurm":
        return _run_submit_slurm(args)
    from hpcdiff.launch.local import start_detached
    from hpcdiff.train_config import load_job

    load_job(args.config, args.set)  # refuse a bad config now, not in the background
    pid = start_detached(Path(args.config), Path(args.run_dir), args.ranks, args.max_restarts, args.set)
    print(f"supervisor {pid} runs {args.run_dir}; follow it with: hpcdiff status {args.run_dir}")
    return 0


def _slurm_options(args: argparse.Namespace) -> object:
    from hpcdiff.launch.slurm import SlurmOptions

    return SlurmOptions(
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        time=args.time,
        nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        max_restarts=args.max_restarts,
        signal_before_s=args.signal_before,
        setup=args.setup,
    )


def _run_submit_slurm(args: argparse.Namespace) -> int:
    from hpcdiff.launch.slurm import submit_train
    from hpcdiff.train_config import load_job

    load_job(args.config, args.set)  # refuse a bad config now, not after hours in the queue
    text, sub = submit_train(Path(args.config), Path(args.run_dir), _slurm_options(args), args.set, args.dry_run)
    if sub is None:
        print(text, end="")
    else:
        print(f"submitted Slurm job {sub.job_id} for {args.run_dir} (script {sub.script}, output {sub.output})")
        print(f"follow it from any shell: hpcdiff status {args.run_dir}; hpcdiff logs {args.run_dir} --follow")
    return 0


def _run_submit_pipeline(args: argparse.Namespace) -> int:
    from hpcdiff.errors import UsageError
    from hpcdiff.launch.pipeline import load_pipeline, submit_pipeline

    if args.backend != "slurm":
        raise UsageError("a pipeline runs as dependent Slurm jobs: add --backend slurm")
    pipe = load_pipeline(Path(args.config), args.set, run_dir=args.run_dir)
    result = submit_pipeline(pipe, dry_run=args.dry_run)
    print(result)
    return 0


# ------------------------------------------------------ status, logs, inspect
def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="state of a run, from its run directory alone")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from hpcdiff.launch.pipeline import describe_pipeline, is_pipeline_dir, pipeline_status
    from hpcdiff.report import describe_status, read_status

    if is_pipeline_dir(Path(args.run_dir)):
        status = pipeline_status(Path(args.run_dir))
        print(json.dumps(status, indent=2, sort_keys=True) if args.json else describe_pipeline(status))
        return 0
    status = read_status(Path(args.run_dir))
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else describe_status(status))
    return 0


def _add_logs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logs", help="a rank's log of a run (rank 0 by default)")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    p.set_defaults(handler=_run_logs)


def _run_logs(args: argparse.Namespace) -> int:
    from hpcdiff.report import print_logs

    return print_logs(Path(args.run_dir), rank=args.rank, follow=args.follow)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="checkpoints of a run with their validity, step and weights digest")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from hpcdiff.report import describe_inspect, inspect_run

    report = inspect_run(Path(args.run_dir))
    print(json.dumps(report, indent=2) if args.json else describe_inspect(report))
    return 0


# ---------------------------------------------------------------- cluster aws
def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="cluster set-up: AWS ParallelCluster config and S3 staging")
    providers = p.add_subparsers(dest="provider", metavar="PROVIDER", parser_class=_Parser, required=True)
    aws = providers.add_parser("aws", help="a Slurm cluster on AWS (ParallelCluster v3) and S3 staging")
    actions = aws.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser, required=True)

    init = actions.add_parser("init", help="write cluster.yaml and bootstrap.sh; print the pcluster commands")
    init.add_argument("--out", required=True, help="directory for cluster.yaml and bootstrap.sh")
    init.add_argument("--bucket", required=True, help="S3 bucket for data, runs and the bootstrap script")
    init.add_argument("--subnet", required=True, help="subnet id (subnet-...) with a route to the internet")
    init.add_argument("--region", help="AWS region (default: $AWS_REGION or $AWS_DEFAULT_REGION)")
    init.add_argument("--key-name", help="EC2 key pair for 'pcluster ssh'")
    init.add_argument("--name", default="hpcdiff", help="cluster name (default: hpcdiff)")
    for flag in ("head", "cpu", "gpu"):
        init.add_argument(f"--{flag}-instance", help=f"{flag} instance type (family.size)")
    init.add_argument("--max-cpu-nodes", type=int)
    init.add_argument("--max-gpu-nodes", type=int, help="per GPU queue (gpu and gpu-ondemand)")
    init.add_argument("--fsx-storage-gib", type=int, help="FSx capacity: 1200 or n*2400")
    init.add_argument("--fsx-throughput", type=int, help="FSx MB/s per TiB: 125, 250, 500 or 1000")
    init.add_argument("--os", help="alinux2023 (default), ubuntu2204, ubuntu2404, rhel9 or rocky9")
    init.add_argument("--install-spec", help="pip requirement installing hpcdiff on the cluster")
    init.add_argument("--force", action="store_true", help="overwrite an existing cluster.yaml")
    init.set_defaults(handler=_run_cluster_aws_init)

    for name, src, dst, what in (
        ("stage", "dir", "s3_url", "upload a directory to s3://BUCKET/PREFIX (verified, resumable)"),
        ("fetch", "s3_url", "dir", "download s3://BUCKET/PREFIX into a directory (verified, resumable)"),
    ):
        q = actions.add_parser(name, help=what)
        q.add_argument(src, metavar=src.upper())
        q.add_argument(dst, metavar=dst.upper())
        q.add_argument("--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
        q.add_argument("--part-mib", type=int, default=64, help="multipart threshold and part size, MiB (>= 5)")
        q.set_defaults(handler=_run_cluster_aws_transfer)


def _run_cluster_aws_init(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from hpcdiff.errors import UsageError
    from hpcdiff.launch import aws

    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise UsageError("no region: pass --region (e.g. --region us-east-1) or set AWS_DEFAULT_REGION")
    fields = ("key_name", "head_instance", "cpu_instance", "gpu_instance", "max_cpu_nodes", "max_gpu_nodes")
    fields += ("fsx_storage_gib", "fsx_throughput", "os", "install_spec")
    chosen = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    opts = aws.AwsClusterOptions(region=region, subnet=args.subnet, bucket=args.bucket, **chosen)
    name = aws.check_cluster_name(args.name)
    try:
        aws.validate_with_schema(aws.render_cluster_config(opts), name)
        checked = "checked offline against ParallelCluster's schema"
    except UsageError as e:
        checked = f"NOT checked offline ({e})"
    out = Path(args.out)
    config_path, script_path = aws.write_cluster_files(opts, out, force=args.force)
    print(f"wrote {config_path} ({checked}) and {script_path}\n")
    print(aws.format_commands(aws.cluster_commands(opts, name, out)))
    print(
        f"\n# then, on the head node: data and runs live under {aws.DATA_DIR} (= s3://{opts.bucket}); GPU jobs:\n"
        f"hpcdiff submit CONFIG.yaml --run-dir {aws.DATA_DIR}/runs/NAME --backend slurm --partition "
        + ",".join(aws.GPU_QUEUES)
    )
    return 0


def _run_cluster_aws_transfer(args: argparse.Namespace) -> int:
    from hpcdiff.launch import s3stage

    part = args.part_mib * s3stage.MiB
    sizes = {"endpoint_url": args.endpoint_url, "multipart_threshold": part, "multipart_chunksize": part}
    if args.action == "stage":
        report = s3stage.stage(args.dir, args.s3_url, **sizes)
    else:
        report = s3stage.fetch(args.s3_url, args.dir, **sizes)
    print(f"{args.action}: {report.summary()}")
    return 0


# ---------------------------------------------------------------- stats
def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="group statistics over shards with dask (template, groupdiff, gamma, ...)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser, required=True)
    covariates = "comma-separated covariate columns to adjust for, e.g. age,sex"
    specs = {
        "template": ("voxelwise mean and standard deviation of all subjects", ["shards"]),
        "groupdiff": ("voxelwise group difference (GLM; Welch's t without covariates)", ["shards"]),
        "gamma": ("residual variance after the GLM and its gamma fit, overall and per region", ["shards"]),
        "zscore": ("normative z-score map of one subject given its covariates", ["shards"]),
        "compare": ("does a synthetic cohort reproduce the real one?", ["real", "synth"]),
    }
    for action, (what, positional) in specs.items():
        q = actions.add_parser(action, help=what, description=what)
        for name in positional:
            q.add_argument(name, metavar=name.upper() if name == "shards" else f"{name.upper()}_SHARDS")
        q.add_argument("--out", required=True, help="output directory (NIfTI maps, PNG figures, summary.json)")
        if action in ("groupdiff", "compare"):
            q.add_argument("--group", required=action == "groupdiff", default="group", help="categorical column")
            q.add_argument("--levels", help="REF,OTHER: the two group levels to compare (effect = OTHER - REF)")
            q.add_argument("--alpha", type=float, default=0.05, help="FDR level for counts in the summary")
        if action == "groupdiff":
            q.add_argument("--pooled", action="store_true", help="pooled-variance t instead of Welch's (no covariates)")
        if action != "template":
            q.add_argument("--covariates", default=None, help=covariates)
        if action in ("gamma", "zscore"):
            q.add_argument("--atlas", help="integer label NIfTI on the shards' grid (default: octants of the grid)")
        if action == "zscore":
            q.add_argument("--subject", required=True, help="subject id as in the shards' subjects table")
            q.add_argument("--top", type=int, default=5, help="most deviant regions listed in the summary")
        q.add_argument("--backend", default="local", help="local (default), synchronous, distributed, slurm, mpi")
        q.add_argument("--workers", type=int, default=2, help="worker processes or Slurm jobs (default 2)")
        q.add_argument("--partition", help="Slurm partition of the worker jobs (backend slurm)")
        q.add_argument("--walltime", default="00:30:00", help="Slurm time limit of each worker job")
        q.add_argument("--block", type=int, default=16, help="subjects read per dask task (default 16)")
        q.add_argument("--mask-threshold", type=float, default=0.05, help="mask: template mean > this x max")
        q.add_argument("--json", action="store_true", help="print the summary as JSON")
        q.set_defaults(handler=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from hpcdiff import stats

    opts = stats.StatsOptions(block=args.block, mask_threshold=args.mask_threshold)
    backend_opts = stats.BackendOptions(workers=args.workers, partition=args.partition, walltime=args.walltime)
    listed = getattr(args, "covariates", None)
    cov = [c.strip() for c in listed.split(",") if c.strip()] if listed else []
    levels = args.levels.split(",") if getattr(args, "levels", None) else None
    calls = {
        "template": lambda: stats.run_template(args.shards, args.out, opts),
        "groupdiff": lambda: stats.run_groupdiff(
            args.shards, args.out, args.group, cov, levels, args.pooled, args.alpha, opts
        ),
        "gamma": lambda: stats.run_gamma(args.shards, args.out, cov, args.atlas, options=opts),
        "zscore": lambda: stats.run_zscore(
            args.shards, args.out, args.subject, cov if listed is not None else None, args.atlas, args.top, opts
        ),
        "compare": lambda: stats.run_compare(
            args.real, args.synth, args.out, args.group, cov, levels, args.alpha, opts
        ),
    }
    with stats.backend(args.backend, backend_opts):
        summary = calls[args.action]()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"stats {args.action}: wrote {Path(args.out) / 'summary.json'} ({summary['seconds']:.1f} s)")
    return 0


# ---------------------------------------------------------------- sample
def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="synthetic subjects from a run into shards (resumable, sliced across ranks and tasks)"
    )
    p.add_argument("--run-dir", required=True, help="training run; the EMA weights of its newest valid checkpoint")
    p.add_argument("--out", required=True, help="shard directory to create (a rerun completes it)")
    p.add_argument("--n", type=_positive, help="subjects (optional with --covariates: one per row)")
    p.add_argument("--covariates", metavar="FILE.tsv", help="one row per subject, one column per trained covariate")
    p.add_argument("--steps", type=_positive, default=50, help="sampler steps (default 50)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
    p.add_argument("--sampler", help="euler|heun (flow), ancestral|ddim (DDPM); default: the objective's")
    p.add_argument("--seed", type=int, default=0, help="with the subject index, fixes each subject")
    p.add_argument("--subjects-per-shard", type=_positive, default=64, metavar="K", help="subjects per shard")
    p.add_argument("--batch-size", type=_positive, default=8, help="subjects sampled together")
    _add_task_options(p)
    p.set_defaults(handler=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    import os

    from hpcdiff.data.slicing import Worker, task_of
    from hpcdiff.dist import detect_topology
    from hpcdiff.sample import SampleOptions, default_device, sample

    topology = detect_topology()
    worker = Worker(*task_of(args.task, args.num_tasks, os.environ), topology.rank, topology.world_size)
    opts = SampleOptions(
        n=args.n,
        covariates=Path(args.covariates) if args.covariates else None,
        steps=args.steps,
        guidance=args.guidance,
        sampler=args.sampler,
        seed=args.seed,
        subjects_per_shard=args.subjects_per_shard,
        batch_size=args.batch_size,
    )
    r = sample(args.run_dir, args.out, opts, worker, default_device(topology.local_rank))
    done = "manifest written: all shards done" if r.manifest_written else "other workers' shards still missing"
    print(
        f"sample: worker {worker.index} of {worker.count}: {r.shards_written} shard(s) written, "
        f"{r.shards_skipped} already complete, of {r.num_shards} ({r.num_subjects} subjects) in {r.out}; {done}"
    )
    return 0


# ---------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="shards -> NIfTI (float32) in a BIDS-derivatives layout (resumable)")
    p.add_argument("shards", help="shard directory (real or synthetic)")
    p.add_argument("--out", required=True, help="derivatives folder to create (a rerun completes it)")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from hpcdiff.data.export import export
    from hpcdiff.dist import detect_topology

    r = export(args.shards, args.out)
    if detect_topology().is_main:
        print(f"export: {r.num_images} images in {r.out} ({r.written} written here, {r.skipped} already there)")
    return 0


# ---------------------------------------------------------------- quality
def _add_quality(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quality", help="synthetic vs held-out real: montage, mean/std maps, MMD beside a baseline")
    p.add_argument("real", help="shards of real subjects held out of training")
    p.add_argument("synth", help="shards written by 'hpcdiff sample'")
    p.add_argument("--out", required=True, help="folder for montage.png, maps.png, maps and summary.json")
    p.add_argument("--max-subjects", type=_positive, default=256, help="subjects read from each set (default 256)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_run_quality)


def _run_quality(args: argparse.Namespace) -> int:
    from hpcdiff.quality import quality

    s = quality(args.real, args.synth, args.out, max_subjects=args.max_subjects)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        m = s["mmd"]
        print(
            f"quality: MMD^2 synthetic {m['mmd2_synthetic_vs_real']:.4g}, baseline {m['mmd2_baseline_vs_real']:.4g}, "
            f"real half vs half {m['mmd2_real_half_vs_half']:.4g}; mean map r={s['maps']['corr_mean']:.3f}, "
            f"std map r={s['maps']['corr_std']:.3f}; wrote {Path(args.out) / 'summary.json'}"
        )
    return 0


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_doctor,
    _add_demo,
    _add_cohort,
    _add_ingest,
    _add_train,
    _add_submit,
    _add_status,
    _add_logs,
    _add_inspect,
    _add_cluster,
    _add_stats,
    _add_sample,
    _add_export,
    _add_quality,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hpcdiff",
        description="Train and sample diffusion and flow-matching models of brain MRI; "
        "every job is sliced across MPI ranks or Slurm tasks and resumes where it stopped.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = args.handler(args)
    except HpcdiffError as e:
        print(f"hpcdiff {args.command}: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    if code not in (0, EXIT_REQUEUE):
        # An error seen by one rank only must not leave the others waiting in a collective.
        abort_peers(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
