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


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_doctor,)


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
