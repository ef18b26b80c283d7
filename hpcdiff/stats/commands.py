"""The template, groupdiff and gamma commands: stream the shards, write maps, figures and summary.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hpcdiff.stats import figures
from hpcdiff.stats.analysis import group_maps, group_stats, residual_variance
from hpcdiff.stats.design import Design
from hpcdiff.stats.gammafit import fit_gamma
from hpcdiff.stats.outputs import save_json, save_map
from hpcdiff.stats.prepare import Prepared, StatsOptions, load_design, prepare
from hpcdiff.stats.regions import load_atlas, octant_atlas


def run_template(root: str | Path, out: str | Path, options: StatsOptions | None = None) -> dict[str, Any]:
    """Voxelwise mean and standard deviation over every subject: mean/std/mask NIfTI, PNGs, summary.json."""
    options = options or StatsOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(root, options)
    everywhere = np.ones(prep.mask.size, dtype=bool)
    mean, std = prep.moments.mean, prep.moments.std()
    for name, values in (("mean", mean), ("std", std), ("mask", prep.mask.astype(np.float32))):
        save_map(out / f"{name}.nii.gz", values, everywhere, prep.shape, prep.shards.affine)
    figures.orthogonal_slices(mean.reshape(prep.shape), out / "mean.png", "template mean")
    figures.orthogonal_slices(std.reshape(prep.shape), out / "std.png", "template standard deviation", cmap="magma")
    summary = {
        "command": "template",
        "shards": str(root),
        "num_subjects": int(prep.rows.size),
        "shape": list(prep.shape),
        "mask_voxels": int(prep.mask.sum()),
        "mean_in_mask": float(mean[prep.mask].mean()),
        "std_in_mask": float(std[prep.mask].mean()),
        **prep.throughput(),
    }
    save_json(out / "summary.json", summary)
    return summary


def group_difference(prep: Prepared, design: Design, pooled: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """Group maps (masked) of a prepared cohort; one more pass over the shards."""
    stats = group_stats(prep.blocks(), design, prep.shift)
    maps, test = group_maps(stats, design, pooled)
    maps["group0_mean"] = stats.group0.mean + prep.shift
    maps["group1_mean"] = stats.group1.mean + prep.shift
    return maps, test


def run_groupdiff(
    root: str | Path,
    out: str | Path,
    group: str,
    covariates: Sequence[str] = (),
    levels: Sequence[str] | None = None,
    pooled: bool = False,
    alpha: float = 0.05,
    options: StatsOptions | None = None,
) -> dict[str, Any]:
    """Voxelwise group difference adjusted for covariates: effect, t, p, q, d (+ covariate t) maps and summary."""
    options = options or StatsOptions()
    out = Path(out)
    design = load_design(root, group=group, covariates=covariates, levels=levels)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(root, options, design.rows)
    maps, test = group_difference(prep, design, pooled)
    for name, values in maps.items():
        prep.save(out, name, values)
    save_map(out / "mask.nii.gz", prep.mask[prep.mask].astype(np.float32), prep.mask, prep.shape, prep.shards.affine)
    prep.save_slices(out, "t", maps["t"], f"group t ({design.levels[1]} - {design.levels[0]}), {test}")
    prep.save_slices(out, "d", maps["d"], "Cohen's d")
    figures.histogram(maps["p"], out / "p_hist.png", "p values (uniform under the null)", "p")
    t = np.nan_to_num(maps["t"])
    peak = int(np.argmax(np.abs(t)))
    peak_ijk = np.unravel_index(np.flatnonzero(prep.mask)[peak], prep.shape)
    peak_mm = prep.shards.affine @ np.array([*peak_ijk, 1.0])
    groups = design.group_of_row
    summary = {
        "command": "groupdiff",
        "shards": str(root),
        "test": test,
        "group": group,
        "levels": list(design.levels or ()),
        "contrast": f"{design.levels[1]} - {design.levels[0]}",
        "columns": design.columns,
        "num_subjects": {design.levels[0]: int((groups == 0).sum()), design.levels[1]: int((groups == 1).sum())},
        "left_out": design.left_out.to_json(),
        "mask_voxels": int(prep.mask.sum()),
        "df_median": float(np.nanmedian(maps["df"])),
        "alpha": alpha,
        "significant_voxels_fdr": int(np.sum(maps["q"] < alpha)),
        "peak": {
            "t": float(t[peak]),
            "d": float(maps["d"][peak]),
            "voxel": [int(i) for i in peak_ijk],
            "mm": [float(v) for v in peak_mm[:3]],
        },
        "mean_abs_d": float(np.nanmean(np.abs(maps["d"]))),
        **prep.throughput(),
    }
    save_json(out / "summary.json", summary)
    return summary


def run_gamma(
    root: str | Path,
    out: str | Path,
    covariates: Sequence[str] = (),
    atlas: str | Path | None = None,
    min_region_voxels: int = 50,
    options: StatsOptions | None = None,
) -> dict[str, Any]:
    """Residual variance after the GLM, with a gamma fit across voxels and per region."""
    options = options or StatsOptions()
    out = Path(out)
    design = load_design(root, covariates=covariates)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(root, options, design.rows)
    sigma2, df = residual_variance(prep.blocks(), design, prep.shift)
    prep.save(out, "residual_variance", sigma2)
    prep.save_slices(out, "residual_variance", sigma2, "residual variance", symmetric=False)
    overall = fit_gamma(sigma2)
    figures.gamma_fit_plot(sigma2, overall, out / "gamma.png", f"residual variance, {sigma2.size} voxels, df={df}")
    labels, names = (
        load_atlas(atlas, prep.shape, prep.shards.affine) if atlas else octant_atlas(prep.shape, prep.shards.affine)
    )
    in_mask = labels.ravel()[prep.mask]
    regions = {}
    for label, name in names.items():
        values = sigma2[in_mask == label]
        if values.size >= min_region_voxels:
            regions[name] = fit_gamma(values).to_dict()
    summary = {
        "command": "gamma",
        "shards": str(root),
        "columns": design.columns,
        "left_out": design.left_out.to_json(),
        "df": df,
        "atlas": str(atlas) if atlas else "octants",
        "mask_voxels": int(prep.mask.sum()),
        "fit": overall.to_dict(),
        "regions": regions,
        **prep.throughput(),
    }
    save_json(out / "summary.json", summary)
    return summary
