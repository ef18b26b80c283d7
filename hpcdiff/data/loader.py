"""A distributed, exactly resumable loader over a ShardSet.

The data stream is the infinite concatenation of per-epoch permutations ``perm(seed, epoch)`` of all subjects, and
the only state is the global *position* in that stream (samples consumed so far). At a step starting at position
``p`` with per-rank batch ``b`` and ``W`` ranks, rank ``r`` takes positions ``[p + r*b, p + (r+1)*b)`` and the next
step starts at ``p + W*b``. Hence:

- a loader started at position ``p`` yields exactly the tail of one started at 0 (mid-epoch restart);
- each subject appears exactly once in every epoch's span of positions ``[e*N, (e+1)*N)``, for any ``W``, also when
  ``W`` changes between steps (a resume on another number of ranks), because positions do not depend on ``W``;
- remainder policy: nothing is dropped or padded. When ``W*b`` does not divide ``N`` a step's batches straddle the
  epoch boundary: the first samples of the step close epoch ``e``, the rest open epoch ``e+1``.

In 2d mode the slice of each sample, and with ``patch_size`` the 3D patch, is a function of (seed, stream position),
so it survives resumes too.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from hpcdiff.data.covariates import is_missing
from hpcdiff.data.patches import patch_corners, patch_selection
from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import DataError
from hpcdiff.models.conditioning import MISSING_LEVEL

_SLICE_STREAM = 0x2D  # separates the slice-choice random stream from the permutation stream


@lru_cache(maxsize=4)
def _permutation(num_subjects: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_subjects)
    perm.flags.writeable = False
    return perm


def stream_indices(num_subjects: int, seed: int, start: int, count: int) -> np.ndarray:
    """Subject ids at stream positions ``[start, start + count)``; shape (count,), int64.

    Position ``p`` is subject ``perm(seed, p // N)[p % N]``.
    """
    if num_subjects <= 0:
        raise ValueError("the stream needs at least one subject")
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got {start}, {count}")
    positions = np.arange(start, start + count, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    epochs = positions // num_subjects
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _permutation(num_subjects, seed, int(epoch))[positions[sel] % num_subjects]
    return out


def rank_positions(step_position: int, rank: int, batch_size: int) -> range:
    """Stream positions of rank ``rank``'s batch in the step that starts at ``step_position``."""
    first = step_position + rank * batch_size
    return range(first, first + batch_size)


def slice_indices(size: int, seed: int, positions: np.ndarray, slice_range: tuple[float, float]) -> np.ndarray:
    """The 2D slice for each stream position: uniform over ``slice_range`` of an axis of ``size``; shape like
    ``positions``."""
    lo = int(np.floor(slice_range[0] * size))
    hi = max(lo + 1, int(np.ceil(slice_range[1] * size)))
    hi = min(hi, size)
    u = np.array([np.random.Generator(np.random.PCG64([seed, _SLICE_STREAM, int(p)])).random() for p in positions])
    return lo + np.minimum((u * (hi - lo)).astype(np.int64), hi - lo - 1)


class _Buffers:
    """Batch arrays handed out again once the last tensor made from them is gone.

    A fresh array for a 1 mm batch (4 x 11 MB) costs the kernel's zeroing and a page fault per 4 KiB page: several
    times what decoding LZ4 into it costs. An array returns to the pool when the view handed out is collected;
    ``torch.from_numpy`` holds that view for as long as any tensor shares its memory, so a batch still in use is
    never overwritten.
    """

    def __init__(self, shape: tuple[int, ...], keep: int) -> None:
        self._shape = shape
        self._keep = keep
        self._free: deque[np.ndarray] = deque()

    def take(self) -> np.ndarray:
        try:
            buf = self._free.pop()
        except IndexError:
            buf = np.empty(self._shape, dtype=np.float16)
        view = buf.view()
        weakref.finalize(view, self._give_back, buf).atexit = False
        return view

    def _give_back(self, buf: np.ndarray) -> None:
        if len(self._free) < self._keep:
            self._free.append(buf)


@dataclass
class Batch:
    """One rank's share of one step."""

    # (b, C, D, H, W) in 3d mode (C = 1 for images; or the patch size), (b, 1, *two remaining axes) in 2d mode; float16
    x: torch.Tensor
    covariates: dict[str, torch.Tensor]  # continuous: float32 raw values; categorical: int64 level index
    indices: torch.Tensor  # (b,) int64 global subject ids
    position: int  # stream position of this batch's first sample


class Loader:
    """Batches for one rank, read by a prefetch thread so decoding overlaps the model's step.

    Args:
        shards: the data; its files are opened lazily in this process.
        batch_size: per-rank batch ``b``.
        rank, world_size: this rank and the number of ranks ``W``.
        seed: data-order seed (with the epoch it fixes the permutation; with the position the 2D slice).
        start_position: global stream position of the first step (what a checkpoint stored as ``position``).
        mode: "3d" volumes or "2d" slices along ``slice_axis`` (0, 1 or 2 of (D, H, W)).
        slice_range: fractions of the axis the 2D slice is drawn from.
        patch_size: 3d mode: read a random (d, h, w) patch of each volume instead of the whole volume.
        prefetch: batches read ahead; 0 reads synchronously in the caller's thread.
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_position: int = 0,
        mode: Literal["3d", "2d"] = "3d",
        slice_axis: int = 0,
        slice_range: tuple[float, float] = (0.3, 0.7),
        patch_size: tuple[int, int, int] | None = None,
        prefetch: int = 2,
    ) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size > 0 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        if mode not in ("3d", "2d"):
            raise ValueError(f"mode must be '3d' or '2d', got {mode!r}")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        if not 0.0 <= slice_range[0] < slice_range[1] <= 1.0:
            raise ValueError(f"slice_range must satisfy 0 <= lo < hi <= 1, got {slice_range}")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        if patch_size is not None and (mode != "3d" or len(patch_size) != 3):
            raise ValueError(f"patch_size needs mode '3d' and three sizes, got {patch_size} in mode {mode!r}")
        self.shards = shards
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.position = start_position
        self.mode = mode
        self.slice_axis = slice_axis
        self.slice_range = slice_range
        self.patch_size = patch_size
        self.prefetch = prefetch
        self._table = self._covariate_table()
        if patch_size is not None:
            sample: tuple[int, ...] = tuple(patch_size)
        elif mode == "3d":
            sample = shards.shape
        else:
            sample = tuple(s for a, s in enumerate(shards.shape) if a != slice_axis)
        # The consumer's batch, those queued, the one being read, and one the consumer has not dropped yet.
        self._buffers = _Buffers((batch_size, shards.channels, *sample), keep=prefetch + 3)
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _covariate_table(self) -> dict[str, np.ndarray]:
        table = self.shards.subjects()
        out: dict[str, np.ndarray] = {}
        for name, spec in self.shards.covariates.items():
            column = table[name]
            if spec["kind"] == "categorical":
                out[name] = self._level_indices(name, column, spec["levels"])
            else:
                out[name] = column.astype(np.float32)
        return out

    def _level_indices(self, name: str, column: np.ndarray, levels: list[str]) -> np.ndarray:
        """Level index per subject; a missing value is ``MISSING_LEVEL``, which the model embeds as its null."""
        index = {level: i for i, level in enumerate(levels)}
        out = np.empty(len(column), dtype=np.int64)
        for row, value in enumerate(column):
            text = str(value)
            if is_missing(text):
                out[row] = MISSING_LEVEL
            elif text in index:
                out[row] = index[text]
            else:  # a value the manifest does not list: the shards were edited, or written by something else
                raise DataError(
                    f"{self.shards.root}: covariate {name!r} of subject row {row} is {text!r}, not one of the "
                    f"manifest's levels {levels}; re-run ingest so the subjects table and manifest agree"
                )
        return out

    @property
    def step_size(self) -> int:
        """Stream positions one step consumes over all ranks: ``W * b``."""
        return self.world_size * self.batch_size

    def batch_at(self, step_position: int) -> Batch:
        """This rank's batch of the step that starts at global stream position ``step_position``."""
        positions = rank_positions(step_position, self.rank, self.batch_size)
        first = positions.start
        indices = stream_indices(self.shards.num_subjects, self.seed, first, self.batch_size)
        if self.patch_size is not None:
            positions = np.arange(first, first + self.batch_size)
            corners = patch_corners(self.shards.shape, self.patch_size, self.seed, positions)
            buf = self._buffers.take()
            for i, (index, corner) in enumerate(zip(indices, corners)):
                self.shards.read_into(int(index), buf[i, 0], patch_selection(corner, self.patch_size))
        elif self.mode == "3d":
            buf = self._buffers.take()
            self.shards.read_batch_into(indices, buf)
        else:
            axis = self.slice_axis
            slices = slice_indices(self.shards.shape[axis], self.seed, np.asarray(positions), self.slice_range)
            buf = self._buffers.take()
            selections = [tuple(int(s) if a == axis else slice(None) for a in range(3)) for s in slices]
            self.shards.read_batch_into(indices, buf, selections)
        return Batch(
            x=torch.from_numpy(buf),
            covariates={name: torch.from_numpy(col[indices]) for name, col in self._table.items()},
            indices=torch.from_numpy(indices),
            position=first,
        )

    @staticmethod
    def _put(out: queue.Queue, item: object, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _produce(self, start: int, out: queue.Queue, stop: threading.Event) -> None:
        step_position = start
        try:
            while not stop.is_set():
                self._put(out, self.batch_at(step_position), stop)
                step_position += self.step_size
        except BaseException as e:  # handed to the consumer, which re-raises it in its own thread
            self._put(out, e, stop)

    def __iter__(self) -> Iterator[Batch]:
        """Infinite batches; step k starts at ``position_at_iter + k*W*b``; ``position`` moves as batches leave."""
        self.close()
        if self.prefetch <= 0:
            while True:
                batch = self.batch_at(self.position)
                self.position += self.step_size
                yield batch
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(self.position, out, stop), daemon=True)
        self._stop, self._thread = stop, thread
        thread.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                self.position += self.step_size
                yield item
        finally:
            if self._thread is thread:
                self.close()

    def close(self) -> None:
        """Stop the prefetch thread (batches it read ahead are discarded; ``position`` is unaffected)."""
        if self._thread is not None and self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=30)
        self._stop = self._thread = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
