"""``stats randomise``: permutation inference over shards, sliced over ranks and array tasks, resumable.

One process: open the shards, build the design and the mask (the template pass every stats command makes), fit
the nuisance model, compute the observed statistic, then each of its batches of permutations (``permbatches``)
as batched products (``permute``), writing each batch's partial file. If every batch is then done, it merges the
files and writes the maps, the null and summary.json. Processes never talk to each other: the plan digest in
``plan.json`` and in every partial file is what ties them together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from hpcdiff.atomic import write_text_atomic
from hpcdiff.batch import Worker
from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import ConfigError, DataError, UsageError
from hpcdiff.stats import figures
from hpcdiff.stats.design import Design, _text
from hpcdiff.stats.outputs import save_json, save_map
from hpcdiff.stats.permbatches import PARTIALS, Batches, is_done, merge, save_partial
from hpcdiff.stats.permtail import ACCELS, fit_tail
from hpcdiff.stats.permute import FreedmanLane, check_blocks, fwe_p, permutation
from hpcdiff.stats.prepare import Prepared, StatsOptions, load_design, prepare
from hpcdiff.stats.source import open_shards
from hpcdiff.stats.tfce import TFCEOptions, tfce

log = logging.getLogger(__name__)

PLAN = "plan.json"


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
    missing = np.isin(labels, ["", "nan"])
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


def _written_by_us(name: str) -> bool:
    return name in (PLAN, PARTIALS, "summary.json") or name.startswith((".", "max_null")) or name.endswith(".nii.gz")


def _claim(out: Path, plan: dict[str, Any], digest: str, overwrite: bool) -> None:
    """Make ``out`` this plan's folder, resuming the same plan, refusing (or with ``overwrite`` clearing) another.

    With ``overwrite`` the previous run's outputs and partial files go; files it did not write are left alone.
    """
    path = out / PLAN
    try:
        old = json.loads(path.read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        old = "unreadable" if path.exists() else None
    foreign = sorted(p.name for p in out.iterdir() if not _written_by_us(p.name))
    if old == digest:
        return
    if (old is not None or foreign) and not overwrite:
        what = f"a randomise run of another plan ({path})" if old else f"files it did not write: {foreign[:5]}"
        raise UsageError(f"{out} holds {what}; choose another --out, or pass --overwrite to replace it")
    shutil.rmtree(out / PARTIALS, ignore_errors=True)
    for p in out.iterdir():
        if _written_by_us(p.name) and p.is_file() and p.name != PLAN and not p.name.startswith("."):
            p.unlink()
    write_text_atomic(path, json.dumps({**plan, "digest": digest}, indent=1, sort_keys=True) + "\n")


def run_randomise(
    root: str | Path, out: str | Path, options: RandomiseOptions, worker: Worker | None = None
) -> dict[str, Any]:
    """Compute this worker's batches of ``stats randomise``; merge and write the outputs if all are done.

    Returns:
        the summary (also in ``out/summary.json``) when complete; else a dict with ``complete: False``.
    """
    started = time.perf_counter()
    root, out, worker = Path(root), Path(out), worker or Worker(0, 1, 0, 1)
    o = options
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
    two_sided = model.two_sided and model.statistic == "t"
    with threadpool_limits(limits=o.threads):
        prep = prepare(root, o.stats, design.rows)
        plan = {
            "command": "randomise",
            "manifest_sha256": _sha256(json.dumps(shards.manifest, sort_keys=True).encode()),
            "rows_sha256": _sha256(design.rows.astype(np.int64).tobytes()),
            "design_sha256": _sha256(design.x.tobytes()),
            "mask_sha256": _sha256(prep.mask.tobytes()),
            "columns": design.columns,
            "tested": [design.columns[i] for i in tested],
            "permutations": o.permutations,
            "seed": o.seed,
            "batch_size": o.batch_size,
            "threads": o.threads,
            "two_sided": two_sided,
            "tfce": asdict(o.tfce) if o.tfce else None,
            "exchangeability_blocks": o.exchangeability_blocks,
            "block": o.stats.block,
        }
        digest = _sha256(json.dumps(plan, sort_keys=True).encode())
        out.mkdir(parents=True, exist_ok=True)
        _claim(out, plan, digest, o.overwrite)
        batches = Batches(o.permutations, o.batch_size)
        data = Residuals(prep, model, o.cache_gb * 1e9)
        stat = model.statistics(data.products(np.arange(model.num_rows)[None]), data.ee)[0]
        observed = model.ranked(stat)
        tfce_observed = _tfce_ranked(stat, prep, o.tfce, two_sided) if o.tfce else None
        computed, mine = 0, batches.of(worker)
        for done, b in enumerate(mine, 1):
            if is_done(out, b, digest):
                continue
            orders = np.stack([permutation(o.seed, k, model.num_rows, blocks) for k in batches.range(b)])
            perm_stats = model.statistics(data.products(orders), data.ee)
            ranked = model.ranked(perm_stats)
            arrays = {"max_stat": np.nanmax(ranked, axis=1), "exceed_stat": (ranked >= observed).sum(axis=0)}
            if o.tfce:
                enhanced = [np.abs(_tfce_ranked(s, prep, o.tfce, two_sided)) for s in perm_stats]
                arrays["max_tfce"] = np.array([e.max() for e in enhanced])
            save_partial(out, b, digest, arrays)
            computed += 1
            log.info("randomise: worker %d: batch %d done (%d of its %d)", worker.index, b, done, len(mine))
        merged = merge(out, batches, digest)
        progress = {"batches_computed": computed, "num_batches": batches.count, "worker": worker.index}
        if merged is None:
            return {"command": "randomise", "complete": False, **progress, "seconds": time.perf_counter() - started}
        summary = _finish(out, prep, design, model, stat, observed, tfce_observed, merged, o, digest, shards)
    return {**summary, **progress, "seconds": time.perf_counter() - started}


def _finish(
    out: Path,
    prep: Prepared,
    design: Design,
    model: FreedmanLane,
    stat: np.ndarray,
    observed: np.ndarray,
    tfce_observed: np.ndarray | None,
    merged: dict[str, np.ndarray],
    o: RandomiseOptions,
    digest: str,
    shards: ShardSet,
) -> dict[str, Any]:
    """Maps, nulls, figures and summary.json from the merged batches; the same bytes whoever writes them."""
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
        "shards": str(shards.root),
        "statistic": model.statistic,
        "tested": [design.columns[i] for i in model.tested],
        "columns": design.columns,
        "nuisance": [design.columns[i] for i in model.nuisance],
        "two_sided": model.two_sided and model.statistic == "t",
        "df": model.df,
        "num_subjects": int(design.rows.size),
        "subjects_left_out": int(shards.num_subjects - design.rows.size),
        "exchangeability_blocks": o.exchangeability_blocks,
        "permutations": n_perm,
        "seed": o.seed,
        "batch_size": o.batch_size,
        "num_batches": Batches(n_perm, o.batch_size).count,
        "min_achievable_p": 1.0 / (n_perm + 1.0),
        "accel": o.accel,
        "tfce": asdict(o.tfce) if o.tfce else None,
        "alpha": o.alpha,
        "mask_voxels": int(prep.mask.sum()),
        "significant_voxels_uncorrected": int(np.sum(maps["p_uncorrected"] <= o.alpha)),
        **inference,
        "peak": {"stat": float(stat[peak]), "voxel": [int(i) for i in peak_ijk], "p_fwe": float(maps["p_fwe"][peak])},
        "plan_digest": digest,
    }
    save_json(out / "summary.json", summary)
    return summary
