"""How a permutation test is cut up and put back together: fixed batches of k, one atomic file per batch.

Batch b holds permutations [b * S, (b + 1) * S) (S = batch size, part of the plan), so its content never
depends on who computed it. Worker ``task * W + rank`` of ``T * W`` takes batches ``worker, worker + T*W, ...``
(``hpcdiff.batch.Worker``). Each batch's partial result (maxima per permutation, exceedance counts per
voxel) is written atomically with the plan digest; a rerun skips batches whose file carries the digest, so a kill
loses at most the batches in flight. Whoever finds every batch done merges from the files alone, in batch order:
maxima are concatenated and counts (integers) summed, so the merge is the same whatever the slicing.

This is the only slicing code of ``stats randomise``; moving it onto a general sliced-job core touches this file.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcdiff.atomic import atomic_write
from hpcdiff.batch import Worker

PARTIALS = "partials"


@dataclass(frozen=True)
class Batches:
    """N permutations in batches of ``size``."""

    num_permutations: int
    size: int

    @property
    def count(self) -> int:
        return -(-self.num_permutations // self.size)

    def range(self, batch: int) -> range:
        """Permutation indices k of one batch."""
        return range(batch * self.size, min((batch + 1) * self.size, self.num_permutations))

    def of(self, worker: Worker) -> range:
        """Batches one worker computes."""
        return worker.indices(self.count)


def partial_path(out: Path, batch: int) -> Path:
    return Path(out) / PARTIALS / f"batch-{batch:06d}.npz"


def save_partial(out: Path, batch: int, digest: str, arrays: dict[str, np.ndarray]) -> None:
    """Write one batch's arrays with the plan digest, atomically (readers see all of it or nothing)."""
    buffer = io.BytesIO()
    np.savez(buffer, plan_digest=np.array(digest), **arrays)
    atomic_write(partial_path(out, batch), buffer.getvalue())


def load_partial(out: Path, batch: int, digest: str) -> dict[str, np.ndarray] | None:
    """A batch's arrays, or None when the file is missing, unreadable or from another plan."""
    try:
        with np.load(partial_path(out, batch), allow_pickle=False) as f:
            if str(f["plan_digest"]) != digest:
                return None
            return {k: f[k] for k in f.files if k != "plan_digest"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def is_done(out: Path, batch: int, digest: str) -> bool:
    return load_partial(out, batch, digest) is not None


def merge(out: Path, batches: Batches, digest: str) -> dict[str, np.ndarray] | None:
    """Every batch's arrays put together (``max*`` concatenated in k order, ``exceed*`` summed), or None while
    any batch is missing."""
    merged: dict[str, np.ndarray] = {}
    for b in range(batches.count):
        part = load_partial(out, b, digest)
        if part is None:
            return None
        for key, value in part.items():
            if key not in merged:
                merged[key] = value
            elif key.startswith("max"):
                merged[key] = np.concatenate([merged[key], value])
            else:
                merged[key] = merged[key] + value
    return merged
