"""Read a run directory and say what happened: ``status``, ``logs`` and ``inspect``.

Everything here reads files only, so it works from any shell on any login node after the submitting process,
the SSH session and even the job are gone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hpcdiff import checkpoint
from hpcdiff.errors import UsageError
from hpcdiff.runstate import RunDir

TERMINAL = ("completed", "failed")


def _run(path: Path) -> RunDir:
    run = RunDir(path)
    if not run.root.is_dir():
        raise UsageError(f"{path} is not a run directory (it does not exist)")
    if not run.status_file.exists() and not run.config.exists():
        raise UsageError(f"{path} is not a run directory: no status.json or config.yaml in it")
    return run


def read_status(path: Path) -> dict[str, Any]:
    """status.json plus what can be derived: heartbeat age and the latest valid checkpoint."""
    run = _run(path)
    status = run.read_status()
    if "heartbeat" in status:
        status["heartbeat_age_s"] = round(time.time() - status["heartbeat"], 1)
    # Marker and size only: status stays instant whatever the checkpoints weigh (inspect checks the sha256).
    latest = checkpoint.latest_valid(run.checkpoints, deep=False)
    status["latest_valid_checkpoint"] = str(latest.path) if latest else None
    status["latest_valid_step"] = latest.step if latest else None
    if latest is not None:
        # The folder is renamed into place once written: its mtime is when the checkpoint was made.
        status["checkpoint_age_s"] = round(time.time() - latest.path.stat().st_mtime, 1)
    status.setdefault("state", "pending")
    status["run_dir"] = str(run.root)
    if status.get("backend") == "slurm" and status.get("job_ids"):
        from hpcdiff.launch.slurm.query import job_summary

        # Live, while Slurm remembers the job; the run directory above stays the source of truth.
        status["slurm"] = job_summary(str(status["job_ids"][-1]))
    return status


def describe_status(status: dict[str, Any]) -> str:
    lines = [
        f"run        {status['run_dir']}",
        f"state      {status['state']}" + (f" ({status['stop_reason']})" if status.get("stop_reason") else ""),
        f"step       {status.get('step', 0)}/{status.get('total_steps', '?')}",
        f"restarts   {status.get('restarts', 0)}",
        f"checkpoint {status.get('latest_valid_checkpoint') or 'none yet'}",
    ]
    if status.get("job_ids"):
        lines.append(f"job ids    {', '.join(map(str, status['job_ids']))}")
    if status.get("slurm"):
        live = status["slurm"]
        lines.append(f"slurm      job {live['job_id']} {live['state']} (requeued {live.get('restarts', '?')} times)")
    if "heartbeat_age_s" in status:
        lines.append(f"heartbeat  {status['heartbeat_age_s']} s ago")
    if status.get("error"):
        lines.append(f"error      {status['error']}")
    return "\n".join(lines)


def age(seconds: float | None) -> str:
    """A short age for one-line summaries: 42s, 7m, 5h, 3d (or - when unknown)."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def status_line(status: dict[str, Any]) -> str:
    """One line of a run: state, step, last checkpoint age, heartbeat age, newest job id."""
    state = status["state"] + (f" ({status['stop_reason']})" if status.get("stop_reason") else "")
    step = f"{status.get('step', 0)}/{status.get('total_steps', '?')}"
    job = str(status["job_ids"][-1]) if status.get("job_ids") else "-"
    return (
        f"{status['run_dir']}  {state:<10s} step {step:<13s} checkpoint {age(status.get('checkpoint_age_s')):>4s} ago"
        f"  heartbeat {age(status.get('heartbeat_age_s')):>4s} ago  job {job}"
    )


def print_logs(path: Path, rank: int = 0, follow: bool = False, poll_s: float = 0.5) -> int:
    """Print a rank's log; with ``follow``, keep printing until the run reaches a terminal state."""
    run = _run(path)
    log_file = run.rank_log(rank)
    offset = 0
    while True:
        if log_file.exists():
            with open(log_file, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if not follow:
            if not log_file.exists():
                raise UsageError(f"no log for rank {rank} in {run.logs} yet")
            return 0
        if run.read_status().get("state") in TERMINAL and log_file.exists() and log_file.stat().st_size == offset:
            return 0
        time.sleep(poll_s)


def inspect_run(path: Path) -> dict[str, Any]:
    """Step, every checkpoint with its validity, and the weights digest of the newest valid one."""
    run = _run(path)
    infos = checkpoint.list_checkpoints(run.checkpoints)
    latest = next((i for i in infos if i.valid), None)
    return {
        "run_dir": str(run.root),
        "step": latest.step if latest else 0,
        "weights_sha256": latest.weights_sha256 if latest else None,
        "latest_valid": str(latest.path) if latest else None,
        "checkpoints": [i.as_dict() for i in infos],
        "state": run.read_status().get("state", "pending"),
    }


def describe_inspect(report: dict[str, Any]) -> str:
    lines = [f"run {report['run_dir']}: step {report['step']}, weights_sha256 {report['weights_sha256']}"]
    for c in report["checkpoints"]:
        mark = "valid  " if c["valid"] else "INVALID"
        lines.append(f"  {mark} step {c['step']:>9}  {c['path']}" + (f"  ({c['reason']})" if c["reason"] else ""))
    return "\n".join(lines)
