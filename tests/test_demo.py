"""`make demo`'s pipeline end to end: cohort, ingest, training under mpirun -n 2, sampling, export, quality, stats."""

import json

import pytest

from tests.harness import assert_ok, hpcdiff

pytestmark = pytest.mark.mpi


def test_demo_runs_the_whole_pipeline_and_learns_something(tmp_path):
    out = tmp_path / "demo out"
    assert_ok(hpcdiff("demo", "--out", out, "--ranks", 2, timeout=900))
    status = json.loads((out / "run" / "status.json").read_text())
    assert status["state"] == "completed"
    mmd = json.loads((out / "quality" / "summary.json").read_text())["mmd"]
    # The trained model's samples sit closer to the real cohort than the mean-plus-noise baseline does.
    assert mmd["mmd2_synthetic_vs_real"] < mmd["mmd2_baseline_vs_real"]
    assert len(list((out / "nifti").glob("sub-*/anat/*.nii.gz"))) == 16
    groupdiff = json.loads((out / "stats" / "groupdiff" / "summary.json").read_text())
    assert sum(groupdiff["num_subjects"].values()) == 64  # both groups, every subject of the cohort
    for png in ("quality/montage.png", "stats/template/mean.png", "stats/groupdiff/t.png"):
        assert (out / png).stat().st_size > 0, png
