"""Argument types and option groups shared by several sub-commands."""

from __future__ import annotations

import argparse
import sys

from hpcdiff.errors import EXIT_USAGE


def shape(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {value}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_task_options(p: argparse.ArgumentParser) -> None:
    """--task/--num-tasks of a data job spread over a Slurm array, and --overwrite (see hpcdiff.batch)."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of another plan of this command in --out (only files it wrote; never others)",
    )
    p.add_argument("--task", type=int, help="array task index (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN)")
    p.add_argument("--num-tasks", type=positive, help="array tasks (default: $SLURM_ARRAY_TASK_COUNT, else 1)")


class Parser(argparse.ArgumentParser):
    """argparse that says what was expected and exits 2 (its own convention, kept)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")
