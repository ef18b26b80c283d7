"""`hpcdiff stats ...` end to end on real shards: planted effects recovered, outputs on the grid, bad input."""

import json

import nibabel as nib
import numpy as np
import pytest

from tests.harness import assert_ok, hpcdiff
from tests.stats_data import write_cohort_shards

pytestmark = pytest.mark.slow  # runs every stats command end to end: left out of `make test-quick`


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats cohort") / "shards"  # a space in the path on purpose
    truth = write_cohort_shards(root, num_subjects=40, lesion=7)
    return root, truth


def _map(path):
    img = nib.load(str(path))
    return img.get_fdata(), img.affine


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def _is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_template_maps_equal_numpy(cohort, tmp_path):
    root, truth = cohort
    out = tmp_path / "template"
    assert_ok(hpcdiff("stats", "template", root, "--out", out, "--block", 7))
    mean, affine = _map(out / "mean.nii.gz")
    std, _ = _map(out / "std.nii.gz")
    volumes = truth["images"][:, 0].astype(np.float16).astype(np.float64)  # what the shards hold
    np.testing.assert_allclose(mean, volumes.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, volumes.std(0, ddof=1), atol=1e-5)
    np.testing.assert_array_equal(affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    mask, _ = _map(out / "mask.nii.gz")
    assert mask.astype(bool).sum() == truth["brain"].sum()
    assert _is_png(out / "mean.png") and _is_png(out / "std.png")
    assert json.loads((out / "summary.json").read_text())["num_subjects"] == 40


def test_groupdiff_recovers_the_planted_group_and_age_effects(cohort, tmp_path):
    root, truth = cohort
    out = tmp_path / "groupdiff"
    proc = hpcdiff("stats", "groupdiff", root, "--group", "group", "--covariates", "age,sex", "--out", out, "--json")
    assert_ok(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"] == "glm" and summary["contrast"] == "AD - CN"
    assert summary["columns"] == ["intercept", "group[AD]", "age", "sex[M]"]
    brain = truth["brain"]
    d, affine = _map(out / "d.nii.gz")
    np.testing.assert_array_equal(affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    effect = truth["patch"] * 0.25
    assert _corr(d[brain], effect[brain]) > 0.8
    q, _ = _map(out / "q.nii.gz")
    significant = (q < 0.05) & brain
    assert significant[truth["patch"]].mean() > 0.8  # most of the patch is found...
    assert significant[brain & ~truth["patch"]].mean() < 0.05  # ...and little else
    t_age, _ = _map(out / "t_age.nii.gz")
    assert t_age[truth["ventricles"]].mean() < -5  # ventricles darken with age
    assert abs(t_age[brain & ~truth["ventricles"]].mean()) < 1
    for png in ("t.png", "d.png", "p_hist.png"):
        assert _is_png(out / png)


def test_groupdiff_welch_without_covariates(cohort, tmp_path):
    root, _ = cohort
    out = tmp_path / "welch"
    assert_ok(hpcdiff("stats", "groupdiff", root, "--group", "group", "--out", out))
    assert json.loads((out / "summary.json").read_text())["test"] == "welch"
    assert_ok(hpcdiff("stats", "groupdiff", root, "--group", "group", "--pooled", "--out", tmp_path / "pooled"))
    assert json.loads((tmp_path / "pooled" / "summary.json").read_text())["test"] == "pooled"


def test_gamma_fits_residual_variance_overall_and_per_region(cohort, tmp_path):
    root, _ = cohort
    out = tmp_path / "gamma"
    assert_ok(hpcdiff("stats", "gamma", root, "--covariates", "age,sex,group", "--out", out))
    summary = json.loads((out / "summary.json").read_text())
    # Noise sd 0.1 on intensity ~1: residual variance ~0.01, chi-square-like across voxels.
    assert summary["fit"]["shape"] * summary["fit"]["scale"] == pytest.approx(0.01, rel=0.2)
    assert len(summary["regions"]) == 8 and "R-A-S" in summary["regions"]
    assert _is_png(out / "gamma.png")
    sigma2, _ = _map(out / "residual_variance.nii.gz")
    assert (sigma2 > 0).sum() == summary["mask_voxels"]


def test_zscore_finds_the_lesioned_octant(cohort, tmp_path):
    root, truth = cohort
    out = tmp_path / "z"
    assert_ok(hpcdiff("stats", "zscore", root, "--subject", "sub-007", "--out", out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["most_deviant_regions"][0]["region"] == "R-A-S"  # last octant, diagonal positive affine
    assert summary["most_deviant_regions"][0]["mean_z"] > 3
    z, _ = _map(out / "z.nii.gz")
    assert z[truth["last_octant"]].mean() > 3 and abs(z[truth["brain"] & ~truth["last_octant"]].mean()) < 1
    assert_ok(hpcdiff("stats", "zscore", root, "--subject", "sub-008", "--out", tmp_path / "z8"))
    other = json.loads((tmp_path / "z8" / "summary.json").read_text())
    assert other["most_deviant_regions"][0]["mean_abs_z"] < 1.5


def test_compare_measures_a_weaker_synthetic_effect(cohort, tmp_path):
    root, _ = cohort
    synth = tmp_path / "synth"
    write_cohort_shards(synth, num_subjects=40, seed=5, group_effect=0.125)
    out = tmp_path / "compare"
    assert_ok(hpcdiff("stats", "compare", root, synth, "--out", out))
    s = json.loads((out / "summary.json").read_text())
    assert s["template_correlation"] > 0.9
    assert s["groupdiff_d_correlation"] > 0.5
    assert s["sign_agreement"] > 0.9
    assert 0.3 < s["effect_size_ratio"] < 0.8  # half the planted effect, measured with noise
    assert _is_png(out / "d_scatter.png")


def test_compare_measures_whether_the_synthetic_age_map_agrees(cohort, tmp_path):
    # The real cohort's ventricles darken with age; one synthetic cohort obeys that, one has it reversed.
    root, _ = cohort
    ages = {}
    for name, effect in (("obeys", -0.006), ("reversed", 0.006)):
        write_cohort_shards(tmp_path / name, num_subjects=40, seed=5, age_effect=effect)
        out = tmp_path / f"compare {name}"
        assert_ok(hpcdiff("stats", "compare", root, tmp_path / name, "--covariates", "age,sex", "--out", out))
        ages[name] = json.loads((out / "summary.json").read_text())["covariates"]["age"]
    assert ages["obeys"]["real_significant_voxels"] > 0
    assert ages["obeys"]["t_correlation"] > 0.3 and ages["obeys"]["sign_agreement"] > 0.9
    assert ages["reversed"]["t_correlation"] < -0.3 and ages["reversed"]["sign_agreement"] < 0.1


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["groupdiff", "{root}", "--group", "group", "--covariates", "age,agee"], 2, ["'agee'", "does not exist"]),
        (["groupdiff", "{root}", "--group", "nope"], 2, ["'nope'"]),
        (["groupdiff", "{one}", "--group", "group"], 3, ["'group'", "only one level"]),
        (["zscore", "{root}", "--subject", "sub-999"], 2, ["'sub-999'", "not found"]),
        (["compare", "{root}", "{other_grid}"], 3, ["manifest.json", "different grids"]),
        (["template", "{missing}"], 3, ["manifest.json"]),
        (["template", "{root}", "--backend", "spark"], 2, ["'spark'", "distributed"]),
        (["template", "{root}", "--block", "0"], 2, ["--block"]),
    ],
)
def test_bad_input_exits_with_a_clear_message(cohort, tmp_path_factory, args, code, words):
    root, _ = cohort
    base = tmp_path_factory.getbasetemp() / "stats bad input"
    paths = {"root": root, "one": base / "one", "other_grid": base / "other", "missing": base / "missing"}
    if not (base / "one").exists():
        write_cohort_shards(base / "one", num_subjects=8, groups=("CN",))
        write_cohort_shards(base / "other", num_subjects=8, shape=(10, 12, 10))
    argv = [a.format(**paths) for a in args]
    proc = hpcdiff("stats", *argv, "--out", base / "out")
    assert_ok(proc, code)
    for word in words:
        assert word in proc.stderr, proc.stderr
