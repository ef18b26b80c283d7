"""A real single-node Slurm for tests: started by slurm/local/start.sh under one folder, stopped by PID.

Job states are read with ``scontrol show job -o`` (there is no accounting database, so no ``sacct``); finished jobs
stay visible for the config's MinJobAge (300 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.harness import ROOT, require, run

START = ROOT / "slurm" / "local" / "start.sh"
STOP = ROOT / "slurm" / "local" / "stop.sh"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scontrol", "scancel")
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


def require_slurm() -> None:
    """Skip (or fail under HPCDIFF_REQUIRE=slurm) unless a local Slurm can be started here."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    fix = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
    require("slurm", not missing, f"missing {', '.join(missing)} ({fix})")
    require("slurm", os.geteuid() == 0, "the local Slurm runs with SlurmUser=root: run the tests as root")


class SlurmCluster:
    """Handle on a running local Slurm: its folder, the environment its clients need, and job helpers."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.conf = directory / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls, directory: Path, timeout: float = 60) -> SlurmCluster:
        cluster = cls(directory)
        proc = run(["bash", START, directory], timeout=timeout)
        if proc.returncode != 0:
            cluster.stop()  # whatever half of it came up must not outlive the session
            pytest.fail(f"slurm/local/start.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return cluster

    def stop(self, timeout: float = 90) -> None:
        proc = run(["bash", STOP, self.dir], timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"slurm/local/stop.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def run(self, argv: Iterable[object], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (or anything else) against this cluster."""
        return run(list(argv), timeout=timeout, env=self.env)

    def _checked(self, argv: list[object], timeout: float = 60) -> str:
        proc = self.run(argv, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def sbatch(self, script: Path, *args: object) -> str:
        """Submit ``script`` with extra sbatch options; return the job id."""
        out = self._checked(["sbatch", "--parsable", *args, script])
        return out.strip().split(";")[0]

    def show_job(self, job_id: str) -> str:
        """The one-line ``scontrol show job -o`` record of a job."""
        return self._checked(["scontrol", "show", "job", "-o", job_id]).strip()

    def job_field(self, job_id: str, key: str) -> str:
        """One ``Key=value`` field of the job record (values without spaces only, such as JobState)."""
        match = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", self.show_job(job_id))
        if match is None:
            pytest.fail(f"no {key}= in the record of job {job_id}")
        return match.group(1)

    def job_state(self, job_id: str) -> str:
        return self.job_field(job_id, "JobState")

    def wait(self, job_id: str, states: Iterable[str] = FINAL_STATES, timeout: float = 120, poll: float = 0.2) -> str:
        """Poll until the job reaches one of ``states``; return it. Fails the test with the record past timeout."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            ended = state in FINAL_STATES
            if ended or time.monotonic() > deadline:
                why = f"ended {state}" if ended else f"still {state} after {timeout}s"
                pytest.fail(f"job {job_id} {why}, wanted {sorted(wanted)}:\n{self.show_job(job_id)}")
            time.sleep(poll)
