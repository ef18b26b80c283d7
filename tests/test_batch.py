"""The sliced-job core on a toy job: slices, records, skips, one finisher, and who owns a folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hpcdiff.atomic import file_sha256
from hpcdiff.batch import STATE_DIR, Marker, Record, Worker, digest, read_marker, run, take
from hpcdiff.batch.job import CLAIM, _claim
from hpcdiff.errors import UsageError


@dataclass
class Toy:
    """Output i is ``out-i.txt``; finishing writes ``total.txt`` from the records' numbers alone."""

    out: Path
    num_outputs: int
    plan_sha256: str = "p1"
    written: list[int] = field(default_factory=list)
    finish_files = ("total.txt",)

    def files(self, index: int) -> list[str]:
        return [f"out-{index}.txt"]

    def write(self, index: int) -> dict:
        (self.out / f"out-{index}.txt").write_text(f"{index * index}\n")
        self.written.append(index)
        return {"square": index * index}

    def finish(self, records: list[Record]) -> int:
        total = sum(r.data["square"] for r in records)
        (self.out / "total.txt").write_text(f"{total}\n")
        return total

    def marker(self) -> Marker:
        return Marker(
            "toy", "text", self.plan_sha256, (*(f"out-{i}.txt" for i in range(self.num_outputs)), "total.txt")
        )


def test_workers_cover_every_output_once_and_the_last_one_finishes_from_records(tmp_path):
    job = Toy(tmp_path, 7)
    take(tmp_path, job.marker())
    first = run(job, Worker(0, 2, 0, 2))  # task 0, rank 0 of 2 ranks: outputs 0, 4
    second = run(job, Worker(0, 2, 1, 2))  # 1, 5
    assert sorted(first.mine) == [0, 4] and sorted(second.mine) == [1, 5]
    assert not first.finished and not second.finished and not (tmp_path / "total.txt").exists()
    last = run(job, Worker(1, 2, 0, 2))  # 2, 6 of task 1
    assert not last.finished
    final = run(job, Worker(1, 2, 1, 2))  # 3: now every output is recorded
    assert final.finished_here and final.summary == sum(i * i for i in range(7))
    assert (tmp_path / "total.txt").read_text() == "91\n"
    record = json.loads((tmp_path / STATE_DIR / "records" / "000003.json").read_text())
    assert record["files"]["out-3.txt"]["sha256"] == file_sha256(tmp_path / "out-3.txt")
    assert record["plan_sha256"] == "p1" and record["data"] == {"square": 9}


def test_a_rerun_skips_recorded_outputs_and_redoes_missing_or_truncated_ones(tmp_path):
    job = Toy(tmp_path, 4)
    assert run(job, Worker(0, 1, 0, 1)).finished_here
    (tmp_path / "out-1.txt").unlink()
    (tmp_path / "out-2.txt").write_text("9")  # another size than recorded
    again = Toy(tmp_path, 4)
    outcome = run(again, Worker(0, 1, 0, 1))
    assert again.written == [1, 2] and outcome.skipped == 2
    assert outcome.finished and not outcome.finished_here  # finished once, not twice
    (tmp_path / "total.txt").unlink()
    assert run(Toy(tmp_path, 4), Worker(0, 1, 0, 1)).finished_here  # a removed finishing file is written again
    other = Toy(tmp_path, 4, plan_sha256="p2")  # another plan's records never count
    assert run(other, Worker(0, 1, 0, 1)).written == 4


def test_one_claim_wins_and_a_dead_holders_claim_is_taken_over(tmp_path):
    path = tmp_path / CLAIM
    assert _claim(path, "p") == "mine"
    assert _claim(path, "p") == "busy"  # held by a live process (this one)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held = json.loads(path.read_text()) | {"pid": int(dead.stdout)}
    path.write_text(json.dumps(held))
    assert _claim(path, "p") == "mine"
    path.write_text(json.dumps({"plan_sha256": "p", "done": True}))
    assert _claim(path, "p") == "done"


def test_a_folder_of_foreign_files_is_refused_by_name_and_left_as_it_was(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    marker = Toy(tmp_path, 2).marker()
    for overwrite in (False, True):
        with pytest.raises(UsageError, match=r"holds 1 file\(s\) that hpcdiff toy did not write \(notes.txt\)"):
            take(tmp_path, marker, overwrite)
    assert (tmp_path / "notes.txt").read_text() == "mine\n" and read_marker(tmp_path) is None


def test_same_plan_resumes_other_plan_needs_overwrite_which_removes_only_listed_files(tmp_path):
    job = Toy(tmp_path, 3)
    assert take(tmp_path, job.marker()) is False
    run(job, Worker(0, 1, 0, 1))
    (tmp_path / ".out-1.txt.abc123.tmp").write_text("left by a kill")
    assert take(tmp_path, job.marker()) is True
    other = Toy(tmp_path, 2, plan_sha256="p2")
    with pytest.raises(UsageError, match="another hpcdiff toy plan .* --overwrite"):
        take(tmp_path, other.marker())
    assert sorted(os.listdir(tmp_path)) == sorted([".hpcdiff", ".out-1.txt.abc123.tmp", *job.marker().files])
    assert take(tmp_path, other.marker(), overwrite=True) is False
    assert sorted(os.listdir(tmp_path)) == [".hpcdiff"] and read_marker(tmp_path) == other.marker()
    (tmp_path / "theirs.txt").write_text("x")
    with pytest.raises(UsageError, match=r"theirs.txt.*--overwrite included"):
        take(tmp_path, job.marker(), overwrite=True)
    assert (tmp_path / "theirs.txt").exists()


def test_another_commands_folder_is_refused_even_with_overwrite(tmp_path):
    take(tmp_path, Marker("ingest", "shards", "a", ("shard-00000.h5",)))
    (tmp_path / "shard-00000.h5").write_bytes(b"data")
    with pytest.raises(UsageError, match="holds the shards of `hpcdiff ingest`.*not even with --overwrite"):
        take(tmp_path, Marker("sample", "shards", "b", ("shard-00000.h5",)), overwrite=True)
    assert (tmp_path / "shard-00000.h5").read_bytes() == b"data"


def test_plan_digest_is_canonical():
    assert digest({"a": 1, "b": [1.5, "x"]}) == digest({"b": [1.5, "x"], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
