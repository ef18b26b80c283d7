"""Training runs on Slurm from Python or a notebook, through submitit.

    run = submit_training("jobs/demo.yaml", "/scratch/me/runs/demo", partition="gpu", timeout_min=240)
    run.wait()            # polls the run directory (and scontrol): no sacct needed
    run.result()          # {"step": ..., "weights_sha256": ..., "checkpoints": [...], ...}

Checkpoint and requeue go through submitit's own mechanism: Slurm sends USR2 ``signal_delay_s`` before the time
limit (or on preemption), submitit calls ``TrainingRun.checkpoint``, which passes the signal on to the training
process, waits for its checkpoint and clean exit, and hands back a fresh ``TrainingRun`` that submitit requeues
with ``scontrol requeue``; the rerun resumes from the newest valid checkpoint. State comes from the run
directory, never from ``sacct`` (submitit's own job state is UNKNOWN where there is no accounting).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from hpcdiff.errors import EXIT_REQUEUE
from hpcdiff.launch.local import train_command
from hpcdiff.launch.slurm.query import is_final, job_summary
from hpcdiff.launch.slurm.sbatch import SlurmOptions, train_job
from hpcdiff.report import inspect_run, read_status
from hpcdiff.runstate import RunDir

# Slurm's warning must come before train.stop_margin_s (120 s by default), or the loop stops on the time limit
# by itself first and submitit never gets to requeue.
DEFAULT_SIGNAL_DELAY_S = 240


class TrainingRun(submitit.helpers.Checkpointable):
    """The callable submitit runs: ``hpcdiff train`` as a child process, checkpointed and requeued on USR2."""

    def __init__(self, config: str | Path, run_dir: str | Path, overrides: Sequence[str] = (), ranks: int = 1):
        self.config = str(Path(config).absolute())
        self.run_dir = str(Path(run_dir).absolute())
        self.overrides = list(overrides)
        self.ranks = ranks
        self._child: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_child"}  # a process handle does not pickle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _child=None)

    def __call__(self) -> dict[str, Any]:
        if self.ranks > 1:  # mpirun inside the job's allocation
            cmd = train_command(Path(self.config), Path(self.run_dir), self.ranks, self.overrides)
        else:  # the very command the sbatch script runs
            cmd = train_job(Path(self.config), Path(self.run_dir), SlurmOptions(), self.overrides).command
        self._child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        rc = self._child.wait()
        if rc == EXIT_REQUEUE:
            raise submitit.core.utils.UncompletedJobError(
                f"training stopped cleanly (exit 75) without submitit's signal, e.g. on the time limit: "
                f"submit again to resume {self.run_dir}"
            )
        if rc != 0:
            raise RuntimeError(
                f"hpcdiff train exited {rc}; see {self.run_dir}/logs and `hpcdiff status {self.run_dir}`"
            )
        return inspect_run(Path(self.run_dir))

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2: let the training checkpoint and exit, then ask to be run again."""
        child = self._child
        if child is not None and child.returncode is None:
            child.send_signal(signal.SIGUSR2)
            _reap(child.pid, timeout=float(os.environ.get("HPCDIFF_CHECKPOINT_WAIT_S", "600")))
        return submitit.helpers.DelayedSubmission(TrainingRun(self.config, self.run_dir, self.overrides, self.ranks))


def _reap(pid: int, timeout: float) -> None:
    """Wait for a child from inside a signal handler, where Popen.wait cannot: the interrupted main thread holds
    Popen's wait lock, so Popen.wait(timeout) would spin until the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)  # the last periodic checkpoint is what the rerun resumes from


class SubmittedRun:
    """A training run submitted through submitit: its job and its run directory (the source of truth)."""

    def __init__(self, job: submitit.Job, run_dir: Path) -> None:
        self.job = job
        self.run_dir = Path(run_dir)

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def status(self) -> dict[str, Any]:
        """What ``hpcdiff status`` shows: state, step, restarts, last checkpoint, job ids, live Slurm state."""
        return read_status(self.run_dir)

    def wait(self, timeout: float | None = None, poll_s: float = 2.0) -> dict[str, Any]:
        """Block until the run is completed or failed, or Slurm says the job ended; return the final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status.get("state") in ("completed", "failed"):
                return status
            live = job_summary(self.job_id)
            if live is not None and is_final(str(live["state"])):
                return self.status()  # ended without the run saying so (cancelled, killed): report what is known
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.run_dir} still {status.get('state')} after {timeout} s")
            time.sleep(poll_s)

    def result(self) -> dict[str, Any]:
        """Step, checkpoints and weights digest, read from the run directory."""
        return inspect_run(self.run_dir)


def submit_training(
    config: str | Path,
    run_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    folder: str | Path | None = None,
    partition: str | None = None,
    timeout_min: int = 60,
    cpus_per_task: int = 1,
    gpus_per_node: int = 0,
    setup: Sequence[str] = (),
    signal_delay_s: int = DEFAULT_SIGNAL_DELAY_S,
    max_num_timeout: int = 3,
    **slurm_parameters: Any,
) -> SubmittedRun:
    """Submit ``hpcdiff train CONFIG --run-dir RUN`` as a Slurm job through submitit; record the job id in RUN.

    Args:
        config: training job YAML.
        run_dir: run directory (created).
        overrides: ``key=value`` overrides, as with ``--set``.
        folder: submitit's folder for its pickles and logs (default RUN/submitit).
        partition, timeout_min, cpus_per_task, gpus_per_node: the Slurm request (one task).
        setup: shell lines run before the job (``module load ...``): trusted shell.
        signal_delay_s: seconds before the time limit at which Slurm sends USR2 (above train.stop_margin_s).
        max_num_timeout: requeues on timeouts before submitit gives up (preemptions do not count).
        slurm_parameters: any other ``slurm_*`` parameter of ``submitit.AutoExecutor.update_parameters``.
    """
    run = RunDir(run_dir)
    run.create()
    executor = submitit.AutoExecutor(
        folder=str(folder or run.root / "submitit"), cluster="slurm", slurm_max_num_timeout=max_num_timeout
    )
    params: dict[str, Any] = {
        "timeout_min": timeout_min,
        "tasks_per_node": 1,
        "cpus_per_task": cpus_per_task,
        "slurm_signal_delay_s": signal_delay_s,
        "slurm_setup": list(setup),
        "slurm_additional_parameters": {"open-mode": "append"},
        **slurm_parameters,
    }
    if partition:
        params["slurm_partition"] = partition
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    executor.update_parameters(**params)
    job = executor.submit(TrainingRun(config, run.root, overrides))
    previous = run.read_status()
    run.update_status(
        state=previous.get("state") if previous.get("state") == "completed" else "pending",
        backend="slurm",
        job_ids=[*previous.get("job_ids", []), str(job.job_id)],
    )
    run.event("submitted", backend="submitit", job_id=str(job.job_id))
    return SubmittedRun(job, run.root)
