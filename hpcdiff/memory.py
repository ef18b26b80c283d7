"""Refuse work that cannot fit this machine's memory before starting it, saying how much it needs."""

from __future__ import annotations

import os

from hpcdiff.errors import UsageError


def total_memory() -> int:
    """Bytes of physical memory; total rather than free, so a busy moment never refuses a job that fits."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require_memory(nbytes: int, what: str, fix: str) -> None:
    """Raise UsageError (exit 2) naming ``what``, the bytes it needs and ``fix`` when it exceeds physical memory."""
    have = total_memory()
    if nbytes > have:
        raise UsageError(f"{what} needs about {_gib(nbytes)} of memory, more than this machine's {_gib(have)}; {fix}")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
