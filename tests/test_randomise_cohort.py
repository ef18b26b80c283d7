"""On the built-in cohort (`hpcdiff cohort` -> `hpcdiff ingest` -> `hpcdiff stats randomise`), the voxels that survive
FWE correction are the planted atrophy, and on the same cohort generated without the atrophy none survive.

The truth region is where the planted group effect reaches a tenth of its peak (18 voxels of 4,871 in the mask at
24x28x24); with 200 subjects and 200 permutations the FWE region (12 voxels) overlaps it with Dice 0.8.
"""

import json

import nibabel as nib
import numpy as np
import pytest
from nilearn.image import resample_to_img

from hpcdiff.cli import main
from hpcdiff.data.cohort import TRUTH_DIR, Effects, make_cohort

pytestmark = pytest.mark.slow

SUBJECTS, SHAPE = 200, ("24", "28", "24")
RANDOMISE = ["--group", "group", "--covariates", "age,sex", "--permutations", "200", "--seed", "4"]


def _randomise(tmp_path, name, effects=None):
    bids, shards, out = (tmp_path / f"{name}-{part}" for part in ("bids", "shards", "out"))
    if effects is None:
        assert main(["cohort", "--out", str(bids), "--subjects", str(SUBJECTS), "--shape", *SHAPE, "--seed", "1"]) == 0
    else:
        make_cohort(bids, SUBJECTS, tuple(map(int, SHAPE)), seed=1, effects=effects)
    assert main(["ingest", str(bids), "--out", str(shards), "--shape", *SHAPE]) == 0
    assert main(["stats", "randomise", str(shards), *RANDOMISE, "--out", str(out)]) == 0
    return bids, out


def test_fwe_region_is_the_planted_atrophy_and_nothing_survives_without_it(tmp_path):
    bids, out = _randomise(tmp_path, "planted")
    p_img = nib.load(out / "p_fwe.nii.gz")
    mask = nib.load(out / "mask.nii.gz").get_fdata() > 0
    truth_img = nib.load(bids / TRUTH_DIR / "group_effect.nii.gz")
    effect = resample_to_img(truth_img, p_img, interpolation="continuous", force_resample=True, copy_header=True)
    effect = np.abs(effect.get_fdata())
    truth = (effect >= 0.1 * effect.max()) & mask
    found = (p_img.get_fdata() <= 0.05) & mask
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    print(f"FWE region {found.sum()} voxels, truth {truth.sum()} voxels, Dice {dice:.2f}")
    assert found.sum() > 0 and dice >= 0.5, f"Dice {dice:.2f}: {found.sum()} FWE voxels, {truth.sum()} true"

    _, null_out = _randomise(tmp_path, "null", Effects(atrophy_fraction=0.0))
    summary = json.loads((null_out / "summary.json").read_text())
    assert summary["fwe"]["significant_voxels"] == 0
    assert summary["fwe"]["min_p"] > 0.05
