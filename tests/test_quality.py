"""quality in blocks: the same summary whatever the block size, so memory can stay flat at 1 mm."""

import json

import numpy as np
import pytest

from hpcdiff import quality
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
