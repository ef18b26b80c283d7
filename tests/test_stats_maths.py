"""Statistics maths against reference libraries: scipy's t tests, FDR and gamma fit, nilearn's GLM."""

import dask.array as da
import numpy as np
import pytest
from scipy import stats as sps

from hpcdiff.errors import DataError, UsageError
from hpcdiff.stats import (
    Moments,
    build_design,
    fdr_bh,
    fit_gamma,
    glm_sums,
    group_maps,
    group_stats,
    normative_z,
    residual_variance,
    template,
)

SCHEMA = {
    "group": {"kind": "categorical", "levels": ["CN", "AD"]},
    "age": {"kind": "continuous"},
    "sex": {"kind": "categorical", "levels": ["F", "M"]},
    "site": {"kind": "categorical", "levels": ["a", "b", "c"]},
}


def _data(n=37, v=200, seed=0):
    rng = np.random.default_rng(seed)
    subjects = {
        "id": np.array([f"s{i}" for i in range(n)]),
        "group": np.array(["CN"] * 15 + ["AD"] * (n - 15)),
        "age": rng.uniform(20, 80, n),
        "sex": rng.choice(["F", "M"], n),
        "site": np.array(["a", "b", "c"])[np.arange(n) % 3],
    }
    y = 3.0 + rng.normal(size=(n, v)) * rng.uniform(0.5, 2.0, v)  # unequal variances across voxels
    y[15:, :40] += 0.9
    y += 0.02 * (subjects["age"][:, None] - 50)
    return subjects, y.astype(np.float32)


def _dask(y, block=7):
    return da.from_array(y, chunks=(block, y.shape[1]))


@pytest.mark.parametrize("pooled", [False, True])
def test_group_t_equals_scipy_ttest_ind(pooled):
    subjects, y = _data()
    design = build_design(subjects, SCHEMA, group="group")
    stats = group_stats(_dask(y), design, template(_dask(y)).mean)
    maps, test = group_maps(stats, design, pooled=pooled)
    yy = y.astype(np.float64)
    ref = sps.ttest_ind(yy[15:], yy[:15], equal_var=pooled)
    assert test == ("pooled" if pooled else "welch")
    np.testing.assert_allclose(maps["t"], ref.statistic, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps["p"], ref.pvalue, rtol=1e-5, atol=1e-8)
    if not pooled:
        np.testing.assert_allclose(maps["df"], ref.df, rtol=1e-6)
    pooled_sd = np.sqrt(((14 * yy[:15].var(0, ddof=1)) + (21 * yy[15:].var(0, ddof=1))) / 35)
    np.testing.assert_allclose(maps["d"], (yy[15:].mean(0) - yy[:15].mean(0)) / pooled_sd, rtol=1e-8)


def test_fdr_equals_scipy_false_discovery_control():
    p = np.random.default_rng(1).uniform(size=500) ** 3
    np.testing.assert_allclose(fdr_bh(p), sps.false_discovery_control(p, method="bh"), rtol=1e-12)
    with_nan = p.copy()
    with_nan[::7] = np.nan
    q = fdr_bh(with_nan)
    ok = ~np.isnan(with_nan)
    np.testing.assert_allclose(q[ok], sps.false_discovery_control(with_nan[ok]), rtol=1e-12)
    assert np.isnan(q[~ok]).all()


def test_glm_t_equals_nilearn_second_level_model(tmp_path):
    import nibabel as nib
    import pandas as pd
    from nilearn.glm.second_level import SecondLevelModel

    subjects, y = _data(v=4 * 5 * 6)
    design = build_design(subjects, SCHEMA, group="group", covariates=["age", "sex", "site"])
    stats = group_stats(_dask(y), design, template(_dask(y)).mean)
    maps, test = group_maps(stats, design)
    assert test == "glm"
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    images = [nib.Nifti1Image(row.reshape(4, 5, 6).astype(np.float32), affine) for row in y]
    frame = pd.DataFrame(design.x, columns=design.columns)
    model = SecondLevelModel(mask_img=nib.Nifti1Image(np.ones((4, 5, 6), np.int8), affine))
    model.fit(images, design_matrix=frame)
    for column, ours in (("group[AD]", maps["t"]), ("age", maps["t_age"]), ("site[c]", maps["t_site[c]"])):
        theirs = model.compute_contrast(column, output_type="stat").get_fdata().ravel()
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_moments_do_not_depend_on_blocks():
    _, y = _data(n=53)
    ref = y.astype(np.float64)
    for block in (1, 5, 16, 53):
        m = template(_dask(y, block))
        np.testing.assert_allclose(m.mean, ref.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m.std(), ref.std(0, ddof=1), rtol=1e-10)
    assert Moments.from_block(y[:0]).combine(Moments.from_block(y)).n == 53


def test_residual_variance_equals_lstsq():
    subjects, y = _data()
    design = build_design(subjects, SCHEMA, covariates=["age", "sex"])
    sigma2, df = residual_variance(_dask(y), design, np.zeros(y.shape[1]))
    yy = y.astype(np.float64)
    beta, *_ = np.linalg.lstsq(design.x, yy, rcond=None)
    assert df == y.shape[0] - 3
    np.testing.assert_allclose(sigma2, ((yy - design.x @ beta) ** 2).sum(0) / df, rtol=1e-8)


def test_normative_z_is_a_fit_on_the_others():
    subjects, y = _data()
    design = build_design(subjects, SCHEMA, covariates=["age", "sex", "group"])
    shift = y.mean(0).astype(np.float64)
    sums = glm_sums(_dask(y), design, shift)
    s = 11
    z = normative_z(sums, design.x[s], y[s] - shift)
    others = np.delete(np.arange(y.shape[0]), s)
    x_o, y_o = design.x[others], y[others].astype(np.float64)
    beta, *_ = np.linalg.lstsq(x_o, y_o, rcond=None)
    sigma = np.sqrt(((y_o - x_o @ beta) ** 2).sum(0) / (others.size - design.x.shape[1]))
    np.testing.assert_allclose(z, (y[s] - design.x[s] @ beta) / sigma, rtol=1e-7, atol=1e-9)


def test_gamma_fit_equals_scipy_gamma_fit():
    x = sps.gamma(4.2, scale=0.013).rvs(3000, random_state=2)
    ours = fit_gamma(x)
    shape, loc, scale = sps.gamma.fit(x, floc=0)
    assert loc == 0
    assert ours.shape == pytest.approx(shape, rel=1e-6)
    assert ours.scale == pytest.approx(scale, rel=1e-6)
    ks = sps.kstest(x, "gamma", args=(shape, 0, scale))
    assert ours.ks_statistic == pytest.approx(ks.statistic, rel=1e-4)
    assert ours.ks_pvalue > 0.05  # gamma data: the fit is not rejected
    assert fit_gamma(np.random.default_rng(0).uniform(0.5, 1.0, 3000)).ks_pvalue < 1e-3  # not gamma: rejected


def test_design_columns_and_errors():
    subjects, _ = _data()
    design = build_design(subjects, SCHEMA, group="group", covariates=["age", "site"])
    assert design.columns == ["intercept", "group[AD]", "age", "site[b]", "site[c]"]
    assert abs(design.x[:, 2].mean()) < 1e-12  # continuous covariates are centred
    with pytest.raises(UsageError, match="'agee' does not exist"):
        build_design(subjects, SCHEMA, group="group", covariates=["agee"])
    one = dict(subjects, group=np.array(["CN"] * len(subjects["id"])))
    with pytest.raises(DataError, match="'group' has only one level"):
        build_design(one, SCHEMA, group="group")
    with pytest.raises(UsageError, match="choose two with --levels"):
        build_design(subjects, SCHEMA, group="site")
    pair = build_design(subjects, SCHEMA, group="site", levels=["a", "c"])
    assert pair.levels == ("a", "c") and set(subjects["site"][pair.rows]) == {"a", "c"}
    with pytest.raises(UsageError, match="is continuous"):
        build_design(subjects, SCHEMA, group="age")


def test_subjects_per_task_follow_the_grid():
    from hpcdiff.stats.source import BLOCK_BYTES, MAX_BLOCK, block_for

    one_mm = 160 * 224 * 160
    assert block_for(one_mm) >= 1 and block_for(one_mm) * one_mm * 8 <= BLOCK_BYTES
    assert block_for(48 * 56 * 48) == MAX_BLOCK
    assert block_for(10**12) == 1


def test_reduction_holds_a_constant_number_of_blocks_and_summaries(tmp_path, monkeypatch):
    """Blocks read and summaries alive at once do not grow with the subjects (8 vs 48 blocks), on real shards."""
    import threading
    import weakref

    import dask

    from hpcdiff.data.shards import ShardSet
    from hpcdiff.stats import source
    from hpcdiff.stats.reduce import reduce_blocks
    from hpcdiff.stats.source import VoxelBlocks
    from tests.stats_data import write_cohort_shards

    write_cohort_shards(tmp_path, num_subjects=48, per_shard=16)
    shards = ShardSet.open(tmp_path)
    lock, live, peak = threading.Lock(), [0], [0]

    def release() -> None:
        with lock:
            live[0] -= 1

    def track(obj: object) -> None:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        weakref.finalize(obj, release)

    read_block = source._read_block

    def tracked_read(*args: object) -> np.ndarray:
        y = read_block(*args)
        track(y)
        return y

    monkeypatch.setattr(source, "_read_block", tracked_read)

    def summarise(y: np.ndarray) -> Moments:
        m = Moments.from_block(y)
        track(m.mean)
        return m

    peaks = {}
    for n in (8, 48):
        peak[0] = 0
        with dask.config.set(scheduler="threads", num_workers=2):
            m = reduce_blocks(VoxelBlocks(shards, np.arange(n), block=1), summarise)
        volumes = shards.read_many(range(n), dtype=np.float64).reshape(n, -1)
        np.testing.assert_allclose(m.mean, volumes.mean(0), atol=1e-12)
        peaks[n] = peak[0]
    # Two lanes: each holds its running summary, and a running task its block and that block's summary.
    assert peaks[48] <= 6 and peaks[8] <= 6, peaks
