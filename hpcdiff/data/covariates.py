"""Covariate tables: the one reader of BIDS TSV files, the manifest's schema of a table, a cohort TSV checked
against a trained schema, and cohorts drawn from a training table.

BIDS TSV has no quoting: a line is fields separated by tabs, nothing else. Reading it as CSV (where a stray ``"``
swallows the following lines into one value) or letting a repeated column name replace the first loses subjects
silently, so every TSV hpcdiff reads goes through ``read_bids_tsv``, which refuses what it cannot read exactly.

A sampled cohort must stay inside what the model saw: a continuous value outside the training range or an unseen
level would make the model extrapolate silently, so a TSV that asks for one is refused with its row and column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcdiff.errors import DataError, UsageError

MISSING = frozenset({"", "n/a", "NA", "nan"})
"""Spellings of a missing value in a TSV cell: the model then uses that covariate's null embedding."""
MISSING_LEVEL = "n/a"
"""How a missing categorical value is stored in a shard's subjects table (never one of the levels)."""

# A column name becomes an HDF5 dataset name: "/" nests groups, "." is the group itself, and control characters
# or edge whitespace make names that no one can type back.
_BAD_NAME = re.compile(r"^$|^\.|/|[\x00-\x1f\x7f]|^\s|\s$")


def is_missing(text: str | None) -> bool:
    """Whether a TSV cell is a missing value (see ``MISSING``)."""
    return text is None or text.strip() in MISSING


def is_number(text: str) -> bool:
    """Whether a TSV cell is a finite number, as Python's float() reads it."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@dataclass(frozen=True)
class TsvTable:
    """A BIDS TSV file: its column names and its rows (cell text by column, with the file's line number)."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]


def read_bids_tsv(path: str | Path) -> TsvTable:
    """Read a BIDS TSV file exactly: tab-separated fields, no quoting, UTF-8 (a byte-order mark is accepted).

    Raises:
        DataError: not UTF-8, an empty, repeated or unusable column name (``.``, ``/``, a trailing tab), or a
            line whose field count differs from the header's; the message names the file, line and column.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)"
        ) from None
    numbered = [(i, raw.rstrip("\r")) for i, raw in enumerate(text.split("\n"), 1)]
    numbered = [(i, line) for i, line in numbered if line.strip()]
    if not numbered:
        raise DataError(f"{path}: the file is empty; it needs a header line of tab-separated column names")
    header_line, header = numbered[0][0], numbered[0][1].split("\t")
    for position, name in enumerate(header, 1):
        where = f"{path}: line {header_line}, column {position}"
        if name == "" and position == len(header) > 1:
            raise DataError(f"{where}: the header ends with a tab (a column without a name); remove the trailing tab")
        if _BAD_NAME.search(name):
            raise DataError(
                f"{where}: column name {name!r} cannot be used (empty, starting with '.', containing '/', a control "
                "character or edge whitespace); rename it, e.g. to letters, digits and _"
            )
        if header.index(name) != position - 1:
            raise DataError(
                f"{where}: column {name!r} is repeated (also column {header.index(name) + 1}); "
                "give each column its own name"
            )
    rows, lines = [], []
    for number, line in numbered[1:]:
        cells = line.split("\t")
        if len(cells) != len(header):
            hint = " (a trailing tab?)" if len(cells) == len(header) + 1 and cells[-1] == "" else ""
            raise DataError(
                f"{path}: line {number} has {len(cells)} tab-separated fields for {len(header)} columns{hint}; "
                "give every line one field per column (n/a for a missing value)"
            )
        rows.append(dict(zip(header, cells)))
        lines.append(number)
    return TsvTable(path, header, rows, lines)


def guess_kinds(table: TsvTable, columns: Sequence[str]) -> dict[str, str]:
    """Guessed from the values: 'continuous' for a column of numbers (missing values aside), 'categorical' for words.

    A column mixing both is refused: a typo in one cell of a numeric column (``4O`` for ``40``, ``unknown`` for
    a gap) would otherwise silently turn the whole covariate into categories.
    """
    kinds: dict[str, str] = {}
    for name in columns:
        present = [(line, row[name].strip()) for line, row in zip(table.lines, table.rows) if not is_missing(row[name])]
        numbers = [(line, v) for line, v in present if is_number(v)]
        words = [(line, v) for line, v in present if not is_number(v)]
        if numbers and words:
            line, value = words[0] if len(numbers) >= len(words) else numbers[0]
            raise DataError(
                f"{table.path}: line {line}, column {name!r}: {value!r} mixes with the column's "
                f"{len(numbers)} numbers and {len(words)} non-numbers; write n/a for a missing value, fix the "
                "typo, or make every value a word (e.g. site-1) for a categorical covariate"
            )
        kinds[name] = "continuous" if numbers or not words else "categorical"
    return kinds


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
            schema[name] = {"kind": kind, "levels": sorted({str(x) for x in values if not is_missing(str(x))})}
    return schema


def _cell(path: Path, row: int, line: int, name: str, text: str, spec: Mapping[str, Any]) -> float | str:
    where = f"{path}: row {row} (line {line}), column {name!r}"
    text = text.strip()
    if text in MISSING:
        return math.nan if spec["kind"] == "continuous" else MISSING_LEVEL
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
    table = read_bids_tsv(path)
    header = table.columns
    unknown = [h for h in header if h not in schema]
    if unknown:
        raise DataError(
            f"{path}: row 0 (header), column {unknown[0]!r}: not a covariate of the model; "
            f"the columns must be exactly {list(schema)}"
        )
    missing = [name for name in schema if name not in header]
    if missing:
        raise DataError(f"{path}: row 0 (header): column {missing[0]!r} is missing; add it (n/a marks a gap)")
    if not table.rows:
        raise DataError(f"{path}: no rows; write one row per synthetic subject")
    if n is not None and len(table.rows) != n:
        raise DataError(f"{path}: {len(table.rows)} rows but --n {n}: give one row per subject, or leave --n out")
    columns: dict[str, list] = {name: [] for name in schema}
    for row_number, (line, row) in enumerate(zip(table.lines, table.rows), 1):
        for name in schema:
            columns[name].append(_cell(path, row_number, line, name, row[name], schema[name]))
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
