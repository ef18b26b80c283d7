"""Every data command on the sliced-job core, run as users run it: bytes, kills, late tasks, finishers, folders.

Layouts: 1 process, ``mpirun -n 2``, and 2 array tasks of 2 ranks each give the same bytes. Kills come from the
core's test hook (SIGKILL right after the N-th output, N drawn from a seeded generator), pauses from its pause
hook (a worker waits for a file): no sleeps decide an order here.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from hpcdiff.atomic import file_sha256
from hpcdiff.batch.hooks import KILL_AFTER, PAUSE
from hpcdiff.data.shards import MANIFEST, QUARANTINE, shard_name
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, assert_ok, child_env, hpcdiff, mpirun, require

pytestmark = pytest.mark.slow  # trains models or runs ANTs/mpirun: left out of `make test-quick`

SHAPE = (16, 20, 16)
NUM = 6
COHORT = ("--subjects", NUM, "--shape", *SHAPE, "--seed", 2)
INGEST = ("--shape", *SHAPE, "--subjects-per-shard", 1)


def _tree(root: Path) -> dict[str, str]:
    """Every file the command wrote (not the core's own records), by relative path, with its checksum."""
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".hpcdiff" not in p.relative_to(root).parts
    }


def _argv(command: str, src: Path | None, out: Path) -> list:
    if command == "cohort":
        return ["cohort", "--out", out, *COHORT]
    if command == "ingest":
        return ["ingest", src, "--out", out, *INGEST]
    return ["export", src, "--out", out]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """One-process references: the cohort, its shards and their export."""
    root = tmp_path_factory.mktemp("sliced")
    refs = {"cohort": root / "bids", "ingest": root / "shards", "export": root / "nifti"}
    assert_ok(hpcdiff(*_argv("cohort", None, refs["cohort"]), timeout=300))
    assert_ok(hpcdiff(*_argv("ingest", refs["cohort"], refs["ingest"]), timeout=300))
    assert_ok(hpcdiff(*_argv("export", refs["ingest"], refs["export"]), timeout=300))
    return refs


_SOURCE = {"cohort": None, "ingest": "cohort", "export": "ingest"}


def _src(made, command):
    return made[_SOURCE[command]] if _SOURCE[command] else None


@pytest.mark.mpi
@pytest.mark.parametrize("command", ["cohort", "ingest", "export"])
def test_two_ranks_and_two_tasks_of_two_ranks_give_the_bytes_of_one_process(made, command, tmp_path):
    argv = _argv(command, _src(made, command), tmp_path / "ranks")
    assert_ok(mpirun(2, [*HPCDIFF, *argv], timeout=300))
    assert _tree(tmp_path / "ranks") == _tree(made[command])
    argv = _argv(command, _src(made, command), tmp_path / "tasks")
    for task in (1, 0):
        assert_ok(mpirun(2, [*HPCDIFF, *argv, "--task", task, "--num-tasks", 2], timeout=300))
    assert _tree(tmp_path / "tasks") == _tree(made[command])


@pytest.mark.parametrize("command", ["cohort", "ingest", "export"])
def test_killed_after_a_seeded_number_of_outputs_then_rerun_gives_the_undisturbed_bytes(made, command, tmp_path):
    after = random.Random(f"kill-{command}").randint(1, NUM - 1)
    argv = _argv(command, _src(made, command), tmp_path / "out")
    killed = hpcdiff(*argv, env={KILL_AFTER: str(after)}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list((tmp_path / "out" / ".hpcdiff" / "records").iterdir())) == after
    rerun = hpcdiff(*argv, timeout=300)
    assert_ok(rerun)
    assert _tree(tmp_path / "out") == _tree(made[command]), f"killed after {after} outputs"


def _finished_here(text: str) -> int:
    return len(re.findall(r": finished here from \d+ records", text))


def _outputs_of(done: Path, index: int) -> list[str]:
    """The files output ``index`` of a finished reference run consists of, from its record."""
    return sorted(json.loads((done / ".hpcdiff" / "records" / f"{index:06d}.json").read_text())["files"])


@pytest.mark.parametrize("command", ["cohort", "ingest", "export"])
def test_the_last_task_to_finish_finishes_once_while_another_still_writes(made, command, tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    argv = [*HPCDIFF, *_argv(command, _src(made, command), out), "--num-tasks", 2]
    # Task 1 owns outputs 1, 3, 5 and waits before its last one; task 0 ends first, finding output 5 missing.
    paused = subprocess.Popen(
        [*map(str, argv), "--task", "1"],
        env=child_env({PAUSE: f"{NUM - 1}:{go}"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = subprocess.run([*map(str, argv), "--task", "0"], env=child_env(), capture_output=True, text=True)
    assert_ok(first)
    assert _finished_here(first.stderr) == 0 and not (out / ".hpcdiff" / "finish.json").exists()
    assert paused.poll() is None
    go.touch()
    stdout, stderr = paused.communicate(timeout=300)
    assert paused.returncode == 0, stderr
    assert _finished_here(first.stderr) + _finished_here(stderr) == 1
    assert _tree(out) == _tree(made[command])


@pytest.mark.parametrize("command", ["cohort", "ingest", "export"])
def test_the_finisher_opens_none_of_the_other_workers_outputs(made, command, tmp_path):
    strace = shutil.which("strace")
    require("strace", strace is not None, "counts the files the finisher opens (apt-get install strace)")
    out, trace = tmp_path / "out", tmp_path / "trace.txt"
    argv = [*HPCDIFF, *_argv(command, _src(made, command), out), "--num-tasks", 2]
    assert_ok(hpcdiff(*argv[3:], "--task", 0, timeout=300))
    cmd = [strace, "-f", "-qq", "-e", "trace=open,openat", "-o", trace, *argv, "--task", 1]
    proc = subprocess.run(list(map(str, cmd)), env=child_env(), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    assert _finished_here(proc.stderr) == 1
    opened = trace.read_text()
    assert "records/000000.json" in opened  # it read the other task's records...
    for index in range(0, NUM, 2):  # ...and none of its outputs
        for name in _outputs_of(made[command], index):
            assert name not in opened, f"the {command} finisher opened task 0's {name}"
    assert _tree(out) == _tree(made[command])


# ---------------------------------------------------------------- who owns a folder (the cases that lost data before)
def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(proc, folder: Path, before: dict[str, bytes], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert str(folder) in proc.stderr and all(w in proc.stderr for w in words), proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(folder) == before, "a refused command changed the folder"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    shards = blob_shards(root / "blobs", num_subjects=6, per_shard=3)
    job = job_yaml(root / "job.yaml", shards, train={"steps": 2, "checkpoint_every": 2})
    assert_ok(hpcdiff("train", job, "--run-dir", root / "run", "--quiet", timeout=300))
    return root / "run"


def test_sample_onto_an_ingest_folder_is_refused(made, tiny_run, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(made["ingest"], folder)
    before = _snapshot(folder)
    for extra in ([], ["--overwrite"]):
        proc = hpcdiff("sample", "--run-dir", tiny_run, "--out", folder, "--n", 2, "--steps", 2, *extra)
        _refused(proc, folder, before, "`hpcdiff ingest`", "not even with --overwrite")


def test_ingest_onto_another_ingest_is_refused_unless_overwrite(made, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(made["ingest"], folder)
    before = _snapshot(folder)
    proc = hpcdiff("ingest", made["cohort"], "--out", folder, "--shape", *SHAPE, "--subjects-per-shard", 2)
    _refused(proc, folder, before, "another hpcdiff ingest plan", "--overwrite", shard_name(0))
    proc = hpcdiff(
        "ingest", made["cohort"], "--out", folder, "--shape", *SHAPE, "--subjects-per-shard", 2, "--overwrite"
    )
    assert_ok(proc)
    assert sorted(p.name for p in folder.glob("shard-*")) == [shard_name(i) for i in range(3)]
    assert (folder / QUARANTINE).exists() and (folder / MANIFEST).exists()


def test_export_onto_a_bids_root_is_refused(made, tmp_path):
    folder = tmp_path / "bids"
    shutil.copytree(made["cohort"], folder)
    before = _snapshot(folder)
    for extra in ([], ["--overwrite"]):
        proc = hpcdiff("export", made["ingest"], "--out", folder, *extra)
        _refused(proc, folder, before, "`hpcdiff cohort`")


def test_cohort_onto_a_bids_dataset_it_did_not_write_is_refused(made, tmp_path):
    folder = tmp_path / "bids"
    shutil.copytree(made["cohort"], folder, ignore=shutil.ignore_patterns(".hpcdiff"))
    before = _snapshot(folder)
    for extra in ([], ["--overwrite"]):
        proc = hpcdiff("cohort", "--out", folder, *COHORT, *extra, timeout=300)
        _refused(proc, folder, before, "holds 19 file(s) that hpcdiff cohort did not write", "dataset_description.json")
