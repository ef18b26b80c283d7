"""Sub-commands that run and watch training: demo, train, submit (local, Slurm, pipelines), status, logs, inspect."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from hpcdiff.cli.common import positive

SET_HELP = "override a config key, e.g. optim.lr=3e-4 or 'optim.betas=[0.9,0.95]' (repeatable)"


# ---------------------------------------------------------------- demo
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="whole pipeline on a built-in cohort, minutes on a laptop")
    p.add_argument("--out", default="demo-out", help="folder for every output (default: demo-out)")
    p.add_argument("--ranks", type=positive, default=2, help="MPI ranks for the parallel stages")
    p.add_argument(
        "--latent",
        action="store_true",
        help="the latent road at 2 mm: autoencoder, encode, diffusion on latents, sample (decoded), export, quality",
    )
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from hpcdiff.demo import run_demo

    return run_demo(Path(args.out), ranks=args.ranks, latent=args.latent)


# ---------------------------------------------------------------- train
def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model; resumes from the newest valid checkpoint in --run-dir")
    p.add_argument("config", help="job config YAML (see jobs/)")
    p.add_argument("--run-dir", required=True, help="run directory: checkpoints, status, logs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--allow-data-change", action="store_true", help="resume although the shards hold other subjects")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config changed (refused, with nothing written, if the checkpoint does not fit)",
    )
    p.add_argument(
        "--start-over", action="store_true", help="train from step 0 when every checkpoint of the run is invalid"
    )
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
    from hpcdiff.launch.slurm.env import job_deadline
    from hpcdiff.runstate import RunDir
    from hpcdiff.train import train
    from hpcdiff.train_config import load_job

    job = load_job(args.config, args.set)
    run = RunDir(args.run_dir)
    topology = dist.detect_topology()
    _setup_rank_logging(run.rank_log(topology.rank), topology.rank, args.quiet)
    ctx = dist.init(timeout_s=job.train.collective_timeout_s, topology=topology)
    try:
        # Only rank 0 asks Slurm for the time limit (squeue, on Slurm < 23.02), then shares it: a thousand ranks
        # asking at once would load the controller.
        deadline = ctx.broadcast_object(job_deadline(os.environ) if ctx.is_main else None)
        return train(
            job,
            run,
            ctx,
            deadline=deadline,
            allow_config_change=args.allow_config_change,
            allow_data_change=args.allow_data_change,
            start_over=args.start_over,
            progress=not args.quiet,
        )
    finally:
        ctx.close()


# ---------------------------------------------------------------- submit
def add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="run a training job (or a pipeline YAML) in the background: local supervisor or Slurm",
        description="Submit CONFIG.yaml (a training job) to the local supervisor or to Slurm; a pipeline YAML "
        "(with a 'stages' section, see jobs/pipeline.yaml) submits its stages as dependent Slurm jobs.",
    )
    p.add_argument("config", help="job config YAML, or a pipeline YAML")
    p.add_argument("--run-dir", help="run directory (required for a training job; overrides a pipeline's 'dir')")
    p.add_argument("--backend", choices=("local", "slurm"), default="local")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--max-restarts", type=int, default=3, help="restarts after a crash or a clean stop")
    local = p.add_argument_group("local backend")
    local.add_argument("--ranks", type=positive, default=1, help="mpirun ranks")
    slurm = p.add_argument_group("slurm backend")
    slurm.add_argument("--partition", help="partition (queue)")
    slurm.add_argument("--account", help="account charged")
    slurm.add_argument("--qos", help="quality of service")
    slurm.add_argument("--constraint", help="node features, e.g. a100")
    slurm.add_argument("--time", help="time limit (minutes, HH:MM:SS or D-HH:MM:SS)")
    slurm.add_argument("--nodes", type=positive, default=1)
    slurm.add_argument("--ntasks-per-node", type=positive, help="ranks per node (default: one per GPU, else 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=0)
    slurm.add_argument("--cpus-per-task", type=positive)
    slurm.add_argument("--signal-before", type=positive, default=300, metavar="S", help="USR1 S seconds before --time")
    slurm.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run first, e.g. 'module load cuda' (trusted: copied into the script verbatim; repeatable)",
    )
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.set_defaults(handler=_run_submit)


def _run_submit(args: argparse.Namespace) -> int:
    from hpcdiff.config import load_yaml
    from hpcdiff.errors import UsageError
    from hpcdiff.launch.slurm.pipeline import is_pipeline

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
    from hpcdiff.launch.slurm.sbatch import SlurmOptions

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
    from hpcdiff.launch.slurm.sbatch import submit_train
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
    from hpcdiff.launch.slurm.pipeline import load_pipeline, submit_pipeline

    if args.backend != "slurm":
        raise UsageError("a pipeline runs as dependent Slurm jobs: add --backend slurm")
    pipe = load_pipeline(Path(args.config), args.set, run_dir=args.run_dir)
    result = submit_pipeline(pipe, dry_run=args.dry_run)
    print(result)
    return 0


# ------------------------------------------------------ status, logs, inspect
def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="state of runs (or pipeline folders), from their directories alone",
        description="One RUN: its full status. Several (e.g. a shell glob runs/*): one line each with state, step, "
        "last checkpoint age, heartbeat age and job id; a pipeline folder gives one line of its stages.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN")
    p.add_argument("--json", action="store_true", help="JSON (a list when several RUNs are given)")
    p.set_defaults(handler=_run_status)


def _one_status(path: Path) -> tuple[dict, str, str]:
    """(status dict, full description, one-line summary) of a run or pipeline folder."""
    from hpcdiff.launch.slurm.pipeline import describe_pipeline, is_pipeline_dir, pipeline_status
    from hpcdiff.report import describe_status, read_status, status_line

    if is_pipeline_dir(path):
        status = pipeline_status(path)
        stages = ", ".join(f"{st['name']} {st['state']}" for st in status["stages"])
        return status, describe_pipeline(status), f"{status['dir']}  pipeline  {stages}"
    status = read_status(path)
    return status, describe_status(status), status_line(status)


def _run_status(args: argparse.Namespace) -> int:
    from hpcdiff.errors import UsageError

    if len(args.run_dirs) == 1:
        status, text, _ = _one_status(Path(args.run_dirs[0]))
        print(json.dumps(status, indent=2, sort_keys=True) if args.json else text)
        return 0
    statuses, code = [], 0
    for path in args.run_dirs:
        try:
            status, _, line = _one_status(Path(path))
        except UsageError as e:
            # One wrong folder in a glob must not hide the others: report it in its place, exit 2 at the end.
            status, line, code = {"run_dir": str(path), "error": str(e)}, f"{path}  error: {e}", 2
        statuses.append(status)
        if not args.json:
            print(line)
    if args.json:
        print(json.dumps(statuses, indent=2, sort_keys=True))
    return code


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one page of a run's life (loss, lr, step time, restarts, newest preview) from its run directory",
    )
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--out", help="folder for report.html, report.png and report.json (default: RUN/report)")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from hpcdiff.report_page import write_report

    files = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"wrote {files.html} ({files.png.name}, {files.json.name} beside it)")
    return 0


def add_logs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logs", help="a rank's log of a run (rank 0 by default)")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    p.set_defaults(handler=_run_logs)


def _run_logs(args: argparse.Namespace) -> int:
    from hpcdiff.report import print_logs

    return print_logs(Path(args.run_dir), rank=args.rank, follow=args.follow)


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="checkpoints of a run with their validity, step and weights digest")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from hpcdiff.report import describe_inspect, inspect_run

    report = inspect_run(Path(args.run_dir))
    print(json.dumps(report, indent=2) if args.json else describe_inspect(report))
    return 0
