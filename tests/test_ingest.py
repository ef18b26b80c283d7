import csv
import gzip
import json
import random
import shutil
import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest

from hpcdiff.atomic import file_sha256
from hpcdiff.batch import task_of
from hpcdiff.data.cohort import make_cohort
from hpcdiff.data.shards import MANIFEST, QUARANTINE, ShardSet, shard_name
from tests.harness import HPCDIFF, assert_ok, child_env, hpcdiff, mpirun

SHAPE = (24, 28, 24)
ARGS = ["--shape", *SHAPE, "--subjects-per-shard", 2]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids with space")
    make_cohort(root, 7, SHAPE, seed=5)
    return root


def _digest(out):
    """Everything an ingest leaves behind, by name: the manifest text and every file's checksum."""
    return {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()}


def _ingest(bids, out, *extra, timeout=300):
    return hpcdiff("ingest", bids, "--out", out, *ARGS, *extra, timeout=timeout)


def test_ingest_writes_conformed_normalised_shards(cohort, tmp_path):
    proc = _ingest(cohort, tmp_path / "s")
    assert_ok(proc)
    assert "7 subjects in 4 shards" in proc.stdout and "0 quarantined" in proc.stdout
    shards = ShardSet.open(tmp_path / "s", verify=True)
    m = shards.manifest
    assert m["shape"] == list(SHAPE) and m["num_subjects"] == 7 and m["dtype"] == "float16"
    assert [s["num_subjects"] for s in m["shards"]] == [2, 2, 2, 1]
    assert m["covariates"]["sex"] == {"kind": "categorical", "levels": sorted(set(shards.subjects()["sex"]))}
    assert m["covariates"]["age"]["kind"] == "continuous"
    ages = shards.subjects()["age"]
    assert m["covariates"]["age"]["min"] == ages.min() and m["covariates"]["age"]["max"] == ages.max()
    table = shards.subjects()
    assert list(table["id"]) == [f"sub-{i:04d}" for i in range(1, 8)]
    with open(cohort / "participants.tsv", newline="") as f:
        rows = {r["participant_id"]: r for r in csv.DictReader(f, delimiter="\t")}
    for i, sid in enumerate(table["id"]):
        assert float(rows[sid]["age"]) == table["age"][i] and rows[sid]["group"] == table["group"][i]
        assert table["source_sha256"][i] == file_sha256(cohort / table["source_path"][i])
    vols = shards.read_many(range(7))
    assert vols.min() >= 0 and vols.max() <= 1 and vols.mean() > 0.05
    # Same grid as the input here, so the conformed volume correlates tightly with the source image.
    src = nib.load(cohort / table["source_path"][0]).get_fdata()
    assert np.corrcoef(src.ravel(), vols[0, 0].ravel())[0, 1] > 0.9
    assert (tmp_path / "s" / QUARANTINE).read_text() == "source_path\tsubject\treason\n"


@pytest.mark.mpi
def test_one_rank_and_two_ranks_give_identical_shards(cohort, tmp_path):
    assert_ok(_ingest(cohort, tmp_path / "one"))
    proc = mpirun(2, [*HPCDIFF, "ingest", cohort, "--out", tmp_path / "two", *ARGS], timeout=300)
    assert_ok(proc)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    a, b = ShardSet.open(tmp_path / "one"), ShardSet.open(tmp_path / "two")
    assert np.array_equal(a.read_many(range(7)), b.read_many(range(7)))
    assert all(np.array_equal(a.subjects()[k], b.subjects()[k]) for k in a.subjects())


def test_h5dump_reads_an_ingested_shard(cohort, tmp_path):
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump not installed (apt-get install hdf5-tools)")
    assert_ok(_ingest(cohort, tmp_path))
    out = subprocess.run(
        ["h5dump", "-H", "-A", str(tmp_path / "shard-00000.h5")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "( 2, 1, 24, 28, 24 )" in out.stdout and 'DATASET "source_sha256"' in out.stdout


@pytest.mark.slow
def test_killed_ingest_reruns_to_the_same_result(cohort, tmp_path):
    assert_ok(_ingest(cohort, tmp_path / "ref", "--subjects-per-shard", 1))
    out = tmp_path / "killed"
    delay = random.Random().uniform(2.0, 9.0)
    cmd = [*HPCDIFF, "ingest", cohort, "--out", out, *ARGS, "--subjects-per-shard", 1]
    proc = subprocess.Popen(list(map(str, cmd)), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert_ok(_ingest(cohort, out, "--subjects-per-shard", 1))
    assert _digest(out) == _digest(tmp_path / "ref"), f"killed after {delay:.2f} s"
    assert (out / MANIFEST).read_text().replace(str(out), "") == (tmp_path / "ref" / MANIFEST).read_text()
    # A rerun over a finished directory skips every shard.
    proc = _ingest(cohort, out, "--subjects-per-shard", 1)
    assert_ok(proc)
    assert "0 written, 7 already complete" in proc.stdout


def _nifti(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) * 4 if affine is None else affine), path)


@pytest.fixture(scope="module")
def bad_bids(cohort, tmp_path_factory):
    """The cohort plus one input of every bad kind (and two good edge cases: a singleton 4D and two sessions)."""
    root = tmp_path_factory.mktemp("bad") / "bids"
    shutil.copytree(cohort, root)
    good = nib.load(root / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz")
    data, affine = good.get_fdata(dtype=np.float32), good.affine
    anat = lambda sid, ses="": root / sid / ses / "anat" / f"{sid}{'_' + ses if ses else ''}_T1w.nii.gz"  # noqa: E731
    full = gzip.compress(anat("sub-0002").read_bytes(), mtime=0)
    anat("sub-0002").write_bytes(gzip.compress(gzip.decompress(full))[: len(full) // 3])  # truncated
    nan = data.copy()
    nan[10, 10, 10] = np.nan
    _nifti(anat("sub-0101"), nan, affine)
    _nifti(anat("sub-0102"), np.stack([data, data], axis=-1), affine)  # 4D
    _nifti(anat("sub-0103"), data[..., None], affine)  # 4D with a singleton: squeezed, good
    _nifti(anat("sub-0104"), np.zeros_like(data), affine)  # empty
    _nifti(anat("sub-0105"), data, affine)  # no participants row
    _nifti(root / "sub-0003" / "anat" / "sub-0003_run-2_T1w.nii.gz", data, affine)  # duplicate image
    anat("sub-0106").parent.mkdir(parents=True)
    anat("sub-0106").write_text("this is not a NIfTI file\n")
    _nifti(anat("sub-0107"), data, affine)  # two participants rows
    _nifti(anat("sub-0108", "ses-01"), data, affine)
    _nifti(anat("sub-0108", "ses-02"), data * 1.1, affine)
    with open(root / "participants.tsv", "a") as f:
        for sid in ("sub-0101", "sub-0102", "sub-0103", "sub-0104", "sub-0106", "sub-0107", "sub-0107", "sub-0108"):
            f.write(f"{sid}\t60.0\tF\tcontrol\n")
    return root


def test_each_bad_input_is_quarantined_with_its_reason(bad_bids, tmp_path):
    proc = _ingest(bad_bids, tmp_path)
    assert_ok(proc)
    with open(tmp_path / QUARANTINE, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    reasons = {r["source_path"]: r["reason"] for r in rows}
    expected = {
        "sub-0002/anat/sub-0002_T1w.nii.gz": "unreadable",
        "sub-0101/anat/sub-0101_T1w.nii.gz": "NaN/Inf",
        "sub-0102/anat/sub-0102_T1w.nii.gz": "not 3D",
        "sub-0104/anat/sub-0104_T1w.nii.gz": "empty",
        "sub-0105/anat/sub-0105_T1w.nii.gz": "no row in participants.tsv",
        "sub-0003/anat/sub-0003_T1w.nii.gz": "duplicate id",
        "sub-0003/anat/sub-0003_run-2_T1w.nii.gz": "duplicate id",
        "sub-0106/anat/sub-0106_T1w.nii.gz": "unreadable",
        "sub-0107/anat/sub-0107_T1w.nii.gz": "duplicate id",
    }
    assert set(reasons) == set(expected), reasons
    for path, why in expected.items():
        assert why in reasons[path], (path, reasons[path])
    assert f"{len(expected)} quarantined" in proc.stdout and str(tmp_path / QUARANTINE) in proc.stdout
    table = ShardSet.open(tmp_path, verify=True).subjects()
    good = [f"sub-{i:04d}" for i in (1, 4, 5, 6, 7)] + ["sub-0103", "sub-0108", "sub-0108"]
    assert sorted(table["id"]) == sorted(good)
    sessions = sorted(s for i, s in zip(table["id"], table["session"]) if i == "sub-0108")
    assert sessions == ["ses-01", "ses-02"]


def test_quarantine_is_the_same_at_two_ranks(bad_bids, tmp_path):
    assert_ok(_ingest(bad_bids, tmp_path / "one"))
    assert_ok(mpirun(2, [*HPCDIFF, "ingest", bad_bids, "--out", tmp_path / "two", *ARGS], timeout=300))
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")


@pytest.mark.slow
def test_two_array_tasks_give_the_shards_quarantine_and_manifest_of_one_process(bad_bids, tmp_path):
    assert_ok(_ingest(bad_bids, tmp_path / "one"))
    num_shards = len(json.loads((tmp_path / "one" / MANIFEST).read_text())["shards"])
    assert num_shards >= 4
    out = tmp_path / "tasks"
    first = _ingest(bad_bids, out, "--task", 0, "--num-tasks", 2)
    assert_ok(first)
    assert "task 0 of 2" in first.stdout and "other workers' shards still missing" in first.stdout
    assert sorted(p.name for p in out.glob("shard-*.h5")) == [shard_name(i) for i in range(0, num_shards, 2)]
    assert not (out / MANIFEST).exists() and not (out / QUARANTINE).exists()
    # The second task takes its place from a Slurm array's variables (IDs need not start at 0) and finishes the job.
    array = {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "7", "SLURM_ARRAY_TASK_COUNT": "2"}
    second = hpcdiff("ingest", bad_bids, "--out", out, *ARGS, timeout=300, env=array)
    assert_ok(second)
    assert "9 quarantined" in second.stdout and f"in {num_shards} shards" in second.stdout
    assert _digest(out) == _digest(tmp_path / "one")
    # Both at once: each may find the other's shards done and write the same quarantine.tsv and manifest.
    racing = tmp_path / "racing"
    cmds = [[*HPCDIFF, "ingest", bad_bids, "--out", racing, *ARGS, "--task", t, "--num-tasks", 2] for t in (0, 1)]
    procs = [subprocess.Popen(list(map(str, c)), env=child_env(), stdout=subprocess.PIPE, text=True) for c in cmds]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert any("quarantined" in p.stdout.read() for p in procs)
    assert _digest(racing) == _digest(tmp_path / "one")


def test_task_options_default_to_the_slurm_array():
    assert task_of(None, None, {}) == (0, 1)
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert task_of(None, None, array) == (1, 3)
    assert task_of(2, 4, array) == (2, 4) and task_of(2, None, array) == (2, 1) and task_of(None, 5, array) == (1, 5)
    proc = hpcdiff("ingest", "/nowhere", "--out", "/nowhere", "--task", 2, "--num-tasks", 2)
    assert_ok(proc, 2)
    assert "--task 2 is outside 0..1" in proc.stderr


def test_strict_makes_any_quarantine_an_error(bad_bids, cohort, tmp_path):
    proc = _ingest(bad_bids, tmp_path / "bad", "--strict")
    assert_ok(proc, 3)
    assert "--strict" in proc.stderr and "quarantine" in proc.stderr
    assert not (tmp_path / "bad" / MANIFEST).exists()
    assert_ok(_ingest(cohort, tmp_path / "good", "--strict"))


def test_bad_arguments_and_missing_inputs_exit_with_the_contract_codes(cohort, tmp_path):
    assert_ok(hpcdiff("ingest", cohort), 2)  # --out missing
    assert_ok(hpcdiff("ingest", cohort, "--out", tmp_path, "--shape", 24, 28), 2)
    assert_ok(hpcdiff("ingest", cohort, "--out", tmp_path, "--subjects-per-shard", "x"), 2)
    assert_ok(hpcdiff("ingest", cohort, "--out", tmp_path, "--spacing", -1), 2)
    assert_ok(hpcdiff("ingest", cohort, "--out", tmp_path, "--frobnicate"), 2)
    proc = hpcdiff("ingest", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert_ok(proc, 3)
    assert "not a directory" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = hpcdiff("ingest", empty, "--out", tmp_path / "o")
    assert_ok(proc, 3)
    assert "participants.tsv is missing" in proc.stderr


def test_spacing_and_shape_change_the_grid(cohort, tmp_path):
    assert_ok(hpcdiff("ingest", cohort, "--out", tmp_path, "--shape", 16, 16, 16, "--spacing", 6, timeout=300))
    shards = ShardSet.open(tmp_path)
    assert shards.shape == (16, 16, 16) and shards.manifest["spacing"] == [6.0, 6.0, 6.0]
    np.testing.assert_allclose(np.diag(shards.affine)[:3], 6.0)
    assert json.loads((tmp_path / MANIFEST).read_text())["provenance"]["tool"] == "hpcdiff ingest"
