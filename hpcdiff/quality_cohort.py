"""Cohort-level quality beyond the mean and spread: diversity (MS-SSIM between pairs) and the conditioning check.

Diversity: a model that collapses onto a few subjects gives synthetic pairs far more alike than real pairs, which
neither the maps nor a small MMD reveal. The mean multi-scale SSIM (3D) between disjoint random pairs of one set is
compared with the same number for the real subjects (Pinaya et al. 2022 report 0.6555 for UK Biobank).

Conditioning: whether a conditioned model obeys the age it was asked for. The ventricles grow with age, so the
volume of CSF-like dark voxels inside a central box (ventricles, not the background) is regressed on the requested
age; its slope should have the real cohort's sign. Both read volumes one or two at a time: memory does not grow
with the number of subjects, and a 1 mm volume with its temporaries stays well under 1 GB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hpcdiff.data.shards import ShardSet
from hpcdiff.models.ssim import ms_ssim

MAX_PAIRS = 32
"""Disjoint pairs averaged per set: a 1 mm pair costs ~30 s on one loaded CPU core (docs/benchmarks.md)."""
CENTRAL_BOX = (1 / 3, 2 / 3)
"""Fractions of each axis that bound the central box where the ventricles lie (MNI-like, RAS grids)."""
DARK_FRACTION = 0.4
"""A voxel is CSF-like when darker than this fraction of its volume's 95th percentile (bright tissue)."""


def pair_ms_ssim(shards: ShardSet, indices: Sequence[int], seed: int = 0, max_pairs: int = MAX_PAIRS) -> float:
    """Mean 3D MS-SSIM over up to ``max_pairs`` disjoint random pairs of ``indices`` (data range 1, as ingested).

    The pairs are a function of (seed, the indices): two sets with the same subjects give the same pairs.
    """
    order = np.random.default_rng(seed).permutation(np.asarray(indices))
    pairs = order[: 2 * min(max_pairs, len(order) // 2)].reshape(-1, 2)
    if not len(pairs):
        raise ValueError(f"MS-SSIM diversity needs at least 2 subjects, got {len(indices)}")
    values = []
    for a, b in pairs:
        x = torch.from_numpy(shards.read_many([int(a), int(b)]))
        values.append(float(ms_ssim(x[:1], x[1:])[0]))
    return float(np.mean(values))


def ventricle_volume(volume: np.ndarray, spacing: Sequence[float]) -> float:
    """Millilitres of CSF-like voxels inside the central box of one (D, H, W) volume."""
    lo, hi = CENTRAL_BOX
    box = tuple(slice(int(n * lo), max(int(n * hi), int(n * lo) + 1)) for n in volume.shape)
    bright = float(np.percentile(volume, 95))
    dark = int((volume[box] < DARK_FRACTION * bright).sum())
    return dark * float(np.prod(spacing)) / 1000.0


def age_slope(shards: ShardSet, indices: Sequence[int], covariate: str = "age") -> dict[str, Any] | None:
    """Least-squares slope of ventricle volume (mL) on ``covariate`` (per unit, e.g. mL per year) with Pearson's r.

    None when the set has no such covariate (an unconditioned model) or fewer than 3 subjects with a value.
    """
    table = shards.subjects()
    if covariate not in table:
        return None
    ages = np.asarray(table[covariate], dtype=np.float64)[list(indices)]
    keep = [i for i, a in zip(indices, ages) if np.isfinite(a)]
    if len(keep) < 3:
        return None
    spacing = shards.manifest.get("spacing", [1.0, 1.0, 1.0])
    volumes = np.array([ventricle_volume(shards.read(int(i))[0], spacing) for i in keep])
    x = np.asarray(table[covariate], dtype=np.float64)[keep]
    slope, intercept = np.polyfit(x, volumes, 1) if np.ptp(x) > 0 else (0.0, float(volumes.mean()))
    r = float(np.corrcoef(x, volumes)[0, 1]) if np.ptp(x) > 0 and np.ptp(volumes) > 0 else 0.0
    return {
        "slope_ml_per_unit": float(slope),
        "intercept_ml": float(intercept),
        "pearson_r": r,
        "num_subjects": len(keep),
        "mean_volume_ml": float(volumes.mean()),
    }
