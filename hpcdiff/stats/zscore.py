"""Normative z-score of one subject: where it lies among the others given its covariates.

The GLM is fitted on every other subject by taking the subject's own row out of the summed sufficient statistics
(exact, no second pass); z = (y - x'beta) / sigma per voxel with sigma the others' residual standard deviation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hpcdiff.errors import UsageError
from hpcdiff.stats.analysis import glm_sums
from hpcdiff.stats.glm import SufficientStats, fit
from hpcdiff.stats.outputs import save_json
from hpcdiff.stats.prepare import StatsOptions, load_design, prepare
from hpcdiff.stats.regions import load_atlas, octant_atlas
from hpcdiff.stats.source import open_shards


def normative_z(sums: SufficientStats, x_s: np.ndarray, y_s: np.ndarray) -> np.ndarray:
    """z map of one subject from the sums over all subjects (the subject included; it is taken out here).

    Args:
        sums: SufficientStats over every subject, on values shifted like ``y_s``.
        x_s: the subject's design row, shape (p,).
        y_s: the subject's shifted values, shape (V,).
    """
    glm = fit(sums.without(x_s, y_s))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (y_s - x_s @ glm.beta) / np.sqrt(glm.sigma2)


def region_table(z: np.ndarray, in_mask_labels: np.ndarray, names: dict[int, str]) -> list[dict[str, Any]]:
    """Per region: voxels, mean z, mean |z|, fraction with |z| > 2; most deviant (mean |z|) first."""
    rows = []
    for label, name in names.items():
        v = z[in_mask_labels == label]
        v = v[np.isfinite(v)]
        if v.size:
            rows.append(
                {
                    "region": name,
                    "voxels": int(v.size),
                    "mean_z": float(v.mean()),
                    "mean_abs_z": float(np.abs(v).mean()),
                    "frac_abs_z_gt_2": float(np.mean(np.abs(v) > 2)),
                }
            )
    return sorted(rows, key=lambda r: -r["mean_abs_z"])


def run_zscore(
    root: str | Path,
    out: str | Path,
    subject: str,
    covariates: Sequence[str] | None = None,
    atlas: str | Path | None = None,
    top: int = 5,
    options: StatsOptions | None = None,
) -> dict[str, Any]:
    """z map, slices and a summary of the most deviant regions of ``subject`` (by id)."""
    options = options or StatsOptions()
    out = Path(out)
    shards = open_shards(root)
    ids = shards.subjects()["id"]
    hits = np.flatnonzero(ids == subject)
    if hits.size == 0:
        raise UsageError(f"subject '{subject}' not found in {root} ({ids.size} subjects, e.g. {', '.join(ids[:3])})")
    covariates = list(shards.covariates) if covariates is None else list(covariates)
    design = load_design(root, covariates=covariates)
    where = np.flatnonzero(design.rows == hits[0])
    if where.size == 0:
        raise UsageError(f"subject '{subject}' lacks a value of {covariates} in {root}: choose other --covariates")
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(root, options, design.rows)
    sums = glm_sums(prep.blocks(), design, prep.shift)
    y_s = shards.read_many([int(hits[0])]).reshape(-1)[prep.mask].astype(np.float64) - prep.shift
    z = normative_z(sums, design.x[where[0]], y_s)
    prep.save(out, "z", z)
    prep.save_slices(out, "z", z, f"normative z, subject {subject}")
    labels, names = load_atlas(atlas, prep.shape, shards.affine) if atlas else octant_atlas(prep.shape, shards.affine)
    regions = region_table(z, labels.ravel()[prep.mask], names)
    summary = {
        "command": "zscore",
        "shards": str(root),
        "subject": subject,
        "columns": design.columns,
        "num_reference_subjects": int(design.rows.size - 1),
        "left_out": design.left_out.to_json(),
        "mean_abs_z": float(np.nanmean(np.abs(z))),
        "frac_abs_z_gt_2": float(np.nanmean(np.abs(z) > 2)),
        "most_deviant_regions": regions[:top],
        "regions": regions,
        **prep.throughput(),
    }
    save_json(out / "summary.json", summary)
    return summary
