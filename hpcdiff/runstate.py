"""The run directory: the single source of truth for a training run.

``status``, ``logs`` and ``inspect`` need nothing but this folder: no live process, no ``sacct``, no SSH
session. Files are written atomically (status.json) or appended line by line (events.jsonl, metrics.jsonl), so a
process killed at any moment leaves them readable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from hpcdiff.atomic import atomic_write, naming
from hpcdiff.config import load_yaml
from hpcdiff.errors import DataError, RunLockedError

State = Literal["pending", "running", "stopped", "completed", "failed"]


class RunDir:
    """Paths and small writers of one run directory (DESIGN.md, "The run directory")."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.config = self.root / "config.yaml"
        self.status_file = self.root / "status.json"
        self.events_file = self.root / "events.jsonl"
        self.metrics_file = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.logs = self.root / "logs"
        self.lock_file = self.root / "lock"
        self._lock_fd: int | None = None

    def create(self) -> None:
        for d in (self.root, self.checkpoints, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lock
    def acquire_lock(self) -> None:
        """Become the one writer of this run, or raise RunLockedError naming the holder.

        ``flock`` is released by the kernel when its holder dies, so a lock left by a killed process never
        blocks a resume; the pid and host in the file are only for the message.
        """
        self.create()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.root} is in use by another live process ({holder}); "
                "wait for it, stop it, or choose another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDir]:
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()

    # ---------------------------------------------------------------- config
    def read_config(self) -> dict[str, Any] | None:
        if not self.config.exists():
            return None
        return load_yaml(self.config)

    def freeze_config(self, config: dict[str, Any]) -> None:
        atomic_write(self.config, yaml.safe_dump(config, sort_keys=False).encode())

    # ---------------------------------------------------------------- status
    def read_status(self) -> dict[str, Any]:
        try:
            status = json.loads(self.status_file.read_bytes().decode())
        except FileNotFoundError:
            return {}
        except ValueError as e:  # JSON or UTF-8
            status = f"not JSON ({e})"
        if not isinstance(status, dict):
            raise DataError(
                f"{self.status_file} is corrupt: {status if isinstance(status, str) else 'not a JSON object'}. "
                "It holds only what the run reports (checkpoints hold the training state): remove it and run again"
            )
        return status

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into status.json (atomically) and return the new status."""
        status = self.read_status()
        status.update(fields)
        status["updated"] = time.time()
        atomic_write(self.status_file, json.dumps(status, indent=1, sort_keys=True).encode())
        return status

    # ------------------------------------------------------ append-only logs
    def event(self, kind: str, **fields: Any) -> None:
        _append(self.events_file, {"time": time.time(), "event": kind, **fields})

    def metric(self, row: dict[str, Any]) -> None:
        _append(self.metrics_file, row)

    def read_events(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.events_file)

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_file)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows past ``after_step``: they will be logged again, identically, by the resumed run."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank-{rank:03d}.log"


def _append(path: Path, row: dict[str, Any]) -> None:
    # One write() of one line, O_APPEND: concurrent appenders and a kill mid-way leave whole lines (or a last
    # partial line, which readers skip).
    line = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with naming(path):
            os.write(fd, line)
    finally:
        os.close(fd)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out
