"""Does a synthetic cohort reproduce the real one? Template and group-difference maps compared voxel by voxel."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hpcdiff.errors import DataError
from hpcdiff.stats import figures
from hpcdiff.stats.commands import group_difference
from hpcdiff.stats.glm import fdr_bh, two_sided_p
from hpcdiff.stats.outputs import save_json
from hpcdiff.stats.prepare import StatsOptions, load_design, prepare
from hpcdiff.stats.source import open_shards


def check_same_grid(real: str | Path, synth: str | Path) -> None:
    """Raise DataError naming both manifests when the two shard sets lie on different grids."""
    a, b = open_shards(real), open_shards(synth)
    if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-4):
        raise DataError(
            f"{Path(real) / 'manifest.json'} (shape {a.shape}) and {Path(synth) / 'manifest.json'} (shape {b.shape}) "
            "are on different grids (shape or affine): ingest or sample both on the same --shape"
        )


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 1 else float("nan")


def compare_maps(real: dict[str, np.ndarray], synth: dict[str, np.ndarray], alpha: float) -> dict[str, Any]:
    """Agreement of two sets of group maps on the same voxels (each map shape (V,)).

    Sign agreement and the effect-size ratio are taken over the voxels where the real effect is FDR-significant
    (all voxels when none is), since the sign of a null effect is noise.
    """
    sig = real["q"] < alpha
    where = sig if sig.any() else np.ones_like(sig)
    d_r, d_s = real["d"][where], synth["d"][where]
    return {
        "groupdiff_t_correlation": _corr(real["t"], synth["t"]),
        "groupdiff_d_correlation": _corr(real["d"], synth["d"]),
        "sign_agreement": float(np.mean(np.sign(d_r) == np.sign(d_s))),
        "sign_agreement_all_voxels": float(np.mean(np.sign(real["d"]) == np.sign(synth["d"]))),
        "effect_size_ratio": float(np.nanmean(np.abs(d_s)) / np.nanmean(np.abs(d_r))),
        "voxels_compared": int(where.sum()),
        "real_significant_voxels": int(sig.sum()),
        "synth_significant_voxels": int(np.sum(synth["q"] < alpha)),
        "covariates": {
            name[2:]: _covariate_agreement(real, synth, name, alpha) for name in real if name.startswith("t_")
        },
    }


def _covariate_agreement(real: dict[str, np.ndarray], synth: dict[str, np.ndarray], name: str, alpha: float) -> dict:
    """Agreement of one covariate's t maps (e.g. age): does the synthetic cohort obey the conditioning voxel by voxel?

    Sign agreement is taken where the real covariate effect is FDR-significant, as for the group effect.
    """
    sig = fdr_bh(two_sided_p(real[name], real["df"])) < alpha
    where = sig if sig.any() else np.ones_like(sig)
    return {
        "t_correlation": _corr(real[name], synth[name]),
        "sign_agreement": float(np.mean(np.sign(real[name][where]) == np.sign(synth[name][where]))),
        "voxels_compared": int(where.sum()),
        "real_significant_voxels": int(sig.sum()),
    }


def run_compare(
    real: str | Path,
    synth: str | Path,
    out: str | Path,
    group: str = "group",
    covariates: Sequence[str] = (),
    levels: Sequence[str] | None = None,
    alpha: float = 0.05,
    options: StatsOptions | None = None,
) -> dict[str, Any]:
    """Template correlation, group-difference correlation, sign agreement, effect-size ratio and, per covariate
    (e.g. age), the agreement of its t maps (summary.json)."""
    options = options or StatsOptions()
    started = time.perf_counter()
    out = Path(out)
    check_same_grid(real, synth)
    designs = [load_design(root, group=group, covariates=covariates, levels=levels) for root in (real, synth)]
    if designs[0].levels != designs[1].levels:
        raise DataError(f"group levels differ: {real} has {designs[0].levels}, {synth} has {designs[1].levels}")
    out.mkdir(parents=True, exist_ok=True)
    preps = [prepare(root, options, d.rows) for root, d in zip((real, synth), designs)]
    mask = preps[0].mask & preps[1].mask
    for prep in preps:
        prep.mask = mask
    maps = [group_difference(prep, d)[0] for prep, d in zip(preps, designs)]
    means = [prep.moments.mean[mask] for prep in preps]
    figures.scatter(maps[0]["d"], maps[1]["d"], out / "d_scatter.png", "Cohen's d per voxel", "real", "synthetic")
    summary = {
        "command": "compare",
        "real": str(real),
        "synth": str(synth),
        "group": group,
        "levels": list(designs[0].levels or ()),
        "num_subjects": {"real": int(designs[0].rows.size), "synth": int(designs[1].rows.size)},
        "left_out": {"real": designs[0].left_out.to_json(), "synth": designs[1].left_out.to_json()},
        "mask_voxels": int(mask.sum()),
        "template_correlation": _corr(*means),
        "template_std_correlation": _corr(*(p.moments.std()[mask] for p in preps)),
        **compare_maps(maps[0], maps[1], alpha),
        "seconds": time.perf_counter() - started,
    }
    save_json(out / "summary.json", summary)
    return summary
