"""Which participants.tsv columns are categorical and which continuous, as the dataset declares them.

Labs code ``sex`` as 0/1 and ``site`` as numbers; guessed from the values alone they would become continuous
covariates. BIDS's ``participants.json`` says what a column is (``Levels``: categorical, ``Units``: continuous),
so that comes first; then ``--categorical``/``--continuous``; only then a guess from the values. The log says
which kind each column got and why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from hpcdiff.data.covariates import TsvTable, guess_kinds, is_missing, is_number
from hpcdiff.errors import DataError, UsageError

log = logging.getLogger(__name__)


def declared_kinds(root: Path, columns: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(kind, why) of each column that participants.json describes with ``Levels`` or ``Units``."""
    path = root / "participants.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); fix it or remove it") from e
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object with one entry per participants.tsv column")
    kinds: dict[str, tuple[str, str]] = {}
    for name in columns:
        entry = doc.get(name)
        if not isinstance(entry, dict):
            continue
        if "Levels" in entry:
            kinds[name] = ("categorical", "participants.json Levels")
        elif "Units" in entry:
            kinds[name] = ("continuous", f"participants.json Units {entry['Units']!r}")
    return kinds


def column_kinds(
    table: TsvTable, columns: Sequence[str], categorical: Sequence[str] = (), continuous: Sequence[str] = ()
) -> dict[str, str]:
    """The kind of each covariate column, logged with the reason.

    Args:
        table: participants.tsv as read (participants.json is read from the same folder).
        columns: its covariate columns (participant_id excluded).
        categorical, continuous: kinds given on the command line.

    Raises:
        UsageError: a flag names no column, names one twice, or contradicts participants.json.
        DataError: a column declared continuous holds a value that is not a number, or a column left to guessing
            mixes numbers and words.
    """
    root = table.path.parent
    both = sorted(set(categorical) & set(continuous))
    if both:
        raise UsageError(f"{both} given to both --categorical and --continuous: choose one")
    unknown = [c for c in (*categorical, *continuous) if c not in columns]
    if unknown:
        raise UsageError(f"--categorical/--continuous name {unknown}, not columns of participants.tsv {list(columns)}")
    flags = {c: "categorical" for c in categorical} | {c: "continuous" for c in continuous}
    declared = declared_kinds(root, columns)
    kinds: dict[str, str] = {}
    for name in columns:
        present = [r[name] for r in table.rows if not is_missing(r.get(name))]
        numeric = all(is_number(v) for v in present)
        if name in declared:
            kind, why = declared[name]
            if name in flags and flags[name] != kind:
                raise UsageError(
                    f"--{flags[name]} {name}: {root / 'participants.json'} declares it {kind} ({why}); "
                    "fix participants.json or drop the flag"
                )
        elif name in flags:
            kind, why = flags[name], f"--{flags[name]}"
        else:
            kind = guess_kinds(table, [name])[name]  # refuses a mix of numbers and words, naming the line
            why = "guessed: every value is a number" if numeric else "guessed: not every value is a number"
            if numeric and len(set(present)) <= 2:
                log.warning(
                    "ingest: covariate %s has only the values %s and is taken as continuous; if it is a code "
                    "(sex 0/1, a site), declare Levels in participants.json or pass --categorical %s",
                    name,
                    sorted(set(present)),
                    name,
                )
        if kind == "continuous" and not numeric:
            bad = next(v for v in present if not is_number(v))
            raise DataError(
                f"{root / 'participants.tsv'}: column {name!r} is continuous ({why}) but holds {bad!r}; "
                "fix the value, mark it missing (n/a), or declare the column categorical"
            )
        log.info("ingest: covariate %s: %s (%s)", name, kind, why)
        kinds[name] = kind
    return kinds
