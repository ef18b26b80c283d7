"""Exception family and exit codes (the table in docs/guarantees.md, which runners follow).

Library code raises these; only the ``hpcdiff.cli`` package turns them into exit codes, so every part stays usable
from Python. The code says the cause, and so whether a rerun can help: 75 means "retry me" and nothing else.
"""

from __future__ import annotations

import errno
import re

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_DATA = 3
EXIT_DIVERGED = 4  # a NaN/Inf loss: the same config diverges again
EXIT_BAD_CHECKPOINT = 5  # a checkpoint that cannot be loaded or written and verified
EXIT_NO_SPACE = 74  # sysexits' EX_IOERR
EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: stopped on a signal, or a failure a rerun can fix

NO_RETRY_EXITS = frozenset({EXIT_USAGE, EXIT_BAD_DATA, EXIT_DIVERGED, EXIT_BAD_CHECKPOINT, EXIT_NO_SPACE})
"""Codes a runner (Slurm runner script, local supervisor) must not retry: the same run fails the same way."""

# A full disk, an exhausted quota, a file-size limit (ulimit -f): waiting or retrying does not help, freeing does.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Passing trouble of a process or a shared file system: too many open files, an I/O error, a stale NFS handle, a
# lock or a peer that went away. The data may be fine; a rerun (often on another node) is the cure.
RETRY_ERRNOS = frozenset(
    {
        errno.EMFILE,
        errno.ENFILE,
        errno.EIO,
        errno.ESTALE,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENOLCK,
    }
)
# HDF5 reports OS errors inside its message ("unable to lock file, errno = 11, ..."), with no errno attribute.
_HDF5_ERRNO = re.compile(r"errno = (\d+)")
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def retry_cause(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it was raised from) is worth a retry, or None when it is not."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            code = seen.errno
            if code is None and (m := _HDF5_ERRNO.search(str(seen))):
                code = int(m.group(1))
            if code in RETRY_ERRNOS:
                return f"{errno.errorcode.get(code, code)} ({seen})"
            if "unable to lock file" in str(seen):
                return f"HDF5 file lock ({seen})"
        if isinstance(seen, RuntimeError) and any(s in str(seen) for s in _LOST_PEER):
            return f"lost peer ({seen})"
        seen = seen.__cause__ or seen.__context__
    return None


class HpcdiffError(Exception):
    """Base of every error hpcdiff reports to a user rather than crashing on."""

    exit_code = 1
    on_every_rank = False
    """Set when every rank raised this same error (``dist.Context.run_on_main``): nobody waits, nothing to abort."""


class ConfigError(HpcdiffError, ValueError):
    """A config key, type or value is wrong; the message names the key and the fix."""

    exit_code = EXIT_USAGE


class UsageError(HpcdiffError, ValueError):
    """A command was called wrongly (a bad argument or a missing prerequisite)."""

    exit_code = EXIT_USAGE


class DataError(HpcdiffError):
    """Input data cannot be used; the message names the file and what is wrong with it."""

    exit_code = EXIT_BAD_DATA


class ShardError(DataError):
    """A shard or its manifest is missing, truncated or inconsistent."""


class CheckpointError(HpcdiffError):
    """No valid checkpoint could be written or read."""

    exit_code = EXIT_BAD_CHECKPOINT


class DivergedError(HpcdiffError, FloatingPointError):
    """Training produced a NaN/Inf loss; the message names the step and what to change."""

    exit_code = EXIT_DIVERGED


class BadCheckpointError(CheckpointError):
    """A checkpoint on disk cannot be used (refused by ``weights_only``, every one invalid): exit 5, which runners
    do not retry (a rerun would load the same bytes), kept apart from bad input data (3)."""


class RunLockedError(HpcdiffError):
    """Another live process holds the run directory's lock."""

    exit_code = EXIT_USAGE


class LeaseLostError(RunLockedError):
    """Another writer took this run directory over (its holder was declared lost): stop, do not retry."""
