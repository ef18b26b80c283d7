"""One small record per output, written right after it: what a rerun checks to skip it and a finisher reads.

``OUT/.hpcdiff/records/NNNNNN.json`` holds the plan digest, each file's size and sha256, and the job's own data
(e.g. a shard's subject rows and quarantined inputs). A finisher reads these, never the outputs themselves, so
finishing costs records, not data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcdiff.atomic import file_sha256, write_text_atomic
from hpcdiff.batch.owner import STATE_DIR

RECORDS = "records"


@dataclass(frozen=True)
class Record:
    """One finished output."""

    index: int
    plan_sha256: str
    files: dict[str, dict[str, Any]]  # relative path -> {"size": bytes, "sha256": hex}
    data: dict[str, Any] = field(default_factory=dict)


def records_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR / RECORDS


def record_path(out: Path, index: int) -> Path:
    return records_dir(out) / f"{index:06d}.json"


def write_record(out: Path, index: int, plan_sha256: str, files: list[str], data: dict[str, Any]) -> Record:
    """Checksum this worker's own just-written files and record them with the job's data."""
    sums = {f: {"size": (Path(out) / f).stat().st_size, "sha256": file_sha256(Path(out) / f)} for f in files}
    record = Record(index, plan_sha256, sums, data)
    payload = {"index": index, "plan_sha256": plan_sha256, "files": sums, "data": data}
    write_text_atomic(record_path(out, index), json.dumps(payload, sort_keys=True) + "\n")
    return record


def read_record(out: Path, index: int) -> Record | None:
    try:
        raw = json.loads(record_path(out, index).read_text(encoding="utf-8"))
        return Record(int(raw["index"]), raw["plan_sha256"], raw["files"], raw.get("data", {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_done(out: Path, index: int, plan_sha256: str, files: list[str]) -> Record | None:
    """The record of output ``index`` if it belongs to this plan and its files are there at their recorded size.

    Metadata only: ``hpcdiff verify`` is the full re-read.
    """
    record = read_record(out, index)
    if record is None or record.plan_sha256 != plan_sha256 or sorted(record.files) != sorted(files):
        return None
    for name, meta in record.files.items():
        try:
            if os.stat(Path(out) / name).st_size != meta["size"]:
                return None
        except OSError:
            return None
    return record


def all_listed(out: Path, num_outputs: int) -> bool:
    """Whether every output has a record file: one directory listing, nothing opened."""
    try:
        names = set(os.listdir(records_dir(out)))
    except OSError:
        return False
    return all(f"{index:06d}.json" in names for index in range(num_outputs))


def all_records(out: Path, plan_sha256: str, num_outputs: int) -> list[Record] | None:
    """Every output's record, in index order, when all are there and of this plan; else None."""
    found = []
    for index in range(num_outputs):
        record = read_record(out, index)
        if record is None or record.plan_sha256 != plan_sha256:
            return None
        found.append(record)
    return found
