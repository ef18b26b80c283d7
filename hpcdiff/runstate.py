"""The run directory: the single source of truth for a training run.

``status``, ``logs`` and ``inspect`` need nothing but this folder: no live process, no ``sacct``, no SSH
session. Files are written atomically (status.json) or appended line by line (events.jsonl, metrics.jsonl), so a
process killed at any moment leaves them readable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from hpcdiff.atomic import atomic_write, naming
from hpcdiff.config import load_yaml
from hpcdiff.errors import DataError, LeaseLostError, RunLockedError

State = Literal["pending", "running", "stopped", "completed", "failed"]
log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S = 600.0
# flock on a file system mounted without lock support (Lustre -o noflock, some NFS and FUSE mounts).
_FLOCK_UNSUPPORTED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})


class RunDir:
    """Paths and small writers of one run directory (its layout: docs/guarantees.md, "The run directory")."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.config = self.root / "config.yaml"
        self.status_file = self.root / "status.json"
        self.events_file = self.root / "events.jsonl"
        self.metrics_file = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.logs = self.root / "logs"
        self.lock_file = self.root / "lock"
        self.lease_file = self.root / "lease.json"
        self._lock_fd: int | None = None
        self._token: str | None = None
        self._lease: dict[str, Any] = {}
        self._lost = False

    def create(self) -> None:
        for d in (self.root, self.checkpoints, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lock
    def acquire_lock(
        self,
        job_id: str | None = None,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        job_ended: Callable[[str], bool] | None = None,
    ) -> None:
        """Become the one writer of this run, or raise RunLockedError naming the holder.

        Two layers. A ``flock`` on RUN/lock, which the kernel drops when its holder dies. And a lease record,
        RUN/lease.json (job id, host, pid, heartbeat, a token), because on Lustre or NFS a dead client's flock
        lingers and a process cut off behind a failed link goes on running. A lease not released is taken over
        (with a ``lock_takeover`` event saying why) when its holder is the same Slurm job (a requeue), a job that
        Slurm says has ended, a process on this host that no longer exists, or silent for ``stale_after_s``;
        otherwise the run is refused. Every status write and checkpoint then checks the token
        (``check_lease``), so a writer whose lease was taken over stops instead of writing beside the new one.

        Args:
            job_id: this process's Slurm job id, if any.
            stale_after_s: a holder whose heartbeat is older than this is taken for dead.
            job_ended: asks Slurm whether a job has ended (default: ``scontrol``; unknown counts as not ended).
        """
        self.create()
        fd, busy = self._try_flock()
        lease = self.read_lease()
        reason = None
        try:
            if lease and not lease.get("released"):
                reason = _takeover_reason(lease, job_id, stale_after_s, job_ended or _slurm_job_ended)
                if reason is None:
                    raise RunLockedError(
                        f"run directory {self.root} is in use by another live process ({_describe(lease)}); "
                        "wait for it, stop it, or choose another --run-dir"
                    )
            elif busy:
                holder = self.lock_file.read_text().strip() or "unknown"
                raise RunLockedError(
                    f"run directory {self.root} is in use by another live process ({holder}); "
                    "wait for it, stop it, or choose another --run-dir"
                )
        except RunLockedError:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        # Without the flock (a dead holder's lingering one, or none on this file system) the lease guards alone.
        self._lock_fd = fd
        self._token = uuid.uuid4().hex
        self._lease = {"token": self._token, "job_id": job_id, "host": socket.gethostname(), "pid": os.getpid()}
        self._write_lease()
        if reason is not None:
            self.event("lock_takeover", reason=reason, previous=lease)

    def _try_flock(self) -> tuple[int | None, bool]:
        """(the locked descriptor, or None; whether another holder has the flock)."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None, True
        except OSError as e:
            os.close(fd)
            if e.errno not in _FLOCK_UNSUPPORTED:
                raise
            self._warn_no_flock(e)
            return None, False
        return fd, False

    def _warn_no_flock(self, error: OSError) -> None:
        log.warning(
            "the file system of %s does not support flock (%s): the run directory is guarded by its lease "
            "record alone (RUN/lease.json), which refuses a second writer while the first one's heartbeat is "
            "fresh. Mount with flock support (Lustre: -o flock) for a kernel-enforced lock as well.",
            self.root,
            os.strerror(error.errno or 0),
        )

    def read_lease(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.lease_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_lease(self, **fields: Any) -> None:
        self._lease.update(fields, heartbeat=time.time())
        atomic_write(self.lease_file, json.dumps(self._lease, sort_keys=True).encode())

    def check_lease(self) -> None:
        """Raise LeaseLostError if another writer has taken this run over; refresh the heartbeat otherwise."""
        if self._lost:
            raise LeaseLostError(f"run directory {self.root} was taken over by another writer: not writing")
        if self._token is None:
            return
        current = self.read_lease() or {}
        if current.get("token") != self._token:
            self._lost, self._token = True, None
            raise LeaseLostError(
                f"run directory {self.root} was taken over by another writer ({_describe(current)}) while this "
                "process held it (a requeue after this job was declared lost?): stopping without writing more"
            )
        self._write_lease()

    def release_lock(self) -> None:
        if self._token is not None and (self.read_lease() or {}).get("token") == self._token:
            self._write_lease(released=True)
        self._token = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self, **lease: Any) -> Iterator[RunDir]:
        self.acquire_lock(**lease)
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
        """Merge ``fields`` into status.json (atomically) and return the new status.

        A holder of the lock checks its lease first (and so refreshes its heartbeat).
        """
        self.check_lease()
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


def _describe(lease: dict[str, Any]) -> str:
    job = f"Slurm job {lease['job_id']}, " if lease.get("job_id") else ""
    age = time.time() - float(lease.get("heartbeat", 0))
    return f"{job}pid={lease.get('pid')} host={lease.get('host')}, heartbeat {age:.0f} s ago"


def _takeover_reason(
    lease: dict[str, Any], job_id: str | None, stale_after_s: float, job_ended: Callable[[str], bool]
) -> str | None:
    """Why an unreleased lease may be taken over, or None when its holder may still be writing."""
    here = lease.get("host") == socket.gethostname()
    if here and _pid_alive(lease.get("pid")):
        return None  # seen alive: whatever its job or heartbeat says, it may still write
    held_by = lease.get("job_id")
    if held_by and job_id and str(held_by) == str(job_id):
        return f"held by this same Slurm job {job_id}: a requeue (Slurm runs one instance of a job at a time)"
    age = time.time() - float(lease.get("heartbeat", 0))
    if age > stale_after_s:
        return f"the holder's heartbeat is {age:.0f} s old (more than {stale_after_s:.0f} s)"
    if here:
        return f"the holder, pid {lease.get('pid')} on this host, no longer exists"
    if held_by and job_ended(str(held_by)):
        return f"the holder, Slurm job {held_by}, has ended"
    return None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job_ended(job_id: str) -> bool:
    from hpcdiff.launch.slurm.query import is_final, job_summary

    summary = job_summary(job_id)
    return summary is not None and is_final(str(summary["state"]))
