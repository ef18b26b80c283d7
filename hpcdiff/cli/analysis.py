"""``hpcdiff stats``: group statistics over shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from hpcdiff.cli.common import Parser, add_task_options, positive

if TYPE_CHECKING:
    from hpcdiff.stats import BackendOptions


# ---------------------------------------------------------------- stats
def add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="group statistics over shards with dask (template, groupdiff, gamma, ...)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser, required=True)
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
        q.add_argument(
            "--block", type=int, default=None, help="subjects read per dask task (default: from the grid, at most 16)"
        )
        q.add_argument(
            "--interface",
            help="network interface of the dask scheduler and workers, e.g. ib0 (default: slurm: the address the "
            "partition's nodes reach, lo when they are all this host; mpi: lo on one host, else the interface of "
            "the address the other hosts reach)",
        )
        q.add_argument("--mask-threshold", type=float, default=0.05, help="mask: template mean > this x max")
        q.add_argument("--json", action="store_true", help="print the summary as JSON")
        q.set_defaults(handler=_run_stats)
    _add_randomise(actions)


def _run_stats(args: argparse.Namespace) -> int:
    from hpcdiff import stats

    opts = stats.StatsOptions(block=args.block, mask_threshold=args.mask_threshold)
    backend_opts = stats.BackendOptions(
        workers=args.workers, partition=args.partition, walltime=args.walltime, interface=args.interface
    )
    if args.backend == "slurm":
        _size_slurm_workers(backend_opts, getattr(args, "shards", None) or args.real, args.block, args.out)
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


def _size_slurm_workers(opts: BackendOptions, shards: str, block: int | None, out: str) -> None:
    """Worker memory from the shards' grid and the block; worker logs beside the outputs (a shared folder)."""
    import math

    from hpcdiff.stats.source import open_shards

    opts.num_voxels = math.prod(open_shards(shards).shape)
    opts.block = block
    opts.log_dir = str(Path(out).absolute() / ".hpcdiff" / "dask-workers")


# ---------------------------------------------------------------- stats randomise
def _add_randomise(actions: argparse._SubParsersAction) -> None:
    what = "permutation inference (Freedman-Lane): FWE p by max statistic and TFCE; sliced and resumable"
    q = actions.add_parser("randomise", help=what, description=what)
    q.add_argument("shards", metavar="SHARDS")
    q.add_argument("--out", required=True, help="output directory (maps, null, summary.json; a rerun resumes)")
    q.add_argument("--group", required=True, help="categorical column with two levels (tested by default)")
    q.add_argument("--levels", help="REF,OTHER: the two group levels to compare (effect = OTHER - REF)")
    q.add_argument("--covariates", help="comma-separated nuisance columns, e.g. age,sex")
    q.add_argument("--contrast", help="column(s) to test: one gives t, several (comma-separated) an F")
    q.add_argument("--permutations", type=positive, required=True, help="random permutations N")
    q.add_argument("--one-sided", action="store_true", help="rank t (FSL) instead of |t| (nilearn's default)")
    q.add_argument("--tfce", action="store_true", help="also TFCE and its FWE p")
    q.add_argument("--tfce-h", type=float, default=2.0, help="TFCE height power H (default 2)")
    q.add_argument("--tfce-e", type=float, default=0.5, help="TFCE extent power E (default 0.5)")
    q.add_argument("--tfce-connectivity", type=int, default=26, help="6, 18 or 26 (default 26, as FSL)")
    q.add_argument("--accel", default="none", help="none (default), gamma or tail: FWE p below 1/N from a fit")
    q.add_argument("--exchangeability-blocks", metavar="COL", help="permute subjects only within blocks of COL")
    q.add_argument("--seed", type=int, default=0, help="with k, fixes permutation k (default 0)")
    q.add_argument("--batch-size", type=positive, default=100, help="permutations per batch (default 100)")
    q.add_argument("--threads", type=positive, default=1, help="BLAS threads per process (default 1)")
    q.add_argument("--cache-gb", type=float, default=1.0, help="keep residuals in memory up to this size")
    q.add_argument("--alpha", type=float, default=0.05, help="FWE level for counts in the summary")
    q.add_argument("--block", type=positive, default=16, help="subjects read per block (default 16)")
    q.add_argument("--mask-threshold", type=float, default=0.05, help="mask: template mean > this x max")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_task_options(q)
    q.set_defaults(handler=_run_randomise)


def _names(text: str | None) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()] if text else []


def _run_randomise(args: argparse.Namespace) -> int:
    import os

    from hpcdiff.batch import task_of
    from hpcdiff.stats import StatsOptions
    from hpcdiff.stats.randomise import RandomiseOptions, run_randomise
    from hpcdiff.stats.tfce import TFCEOptions

    task, num_tasks = task_of(args.task, args.num_tasks, os.environ)
    options = RandomiseOptions(
        group=args.group,
        permutations=args.permutations,
        covariates=_names(args.covariates),
        levels=_names(args.levels) or None,
        contrast=_names(args.contrast),
        one_sided=args.one_sided,
        tfce=TFCEOptions(height=args.tfce_h, extent=args.tfce_e, connectivity=args.tfce_connectivity)
        if args.tfce
        else None,
        accel=args.accel,
        exchangeability_blocks=args.exchangeability_blocks,
        seed=args.seed,
        batch_size=args.batch_size,
        threads=args.threads,
        cache_gb=args.cache_gb,
        alpha=args.alpha,
        overwrite=args.overwrite,
        stats=StatsOptions(block=args.block, mask_threshold=args.mask_threshold),
    )
    summary = run_randomise(args.shards, args.out, options, task=task, num_tasks=num_tasks)
    done = f"{summary['batches_computed']} of {summary['num_batches']} batches computed here"
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif summary["complete"]:
        print(f"stats randomise: {done}; wrote {Path(args.out) / 'summary.json'} ({summary['seconds']:.1f} s)")
    else:
        print(f"stats randomise: worker {summary['worker']}: {done}; other workers' batches still missing")
    return 0
