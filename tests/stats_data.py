"""Small shard sets with known structure for the statistics tests, written with the real shard writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcdiff.data.shards import write_manifest, write_shard

SHAPE = (12, 14, 12)


def _ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def regions(shape: tuple[int, int, int] = SHAPE) -> dict[str, np.ndarray]:
    """Boolean masks (D, H, W): brain, a patch with a group effect, ventricles that grow with age."""
    c = tuple((n - 1) / 2 for n in shape)
    brain = _ellipsoid(shape, c, tuple(n * 0.45 for n in shape))
    patch = _ellipsoid(shape, (c[0] + shape[0] * 0.2, c[1], c[2]), (2.5, 2.5, 2.5)) & brain
    ventricles = _ellipsoid(shape, c, (1.6, 2.5, 1.6))
    high = np.meshgrid(*[np.arange(n) >= n / 2 for n in shape], indexing="ij")
    last_octant = high[0] & high[1] & high[2] & brain
    tissue = 0.7 + 0.6 * np.linspace(0, 1, shape[0])[:, None, None] * np.ones(shape)  # structure for templates
    return {"brain": brain, "patch": patch, "ventricles": ventricles, "last_octant": last_octant, "tissue": tissue}


def write_cohort_shards(
    root: Path,
    num_subjects: int = 40,
    shape: tuple[int, int, int] = SHAPE,
    seed: int = 0,
    per_shard: int = 12,
    group_effect: float = 0.25,
    age_effect: float = -0.006,
    noise: float = 0.1,
    groups: tuple[str, ...] = ("CN", "AD"),
    affine: np.ndarray | None = None,
    lesion: int | None = None,
) -> dict[str, np.ndarray]:
    """Write ``num_subjects`` volumes as shards at ``root``; returns the subjects table and the regions.

    Brain 0.7..1.3 along the first axis plus noise; +group_effect in the patch for the second group; ventricles
    darker with age; subject ``lesion`` brighter in the last octant.
    """
    rng = np.random.default_rng(seed)
    reg = regions(shape)
    group = np.array([groups[i % len(groups)] for i in range(num_subjects)])
    age = rng.uniform(20, 90, num_subjects).round(1)
    sex = rng.choice(["F", "M"], num_subjects)
    images = np.zeros((num_subjects, 1, *shape), dtype=np.float32)
    for i in range(num_subjects):
        v = reg["brain"] * (reg["tissue"] + noise * rng.standard_normal(shape))
        v = v + reg["patch"] * group_effect * (group[i] == groups[-1])
        v = v + reg["ventricles"] * age_effect * (age[i] - 50) + reg["brain"] * 0.03 * (sex[i] == "M")
        if i == lesion:
            v = v + 0.5 * reg["last_octant"]
        images[i, 0] = v
    subjects = {
        "id": np.array([f"sub-{i:03d}" for i in range(num_subjects)]),
        "session": np.array([""] * num_subjects),
        "source_path": np.array([f"sub-{i:03d}/anat/T1w.nii.gz" for i in range(num_subjects)]),
        "source_sha256": np.array(["0" * 64] * num_subjects),
        "age": age,
        "sex": sex,
        "group": group,
    }
    infos = []
    for k, start in enumerate(range(0, num_subjects, per_shard)):
        rows = slice(start, start + per_shard)
        infos.append(write_shard(root / f"shard-{k:05d}.h5", images[rows], {c: v[rows] for c, v in subjects.items()}))
    covariates = {
        "age": {
            "kind": "continuous",
            "min": float(age.min()),
            "max": float(age.max()),
            "mean": float(age.mean()),
            "std": float(age.std()),
        },
        "sex": {"kind": "categorical", "levels": ["F", "M"]},
        "group": {"kind": "categorical", "levels": list(groups)},
    }
    write_manifest(
        root,
        shape=shape,
        spacing=(2.0, 2.0, 2.0),
        affine=np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine,
        covariates=covariates,
        shards=infos,
        provenance={"writer": "tests/stats_data.py"},
        subjects=subjects,
    )
    return {"subjects": subjects, "images": images, **reg}
