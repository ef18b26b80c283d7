"""The run directory's lease: who may take a run over (a requeue, an ended job, a dead or silent holder) and who
is refused (a live second writer), and what a writer whose lease was taken does (it stops writing).

The holders are real processes or lease records as another node would leave them; Slurm's answer is passed in.
"""

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hpcdiff.errors import LeaseLostError, RunLockedError
from hpcdiff.runstate import RunDir

HOLD = """
import sys, time
from hpcdiff.runstate import RunDir
RunDir(sys.argv[1]).acquire_lock(job_id=sys.argv[2] or None)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding the run's flock and lease, as Slurm job 41."""
    argv = [sys.executable, "-c", HOLD, str(tmp_path / "run"), "41"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def _lease_from_elsewhere(run: RunDir, **fields) -> None:
    """A lease as a writer on another node leaves it (its flock, if any, is not visible here)."""
    run.create()
    lease = {"token": "t-other", "job_id": "41", "host": "node-elsewhere", "pid": 12345, "heartbeat": time.time()}
    run.lease_file.write_text(json.dumps({**lease, **fields}))


def _takeovers(run: RunDir) -> list[dict]:
    return [e for e in run.read_events() if e["event"] == "lock_takeover"]


def test_live_second_writer_is_refused_even_with_slurm_saying_nothing(holder, tmp_path):
    with pytest.raises(RunLockedError, match=f"Slurm job 41, pid={holder.pid}"):
        RunDir(tmp_path / "run").acquire_lock(job_id="42", job_ended=lambda _: False)


def test_same_slurm_job_takes_over_a_lingering_lock_as_a_requeue(holder, tmp_path):
    # The flock still held (as a dead NFS or Lustre client's lingers) and a lease the job wrote on another node.
    run = RunDir(tmp_path / "run")
    _lease_from_elsewhere(run, job_id="41")
    run.acquire_lock(job_id="41", job_ended=lambda _: False)
    (event,) = _takeovers(run)
    assert "same Slurm job 41" in event["reason"] and event["previous"]["host"] == "node-elsewhere"
    assert run.read_lease()["pid"] == os.getpid()


def test_same_slurm_job_is_refused_while_its_holder_lives_on_this_host(holder, tmp_path):
    with pytest.raises(RunLockedError, match=f"pid={holder.pid}"):
        RunDir(tmp_path / "run").acquire_lock(job_id="41", job_ended=lambda _: True)


def test_holder_whose_job_slurm_says_ended_is_taken_over(tmp_path):
    run = RunDir(tmp_path / "run")
    _lease_from_elsewhere(run)
    asked = []
    run.acquire_lock(job_id="42", job_ended=lambda j: asked.append(j) or True)
    assert asked == ["41"]
    assert "Slurm job 41, has ended" in _takeovers(run)[0]["reason"]


def test_holder_with_a_stale_heartbeat_is_taken_over(tmp_path):
    run = RunDir(tmp_path / "run")
    _lease_from_elsewhere(run, heartbeat=time.time() - 100, job_id=None)
    with pytest.raises(RunLockedError, match="host=node-elsewhere"):
        run.acquire_lock(stale_after_s=200, job_ended=lambda _: False)
    run.acquire_lock(stale_after_s=50, job_ended=lambda _: False)
    assert "heartbeat is 100 s old" in _takeovers(run)[0]["reason"]


def test_holder_that_died_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = RunDir(tmp_path / "run")
    _lease_from_elsewhere(run, host=socket.gethostname(), pid=int(dead.stdout))
    run.acquire_lock(job_id="42", job_ended=lambda _: False)
    assert "no longer exists" in _takeovers(run)[0]["reason"]


def test_released_lease_is_taken_without_an_event(tmp_path):
    first = RunDir(tmp_path / "run")
    first.acquire_lock(job_id="41")
    first.release_lock()
    assert first.read_lease()["released"] is True
    second = RunDir(tmp_path / "run")
    second.acquire_lock(job_id="42", job_ended=lambda _: False)
    assert _takeovers(second) == []


def test_writer_whose_lease_was_taken_stops_writing(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(socket, "gethostname", lambda: "node1")  # the old writer, on a node cut off from the others
        old = RunDir(tmp_path / "run")
        old.acquire_lock(job_id="41")
        old.update_status(state="running", step=3)  # checks and refreshes its lease
    new = RunDir(tmp_path / "run")
    new.acquire_lock(job_id="41")  # the requeued instance, while the old one still runs behind the cut link
    new.update_status(state="running", step=2)
    with pytest.raises(LeaseLostError, match="taken over"):
        old.update_status(step=4)
    with pytest.raises(LeaseLostError):
        old.check_lease()  # and every later write, checkpoints included
    old.release_lock()  # leaves the new holder's lease alone
    assert new.read_status()["step"] == 2
    assert new.read_lease()["token"] == new._token and not new.read_lease().get("released")


def test_file_system_without_flock_is_guarded_by_the_lease_alone(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # what Lustre mounted with -o noflock answers
    first = RunDir(tmp_path / "run")
    first.acquire_lock(job_id="41")
    assert "does not support flock" in caplog.text and "-o flock" in caplog.text
    with pytest.raises(RunLockedError, match="Slurm job 41"):
        RunDir(tmp_path / "run").acquire_lock(job_id="42", job_ended=lambda _: False)
    first.release_lock()
    RunDir(tmp_path / "run").acquire_lock(job_id="43")
