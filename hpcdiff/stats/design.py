"""The design matrix of a group model, built from the shards' subjects table and covariate schema.

Columns: intercept, the group indicator (1 for the second level, 0 for the reference), then each covariate:
continuous ones centred on the sample mean (so the intercept is the mean at average covariates), categorical
ones as dummies of every level present but the first. Subjects missing a value in a used column (NaN, or a
categorical cell spelled as one of ``hpcdiff.data.covariates.MISSING``, as ingest stores it: never a level) are left
out of the model, with a warning and counts (per column and in all) that the commands put in summary.json.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpcdiff.data.covariates import is_missing
from hpcdiff.errors import DataError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeftOut:
    """Subjects left out of a model: a summary.json entry, so a reader sees who is missing without the log.

    Attributes:
        missing: per used column, how many subjects have no value in it (a subject may count in several).
        missing_total: subjects missing a value in at least one used column.
        other_levels: subjects with every value but a group level other than the two compared.
    """

    missing: dict[str, int]
    missing_total: int
    other_levels: int

    def to_json(self) -> dict[str, Any]:
        return {
            "missing_values": dict(self.missing),
            "missing_values_total": self.missing_total,
            "other_group_levels": self.other_levels,
            "total": self.missing_total + self.other_levels,
        }


@dataclass
class Design:
    """A design matrix and which subjects its rows are.

    Attributes:
        x: design, shape (n, p), float64.
        columns: name of each column (``intercept``, ``group[B]``, ``age``, ``sex[M]``...).
        rows: global subject index of each row, shape (n,).
        group_column: index of the group indicator in ``columns``, or None when no group is modelled.
        levels: (reference, other) levels of the group, or None.
        left_out: subjects not in the model and why (see ``LeftOut``).
    """

    x: np.ndarray
    columns: list[str]
    rows: np.ndarray
    group_column: int | None = None
    levels: tuple[str, str] | None = None
    left_out: LeftOut = field(default_factory=lambda: LeftOut({}, 0, 0))

    def contrast(self, column: str | int) -> np.ndarray:
        """Unit contrast vector selecting one column, shape (p,)."""
        index = column if isinstance(column, int) else self.columns.index(column)
        c = np.zeros(len(self.columns))
        c[index] = 1.0
        return c

    @property
    def group_of_row(self) -> np.ndarray:
        """0/1 group membership per row, shape (n,) (only with a group)."""
        assert self.group_column is not None
        return self.x[:, self.group_column].astype(np.int64)


def _text(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _check_columns(names: Sequence[str], schema: Mapping[str, dict], source: str) -> None:
    for name in names:
        if name not in schema:
            known = ", ".join(sorted(schema)) or "none"
            raise UsageError(f"covariate column '{name}' does not exist in {source} (columns: {known})")


def build_design(
    subjects: Mapping[str, np.ndarray],
    schema: Mapping[str, dict],
    *,
    covariates: Sequence[str] = (),
    group: str | None = None,
    levels: Sequence[str] | None = None,
    source: str = "the shards",
) -> Design:
    """Build the design of ``intercept [+ group] + covariates`` for the subjects that have every value.

    Args:
        subjects: the subjects table, column -> array of length N (global order).
        schema: the manifest's covariate schema, column -> {"kind": "continuous"|"categorical", ...}.
        covariates: columns to adjust for.
        group: categorical column whose two-level difference is tested, or None.
        levels: (reference, other) group levels to compare; needed when the group has more than two levels.
        source: what to call the shards in messages (their path).
    """
    used = ([group] if group else []) + [c for c in covariates if c != group]
    _check_columns(used, schema, source)
    n_all = len(next(iter(subjects.values())))
    values: dict[str, np.ndarray] = {}
    absent: dict[str, np.ndarray] = {}
    for name in used:
        if schema[name].get("kind") == "continuous":
            v = np.asarray(subjects[name], dtype=np.float64)
            absent[name] = ~np.isfinite(v)
        else:
            v = _text(subjects[name])
            absent[name] = np.array([is_missing(x) for x in v], dtype=bool)
        values[name] = v
    keep = ~np.logical_or.reduce([absent[name] for name in used]) if used else np.ones(n_all, dtype=bool)
    left_out = LeftOut({name: int(absent[name].sum()) for name in used}, int((~keep).sum()), 0)
    chosen: tuple[str, str] | None = None
    if group:
        chosen = _group_levels(values[group][keep], schema[group], group, levels, source)
        other = keep & ~np.isin(values[group], chosen)
        keep &= ~other
        left_out = LeftOut(left_out.missing, left_out.missing_total, int(other.sum()))
    _log_left_out(left_out, n_all, group)
    rows = np.flatnonzero(keep)
    cols: list[np.ndarray] = [np.ones(rows.size)]
    names = ["intercept"]
    if group:
        assert chosen is not None
        cols.append((values[group][rows] == chosen[1]).astype(np.float64))
        names.append(f"{group}[{chosen[1]}]")
    for name in used:
        if name == group:
            continue
        v = values[name][rows]
        if schema[name].get("kind") == "continuous":
            cols.append(v - v.mean())
            names.append(name)
        else:
            present = [lv for lv in schema[name].get("levels", sorted(set(v))) if lv in set(v)]
            for lv in present[1:]:
                cols.append((v == lv).astype(np.float64))
                names.append(f"{name}[{lv}]")
    x = np.stack(cols, axis=1)
    if rows.size <= x.shape[1]:
        raise DataError(f"{rows.size} usable subjects in {source} for {x.shape[1]} model columns {names}")
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise DataError(f"the model columns {names} are collinear in {source}: drop a covariate")
    return Design(x, names, rows, 1 if group else None, chosen, left_out)


def _log_left_out(left_out: LeftOut, n_all: int, group: str | None) -> None:
    if left_out.missing_total:
        per_column = ", ".join(f"{name}: {count}" for name, count in left_out.missing.items() if count)
        log.warning("%d of %d subjects left out for missing values (%s)", left_out.missing_total, n_all, per_column)
    if left_out.other_levels:
        log.warning("%d of %d subjects left out: %s is neither compared level", left_out.other_levels, n_all, group)


def _group_levels(
    v: np.ndarray, spec: Mapping, group: str, levels: Sequence[str] | None, source: str
) -> tuple[str, str]:
    if spec.get("kind") != "categorical":
        raise UsageError(f"group column '{group}' in {source} is {spec.get('kind')}, a group must be categorical")
    present = [lv for lv in spec.get("levels", sorted(set(v))) if lv in set(v)]
    if levels:
        if len(levels) != 2 or any(lv not in present for lv in levels):
            raise UsageError(f"--levels must name two levels of '{group}' present in {source}, from {present}")
        return levels[0], levels[1]
    if len(present) < 2:
        raise DataError(
            f"group column '{group}' has only one level ({', '.join(present) or 'none'}) in {source}: "
            "a group difference needs two"
        )
    if len(present) > 2:
        raise UsageError(f"group column '{group}' has levels {present} in {source}: choose two with --levels A,B")
    return present[0], present[1]
