"""The ``hpcdiff`` command: one sub-command per job; each parses, validates and calls one library function.

Nothing below this module knows the command line. Library exceptions become the exit codes of DESIGN.md:
0 done, 2 usage or config error, 3 bad input data, 74 out of disk space (or quota, or ``ulimit -f``), 75 stopped on
a signal after a checkpoint (requeue me).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from hpcdiff.cli.analysis import add_stats
from hpcdiff.cli.common import Parser
from hpcdiff.cli.data import add_cohort, add_export, add_ingest, add_quality, add_sample
from hpcdiff.cli.plan import add_plan
from hpcdiff.cli.runs import add_demo, add_inspect, add_logs, add_status, add_submit, add_train
from hpcdiff.cli.system import add_cluster, add_doctor
from hpcdiff.dist import abort_peers, exit_process
from hpcdiff.errors import EXIT_NO_SPACE, EXIT_REQUEUE, NO_SPACE_ERRNOS, HpcdiffError

log = logging.getLogger("hpcdiff")

Handler = Callable[[argparse.Namespace], int]


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_doctor,
    add_demo,
    add_cohort,
    add_ingest,
    add_train,
    add_plan,
    add_submit,
    add_status,
    add_logs,
    add_inspect,
    add_cluster,
    add_stats,
    add_sample,
    add_export,
    add_quality,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hpcdiff",
        description="Train and sample diffusion and flow-matching models of brain MRI; "
        "every job is sliced across MPI ranks or Slurm tasks and resumes where it stopped.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
    shared = False
    try:
        code = args.handler(args)
    except HpcdiffError as e:
        print(f"hpcdiff {args.command}: error: {e}", file=sys.stderr)
        code, shared = e.exit_code, e.on_every_rank
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"hpcdiff {args.command}: error: {e.strerror}{where}. Free space on that file system (df -h; for a "
            "training run, a lower train.keep_last), raise the quota or `ulimit -f`, or write elsewhere; then run "
            "the same command again: finished results are kept and it goes on from where it stopped.",
            file=sys.stderr,
        )
        code = EXIT_NO_SPACE
    except KeyboardInterrupt:
        code = 130
    if code not in (0, EXIT_REQUEUE) and not shared:
        # An error seen by one rank only must not leave the others waiting in a collective.
        abort_peers(code)
    return code


def run() -> None:
    """The console entry point: ``main`` and then an exit that a distributed run cannot turn into a crash."""
    exit_process(main())
