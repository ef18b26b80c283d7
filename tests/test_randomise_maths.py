"""Permutation maths against references: nilearn's permuted_ols (same permutations, replayed), an explicit refit
of each permuted model, TFCE by its definition (flood fill) and nilearn's, calibration on skewed null data, and
the tail approximations against a 10x longer plain run."""

from collections import deque

import numpy as np
import pytest
from nilearn.mass_univariate import permuted_ols
from nilearn.mass_univariate._utils import calculate_tfce
from scipy import ndimage
from scipy import stats as sps

from hpcdiff.errors import DataError
from hpcdiff.stats.permtail import fit_tail
from hpcdiff.stats.permute import FreedmanLane, check_blocks, fwe_p, permutation, permuted_statistics
from hpcdiff.stats.tfce import TFCEOptions, tfce


def _cohort(n=30, v=400, seed=0, effect=2.5):
    rng = np.random.default_rng(seed)
    group = (np.arange(n) % 2).astype(float)
    age = rng.normal(size=n)
    y = rng.gamma(2.0, size=(n, v)) + effect * group[:, None] * (np.arange(v) < 25) + 0.3 * age[:, None]
    x = np.column_stack([np.ones(n), group, age - age.mean()])
    return x, y, group, age


def _nilearn_orders(seed, n_perm, n):
    """The design-row orders permuted_ols(n_jobs=1, random_state=seed) draws: it reshuffles the design each time."""
    chunk_seed = np.random.RandomState(seed).randint(1, np.iinfo(np.int32).max - 1)
    rng, order, orders = np.random.RandomState(chunk_seed), np.arange(n), []
    for _ in range(n_perm):
        order = order[rng.permutation(n)]
        orders.append(order)
    return np.array(orders)


@pytest.mark.parametrize("two_sided", [True, False])
def test_t_null_and_fwe_p_equal_nilearn_with_the_same_permutations(two_sided):
    x, y, group, age = _cohort()
    ref = permuted_ols(
        group[:, None], y, age[:, None], n_perm=300, two_sided_test=two_sided, random_state=3, output_type="dict"
    )
    model = FreedmanLane(x, [1], two_sided=two_sided)
    ours = permuted_statistics(y, model, _nilearn_orders(3, 300, x.shape[0]), block=7, batch=64)
    np.testing.assert_allclose(ours.stat, ref["t"][0], atol=1e-5)
    np.testing.assert_allclose(ours.max_null, ref["h0_max_t"][0], atol=1e-5)
    np.testing.assert_allclose(-np.log10(ours.p_fwe(model.ranked(ours.stat))), ref["logp_max_t"][0], atol=1e-5)
    p = ours.p_fwe(model.ranked(ours.stat))
    # a voxel's own exceedances are among the permutations whose maximum exceeds it: uncorrected p <= FWE p
    assert np.all(ours.exceed <= (ours.max_null[None, :] >= model.ranked(ours.stat)[:, None]).sum(axis=1))
    assert ours.exceed[:25].mean() < ours.exceed[25:].mean()
    assert np.median(p[:25]) < 0.05 and np.mean(p[25:] <= 0.05) < 0.02  # the planted voxels, mostly only them


def test_each_permuted_statistic_is_the_refit_of_the_permuted_nuisance_residuals():
    """Freedman-Lane by hand: residuals of Z, permuted, refitted on the full design (t and F)."""
    x, y, _, _ = _cohort(n=21, v=30, seed=1)
    orders = np.stack([permutation(5, k, 21) for k in range(4)])
    z = x[:, [0, 2]]
    e = y - z @ np.linalg.lstsq(z, y, rcond=None)[0]
    for tested in ([1], [1, 2]):
        model = FreedmanLane(x, tested)
        ee = np.einsum("nv,nv->v", e, e)
        got = model.statistics(model.products([(slice(0, 21), e)], orders), ee)
        for k, order in enumerate(orders):
            inverse = np.argsort(order)
            target = e[inverse]  # X[order] against e is X against e[order^-1]
            beta, rss_full = np.linalg.lstsq(x, target, rcond=None)[:2]
            if len(tested) == 1:
                g = np.linalg.inv(x.T @ x)
                want = beta[1] / np.sqrt(rss_full / 18 * g[1, 1])
            else:
                rest = x[:, [0]]
                rss_rest = np.sum((target - rest @ np.linalg.lstsq(rest, target, rcond=None)[0]) ** 2, axis=0)
                want = (rss_rest - rss_full) / 2 / (rss_full / 18)
            np.testing.assert_allclose(got[k], want, rtol=1e-9)


def test_permutation_k_is_a_pure_function_and_stays_within_blocks():
    blocks = np.repeat([0, 1, 2], [4, 5, 3])
    a = permutation(9, 17, 12, blocks)
    assert np.array_equal(a, permutation(9, 17, 12, blocks))
    assert not np.array_equal(a, permutation(9, 18, 12, blocks))
    assert np.array_equal(blocks[a], blocks)  # every row stays in its block
    assert sorted(a) == list(range(12))
    with pytest.raises(DataError, match="one subject per block"):
        check_blocks(np.arange(12), "id")


def _flood_fill_tfce(volume, height=2.0, extent=0.5, steps=100):
    """TFCE by its definition (fslmaths): at each step h, the size of v's 26-connected cluster above h."""
    top = volume.max()
    out = np.zeros_like(volume)
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
    for h in np.linspace(0, top, steps + 1)[1:]:
        seen = np.zeros(volume.shape, dtype=bool)
        for start in zip(*np.nonzero(volume >= h)):
            if seen[start]:
                continue
            cluster, queue = [], deque([start])
            seen[start] = True
            while queue:
                v = queue.popleft()
                cluster.append(v)
                for d in offsets:
                    w = tuple(np.add(v, d))
                    if all(0 <= w[i] < volume.shape[i] for i in range(3)) and not seen[w] and volume[w] >= h:
                        seen[w] = True
                        queue.append(w)
            for v in cluster:
                out[v] += len(cluster) ** extent * h**height
    return out


def _smooth_map(shape=(7, 8, 6), seed=2):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * 10


def test_tfce_equals_its_definition_at_26_connectivity():
    v = _smooth_map()
    ref = _flood_fill_tfce(v)
    np.testing.assert_allclose(tfce(v, TFCEOptions(), two_sided=False), ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("two_sided", [True, False])
def test_tfce_equals_nilearn_at_6_connectivity(two_sided):
    v = _smooth_map((12, 14, 12), seed=3)
    ref = calculate_tfce(v[..., None], ndimage.generate_binary_structure(3, 1), two_sided_test=two_sided)[..., 0]
    got = tfce(v, TFCEOptions(connectivity=6), two_sided=two_sided)
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


def test_fwe_rate_on_skewed_null_data_is_calibrated():
    """200 small null cohorts with gamma noise (shape 0.5: strongly skewed), unequal groups (5 vs 9): the max-t
    permutation test rejects at its nominal 5%; the parametric Bonferroni t test is reported beside it."""
    cohorts, n, v, n_perm = 200, 14, 40, 99
    x = np.column_stack([np.ones(n), (np.arange(n) < 5).astype(float)])
    model = FreedmanLane(x, [1])
    perm_hits = param_hits = 0
    for c in range(cohorts):
        y = np.random.default_rng(1000 + c).gamma(0.5, size=(n, v))
        orders = np.stack([permutation(c, k, n) for k in range(n_perm)])
        result = permuted_statistics(y, model, orders, block=n, batch=n_perm)
        perm_hits += result.p_fwe(model.ranked(result.stat)).min() <= 0.05
        param_hits += (2 * sps.t.sf(np.abs(result.stat), model.df)).min() * v <= 0.05
    low, high = sps.binom.ppf([0.005, 0.995], cohorts, 0.05) / cohorts
    perm_rate, param_rate = perm_hits / cohorts, param_hits / cohorts
    print(
        f"FWE rate at 0.05 over {cohorts} null cohorts: permutation {perm_rate:.3f} (99% MC interval "
        f"[{low:.3f}, {high:.3f}]), parametric Bonferroni t {param_rate:.3f}"
    )
    assert low <= perm_rate <= high


@pytest.mark.parametrize("method", ["gamma", "tail"])
def test_accelerated_fwe_p_agree_with_a_ten_times_longer_plain_run(method):
    x, y, group, _ = _cohort(n=40, v=300, seed=4, effect=0.0)
    y = y + group[:, None] * np.linspace(0.0, 3.0, 300)  # effects of every size: p-values across the range
    model = FreedmanLane(x, [1])
    n = x.shape[0]
    short = permuted_statistics(y, model, np.stack([permutation(1, k, n) for k in range(300)]))
    long = permuted_statistics(y, model, np.stack([permutation(2, k, n) for k in range(3000)]))
    ranked = model.ranked(short.stat)
    fit = fit_tail(short.max_null, method)
    accel = fit.sf(ranked)
    plain = fwe_p(ranked, long.max_null)
    resolved = plain >= 10 / 3000  # the long run resolves p down to ~10 / N
    if method == "tail":
        resolved &= ranked > fit.params["threshold"]  # where the tail fit, not the plain short p, answers
    assert resolved.sum() >= 5
    assert np.abs(np.log10(accel[resolved]) - np.log10(plain[resolved])).max() < 0.3
    assert accel.min() < 1 / 301  # below what 300 permutations can give
    assert fit.ks_pvalue > 0.01
