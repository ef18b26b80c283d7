"""Exit codes from the cause: passing I/O trouble says "retry" (75) and never "delete"; bad files exit 3 by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hpcdiff.data.shards import MANIFEST, ShardSet, shard_name
from hpcdiff.errors import EXIT_BAD_CHECKPOINT, EXIT_DIVERGED, NO_RETRY_EXITS, CheckpointError, DivergedError
from tests.datagen import blob_shards
from tests.harness import HPCDIFF, PYTHON, assert_ok, hpcdiff, mpirun, run


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return blob_shards(tmp_path_factory.mktemp("codes") / "shards", num_subjects=16, per_shard=1)


def _retry(proc, what: str) -> None:
    assert proc.returncode == 75, proc.stderr
    assert what in proc.stderr and "run the same command again" in proc.stderr
    assert "delete" not in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_too_many_open_files_exits_75_and_a_rerun_finishes(shards, tmp_path):
    out = tmp_path / "nifti"
    # export keeps one handle per shard open: 16 shards cannot fit under 12 descriptors.
    script = 'ulimit -n 12; exec "$@"'
    proc = run(["bash", "-c", script, "bash", PYTHON, "-m", "hpcdiff", "export", shards, "--out", out], timeout=300)
    _retry(proc, "EMFILE")
    assert_ok(hpcdiff("export", shards, "--out", out, timeout=300))
    assert len(list(out.glob("sub-*/anat/*.nii.gz"))) == 16


def test_an_io_error_exits_75_for_reads_and_verify(shards, tmp_path):
    eio = tmp_path / "eio"
    shutil.copytree(shards, eio)
    (eio / shard_name(3)).unlink()
    (eio / shard_name(3)).symlink_to("/proc/self/mem")  # reading it from offset 0 fails with EIO
    _retry(hpcdiff("verify", eio), "EIO")
    _retry(hpcdiff("export", eio, "--out", tmp_path / "out", timeout=300), "EIO")


@pytest.mark.mpi
def test_verify_names_every_bad_file_at_any_rank_count(shards, tmp_path):
    assert_ok(hpcdiff("verify", shards))
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    flipped = bytearray((bad / shard_name(2)).read_bytes())
    flipped[-100] ^= 0xFF
    (bad / shard_name(2)).write_bytes(bytes(flipped))
    (bad / shard_name(5)).write_bytes((bad / shard_name(5)).read_bytes()[:500])
    (bad / shard_name(9)).unlink()
    for proc in (hpcdiff("verify", bad), mpirun(2, [*HPCDIFF, "verify", bad])):
        assert proc.returncode == 3, proc.stderr
        for index, why in ((2, "sha256 "), (5, "sha256 "), (9, "missing")):
            assert f"{bad / shard_name(index)}: {why}" in proc.stderr
        assert shard_name(4) + ":" not in proc.stderr
    assert ShardSet.open(shards).num_subjects == 16 and (bad / MANIFEST).exists()


def test_diverged_and_unloadable_checkpoint_have_codes_no_runner_retries():
    assert DivergedError("x").exit_code == EXIT_DIVERGED and CheckpointError("x").exit_code == EXIT_BAD_CHECKPOINT
    assert {EXIT_DIVERGED, EXIT_BAD_CHECKPOINT} <= NO_RETRY_EXITS and 75 not in NO_RETRY_EXITS
    runner = (Path(__file__).parents[1] / "hpcdiff" / "launch" / "slurm" / "sbatch_runner.sh").read_text()
    assert "2 | 3 | 4 | 5 | 74)" in runner
