"""What a process can learn about its own Slurm job: chiefly when it will be killed."""

from __future__ import annotations

import datetime as _dt
import subprocess
from collections.abc import Mapping


def job_deadline(env: Mapping[str, str]) -> float | None:
    """Wall-clock time (epoch seconds) at which this Slurm job hits its time limit, or None outside Slurm.

    Slurm >= 23.02 exports SLURM_JOB_END_TIME; older ones are asked with ``squeue`` (no ``sacct`` needed).
    """
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return _dt.datetime.fromisoformat(out).timestamp()
    except ValueError:
        return None  # "N/A", "Unknown" or UNLIMITED: no deadline to plan for
