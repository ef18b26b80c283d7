"""Covariate tables: the manifest's schema of a table, a cohort TSV checked against a trained schema, and cohorts
drawn from a training table.

A sampled cohort must stay inside what the model saw: a continuous value outside the training range or an unseen
level would make the model extrapolate silently, so a TSV that asks for one is refused with its row and column.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hpcdiff.errors import DataError, UsageError

MISSING = ("", "n/a", "NA", "nan")
"""Spellings of a missing value in a TSV cell: the model then uses that covariate's null embedding."""


def schema_of(columns: Mapping[str, Sequence[Any]], kinds: Mapping[str, str]) -> dict[str, dict]:
    """The manifest's covariate schema of a table.

    Continuous: min/max/mean/std over finite values; categorical: sorted levels.
    """
    schema: dict[str, dict] = {}
    for name, kind in kinds.items():
        values = columns[name]
        if kind == "continuous":
            v = np.asarray(values, dtype=np.float64)
            v = v[np.isfinite(v)]
            stats = (v.min(), v.max(), v.mean(), v.std()) if v.size else (math.nan,) * 4
            schema[name] = {"kind": kind, **dict(zip(("min", "max", "mean", "std"), map(float, stats)))}
        else:
            schema[name] = {"kind": kind, "levels": sorted({str(x) for x in values})}
    return schema


def _cell(path: Path, row: int, name: str, text: str, spec: Mapping[str, Any]) -> float | str:
    where = f"{path}: row {row} (line {row + 1}), column {name!r}"
    text = text.strip()
    if text in MISSING:
        return math.nan if spec["kind"] == "continuous" else "n/a"
    if spec["kind"] == "categorical":
        if text not in spec["levels"]:
            raise DataError(f"{where}: level {text!r} was not seen in training; use one of {spec['levels']}")
        return text
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: {text!r} is not a number (the covariate is continuous)") from None
    lo, hi = float(spec["min"]), float(spec["max"])
    if not math.isfinite(value) or not lo <= value <= hi:
        raise DataError(f"{where}: {text} is outside the trained range [{lo:g}, {hi:g}]; the model would extrapolate")
    return value


def read_cohort_tsv(path: str | Path, schema: Mapping[str, Mapping[str, Any]], n: int | None) -> dict[str, list]:
    """Read a cohort TSV: one row per synthetic subject, one column per covariate the model was trained on.

    Args:
        path: tab-separated file with a header row naming exactly the trained covariates (any order).
        schema: the trained covariate schema (continuous min/max, categorical levels).
        n: the subject count asked for on the command line; when given, it must equal the row count.

    Returns:
        Columns in schema order: float (NaN = missing) for continuous, str ("n/a" = missing) for categorical.

    Raises:
        DataError: a missing or unknown column, a value of the wrong type or outside the trained range, no rows,
            or a row count other than ``n``; the message names the row and column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such covariates file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = [h.strip() for h in next(reader, [])]
        rows = [r for r in reader if any(c.strip() for c in r)]
    unknown = [h for h in header if h not in schema]
    if unknown:
        raise DataError(
            f"{path}: row 0 (header), column {unknown[0]!r}: not a covariate of the model; "
            f"the columns must be exactly {list(schema)}"
        )
    missing = [name for name in schema if name not in header]
    if missing:
        raise DataError(f"{path}: row 0 (header): column {missing[0]!r} is missing; add it (n/a marks a gap)")
    if len(set(header)) != len(header):
        raise DataError(f"{path}: row 0 (header): a column is repeated in {header}")
    if not rows:
        raise DataError(f"{path}: no rows; write one row per synthetic subject")
    if n is not None and len(rows) != n:
        raise DataError(f"{path}: {len(rows)} rows but --n {n}: give one row per subject, or leave --n out")
    columns: dict[str, list] = {name: [] for name in schema}
    for row_number, row in enumerate(rows, 1):
        if len(row) != len(header):
            raise DataError(
                f"{path}: row {row_number} (line {row_number + 1}), column {header[min(len(row), len(header)) - 1]!r}:"
                f" {len(row)} fields for {len(header)} columns"
            )
        for name, text in zip(header, row):
            columns[name].append(_cell(path, row_number, name, text, schema[name]))
    return columns


def draw_cohort(table: Mapping[str, np.ndarray], names: Sequence[str], n: int, seed: int) -> dict[str, list]:
    """Covariates of ``n`` subjects, each a row of the training table drawn with replacement.

    Subject i's row depends only on (seed, i), so a cohort grows by appending and any worker can compute any
    subject's covariates. Drawing whole rows keeps the joint distribution (age by group, ...).

    Args:
        table: the training subjects table (``ShardSet.subjects()``).
        names: the covariates to draw (those the model was trained on).
    """
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    size = len(table["id"])
    if size == 0:
        raise DataError("the training shards hold no subjects to draw covariates from; pass --covariates FILE.tsv")
    rows = [int(np.random.Generator(np.random.PCG64([seed, i])).integers(size)) for i in range(n)]
    out: dict[str, list] = {}
    for name in names:
        column = table[name]
        out[name] = [float(column[r]) if column.dtype.kind == "f" else str(column[r]) for r in rows]
    return out
