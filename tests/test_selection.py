"""Covariate kinds as BIDS declares them, and which images of a subject go in (sessions, runs)."""

import json
import logging
import shutil
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest

from hpcdiff.data.cohort import make_cohort
from hpcdiff.data.covariate_kinds import column_kinds
from hpcdiff.data.covariates import read_bids_tsv
from hpcdiff.data.selection import select_images
from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import DataError, UsageError
from tests.harness import assert_ok, hpcdiff

ROWS = [
    {"participant_id": "sub-01", "age": "61", "sex": "0", "site": "1", "dx": "AD"},
    {"participant_id": "sub-02", "age": "n/a", "sex": "1", "site": "2", "dx": "CN"},
    {"participant_id": "sub-03", "age": "70.5", "sex": "", "site": "3", "dx": "n/a"},
]
COLUMNS = ["age", "sex", "site", "dx"]


def _table(root):
    lines = ["\t".join(["participant_id", *COLUMNS])] + [
        "\t".join(r[c] for c in ["participant_id", *COLUMNS]) for r in ROWS
    ]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return read_bids_tsv(root / "participants.tsv")


def test_participants_json_then_flags_then_guessing(tmp_path, caplog):
    (tmp_path / "participants.json").write_text(
        json.dumps({"sex": {"Levels": {"0": "female", "1": "male"}}, "age": {"Units": "years"}})
    )
    with caplog.at_level(logging.INFO):
        kinds = column_kinds(_table(tmp_path), COLUMNS, categorical=["site"])
    assert kinds == {"age": "continuous", "sex": "categorical", "site": "categorical", "dx": "categorical"}
    text = caplog.text
    assert "covariate sex: categorical (participants.json Levels)" in text
    assert "covariate age: continuous (participants.json Units 'years')" in text
    assert "covariate site: categorical (--categorical)" in text
    assert "covariate dx: categorical (guessed: not every value is a number)" in text


def test_a_guessed_numeric_code_is_continuous_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        kinds = column_kinds(_table(tmp_path), COLUMNS)
    assert kinds["sex"] == "continuous" and kinds["site"] == "continuous"
    assert "covariate sex has only the values ['0', '1']" in caplog.text and "--categorical sex" in caplog.text


def test_kind_flags_that_cannot_hold_are_refused(tmp_path):
    (tmp_path / "participants.json").write_text(json.dumps({"sex": {"Levels": {"0": "f", "1": "m"}}}))
    with pytest.raises(UsageError, match="declares it categorical"):
        column_kinds(_table(tmp_path), COLUMNS, continuous=["sex"])
    with pytest.raises(UsageError, match="not columns of participants.tsv"):
        column_kinds(_table(tmp_path), COLUMNS, categorical=["sitee"])
    with pytest.raises(UsageError, match="both"):
        column_kinds(_table(tmp_path), COLUMNS, categorical=["age"], continuous=["age"])
    with pytest.raises(DataError, match="'dx' is continuous .* holds 'AD'"):
        column_kinds(_table(tmp_path), COLUMNS, continuous=["dx"])
    (tmp_path / "participants.json").write_text("{not json")
    with pytest.raises(DataError, match="participants.json: not valid JSON"):
        column_kinds(_table(tmp_path), COLUMNS)


@dataclass(frozen=True)
class Img:
    subject: str
    session: str
    source_path: str


def _img(sub, ses, name):
    return Img(sub, ses, "/".join(p for p in (sub, ses, "anat", name) if p))


IMAGES = [
    _img("sub-1", "ses-10", "sub-1_ses-10_T1w.nii.gz"),
    _img("sub-1", "ses-2", "sub-1_ses-2_run-1_T1w.nii.gz"),
    _img("sub-1", "ses-2", "sub-1_ses-2_run-10_T1w.nii.gz"),
    _img("sub-1", "ses-2", "sub-1_ses-2_run-2_T1w.nii.gz"),
    _img("sub-2", "", "sub-2_acq-a_T1w.nii.gz"),
    _img("sub-2", "", "sub-2_acq-b_T1w.nii.gz"),
    _img("sub-3", "ses-2", "sub-3_ses-2_T1w.nii.gz"),
]


def _paths(selection):
    return [[im.source_path.rsplit("/", 1)[1] for im in g] for g in selection.groups]


def test_runs_first_last_all_and_sessions(caplog):
    with caplog.at_level(logging.INFO):
        last = select_images(IMAGES)
    assert _paths(last) == [
        ["sub-1_ses-10_T1w.nii.gz"],
        ["sub-1_ses-2_run-10_T1w.nii.gz"],  # runs sort as numbers
        ["sub-2_acq-a_T1w.nii.gz", "sub-2_acq-b_T1w.nii.gz"],  # not runs: left for ingest to quarantine
        ["sub-3_ses-2_T1w.nii.gz"],
    ]
    assert "sub-1 ses-2: 3 runs; --run last keeps sub-1/ses-2/anat/sub-1_ses-2_run-10_T1w.nii.gz" in caplog.text
    assert len(last.not_chosen) == 2
    assert _paths(select_images(IMAGES, run="first"))[1] == ["sub-1_ses-2_run-1_T1w.nii.gz"]
    assert len(select_images(IMAGES, run="all").groups) == 6
    first = select_images(IMAGES, session="first")
    assert [g[0].session for g in first.groups] == ["ses-2", "", "ses-2"]  # ses-2 before ses-10
    only = select_images(IMAGES, session="10")
    assert _paths(only) == [["sub-1_ses-10_T1w.nii.gz"]] and len(only.not_chosen) == 6
    with pytest.raises(UsageError, match="sessions found: \\['ses-2', 'ses-10'\\]"):
        select_images(IMAGES, session="ses-3")


@pytest.fixture(scope="module")
def lab_bids(tmp_path_factory):
    """A cohort as a lab writes it: sex coded 0/1 (declared), a numeric site code, two runs of one subject."""
    root = tmp_path_factory.mktemp("lab") / "bids"
    make_cohort(root, 4, (24, 28, 24), seed=4)
    anat = root / "sub-0001" / "anat"
    img = nib.load(anat / "sub-0001_T1w.nii.gz")
    data = np.asarray(img.dataobj)
    (anat / "sub-0001_T1w.nii.gz").rename(anat / "sub-0001_run-1_T1w.nii.gz")
    nib.save(nib.Nifti1Image(np.roll(data, 2, axis=0), img.affine), anat / "sub-0001_run-2_T1w.nii.gz")
    rows = ["participant_id\tage\tsex\tsite"] + [f"sub-{i:04d}\t{60 + i}\t{i % 2}\t{10 + i % 2}" for i in range(1, 5)]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    (root / "participants.json").write_text(json.dumps({"sex": {"Levels": {"0": "female", "1": "male"}}}))
    return root


def test_ingest_takes_kinds_from_participants_json_and_picks_one_run(lab_bids, tmp_path):
    args = ["--shape", 24, 28, 24, "--categorical", "site"]
    proc = hpcdiff("ingest", lab_bids, "--out", tmp_path / "last", *args)
    assert_ok(proc)
    assert "covariate sex: categorical (participants.json Levels)" in proc.stderr
    assert "covariate site: categorical (--categorical)" in proc.stderr
    assert "sub-0001: 2 runs; --run last keeps sub-0001/anat/sub-0001_run-2_T1w.nii.gz" in proc.stderr
    shards = ShardSet.open(tmp_path / "last")
    cov = shards.manifest["covariates"]
    assert cov["sex"] == {"kind": "categorical", "levels": ["0", "1"]}
    assert cov["site"] == {"kind": "categorical", "levels": ["10", "11"]}
    assert cov["age"]["kind"] == "continuous"
    table = shards.subjects()
    assert list(table["id"]) == [f"sub-{i:04d}" for i in range(1, 5)]
    assert table["source_path"][0] == "sub-0001/anat/sub-0001_run-2_T1w.nii.gz"
    proc = hpcdiff("ingest", lab_bids, "--out", tmp_path / "all", *args, "--run", "all")
    assert_ok(proc)
    table = ShardSet.open(tmp_path / "all").subjects()
    assert list(table["source_path"][:2]) == [
        "sub-0001/anat/sub-0001_run-1_T1w.nii.gz",
        "sub-0001/anat/sub-0001_run-2_T1w.nii.gz",
    ]


def test_a_copy_without_runs_is_still_a_duplicate(lab_bids, tmp_path):
    root = tmp_path / "bids"
    shutil.copytree(lab_bids, root)
    anat = root / "sub-0002" / "anat"
    shutil.copy(anat / "sub-0002_T1w.nii.gz", anat / "sub-0002_acq-fast_T1w.nii.gz")
    proc = hpcdiff("ingest", root, "--out", tmp_path / "s", "--shape", 24, 28, 24)
    assert_ok(proc)
    quarantine = (tmp_path / "s" / "quarantine.tsv").read_text()
    assert quarantine.count("duplicate id sub-0002") == 2
