"""Helpers that run the real parts: mpirun ranks, the hpcdiff CLI, the local Slurm.

A test that needs MPI or Slurm skips with a reason when the part is absent, and *fails* instead when the part is
listed in HPCDIFF_REQUIRE (CI sets ``HPCDIFF_REQUIRE=mpi,slurm``), so a missing install can never pass as green.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
HPCDIFF = [PYTHON, "-m", "hpcdiff"]

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    # A container has no fast interconnect; stop Open MPI probing for one (and warning about it).
    "OMPI_MCA_btl": "self,vader,tcp",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "OMPI_MCA_pml": "ob1",
}


def require(part: str, available: bool, why: str) -> None:
    """Skip when ``part`` is missing, or fail when HPCDIFF_REQUIRE lists it."""
    if available:
        return
    required = {p.strip() for p in os.environ.get("HPCDIFF_REQUIRE", "").split(",") if p.strip()}
    if part in required:
        pytest.fail(f"{part} is required here (HPCDIFF_REQUIRE) but missing: {why}")
    pytest.skip(f"{part} not available: {why}")


def require_mpi() -> None:
    ok = shutil.which("mpirun") is not None
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        ok = False
    require("mpi", ok, "needs mpirun and mpi4py (apt-get install openmpi-bin libopenmpi-dev)")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ours, MPI's root variables, one thread per rank."""
    env = dict(os.environ)
    env.update(MPI_ENV)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str], timeout: float = 120, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, and fail the test (not hang it) past ``timeout``."""
    try:
        return subprocess.run(
            list(map(str, argv)),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(env),
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(map(str, argv))} timed out after {timeout}s\n{e.stdout}\n{e.stderr}")


def mpirun(
    n: int,
    argv: Sequence[str],
    timeout: float = 180,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` under a real ``mpirun -n n`` (as root, oversubscribed, unbound)."""
    require_mpi()
    cmd = ["mpirun", "-n", str(n), "--bind-to", "none", *map(str, argv)]
    return run(cmd, timeout=timeout, env=env, cwd=cwd)


def hpcdiff(*args: object, timeout: float = 120, env: Mapping[str, str] | None = None):
    """Run the hpcdiff CLI in a child process."""
    return run([*HPCDIFF, *map(str, args)], timeout=timeout, env=env)


def assert_ok(proc: subprocess.CompletedProcess[str], code: int = 0) -> None:
    assert proc.returncode == code, (
        f"exit {proc.returncode} (wanted {code}) from {proc.args}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )


def wait_for(predicate, timeout: float, what: str, poll: float = 0.01):
    """Poll ``predicate`` until it returns something truthy (returned), or fail the test after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
