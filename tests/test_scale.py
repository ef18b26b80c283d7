"""UK-Biobank scale without the machine: plans simulated in-process, and files opened counted under mpirun.

40,000 subjects on 1,024 ranks cannot run here, but who reads what is a pure function (the loader's stream, the
sliced data plan) and can be checked at that size; what a rank opens at start-up is counted with strace.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hpcdiff.batch import Worker
from hpcdiff.data.loader import rank_positions, stream_indices
from hpcdiff.data.shards import SUBJECTS_TABLE
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, PYTHON, ROOT, assert_ok, hpcdiff, mpirun, require

UKB_SUBJECTS = 40_000


def test_loader_order_at_1024_ranks_resumed_at_768_covers_each_position_once_per_epoch():
    n, batch, seed = UKB_SUBJECTS, 4, 11
    # (world size, steps): 1,024 ranks, a resume on 768 (nodes lost), then back on 1,024; about 2.5 epochs.
    phases = [(1024, 9), (768, 11), (1024, 9)]
    position, positions, subjects = 0, [], []
    for world, steps in phases:
        for _ in range(steps):
            for rank in range(world):
                span = rank_positions(position, rank, batch)
                positions.append(np.arange(span.start, span.stop))
                subjects.append(stream_indices(n, seed, span.start, len(span)))
            position += world * batch  # what the checkpoint stores: the only state a resume needs
    taken = np.concatenate(positions)
    order = np.argsort(taken, kind="stable")
    # Every stream position was given to exactly one rank, and none skipped, across both changes of world size.
    np.testing.assert_array_equal(taken[order], np.arange(taken.size))
    stream = np.concatenate(subjects)[order]
    epochs = taken.size // n
    assert epochs >= 2
    for e in range(epochs):
        np.testing.assert_array_equal(np.sort(stream[e * n : (e + 1) * n]), np.arange(n), err_msg=f"epoch {e}")
    # The partial epoch at the end has no subject twice.
    tail = stream[epochs * n :]
    assert len(np.unique(tail)) == tail.size


def test_sliced_data_plan_for_40000_outputs_on_100_tasks_of_8_ranks_covers_each_once():
    tasks, ranks = 100, 8
    counts = Counter()
    per_worker = []
    for task in range(tasks):
        for rank in range(ranks):
            mine = Worker(task, tasks, rank, ranks).indices(UKB_SUBJECTS)
            counts.update(mine)
            per_worker.append(len(mine))
    assert sorted(counts) == list(range(UKB_SUBJECTS)) and set(counts.values()) == {1}
    assert set(per_worker) == {UKB_SUBJECTS // (tasks * ranks)}  # and evenly: 50 each


@pytest.fixture(scope="module")
def many_small(tmp_path_factory) -> Path:
    """2,000 tiny volumes in 200 shards."""
    return blob_shards(tmp_path_factory.mktemp("many") / "shards", num_subjects=2000, shape=(8, 8, 8), per_shard=10)


@pytest.mark.mpi
def test_many_small_subjects_each_rank_opens_a_constant_number_of_files(many_small, tmp_path):
    require("strace", shutil.which("strace") is not None, "counts the files a rank opens (apt-get install strace)")
    batch, prefetch = 2, 1
    job = job_yaml(
        tmp_path / "job.yaml",
        many_small,
        data={"batch_size": batch, "prefetch": prefetch},
        train={"steps": 1, "checkpoint_every": 1},
    )
    traces = tmp_path / "traces"
    traces.mkdir()
    worker = ROOT / "tests" / "workers" / "straced.py"
    argv = [PYTHON, worker, traces, *HPCDIFF, "train", job, "--run-dir", tmp_path / "run", "--quiet"]
    assert_ok(mpirun(2, argv, timeout=240))
    opened = re.compile(r'openat\([^,]+, "([^"]+)", [^)]*\) = \d+')
    for rank in (0, 1):
        paths = [m.group(1) for m in opened.finditer((traces / f"rank{rank}.trace").read_text())]
        shards = {p for p in paths if Path(p).parent == many_small and p.endswith(".h5")}
        index = [p for p in paths if Path(p).name in ("manifest.json", SUBJECTS_TABLE) and Path(p).parent == many_small]
        # A one-step run reads its batch and, ahead of the next steps, at most prefetch + 1 more batches.
        assert 1 <= len(shards) <= (prefetch + 2) * batch, (rank, sorted(shards))
        assert len(index) <= 4, (rank, index)  # manifest and table, once for the loader, once for the checkpoint
    assert len(list(many_small.glob("shard-*.h5"))) == 200


def test_resume_on_other_shards_is_refused_naming_both_digests(tmp_path):
    shards = tmp_path / "shards"
    blob_shards(shards, num_subjects=8, per_shard=4)
    job = job_yaml(tmp_path / "job.yaml", shards, train={"steps": 2, "checkpoint_every": 2})
    run = tmp_path / "run"
    assert_ok(hpcdiff("train", job, "--run-dir", run, "--quiet"))
    before = json.loads((shards / "manifest.json").read_text())["subjects"]["data_sha256"]
    # Re-ingesting more subjects into the same folder: the stream positions now name other subjects.
    blob_shards(shards, num_subjects=10, per_shard=4)
    after = json.loads((shards / "manifest.json").read_text())["subjects"]["data_sha256"]
    assert before != after
    more = ("--allow-config-change", "--set", "train.steps=3")
    proc = hpcdiff("train", job, "--run-dir", run, "--quiet", *more)
    assert_ok(proc, 2)
    assert before in proc.stderr and after in proc.stderr and "--allow-data-change" in proc.stderr
    assert_ok(hpcdiff("train", job, "--run-dir", run, "--quiet", *more, "--allow-data-change"))
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [(e["old"], e["new"]) for e in events if e.get("event") == "data_change"] == [(before, after)]
