"""Bad inputs to the data and system commands: the promised exit code, a message naming the file and the fix, and
everything that was there before left byte-identical.

Root ignores file modes, so read-only cases use a read-only bind mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from hpcdiff.atomic import file_sha256
from hpcdiff.batch import STATE_DIR
from hpcdiff.data.cohort import make_cohort
from hpcdiff.data.ingest import ingest
from hpcdiff.data.shards import QUARANTINE
from hpcdiff.errors import EXIT_BAD_DATA, EXIT_NO_SPACE, EXIT_USAGE, ConfigError, DataError
from hpcdiff.launch.slurm.sbatch import SlurmOptions
from tests.datagen import job_yaml
from tests.harness import HPCDIFF, assert_ok, child_env, hpcdiff, require

SHAPE = (16, 20, 16)
GRID = ["--shape", *SHAPE, "--subjects-per-shard", 2]


def snapshot(root) -> dict[str, str]:
    """Every file under ``root`` by relative path (symlinks by target): what "byte-identical after" compares."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = file_sha256(path)
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    make_cohort(root, 6, SHAPE, seed=1)
    return root


@contextlib.contextmanager
def read_only(folder):
    """``folder`` bind-mounted read-only onto a sibling path (root ignores file modes, not a read-only mount)."""
    view = folder.with_name(folder.name + "-ro")
    view.mkdir()
    bind = subprocess.run(["mount", "--bind", folder, view], capture_output=True, text=True, check=False)
    if bind.returncode != 0:
        view.rmdir()
        require("rofs", False, f"a read-only bind mount needs root with CAP_SYS_ADMIN: {bind.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", view], check=True)
        yield view
    finally:
        subprocess.run(["umount", view], check=True)
        view.rmdir()


def _bad_header(path, srow_x):
    """A NIfTI whose only spatial transform (sform) has ``srow_x`` as its first row."""
    img = nib.load(path)
    data, header = np.asanyarray(img.dataobj), img.header.copy()
    header["qform_code"], header["sform_code"], header["srow_x"] = 0, 2, srow_x
    path.unlink()
    nib.Nifti1Image(data, None, header).to_filename(path)


def test_one_bad_input_goes_to_quarantine_and_the_rest_is_ingested(cohort, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(cohort, bids, symlinks=True)
    images = sorted(bids.glob("sub-*/anat/*_T1w.nii*"))
    images[0].unlink()
    images[0].symlink_to("missing.nii.gz")  # dangling
    images[1].unlink()
    images[1].symlink_to(images[1].name)  # a loop onto itself
    _bad_header(images[2], [np.nan, 0, 0, 0])
    _bad_header(images[3], [0, 0, 0, 0])
    before = snapshot(bids)
    proc = hpcdiff("ingest", bids, "--out", tmp_path / "out", *GRID, timeout=300)
    assert_ok(proc)
    assert "2 subjects in 3 shards" in proc.stdout and "4 quarantined" in proc.stdout
    reasons = (tmp_path / "out" / QUARANTINE).read_text().splitlines()[1:]
    assert [r.split("\t")[1] for r in reasons] == ["sub-0001", "sub-0002", "sub-0003", "sub-0004"]
    assert "No such file or directory (a symbolic link to nothing" in reasons[0]
    assert "Too many levels of symbolic links" in reasons[1]
    assert "affine" in reasons[2] and "NaN" in reasons[2] and "singular" in reasons[3]
    assert snapshot(bids) == before


def test_an_ingest_without_subjects_is_an_error(cohort, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "participants.tsv").write_text("participant_id\tage\nsub-01\t40\n")
    with pytest.raises(DataError, match=r"empty: no T1w images found; .* check the folder is the dataset's root"):
        ingest(empty, tmp_path / "o1", SHAPE)
    broken = tmp_path / "broken"
    shutil.copytree(cohort, broken)
    for image in broken.glob("sub-*/anat/*_T1w.nii*"):
        image.write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=rf"all 6 input\(s\) were refused, with the reasons in .*{QUARANTINE}"):
        ingest(broken, tmp_path / "o2", SHAPE, subjects_per_shard=6)
    assert not (tmp_path / "o2" / "manifest.json").exists()


@pytest.mark.parametrize("attempt", range(3))
def test_a_full_disk_during_ingest_exits_74_every_time(cohort, tmp_path, attempt):
    """The segfault (139) after the message was intermittent: run it several times."""
    limited = ["bash", "-c", 'ulimit -f 8 && exec "$@"', "limited", *HPCDIFF]
    before = snapshot(cohort)
    proc = subprocess.run(
        [*limited, "ingest", str(cohort), "--out", str(tmp_path / "out"), *map(str, GRID)],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        check=False,
    )
    assert_ok(proc, EXIT_NO_SPACE)
    assert f"File too large writing {tmp_path / 'out'}/shard-00000.h5" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    left = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != STATE_DIR)  # the job's own records
    assert left == []  # no temporary file left behind
    assert snapshot(cohort) == before


def test_bad_grid_arguments_exit_2_with_the_reason(cohort, tmp_path):
    proc = hpcdiff("ingest", cohort, "--out", tmp_path / "a", "--spacing", "nan")
    assert_ok(proc, EXIT_USAGE)
    assert "--spacing must be a positive number of mm, got nan" in proc.stderr
    proc = hpcdiff("ingest", cohort, "--out", tmp_path / "b", "--shape", 4000, 4000, 4000)
    assert_ok(proc, EXIT_USAGE)
    assert "--shape 4000 4000 4000 needs about" in proc.stderr and "GiB of memory" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_any_job_too_big_for_memory_exits_2_saying_how_much(tmp_path):
    """Not only ingest's checked grid: a MemoryError anywhere ends with numpy's size, not a traceback."""
    proc = hpcdiff("cohort", "--out", tmp_path / "c", "--subjects", 1, "--shape", 4000, 4000, 4000)
    assert_ok(proc, EXIT_USAGE)
    assert "out of memory (Unable to allocate" in proc.stderr and "GiB" in proc.stderr
    assert "use a smaller --shape" in proc.stderr and "Traceback" not in proc.stderr


def test_exporting_an_empty_shard_set_exits_3(cohort, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cohort, broken)
    for image in sorted(broken.glob("sub-*/anat/*_T1w.nii*"))[:2]:
        image.write_bytes(b"not a nifti")
    keep = {"sub-0003", "sub-0004", "sub-0005", "sub-0006"}
    for sub in keep:
        shutil.rmtree(broken / sub)
    tsv = broken / "participants.tsv"
    tsv.write_text("".join(line + "\n" for line in tsv.read_text().splitlines() if line.split("\t")[0] not in keep))
    assert_ok(hpcdiff("ingest", broken, "--out", tmp_path / "shards", *GRID), EXIT_BAD_DATA)
    # The same refusal, as an ingest that wrote its manifest before this check existed leaves it: 0 subjects.
    from hpcdiff.data.shards import write_manifest

    write_manifest(
        tmp_path / "shards",
        shape=SHAPE,
        spacing=(1.0,) * 3,
        affine=np.eye(4),
        covariates={},
        shards=[],
        provenance={},
        subjects={"id": [], "session": [], "source_path": [], "source_sha256": []},
    )
    proc = hpcdiff("export", tmp_path / "shards", "--out", tmp_path / "nifti")
    assert_ok(proc, EXIT_BAD_DATA)
    assert f"{tmp_path / 'shards'} holds no subjects" in proc.stderr and "nothing to export" in proc.stderr


def test_an_output_folder_on_a_read_only_file_system_exits_2(cohort, tmp_path):
    target = tmp_path / "disk"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    with read_only(target) as view:
        proc = hpcdiff("ingest", cohort, "--out", view / "shards", *GRID)
        assert_ok(proc, EXIT_USAGE)
        assert f"{view / 'shards'}: Read-only file system; the file system is mounted read-only" in proc.stderr
        job = job_yaml(tmp_path / "job.yaml", tmp_path / "shards")
        proc = hpcdiff("train", job, "--run-dir", view / "run")
        assert_ok(proc, EXIT_USAGE)
        assert f"{view / 'run'}: Read-only file system" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(target) == {"keep.txt": file_sha256(target / "keep.txt")}


def test_cluster_aws_init_onto_a_file_exits_2_and_keeps_it(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    proc = hpcdiff(
        "cluster", "aws", "init", "--out", target, "--bucket", "my-bucket", "--subnet", "subnet-0123abcd",
        "--region", "us-east-1",
    )  # fmt: skip
    assert_ok(proc, EXIT_USAGE)
    assert f"--out {target} is a file, not a folder" in proc.stderr
    assert target.read_text() == "my notes\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("bad", ["1-25:99:99", "1-24", "10:60", "1:00:60", "-5", "1:2:3:4", "abc"])
def test_invalid_slurm_times_are_refused(bad):
    with pytest.raises(ConfigError, match=rf"time: '{bad}' is not a Slurm time limit"):
        SlurmOptions(time=bad)


@pytest.mark.parametrize("good", ["0", "90", "10:30", "2:00:00", "100:00:00", "1-0", "1-23:59", "7-23:59:59"])
def test_valid_slurm_times_are_kept(good):
    assert SlurmOptions(time=good).time == good


def _run_dir(root, status: bytes):
    root.mkdir()
    (root / "status.json").write_bytes(status)
    return root


def test_a_closed_pipe_ends_quietly_with_141(tmp_path):
    """`hpcdiff inspect RUN | head`: the reader leaves before we write."""
    run = _run_dir(tmp_path / "run", json.dumps({"state": "running", "step": 3}).encode())
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [*HPCDIFF, "inspect", str(run), "--json"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_a_corrupt_status_file_exits_3_naming_it(tmp_path):
    run = _run_dir(tmp_path / "run", b'{"state": "runn\xff')
    before = snapshot(run)
    proc = hpcdiff("status", run)
    assert_ok(proc, EXIT_BAD_DATA)
    assert f"{run / 'status.json'} is corrupt" in proc.stderr and "remove it and run again" in proc.stderr
    assert snapshot(run) == before
