"""Quality at a glance: does a synthetic cohort look like held-out real subjects?

Five views, written to one folder: a montage of real and synthetic mid-slices; per-voxel mean and standard deviation
maps of both with their correlations; the maximum mean discrepancy (MMD) between the synthetic and the real subjects
on whole, average-pooled 3D volumes; diversity (mean 3D MS-SSIM between pairs, synthetic against real); and the
conditioning check (ventricle volume against the requested age; see ``quality_cohort``). An MMD alone means little,
so two references sit beside it, computed the same way: a trivial baseline (the real mean image plus Gaussian noise
of the real per-voxel standard deviation), which a useful model must beat, and halves of the real subjects against
each other (averaged over random splits), about as low as the number can go with this many subjects.

Memory does not grow with the number of subjects: volumes are read, summarised (running mean and variance,
downsampled rows for the MMD) and dropped in blocks sized from the voxel count, and the baseline's noise is drawn
block by block too (the same numbers as one draw: the generator fills arrays in order).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcdiff.data.loader import slice_indices
from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import DataError
from hpcdiff.quality_cohort import age_slope, pair_ms_ssim

log = logging.getLogger(__name__)

SLICE_RANGE = (0.3, 0.7)
"""Fractions of the slice axis a 2D model's training slices come from (the Loader's default)."""
MAX_DOWNSAMPLED = 16
"""Each axis is average-pooled down to at most this many voxels before the MMD (kernels suffer in high dimension)."""
BLOCK_BYTES = 256 << 20
"""Float64 bytes of one block of volumes; with the temporaries of a block, peak memory stays near 1 GB."""
SHOWN = 8
"""Subjects of each set in the montage."""


def pairwise_sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, shape (len(x), len(y)); x (n, d), y (m, d), float64."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def median_bandwidth(x: np.ndarray) -> float:
    """Median heuristic: the median distance between distinct rows of ``x`` (n, d)."""
    d = np.sqrt(pairwise_sq_dists(x, x)[np.triu_indices(len(x), k=1)])
    bandwidth = float(np.median(d)) if d.size else 0.0
    return bandwidth if bandwidth > 0 else 1.0


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased squared MMD with the Gaussian kernel exp(-|a-b|^2 / (2 bandwidth^2)) (Gretton et al. 2012, eq. 3).

    Args:
        x: samples, shape (n, d), n >= 2.
        y: samples, shape (m, d), m >= 2.
        bandwidth: kernel width, in the units of the rows.
    """
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side, got {n} and {m}")
    gamma = 1.0 / (2.0 * bandwidth**2)
    kxx, kyy = np.exp(-gamma * pairwise_sq_dists(x, x)), np.exp(-gamma * pairwise_sq_dists(y, y))
    kxy = np.exp(-gamma * pairwise_sq_dists(x, y))
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2.0 * kxy.mean()
    )


def downsample(volumes: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool (n, D, H, W) by ``factor`` on each axis (the edge remainder is cropped); returns (n, d) rows."""
    n = volumes.shape[0]
    dims = [max(s // factor, 1) for s in volumes.shape[1:]]
    f = [min(factor, s) for s in volumes.shape[1:]]
    v = volumes[:, : dims[0] * f[0], : dims[1] * f[1], : dims[2] * f[2]]
    v = v.reshape(n, dims[0], f[0], dims[1], f[1], dims[2], f[2]).mean((2, 4, 6))
    return v.reshape(n, -1).astype(np.float64)


def pool_factor(shape: tuple[int, ...]) -> int:
    return max(1, math.ceil(max(shape) / MAX_DOWNSAMPLED))


def _evenly(n: int, limit: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, limit))})


def training_slices(volumes: np.ndarray, axis: int, indices: Sequence[int], seed: int = 0) -> np.ndarray:
    """One slice per volume, drawn as the 2D loader draws them (uniform over ``SLICE_RANGE`` of ``axis``).

    A 2D model samples from the distribution of its training slices, not from the middle slice, so that is the
    real distribution to compare it with.

    Args:
        volumes: shape (n, D, H, W).
        indices: one number per volume (its subject index) that, with ``seed``, picks the slice.

    Returns:
        shape (n, D, H, W) with ``axis`` of size 1.
    """
    picks = slice_indices(volumes.shape[1 + axis], seed, np.asarray(indices), SLICE_RANGE)
    return np.stack([np.take(v, [int(s)], axis=axis) for v, s in zip(volumes, picks)])


def block_size(num_voxels: int) -> int:
    """Subjects per block so that a block of float64 volumes takes about ``BLOCK_BYTES``."""
    return max(1, BLOCK_BYTES // (8 * max(num_voxels, 1)))


@dataclass
class Summary:
    """What quality keeps of a set of volumes: running moments, MMD rows and the montage's volumes."""

    shape: tuple[int, ...]
    n: int = 0
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)  # sum of squared deviations from the mean
    rows: list[np.ndarray] = field(default_factory=list)
    shown: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.shape)
        self.m2 = np.zeros(self.shape)

    def add(self, x: np.ndarray, factor: int) -> None:
        """Fold a block of volumes (b, *shape) in (Chan et al.'s pairwise update of mean and variance)."""
        x64 = x.astype(np.float64)
        b = len(x64)
        mean_b = x64.mean(0)
        x64 -= mean_b
        m2_b = np.einsum("i...,i...->...", x64, x64)
        delta = mean_b - self.mean
        total = self.n + b
        self.mean += delta * (b / total)
        self.m2 += m2_b + delta**2 * (self.n * b / total)
        self.n = total
        self.rows.append(downsample(x, factor))
        self.shown += [v.copy() for v in x[: SHOWN - len(self.shown)]]

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self.rows)


def _blocks(shards: ShardSet, indices: list[int], slice_axis: int | None) -> Iterator[np.ndarray]:
    """Volumes of ``indices`` block by block, (b, D, H, W) float32; for a 2D cohort, one training-like slice."""
    step = block_size(int(np.prod(shards.shape)))
    for start in range(0, len(indices), step):
        chunk = indices[start : start + step]
        x = shards.read_many(chunk)[:, 0]
        yield x if slice_axis is None else training_slices(x, slice_axis, chunk)


def _summarise(shards: ShardSet, limit: int, slice_axis: int | None, factor: int) -> Summary:
    """Up to ``limit`` subjects spread over the set, summarised."""
    shape = tuple(1 if a == slice_axis else s for a, s in enumerate(shards.shape))
    summary = Summary(shape)
    for x in _blocks(shards, _evenly(shards.num_subjects, limit), slice_axis):
        summary.add(x, factor)
    return summary


def _baseline_rows(mean: np.ndarray, std: np.ndarray, n: int, factor: int, rng: np.random.Generator) -> np.ndarray:
    """MMD rows of ``n`` baseline volumes (mean + std x Gaussian noise), drawn block by block."""
    step = block_size(mean.size)
    rows = []
    for start in range(0, n, step):
        noise = rng.standard_normal((min(step, n - start), *mean.shape))
        noise *= std
        noise += mean
        rows.append(downsample(noise, factor))
    return np.concatenate(rows)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def quality(
    real: str | Path, synth: str | Path, out: str | Path, max_subjects: int = 256, seed: int = 0
) -> dict[str, Any]:
    """Compare a synthetic shard set with real held-out subjects; write montage.png, maps.png, maps NIfTI and
    summary.json to ``out`` and return the summary.

    Args:
        real: shards of real subjects not used in training (the training set itself is accepted with a warning).
        synth: shards written by ``hpcdiff sample`` (or any shards on the same grid).
        out: output folder.
        max_subjects: at most this many subjects of each set are read (spread evenly over the set).
        seed: seeds the baseline's noise.
    """
    from hpcdiff.nifti import write_nifti

    out = Path(out)
    r_set, s_set = ShardSet.open(real), ShardSet.open(synth)
    for shard_set in (r_set, s_set):
        shard_set.require_images("quality")
    slice_of = _slice_of(r_set, s_set, Path(real), Path(synth))
    num_real = len(_evenly(r_set.num_subjects, max_subjects))
    num_synth = len(_evenly(s_set.num_subjects, max_subjects))
    if num_real < 4 or num_synth < 2:
        raise DataError(f"quality needs at least 4 real and 2 synthetic subjects, got {num_real} and {num_synth}")
    factor = pool_factor(s_set.shape)
    real_sum = _summarise(r_set, max_subjects, slice_of, factor)
    synth_sum = _summarise(s_set, max_subjects, None, factor)
    affine = s_set.affine
    training = Path(s_set.manifest.get("provenance", {}).get("training_shards", "")).resolve()
    is_training = training == Path(real).resolve()
    if is_training:
        log.warning("quality: %s is the run's training set; the MMD then rewards memorising it", real)

    mean_r, std_r = real_sum.mean, real_sum.std
    mean_s, std_s = synth_sum.mean, synth_sum.std
    rng = np.random.default_rng(seed)
    f_real, f_synth = real_sum.features, synth_sum.features
    f_base = _baseline_rows(mean_r, std_r, num_synth, factor, rng)
    bandwidth = median_bandwidth(f_real)
    summary: dict[str, Any] = {
        "real": str(Path(real).resolve()),
        "synthetic": str(Path(synth).resolve()),
        "num_real": num_real,
        "num_synthetic": num_synth,
        "real_is_training_set": is_training,
        "mmd": {
            "kernel": "gaussian, bandwidth = median distance between real subjects",
            "downsample_factor": factor,
            "downsampled_shape": [max(s // factor, 1) for s in s_set.shape],
            "bandwidth": bandwidth,
            "mmd2_synthetic_vs_real": mmd2(f_synth, f_real, bandwidth),
            "mmd2_baseline_vs_real": mmd2(f_base, f_real, bandwidth),
            "mmd2_real_half_vs_half": _split_half_mmd2(f_real, bandwidth, rng),
            "baseline": "real per-voxel mean + Gaussian noise of the real per-voxel std",
        },
        "diversity": _diversity(r_set, s_set, max_subjects, seed) if slice_of is None else None,
        "conditioning": _conditioning(r_set, s_set, max_subjects) if slice_of is None else None,
        "maps": {
            "corr_mean": _corr(mean_s, mean_r),
            "corr_std": _corr(std_s, std_r),
            "mean_abs_diff_mean": float(np.abs(mean_s - mean_r).mean()),
            "mean_abs_diff_std": float(np.abs(std_s - std_r).mean()),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("mean_real", mean_r), ("mean_synth", mean_s), ("std_real", std_r), ("std_synth", std_s)):
        write_nifti(out / f"{name}.nii.gz", data, affine, np.float32)
    _montage(out / "montage.png", np.stack(real_sum.shown), np.stack(synth_sum.shown))
    _maps(out / "maps.png", mean_r, mean_s, std_r, std_s, summary["maps"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    r_set.close()
    s_set.close()
    return summary


def _diversity(r_set: ShardSet, s_set: ShardSet, max_subjects: int, seed: int) -> dict[str, Any]:
    """Mean MS-SSIM between synthetic pairs beside the same between real pairs (lower = more diverse)."""
    synth = pair_ms_ssim(s_set, _evenly(s_set.num_subjects, max_subjects), seed)
    real = pair_ms_ssim(r_set, _evenly(r_set.num_subjects, max_subjects), seed)
    return {
        "ms_ssim_synthetic_pairs": synth,
        "ms_ssim_real_pairs": real,
        "difference": synth - real,
        "note": "3D MS-SSIM, data range 1, disjoint random pairs; far above the real pairs' value means mode collapse",
    }


def _conditioning(r_set: ShardSet, s_set: ShardSet, max_subjects: int, covariate: str = "age") -> dict[str, Any]:
    """Slope of the ventricle volume on the requested (synthetic) and recorded (real) age, with its sign."""
    synth = age_slope(s_set, _evenly(s_set.num_subjects, max_subjects), covariate)
    real = age_slope(r_set, _evenly(r_set.num_subjects, max_subjects), covariate)
    same_sign = (
        None
        if synth is None or real is None
        else bool(np.sign(synth["slope_ml_per_unit"]) == np.sign(real["slope_ml_per_unit"]))
    )
    return {
        "covariate": covariate,
        "measure": "ml of voxels darker than 0.4 x the volume's 95th percentile inside the central third of each axis",
        "synthetic": synth,
        "real": real,
        "same_sign": same_sign,
    }


def _split_half_mmd2(rows: np.ndarray, bandwidth: float, rng: np.random.Generator, splits: int = 20) -> float:
    """Mean MMD^2 between random halves of one set: one split alone varies as much as the numbers compared."""
    values = []
    for _ in range(splits):
        p = rng.permutation(len(rows))
        values.append(mmd2(rows[p[: len(p) // 2]], rows[p[len(p) // 2 :]], bandwidth))
    return float(np.mean(values))


def _slice_of(r_set: ShardSet, s_set: ShardSet, real: Path, synth: Path) -> int | None:
    """Check both sets share a grid; for a 2D model's cohort (one axis of size 1), the axis to slice real ones."""
    rs, ss = r_set.shape, s_set.shape
    if rs == ss:
        if not np.allclose(r_set.affine, s_set.affine, atol=1e-4):
            raise DataError(f"{real} and {synth} have the same shape but different affines: not the same grid")
        return None
    thin = [a for a in range(3) if ss[a] == 1 and rs[a] > 1]
    if len(thin) == 1 and all(rs[a] == ss[a] for a in range(3) if a != thin[0]):
        return thin[0]
    raise DataError(
        f"{real / 'manifest.json'} (shape {list(rs)}) and {synth / 'manifest.json'} (shape {list(ss)}) are on "
        "different grids: sample from a run trained on shards of the real set's grid"
    )


def _mid(volume: np.ndarray) -> np.ndarray:
    """The middle slice across the last axis (axial for RAS), or across a 2D cohort's thin axis; anterior up."""
    thin = [a for a in range(3) if volume.shape[a] == 1]
    axis = thin[0] if thin else 2
    return np.take(volume, volume.shape[axis] // 2, axis=axis).T


def _montage(path: Path, real: np.ndarray, synth: np.ndarray, columns: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(columns, len(real), len(synth))
    vmax = float(np.percentile(real[:k], 99.5)) or 1.0
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.6), squeeze=False)
    for row, (name, data) in enumerate((("real", real), ("synthetic", synth))):
        for col in range(k):
            ax = axes[row, col]
            ax.imshow(_mid(data[col]), cmap="gray", origin="lower", vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name)
    fig.suptitle("mid slices: real (top) and synthetic (bottom)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _maps(path: Path, mean_r, mean_s, std_r, std_s, numbers: dict[str, float]) -> None:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(8, 5.5))
    for row, (what, r, s) in enumerate((("mean", mean_r, mean_s), ("std", std_r, std_s))):
        vmax = float(max(r.max(), s.max())) or 1.0
        diff = s - r
        lim = float(np.abs(diff).max()) or 1.0
        panels = ((f"real {what}", r, "gray", 0, vmax), (f"synthetic {what}", s, "gray", 0, vmax))
        panels += ((f"synthetic - real (r={numbers[f'corr_{what}']:.3f})", diff, "coolwarm", -lim, lim),)
        for col, (title, data, cmap, lo, hi) in enumerate(panels):
            ax = axes[row, col]
            im = ax.imshow(_mid(data), cmap=cmap, origin="lower", vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
