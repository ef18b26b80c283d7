"""``stats randomise``: permutation inference over shards, sliced over ranks and array tasks, resumable.

A job on the sliced-job core (``hpcdiff.batch``). Planning (one rank per task) checks the inputs and fixes the
design, the permutations and the plan digest. Output b is batch b of permutations, computed as batched products
(``permute``) and written as one partial file with its record; whoever finds every batch recorded merges the
partial files in batch order and writes the maps, the null and summary.json. Permutation k is a pure function of
(seed, k) and batch boundaries are fixed by the plan, so the outputs are the same bytes however the work was cut.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from hpcdiff.atomic import atomic_write, write_text_atomic
from hpcdiff.batch import STATE_DIR, Marker, Record, Worker, digest, plan_once, run
from hpcdiff.data.covariates import is_missing
from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import ConfigError, DataError, UsageError
from hpcdiff.stats import figures
from hpcdiff.stats.design import Design, _text
from hpcdiff.stats.outputs import save_json, save_map
from hpcdiff.stats.permtail import ACCELS, fit_tail, min_permutations
from hpcdiff.stats.permute import FreedmanLane, check_blocks, fwe_p, permutation
from hpcdiff.stats.prepare import Prepared, StatsOptions, load_design, prepare
from hpcdiff.stats.source import open_shards
from hpcdiff.stats.tfce import TFCEOptions, tfce

log = logging.getLogger(__name__)

PARTIALS = "partials"


@dataclass(kw_only=True)
class RandomiseOptions:
    """What ``stats randomise`` tests, and how its permutations are cut into batches."""

    group: str
    """categorical column whose two levels are compared (tested unless ``contrast`` says otherwise)."""
    permutations: int
    """number of random permutations N (the observed order is counted on top: p >= 1 / (N + 1))."""
    covariates: Sequence[str] = ()
    """nuisance columns (plus the intercept, and the group when it is not tested)."""
    levels: Sequence[str] | None = None
    """(reference, other) group levels when the group has more than two."""
    contrast: Sequence[str] = ()
    """columns tested: one gives t, several an F; a categorical name stands for all its dummies."""
    one_sided: bool = False
    """rank t itself (FSL's convention) rather than |t| (nilearn's default); F is always one-sided."""
    tfce: TFCEOptions | None = None
    """also compute TFCE and its FWE p."""
    accel: str = "none"
    """FWE p from a fitted null: none, gamma (three moments) or tail (generalised Pareto)."""
    exchangeability_blocks: str | None = None
    """column whose values are blocks: subjects are permuted only within their block."""
    seed: int = 0
    """with k, fixes permutation k."""
    batch_size: int = 100
    """permutations per batch: the unit of slicing, resume and memory (batch x columns x voxels x 8 bytes)."""
    threads: int = 1
    """BLAS threads per process; part of the plan so that every slicing rounds alike."""
    cache_gb: float = 1.0
    """keep the nuisance residuals in memory when they fit in this many GB; else re-read the shards per batch."""
    alpha: float = 0.05
    """FWE level for the counts in the summary."""
    overwrite: bool = False
    """replace a randomise run of another plan in the output folder."""
    stats: StatsOptions = field(default_factory=StatsOptions)
    """mask threshold and subjects read per block."""

    def __post_init__(self) -> None:
        if self.permutations < 1:
            raise ConfigError(f"--permutations must be at least 1, got {self.permutations}")
        if self.batch_size < 1 or self.threads < 1:
            raise ConfigError(f"--batch-size and --threads must be >= 1, got {self.batch_size}, {self.threads}")
        if self.accel not in ACCELS:
            raise ConfigError(f"unknown --accel '{self.accel}': choose one of {', '.join(ACCELS)}")
        if self.accel != "none" and self.permutations < min_permutations(self.accel):
            raise ConfigError(
                f"--accel {self.accel} fits the null of at least {min_permutations(self.accel)} permutations, "
                f"got --permutations {self.permutations}: give more, or --accel none"
            )
        if not 0 < self.alpha < 1:
            raise ConfigError(f"--alpha must be in (0, 1), got {self.alpha}")


def tested_columns(design: Design, contrast: Sequence[str], source: str) -> list[int]:
    """Design columns named by ``contrast`` (the group column when empty)."""
    if not contrast:
        assert design.group_column is not None
        return [design.group_column]
    found: list[int] = []
    for name in contrast:
        hits = [i for i, c in enumerate(design.columns) if i > 0 and (c == name or c.startswith(f"{name}["))]
        if not hits:
            raise UsageError(
                f"--contrast '{name}' is not a column of the model for {source} "
                f"(columns: {', '.join(design.columns[1:])}); the intercept cannot be tested"
            )
        found += [i for i in hits if i not in found]
    return sorted(found)


def exchangeability_blocks(shards: ShardSet, rows: np.ndarray, column: str | None) -> np.ndarray | None:
    """Block label of each design row from ``column`` of the subjects table (None: one block)."""
    if column is None:
        return None
    subjects = shards.subjects()
    if column not in subjects:
        raise UsageError(
            f"--exchangeability-blocks '{column}' is not a column of {shards.root} (columns: {', '.join(subjects)})"
        )
    labels = _text(np.asarray(subjects[column])[rows])
    missing = np.array([is_missing(label) for label in labels], dtype=bool)
    if missing.any():
        raise DataError(f"{missing.sum()} analysed subjects have no '{column}' value in {shards.root}: fill them in")
    check_blocks(labels, column)
    return np.unique(labels, return_inverse=True)[1]


class Residuals:
    """Nuisance residuals e = (Y - shift) - Z gamma by blocks of subjects: one read to fit gamma, one for e'e (kept
    in memory when they fit ``cache_bytes``), then, when they did not fit, one more for every batch."""

    def __init__(self, prep: Prepared, model: FreedmanLane, cache_bytes: float) -> None:
        self._prep, self._model = prep, model
        self._y = prep.voxels()
        self._bounds = np.cumsum((0, *self._y.chunks[0]))
        self.gamma = model.nuisance_fit(self._read())
        fits = model.num_rows * self._y.shape[1] * 8 <= cache_bytes
        self._cache = list(self._residuals()) if fits else None
        blocks = self._cache if self._cache is not None else self._residuals()
        self.ee = sum(np.einsum("bv,bv->v", e, e) for _, e in blocks)

    def _read(self) -> Iterator[tuple[slice, np.ndarray]]:
        for i, (lo, hi) in enumerate(zip(self._bounds[:-1], self._bounds[1:])):
            block = self._y.blocks[i].compute(scheduler="synchronous")
            yield slice(int(lo), int(hi)), np.asarray(block, dtype=np.float64) - self._prep.shift

    def _residuals(self) -> Iterator[tuple[slice, np.ndarray]]:
        for rows, y in self._read():
            yield rows, self._model.residuals(y, rows, self.gamma)

    def products(self, orders: np.ndarray) -> np.ndarray:
        """X_P' e for each order, shape (B, p, V); one pass over the data (or the cache)."""
        blocks = self._cache if self._cache is not None else self._residuals()
        return self._model.products(blocks, orders)


def _tfce_ranked(values: np.ndarray, prep: Prepared, opts: TFCEOptions, two_sided: bool) -> np.ndarray:
    """TFCE of a masked map (V,) on the grid, back in the mask: signed when two-sided."""
    grid = np.zeros(int(np.prod(prep.shape)))
    grid[prep.mask] = np.nan_to_num(values)
    return tfce(grid.reshape(prep.shape), opts, two_sided).ravel()[prep.mask]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def partial_name(batch: int) -> str:
    """Where batch ``batch``'s partial result lives, relative to the output folder."""
    return f"{PARTIALS}/batch-{batch:06d}.npz"


@dataclass
class _Observed:
    """What every batch and the finish need from the data: read once per process, and only when needed."""

    prep: Prepared
    data: Residuals
    stat: np.ndarray
    observed: np.ndarray
    tfce_observed: np.ndarray | None


@dataclass
class _RandomiseJob:
    """``stats randomise`` as a batch job: output b is batch b of permutations, [b S, (b + 1) S) with S the batch
    size, written as one partial file (max per permutation, per-voxel exceedance counts); finishing merges the
    partials in batch order and writes the maps, the nulls and summary.json.

    The job is planned on one rank and handed to the others, so it holds plain data; each process reads the shards
    itself (template, nuisance fit, observed statistic) the first time it writes a batch or finishes.
    """

    root: Path
    out: Path
    options: RandomiseOptions
    design: Design
    model: FreedmanLane
    blocks: np.ndarray | None
    shards_name: str
    plan_sha256: str
    num_outputs: int
    finish_files: tuple[str, ...]
    _observed: _Observed | None = field(default=None, init=False, repr=False)

    def marker(self) -> Marker:
        partials = [partial_name(b) for b in range(self.num_outputs)]
        return Marker("stats randomise", "maps", self.plan_sha256, (*partials, *self.finish_files))

    def files(self, index: int) -> list[str]:
        return [partial_name(index)]

    @property
    def two_sided(self) -> bool:
        return self.model.two_sided and self.model.statistic == "t"

    def observed(self) -> _Observed:
        if self._observed is None:
            o = self.options
            prep = prepare(self.root, o.stats, self.design.rows)
            data = Residuals(prep, self.model, o.cache_gb * 1e9)
            stat = self.model.statistics(data.products(np.arange(self.model.num_rows)[None]), data.ee)[0]
            tfce_observed = _tfce_ranked(stat, prep, o.tfce, self.two_sided) if o.tfce else None
            self._observed = _Observed(prep, data, stat, self.model.ranked(stat), tfce_observed)
        return self._observed

    def write(self, index: int) -> dict[str, Any]:
        o, seen = self.options, self.observed()
        ks = range(index * o.batch_size, min((index + 1) * o.batch_size, o.permutations))
        orders = np.stack([permutation(o.seed, k, self.model.num_rows, self.blocks) for k in ks])
        perm_stats = self.model.statistics(seen.data.products(orders), seen.data.ee)
        ranked = self.model.ranked(perm_stats)
        arrays = {"max_stat": np.nanmax(ranked, axis=1), "exceed_stat": (ranked >= seen.observed).sum(axis=0)}
        if o.tfce:
            enhanced = [np.abs(_tfce_ranked(s, seen.prep, o.tfce, self.two_sided)) for s in perm_stats]
            arrays["max_tfce"] = np.array([e.max() for e in enhanced])
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write(self.out / partial_name(index), buffer.getvalue())
        log.info("randomise: batch %d of %d written (permutations %d..%d)", index, self.num_outputs, ks[0], ks[-1])
        return {"permutations": [ks[0], ks[-1] + 1]}

    def finish(self, records: list[Record]) -> dict[str, Any]:
        merged = _merge(self.out, records)
        assert merged["max_stat"].size == self.options.permutations, "a batch's record covers other permutations"
        return _finish(self, self.observed(), merged)


def _merge(out: Path, records: list[Record]) -> dict[str, np.ndarray]:
    """Every batch's arrays from its partial file, checked against its record: maxima concatenated in k order,
    counts (integers) summed, so the result does not depend on who computed which batch."""
    merged: dict[str, np.ndarray] = {}
    for record in records:
        (name,) = record.files
        raw = (out / name).read_bytes()
        if _sha256(raw) != record.files[name]["sha256"]:
            raise DataError(
                f"{out / name} does not match its record (sha256 differs): it changed after it was written; "
                f"remove it and {out / STATE_DIR / 'records' / f'{record.index:06d}.json'}, then rerun to recompute "
                "that batch"
            )
        with np.load(io.BytesIO(raw), allow_pickle=False) as part:
            for key in part.files:
                value = part[key]
                if key not in merged:
                    merged[key] = value
                elif key.startswith("max"):
                    merged[key] = np.concatenate([merged[key], value])
                else:
                    merged[key] = merged[key] + value
    return merged


def _finish_files(options: RandomiseOptions) -> tuple[str, ...]:
    """What finishing writes; summary.json last (it is what a reader waits for)."""
    families = ["", "_tfce"] if options.tfce else [""]
    maps = ["stat", "p_uncorrected", "mask"] + (["tfce"] if options.tfce else [])
    files = [f"{m}.nii.gz" for m in maps]
    for suffix in families:
        files += [f"p{suffix}_fwe.nii.gz", f"max_null{suffix}.txt", f"max_null{suffix}.png"]
        files += [f"p{suffix}_fwe_permutation.nii.gz"] if options.accel != "none" else []
    return (*files, "summary.json")


def _plan(root: Path, out: Path, o: RandomiseOptions) -> _RandomiseJob:
    """Check the inputs and fix the plan: which subjects, which model, which permutations (no voxel is read)."""
    shards = open_shards(root)
    for name in o.contrast:
        if name.split("[")[0] not in shards.covariates:
            known = ", ".join(sorted(shards.covariates))
            raise UsageError(f"--contrast '{name}' names no column of {root} (columns: {known})")
    # A tested column that is not yet in the model joins it (as a column of interest, not as nuisance).
    covariates = list(o.covariates) + [c for c in o.contrast if c not in o.covariates and c != o.group]
    design = load_design(root, group=o.group, covariates=covariates, levels=o.levels)
    tested = tested_columns(design, o.contrast, str(root))
    blocks = exchangeability_blocks(shards, design.rows, o.exchangeability_blocks)
    model = FreedmanLane(design.x, tested, two_sided=not o.one_sided)
    plan = {
        "command": "stats randomise",
        "shards": str(shards.root),
        "manifest_sha256": _sha256(json.dumps(shards.manifest, sort_keys=True).encode()),
        "rows_sha256": _sha256(design.rows.astype(np.int64).tobytes()),
        "design_sha256": _sha256(design.x.tobytes()),
        "columns": design.columns,
        "tested": [design.columns[i] for i in tested],
        "permutations": o.permutations,
        "seed": o.seed,
        "batch_size": o.batch_size,
        "threads": o.threads,
        "two_sided": model.two_sided and model.statistic == "t",
        "tfce": asdict(o.tfce) if o.tfce else None,
        "accel": o.accel,
        "alpha": o.alpha,
        "exchangeability_blocks": o.exchangeability_blocks,
        "stats": asdict(o.stats),
    }
    return _RandomiseJob(
        root=root,
        out=out,
        options=o,
        design=design,
        model=model,
        blocks=blocks,
        shards_name=str(shards.root),
        plan_sha256=digest(plan),
        num_outputs=-(-o.permutations // o.batch_size),
        finish_files=_finish_files(o),
    )


def run_randomise(
    root: str | Path, out: str | Path, options: RandomiseOptions, *, task: int = 0, num_tasks: int = 1
) -> dict[str, Any]:
    """Compute this worker's batches of ``stats randomise``; whoever finds every batch done writes the outputs.

    A job on the sliced-job core (hpcdiff.batch): worker ``task * W + rank`` of ``num_tasks * W`` computes batches
    ``worker, worker + num_tasks * W, ...``; a rerun skips recorded batches; ``out`` must be new, empty, or this
    plan's (``options.overwrite`` replaces another plan's files, never files it did not write).

    Returns:
        the summary (as in ``out/summary.json``) when the run is complete, with this worker's progress; else the
        progress with ``complete: False``.
    """
    from hpcdiff import dist

    started = time.perf_counter()
    root, out = Path(root), Path(out)
    Worker(task, num_tasks, 0, 1)  # refuse a bad --task before bringing up the ranks
    ctx = dist.init(device="cpu")
    try:
        worker = Worker(task, num_tasks, ctx.rank, ctx.world_size)
        job = plan_once(ctx, lambda: _plan(root, out, options), _RandomiseJob.marker, out, options.overwrite)
        with threadpool_limits(limits=options.threads):
            outcome = run(job, worker)
    finally:
        ctx.close()
    progress = {
        "batches_computed": outcome.written,
        "num_batches": job.num_outputs,
        "worker": worker.index,
        "seconds": time.perf_counter() - started,
    }
    if outcome.finished_here:
        return {**outcome.summary, **progress}
    if outcome.finished:
        return {**json.loads((out / "summary.json").read_text()), **progress}
    return {"command": "randomise", "complete": False, **progress}


def _finish(job: _RandomiseJob, seen: _Observed, merged: dict[str, np.ndarray]) -> dict[str, Any]:
    """Maps, nulls, figures and summary.json from the merged batches; the same bytes whoever writes them."""
    o, out, model, design = job.options, job.out, job.model, job.design
    prep, stat, observed, tfce_observed = seen.prep, seen.stat, seen.observed, seen.tfce_observed
    n_perm = o.permutations
    p_uncorrected = np.where(np.isnan(observed), np.nan, (1.0 + merged["exceed_stat"]) / (n_perm + 1.0))
    maps = {"stat": stat, "p_uncorrected": p_uncorrected}
    inference: dict[str, Any] = {}
    nulls = [("", "max_stat", observed)]
    if tfce_observed is not None:
        maps["tfce"] = tfce_observed
        nulls.append(("_tfce", "max_tfce", np.abs(tfce_observed)))
    for suffix, key, ranked in nulls:
        null = merged[key]
        p_perm = fwe_p(ranked, null)
        name = f"p{suffix}_fwe"
        maps[name] = p_perm
        entry: dict[str, Any] = {"null_mean": float(null.mean()), "null_max": float(null.max())}
        if o.accel != "none":
            fit = fit_tail(null, o.accel)
            maps[f"{name}_permutation"] = p_perm
            maps[name] = fit.sf(ranked)
            entry["accel"] = fit.to_dict()
        entry["min_p"] = float(np.nanmin(maps[name]))
        entry["significant_voxels"] = int(np.sum(maps[name] <= o.alpha))
        inference[f"fwe{suffix}"] = entry
        write_text_atomic(out / f"max_null{suffix}.txt", "".join(f"{v!r}\n" for v in null.tolist()))
        figures.histogram(
            null,
            out / f"max_null{suffix}.png",
            f"max {'TFCE' if suffix else model.statistic} over the mask, {n_perm} permutations",
            f"max {'TFCE' if suffix else model.statistic}",
            ylabel="permutations",
        )
    for name, values in maps.items():
        prep.save(out, name, values)
    save_map(out / "mask.nii.gz", prep.mask[prep.mask].astype(np.float32), prep.mask, prep.shape, prep.shards.affine)
    peak = int(np.nanargmax(observed))
    peak_ijk = np.unravel_index(np.flatnonzero(prep.mask)[peak], prep.shape)
    summary = {
        "command": "randomise",
        "complete": True,
        "shards": job.shards_name,
        "statistic": model.statistic,
        "tested": [design.columns[i] for i in model.tested],
        "columns": design.columns,
        "nuisance": [design.columns[i] for i in model.nuisance],
        "two_sided": model.two_sided and model.statistic == "t",
        "df": model.df,
        "num_subjects": int(design.rows.size),
        "subjects_left_out": int(prep.shards.num_subjects - design.rows.size),
        "exchangeability_blocks": o.exchangeability_blocks,
        "permutations": n_perm,
        "seed": o.seed,
        "batch_size": o.batch_size,
        "num_batches": job.num_outputs,
        "min_achievable_p": 1.0 / (n_perm + 1.0),
        "accel": o.accel,
        "tfce": asdict(o.tfce) if o.tfce else None,
        "alpha": o.alpha,
        "mask_voxels": int(prep.mask.sum()),
        "significant_voxels_uncorrected": int(np.sum(maps["p_uncorrected"] <= o.alpha)),
        **inference,
        "peak": {"stat": float(stat[peak]), "voxel": [int(i) for i in peak_ijk], "p_fwe": float(maps["p_fwe"][peak])},
        "plan_digest": job.plan_sha256,
    }
    save_json(out / "summary.json", summary)
    return summary
