import os
import signal
import subprocess
import sys
import time

import pytest

from hpcdiff.errors import RunLockedError
from hpcdiff.runstate import RunDir

HOLD = """
import sys, time
from hpcdiff.runstate import RunDir
RunDir(sys.argv[1]).acquire_lock()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError, match=f"pid={proc.pid}"):
            RunDir(tmp_path / "run").acquire_lock()
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_killed_process_does_not_block(tmp_path):
    proc = _holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = RunDir(tmp_path / "run")
    assert (tmp_path / "run" / "lock").exists()
    run.acquire_lock()
    run.release_lock()


def test_status_events_and_metrics_survive_a_torn_last_line(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    run.update_status(state="running", step=3)
    run.update_status(step=4)
    assert run.read_status()["state"] == "running" and run.read_status()["step"] == 4
    for step in range(1, 6):
        run.metric({"step": step, "loss": 1.0 / step})
    with open(run.metrics_file, "a") as f:
        f.write('{"step": 6, "lo')  # a kill in the middle of a write
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5]
    run.truncate_metrics(after_step=3)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    run.event("start", step=0)
    assert run.read_events()[0]["event"] == "start" and time.time() - run.read_events()[0]["time"] < 60
