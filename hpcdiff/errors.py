"""Exception family and exit codes of the CLI contract (DESIGN.md).

Library code raises these; only ``cli.py`` turns them into exit codes, so every part stays usable from Python.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_DATA = 3
EXIT_NO_SPACE = 74  # sysexits' EX_IOERR
EXIT_REQUEUE = 75

# A full disk, an exhausted quota, a file-size limit (ulimit -f): waiting or retrying does not help, freeing does.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


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


class BadCheckpointError(DataError, CheckpointError):
    """A checkpoint on disk cannot be used (refused by ``weights_only``, every one invalid): bad data, exit 3."""


class RunLockedError(HpcdiffError):
    """Another live process holds the run directory's lock."""

    exit_code = EXIT_USAGE


class LeaseLostError(RunLockedError):
    """Another writer took this run directory over (its holder was declared lost): stop, do not retry."""
