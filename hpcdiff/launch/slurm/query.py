"""Live Slurm job state from ``scontrol`` (no ``sacct``: many sites, and the test cluster, have no accounting).

Only a complement to the run directory: ``scontrol`` forgets a job ``MinJobAge`` seconds after it ends, and a
login node may have no Slurm client at all. Every function here answers None rather than failing.
"""

from __future__ import annotations

import re
import subprocess

_FIELD = re.compile(r"(\w+)=(\S*)")
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)


def job_records(job_id: str, timeout: float = 10) -> list[dict[str, str]] | None:
    """``scontrol show job -o ID`` as one dict per job (an array gives one per task); None if unknown or no Slurm."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    records = [dict(_FIELD.findall(line)) for line in proc.stdout.splitlines() if line.strip()]
    return [r for r in records if "JobState" in r] or None


def job_summary(job_id: str) -> dict[str, object] | None:
    """State, restarts, reason and exit code of a job (of each task for an array), or None if Slurm cannot say."""
    records = job_records(job_id)
    if records is None:
        return None
    tasks = {
        r.get("ArrayTaskId") or r.get("JobId", ""): {
            "state": r["JobState"],
            "restarts": int(r.get("Restarts", "0") or 0),
            "reason": r.get("Reason", ""),
            "exit_code": r.get("ExitCode", ""),
            "job_id": r.get("JobId", ""),
        }
        for r in records
    }
    if len(tasks) == 1 and "ArrayTaskId" not in records[0]:
        return {"job_id": str(job_id), **next(iter(tasks.values()))}
    states = sorted({t["state"] for t in tasks.values()})
    return {"job_id": str(job_id), "state": ",".join(states), "tasks": tasks}


def is_final(state: str) -> bool:
    return all(s in FINAL_STATES for s in state.split(","))
