"""The ``hpcdiff`` command: one sub-command per job; each parses, validates and calls one library function.

Nothing below this package knows the command line. Library exceptions become the exit codes of the table in
docs/guarantees.md (``hpcdiff.errors``): 0 done, 2 usage or config error (also a path that cannot be used: a file
where a folder is needed, no permission, a read-only file system; and a job too big for memory: a rerun cannot fix
either), 3 bad input data, 4 NaN/Inf loss, 5 unloadable checkpoint, 74 out of disk space (or quota, or
``ulimit -f``), 75 retry me (stopped on a signal after a checkpoint, or a failure a rerun can fix: too many open
files, an I/O error, a stale handle, a lock, a lost peer), 141 the reader of our output went away (``| head``), as
for a command killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence

from hpcdiff.cli.analysis import add_stats
from hpcdiff.cli.common import Parser
from hpcdiff.cli.data import add_cohort, add_encode, add_export, add_ingest, add_quality, add_sample, add_verify
from hpcdiff.cli.plan import add_plan
from hpcdiff.cli.runs import add_demo, add_inspect, add_logs, add_report, add_status, add_submit, add_train
from hpcdiff.cli.system import add_cluster, add_doctor
from hpcdiff.dist import abort_peers, exit_process
from hpcdiff.errors import EXIT_NO_SPACE, EXIT_REQUEUE, EXIT_USAGE, NO_SPACE_ERRNOS, HpcdiffError, retry_cause

log = logging.getLogger("hpcdiff")

Handler = Callable[[argparse.Namespace], int]

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader closed the pipe

# A path the user gave that cannot be used as given: rerunning the same command fails the same way.
_PATH_HINTS = {
    errno.EROFS: "the file system is mounted read-only: write elsewhere",
    errno.EACCES: "no permission: fix the permissions or write elsewhere",
    errno.EPERM: "not permitted: fix the permissions or write elsewhere",
    errno.ENOTDIR: "a file stands where a folder is needed: give a folder path",
    errno.EISDIR: "a folder stands where a file is needed: give a file path",
    errno.EEXIST: "a file stands where a folder is needed: give a folder path",
    errno.ENOENT: "a folder on the way does not exist: check the path",
    errno.ENAMETOOLONG: "the name is too long: give a shorter path",
    errno.ELOOP: "the path loops through symbolic links: give a real path",
}


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
    add_report,
    add_cluster,
    add_stats,
    add_sample,
    add_encode,
    add_export,
    add_verify,
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
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except MemoryError as e:  # numpy says how much: "Unable to allocate 238. GiB for an array with shape ..."
        print(
            f"hpcdiff {args.command}: error: out of memory ({e or 'no detail'}); use a smaller --shape, "
            "data.batch_size or --subjects-per-shard, or a machine (Slurm --mem) with more memory",
            file=sys.stderr,
        )
        code = EXIT_USAGE
    except Exception as e:
        cause = retry_cause(e)
        if cause is None:
            code, shared = _report(args.command, e)
        else:
            print(
                f"hpcdiff {args.command}: error: {cause}. This is a passing failure, not bad data: run the same "
                f"command again (a Slurm requeue or the local supervisor does so, on exit {EXIT_REQUEUE}); finished "
                "results are kept and it goes on from where it stopped.",
                file=sys.stderr,
            )
            code = EXIT_REQUEUE
    except KeyboardInterrupt:
        code = 130
    if code not in (0, EXIT_REQUEUE) and not shared:
        # An error seen by one rank only must not leave the others waiting in a collective.
        abort_peers(code)
    return code


def _report(command: str, e: Exception) -> tuple[int, bool]:
    """Exit code and "seen by every rank" for an exception that is not worth a retry; re-raise a crash."""
    if isinstance(e, HpcdiffError):
        print(f"hpcdiff {command}: error: {e}", file=sys.stderr)
        return e.exit_code, e.on_every_rank
    if isinstance(e, OSError) and e.errno in _PATH_HINTS:
        what = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") if e.filename else "a path"
        print(f"hpcdiff {command}: error: {what}: {e.strerror}; {_PATH_HINTS[e.errno]}", file=sys.stderr)
        return EXIT_USAGE, False
    if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"hpcdiff {command}: error: {e.strerror}{where}. Free space on that file system (df -h; for a "
            "training run, a lower train.keep_last), raise the quota or `ulimit -f`, or write elsewhere; then run "
            "the same command again: finished results are kept and it goes on from where it stopped.",
            file=sys.stderr,
        )
        return EXIT_NO_SPACE, False
    raise e


def run() -> None:
    """The console entry point: ``main`` and then an exit that a distributed run cannot turn into a crash."""
    exit_process(main())
