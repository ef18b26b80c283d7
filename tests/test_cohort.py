import csv
import json

import nibabel as nib
import numpy as np
import pytest

from hpcdiff.data.cohort import TRUTH_DIR, Anatomy, Effects, Subject, draw_subject, make_cohort
from tests.harness import HPCDIFF, assert_ok, hpcdiff, mpirun

SHAPE = (24, 28, 24)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.mpi
def test_cohort_is_deterministic_and_independent_of_the_rank_count(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(hpcdiff("cohort", "--out", one, "--subjects", 5, "--shape", *SHAPE, "--seed", 3, timeout=300))
    assert_ok(mpirun(2, [*HPCDIFF, "cohort", "--out", two, "--subjects", 5, "--shape", *SHAPE, "--seed", 3], 300))
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    assert a == b  # byte-identical, images, truth and tables alike
    img = nib.load(one / "sub-0005" / "anat" / "sub-0005_T1w.nii.gz")
    assert img.shape == SHAPE and img.get_data_dtype() == np.int16
    with open(one / "participants.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["participant_id"] for r in rows] == [f"sub-{i:04d}" for i in range(1, 6)]
    for i, row in enumerate(rows):
        subject = draw_subject(3, i)[0]
        assert (float(row["age"]), row["sex"], row["group"]) == (subject.age, subject.sex, subject.group)


def test_rerun_skips_existing_files_and_refuses_other_parameters(tmp_path):
    make_cohort(tmp_path, 2, SHAPE, seed=1)
    path = tmp_path / "sub-0002" / "anat" / "sub-0002_T1w.nii.gz"
    before = path.stat().st_mtime_ns
    path_1 = tmp_path / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz"
    kept = path_1.read_bytes()
    path_1.unlink()  # as if killed before this subject was written
    make_cohort(tmp_path, 2, SHAPE, seed=1)
    assert path.stat().st_mtime_ns == before and path_1.read_bytes() == kept
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))
    proc = hpcdiff("cohort", "--out", tmp_path, "--subjects", 2, "--shape", *SHAPE, "--seed", 2, timeout=300)
    assert_ok(proc, 2)
    assert "another hpcdiff cohort plan" in proc.stderr and "--overwrite" in proc.stderr


def test_planted_effects_sit_where_the_truth_maps_say():
    anatomy = Anatomy(SHAPE, Effects())
    truth = anatomy.truth_maps()
    # Atrophy: the same subject (same random draws) as a patient is darker inside the region, unchanged far away.
    subject, _ = draw_subject(0, 0)
    as_patient = anatomy.subject_image(Subject(subject.participant_id, 60.0, "F", "patient"), draw_subject(0, 0)[1])
    as_control = anatomy.subject_image(Subject(subject.participant_id, 60.0, "F", "control"), draw_subject(0, 0)[1])
    diff = as_patient.astype(np.float64) - as_control
    region = truth["atrophy_weight"] > 0.5
    far = (truth["atrophy_weight"] < 1e-3) & (truth["brain_mask"] > 0)
    assert region.sum() > 0 and diff[region].mean() < -50
    assert abs(diff[far].mean()) < 1
    # Age: ventricles grow, so the intensity change per year is negative around them and nowhere positive.
    ring = truth["age_effect"] < -1e-4
    assert ring.sum() > 0 and truth["age_effect"].max() <= 1e-6
    assert truth["group_effect"][region].mean() < -0.05 and np.abs(truth["group_effect"][far]).max() < 1e-3
    # Sex: males are bigger, so the male-minus-female map is positive at the brain's edge.
    assert truth["sex_effect"].sum() > 0


def test_truth_maps_are_written_with_a_description(tmp_path):
    make_cohort(tmp_path, 1, SHAPE, seed=0)
    root = tmp_path / TRUTH_DIR
    meta = json.loads((root / "truth.json").read_text())
    assert set(meta["maps"]) >= {"age_effect", "group_effect", "sex_effect", "ventricle_mask"}
    for name in meta["maps"]:
        img = nib.load(root / f"{name}.nii.gz")
        assert img.shape == SHAPE
        np.testing.assert_allclose(img.affine, meta["affine"], atol=1e-5)
    subject = nib.load(tmp_path / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz")
    np.testing.assert_allclose(subject.affine, meta["affine"], atol=1e-5)


def test_cohort_rejects_bad_arguments(tmp_path):
    assert_ok(hpcdiff("cohort", "--out", tmp_path, "--subjects", 0), 2)
    assert_ok(hpcdiff("cohort", "--out", tmp_path, "--subjects", 2, "--shape", 4, 4), 2)
    assert_ok(hpcdiff("cohort", "--out", tmp_path, "--subjects", 2, "--bogus"), 2)
