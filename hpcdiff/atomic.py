"""Durable, all-or-nothing file writes and checksums, shared by shards, checkpoints and the run directory.

Readers see the old file or the new one, never a mix: write a temporary file beside the target, fsync it,
rename it over the target, fsync the directory (POSIX needs the directory synced for the rename to last).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_BLOCK = 1 << 20


def file_sha256(path: Path, direct: bool = False) -> str:
    """sha256 of a file, read in 1 MiB blocks so memory stays flat for any size.

    ``direct`` reads what the device holds, with O_DIRECT, so a copy still in the page cache cannot answer (a
    checkpoint's read-back). Dropping the pages instead (``posix_fadvise(DONTNEED)``) is only advice: measured here
    it left from none to all of a fresh file's pages cached. A file system that refuses O_DIRECT (tmpfs, some network
    clients) gets a plain read, which checks what its cache or client returns.
    """
    h = hashlib.sha256()
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        else:
            buf = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT needs
            try:
                while True:
                    n = os.readv(fd, [buf])
                    h.update(memoryview(buf)[:n])
                    if n < _BLOCK:  # a short read is the end of the file (the next offset would be unaligned)
                        return h.hexdigest()
            finally:
                os.close(fd)
                buf.close()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an OSError raised while writing ``path`` that file's name: a failed write() names none, and "No space
    left on device" is only useful with the file (and so the file system) it happened on."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it, rename it over ``path``, fsync the directory.

    On any failure the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are data others read
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def remove_stale_tmp(path: Path) -> None:
    """Temporary files a killed writer of ``path`` left behind (call it only from that file's writer)."""
    for tmp in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        tmp.unlink(missing_ok=True)
