"""quality in blocks (the same summary whatever the block size, so memory can stay flat at 1 mm), and the cohort
metrics on real shards: MMD, diversity (3D MS-SSIM between pairs) and the ventricle-volume-on-age slope."""

import json

import numpy as np
import pytest
import torch

from hpcdiff import quality
from hpcdiff.data.shards import ShardSet
from hpcdiff.models import ms_ssim
from hpcdiff.quality_cohort import age_slope, pair_ms_ssim
from tests.stats_data import write_cohort_shards


def test_running_moments_equal_numpy_over_uneven_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (23, 4, 5, 6)).astype(np.float32)
    summary = quality.Summary((4, 5, 6))
    for lo, hi in ((0, 1), (1, 8), (8, 9), (9, 23)):
        summary.add(x[lo:hi], factor=2)
    np.testing.assert_allclose(summary.mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(summary.std, x.astype(np.float64).std(0), rtol=1e-10)
    np.testing.assert_array_equal(summary.features, quality.downsample(x, 2))
    assert len(summary.shown) == quality.SHOWN


def test_block_size_follows_the_voxel_count():
    one_mm = 160 * 224 * 160
    assert quality.block_size(one_mm) * one_mm * 8 <= quality.BLOCK_BYTES
    assert quality.block_size(40 * 48 * 40) >= 64
    assert quality.block_size(10**12) == 1


def test_summary_does_not_depend_on_the_block_size(tmp_path, monkeypatch):
    write_cohort_shards(tmp_path / "real", num_subjects=12, seed=1)
    write_cohort_shards(tmp_path / "synth", num_subjects=10, seed=2)
    whole = quality.quality(tmp_path / "real", tmp_path / "synth", tmp_path / "q1")
    voxels = int(np.prod(json.loads((tmp_path / "real" / "manifest.json").read_text())["shape"]))
    monkeypatch.setattr(quality, "BLOCK_BYTES", 3 * 8 * voxels)  # blocks of 3 subjects
    blocked = quality.quality(tmp_path / "real", tmp_path / "synth", tmp_path / "q2")
    for key, value in whole["mmd"].items():
        assert blocked["mmd"][key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
    for key, value in whole["maps"].items():
        assert blocked["maps"][key] == pytest.approx(value, rel=1e-9), key


CUBE = (28, 28, 28)  # three MS-SSIM scales with the 7-voxel window


def test_ms_ssim_is_one_for_a_volume_and_itself_and_falls_with_noise():
    x = torch.rand(2, 1, *CUBE)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2))
    noisy = [float(ms_ssim(x, (x + s * torch.randn_like(x)).clamp(0, 1))[0]) for s in (0.05, 0.2, 0.5)]
    assert 1 > noisy[0] > noisy[1] > noisy[2] >= 0
    assert torch.allclose(ms_ssim(x[:, :, :8, :8, :8], x[:, :, :8, :8, :8]), torch.ones(2))  # one scale


def test_identical_cohorts_agree_and_a_noised_one_differs(tmp_path):
    write_cohort_shards(tmp_path / "real", num_subjects=12, shape=CUBE, seed=1, age_effect=-0.015)
    write_cohort_shards(tmp_path / "noised", num_subjects=12, shape=CUBE, seed=1, age_effect=-0.015, noise=0.4)
    same = quality.quality(tmp_path / "real", tmp_path / "real", tmp_path / "q-same")
    noised = quality.quality(tmp_path / "real", tmp_path / "noised", tmp_path / "q-noised")
    # The unbiased MMD^2 of a set against itself is -2 (1 - mean off-diagonal kernel) / n: at most 0, -> 0 with n.
    n, mmd_same = 12, same["mmd"]["mmd2_synthetic_vs_real"]
    assert -2 / n <= mmd_same <= 0
    assert noised["mmd"]["mmd2_synthetic_vs_real"] > 0.1
    assert same["diversity"]["difference"] == 0.0
    assert noised["diversity"]["ms_ssim_synthetic_pairs"] < same["diversity"]["ms_ssim_real_pairs"] - 0.05
    cond = same["conditioning"]
    assert cond["same_sign"] and cond["synthetic"] == cond["real"]
    assert json.loads((tmp_path / "q-noised" / "summary.json").read_text())["diversity"] == noised["diversity"]


def test_a_collapsed_cohort_has_pair_ms_ssim_near_one(tmp_path):
    write_cohort_shards(tmp_path / "same", 8, CUBE, seed=3, group_effect=0.0, age_effect=0.0, noise=0.0)
    with ShardSet.open(tmp_path / "same") as shards:
        assert pair_ms_ssim(shards, range(8)) > 0.99


@pytest.mark.parametrize(("age_effect", "sign"), [(-0.025, 1), (0.025, -1)])
def test_larger_ventricles_at_higher_age_give_a_positive_slope_and_the_reverse_a_negative(tmp_path, age_effect, sign):
    write_cohort_shards(tmp_path / "c", 24, CUBE, seed=4, age_effect=age_effect)
    with ShardSet.open(tmp_path / "c") as shards:
        fit = age_slope(shards, range(24))
        assert age_slope(shards, range(24), covariate="height") is None
    assert np.sign(fit["slope_ml_per_unit"]) == sign and abs(fit["pearson_r"]) > 0.5
