"""``hpcdiff plan``: memory of a training job before it is submitted."""

from __future__ import annotations

import argparse
import json

from hpcdiff.cli.common import shape


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="memory of a training job per GPU before submitting: parameters, checkpoint, activations, fit",
        description="Simulate two training steps of CONFIG on the meta device (no data, no GPU needed) and print "
        "the parameter count, checkpoint size, activation memory per sample, the peak with and without "
        "model.checkpointing, and whether it fits --gpu-memory.",
    )
    p.add_argument("config", help="job config YAML (see jobs/)")
    p.add_argument("--gpu-memory", type=float, metavar="GiB", help="memory of one GPU, e.g. 40 or 80")
    p.add_argument("--shape", type=shape, nargs=3, metavar=("D", "H", "W"), help="volume size (default: shards)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from hpcdiff.plan import format_plan, make_plan
    from hpcdiff.train_config import load_job

    job = load_job(args.config, args.set)
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        from hpcdiff.errors import UsageError

        raise UsageError(f"--gpu-memory must be positive GiB, got {args.gpu_memory}")
    plan = make_plan(job, args.shape, args.gpu_memory)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0
