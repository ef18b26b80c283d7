"""The local supervisor: ``mpirun`` detached from the terminal, restarted from the last checkpoint until done.

``submit --backend local`` starts this module as a new session (``setsid``), so closing the SSH session or
killing the submitting shell leaves it running. It reruns the same ``hpcdiff train`` command line after a crash
or a clean stop (exit 75), not after exit 2, 3 or 74, which a rerun cannot fix; training itself resumes from the
newest valid checkpoint. Everything it knows goes
into the run directory, so ``hpcdiff status`` needs no live process.

status.json belongs to whoever holds the run lock: the submitter and the supervisor write it only while holding
that lock themselves, so a launcher refused because the run is live (a trainer or another supervisor) changes
nothing in the run directory.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hpcdiff.errors import EXIT_REQUEUE, NO_RETRY_EXITS, HpcdiffError, RunLockedError, UsageError
from hpcdiff.runstate import RunDir

log = logging.getLogger("hpcdiff.supervisor")

# Open MPI refuses to run as root, or more ranks than cores, unless told; both are normal on a workstation.
MPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def train_command(config: Path, run_dir: Path, ranks: int, overrides: Sequence[str]) -> list[str]:
    """The argument list one attempt runs: mpirun over ``ranks`` processes of ``hpcdiff train``."""
    train = [sys.executable, "-m", "hpcdiff", "train", str(config), "--run-dir", str(run_dir), "--quiet"]
    for item in overrides:
        train += ["--set", item]
    return mpirun_command(ranks, train)


def mpirun_command(ranks: int, argv: Sequence[str]) -> list[str]:
    """``argv`` under ``mpirun -n ranks``; the one place hpcdiff builds an mpirun command line.

    Oversubscribed and unbound: a workstation's normal case (more ranks than cores would otherwise be refused, and
    Open MPI binds each of up to two ranks to one core). Without mpirun, one rank runs ``argv`` as it is.

    Raises:
        UsageError: more than one rank and no mpirun on PATH.
    """
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        if ranks > 1:
            raise UsageError(
                "mpirun not found: install Open MPI (apt-get install openmpi-bin) or `module load openmpi`"
            )
        return list(argv)
    return [mpirun, "-n", str(ranks), "--oversubscribe", "--bind-to", "none", *argv]


def _supervisor_lock(run: RunDir) -> int:
    """Hold the run's supervisor lock (one supervisor per run) and return its descriptor; RunLockedError if taken."""
    fd = os.open(run.root / "supervisor.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"another supervisor already runs {run.root}: follow it with hpcdiff status {run.root}, "
            "or stop it before submitting again"
        ) from None
    return fd


def _write_status(run: RunDir, **fields: object) -> bool:
    """Merge ``fields`` into status.json while holding the run lock; leave it alone if a live process holds it.

    A second or so of retries lets the submitter and the supervisor, which take the lock for a moment each, both
    write.
    """
    for attempt in range(5):
        try:
            with run.locked():
                run.update_status(**fields)
            return True
        except RunLockedError as e:
            if attempt == 4:
                log.warning("status.json not updated: %s", e)
            time.sleep(0.2)
    return False


def start_detached(config: Path, run_dir: Path, ranks: int, max_restarts: int, overrides: Sequence[str]) -> int:
    """Start the supervisor in its own session and return its pid; it outlives the caller.

    Raises:
        RunLockedError: the run is live (a trainer holds its lock, or a supervisor runs it); nothing is written.
    """
    run = RunDir(run_dir)
    run.create()
    with run.locked():  # refuses while a trainer holds the run; released before the trainer needs it
        os.close(_supervisor_lock(run))  # refuse a second supervisor now rather than in the background
        run.update_status(state="pending", backend="local", ranks=ranks)
    argv = [
        sys.executable,
        "-m",
        "hpcdiff.launch.local",
        "--run-dir",
        str(run.root),
        "--ranks",
        str(ranks),
        "--max-restarts",
        str(max_restarts),
        str(Path(config).absolute()),
        *[f"--set={o}" for o in overrides],
    ]
    with open(run.logs / "supervisor.log", "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd=os.getcwd(),
        )
    _write_status(run, supervisor_pid=proc.pid)  # the supervisor writes it too, first thing
    return proc.pid


class _Forward:
    """Pass TERM/INT/USR1 to the running attempt and remember not to restart after it."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def __call__(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def supervise(config: Path, run_dir: Path, ranks: int, max_restarts: int, overrides: Sequence[str]) -> int:
    """Run attempts until one exits 0, the restart budget is spent, or we are told to stop."""
    run = RunDir(run_dir)
    run.create()
    _supervisor_lock(run)  # held until this process ends
    env = {**os.environ, **(MPI_ROOT_ENV if os.geteuid() == 0 else {})}
    cmd = train_command(config, run.root, ranks, overrides)
    forward = _Forward()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, forward)
    restarts = 0
    while True:
        _write_status(run, supervisor_pid=os.getpid(), supervisor_restarts=restarts)
        log.info("attempt %d: %s", restarts + 1, " ".join(cmd))
        forward.child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        rc = forward.child.wait()
        log.info("attempt %d exited %d", restarts + 1, rc)
        if rc == 0:
            run.event("supervisor_done", attempts=restarts + 1)
            return 0
        if forward.stopping:
            _write_status(run, state="stopped", supervisor_last_exit=rc)
            run.event("supervisor_stopped", exit=rc)
            return EXIT_REQUEUE if rc == EXIT_REQUEUE else rc
        if rc in NO_RETRY_EXITS:  # a rerun fails the same way (docs/guarantees.md, exit codes)
            _write_status(run, state="failed", supervisor_last_exit=rc)
            run.event("supervisor_gave_up", exit=rc, restarts=restarts, reason="a rerun cannot fix this")
            return rc
        if restarts >= max_restarts:
            _write_status(run, state="failed", supervisor_last_exit=rc, error=f"gave up after {restarts} restarts")
            run.event("supervisor_gave_up", exit=rc, restarts=restarts)
            return rc
        restarts += 1
        run.event("restart", exit=rc, restart=restarts, by="supervisor")
        time.sleep(min(2.0 * restarts, 30.0))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcdiff.launch.local", description=__doc__)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("config", type=Path)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s: %(message)s")
    try:
        return supervise(args.config, args.run_dir, args.ranks, args.max_restarts, args.set)
    except HpcdiffError as e:
        log.error("%s", e)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
