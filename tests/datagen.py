"""Small real shard sets for training tests: written with the shard writer, read back through ShardSet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from hpcdiff.data.shards import write_manifest, write_shard


def blob_shards(root: Path, num_subjects: int = 16, shape=(12, 12, 12), per_shard: int = 6, seed: int = 0) -> Path:
    """Smooth blobs whose size grows with 'age' and whose brightness depends on 'group': learnable in seconds."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    infos, table = [], {}
    ages = rng.uniform(40, 80, num_subjects)
    groups = np.array(["control", "patient"])[rng.integers(0, 2, num_subjects)]
    sexes = np.array(["F", "M"])[rng.integers(0, 2, num_subjects)]
    for s, start in enumerate(range(0, num_subjects, per_shard)):
        idx = range(start, min(start + per_shard, num_subjects))
        imgs = []
        for i in idx:
            radius = 0.35 + 0.3 * (ages[i] - 40) / 40
            r2 = ((grid - rng.normal(0, 0.05, (3, 1, 1, 1))) ** 2).sum(0)
            img = (0.6 if groups[i] == "patient" else 1.0) * np.exp(-r2 / (2 * radius**2))
            imgs.append(img[None])
        subjects = {
            "id": [f"sub-{i:04d}" for i in idx],
            "session": ["" for _ in idx],
            "source_path": ["synthetic" for _ in idx],
            "source_sha256": ["" for _ in idx],
            "age": [float(ages[i]) for i in idx],
            "sex": [str(sexes[i]) for i in idx],
            "group": [str(groups[i]) for i in idx],
        }
        infos.append(write_shard(root / f"shard-{s:05d}.h5", np.stack(imgs).astype(np.float32), subjects))
        for name, values in subjects.items():
            table.setdefault(name, []).extend(values)
    write_manifest(
        root,
        shape=shape,
        spacing=(2.0, 2.0, 2.0),
        affine=np.diag([2.0, 2.0, 2.0, 1.0]),
        covariates={
            "age": {
                "kind": "continuous",
                "min": float(ages.min()),
                "max": float(ages.max()),
                "mean": float(ages.mean()),
                "std": float(ages.std()),
            },
            "sex": {"kind": "categorical", "levels": ["F", "M"]},
            "group": {"kind": "categorical", "levels": ["control", "patient"]},
        },
        shards=infos,
        provenance={"source": "tests.datagen.blob_shards"},
        subjects=table,
    )
    return root


def job_yaml(path: Path, shards: Path, **sections) -> Path:
    """A tiny training job; ``sections`` update the defaults section by section."""
    job = {
        "data": {"shards": str(shards), "mode": "3d", "batch_size": 2, "prefetch": 1},
        "model": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": []},
        "objective": {"kind": "flow"},
        "optim": {"lr": 2e-3, "warmup_steps": 5, "ema_decay": 0.99},
        "train": {"steps": 12, "checkpoint_every": 4, "log_every": 4, "seed": 3, "collective_timeout_s": 60},
    }
    for name, values in sections.items():
        job.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(job))
    return path
