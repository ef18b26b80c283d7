"""``hpcdiff stats``: group statistics over shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpcdiff.cli.common import Parser


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
            help="network interface of the dask scheduler and workers, e.g. ib0 (default: slurm lo; mpi: lo on one "
            "host, else the interface of the address the other hosts reach)",
        )
        q.add_argument("--mask-threshold", type=float, default=0.05, help="mask: template mean > this x max")
        q.add_argument("--json", action="store_true", help="print the summary as JSON")
        q.set_defaults(handler=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from hpcdiff import stats

    opts = stats.StatsOptions(block=args.block, mask_threshold=args.mask_threshold)
    backend_opts = stats.BackendOptions(
        workers=args.workers, partition=args.partition, walltime=args.walltime, interface=args.interface
    )
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
