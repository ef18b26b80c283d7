"""Who owns an output folder: a marker naming the command, kind, plan digest and every file the plan writes.

A command writes only into a new or empty folder, or one whose marker is its own: the same plan resumes, another
plan is refused unless ``--overwrite`` (which removes only the files the old marker lists). Files no marker lists
are never touched and always refused, by name: a wrong ``--out`` must not cost anyone their data.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from hpcdiff.atomic import write_text_atomic
from hpcdiff.errors import UsageError

STATE_DIR = ".hpcdiff"
"""The core's own folder inside an output folder: the marker, the records and the finishing claim."""
MARKER = "owner.json"
_SHOWN = 8


@dataclass(frozen=True)
class Marker:
    """What a folder holds and who wrote it."""

    command: str  # "ingest", "sample", ...
    kind: str  # what the folder is: "shards", "bids", "nifti"
    plan_sha256: str
    files: tuple[str, ...]  # every file the plan writes, relative posix paths (outputs and finishing files)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "files": list(self.files)}, indent=1) + "\n"


def marker_path(out: Path) -> Path:
    return Path(out) / STATE_DIR / MARKER


def read_marker(out: Path) -> Marker | None:
    path = marker_path(out)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Marker(raw["command"], raw["kind"], raw["plan_sha256"], tuple(raw["files"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"{path}: unreadable ownership marker ({e}); choose a new --out, or remove {Path(out) / STATE_DIR} and "
            "the files in that folder yourself"
        ) from e


def _is_tmp_of(name: str, listed: set[str]) -> bool:
    """A temporary file a killed atomic write of a listed file left (``.NAME.xxxx.tmp`` beside it)."""
    head, _, base = name.rpartition("/")
    if not (base.startswith(".") and base.endswith(".tmp")):
        return False
    stem = base[1:].rsplit(".", 2)[0]
    return f"{head}/{stem}".lstrip("/") in listed


def present_files(out: Path) -> list[str]:
    """Files in ``out`` (recursively, relative posix paths), apart from the core's own folder."""
    found = []
    for root, dirs, files in os.walk(out):
        rel = Path(root).relative_to(out)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d != STATE_DIR]
        found += [(rel / f).as_posix() for f in files]
    return sorted(found)


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def take(out: Path, marker: Marker, overwrite: bool = False) -> bool:
    """Make ``out`` this plan's folder; True when it already was (a resume). Raises UsageError (exit 2) otherwise.

    Call it once per task, on the rank that plans, before any output is written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose a folder")
    out.mkdir(parents=True, exist_ok=True)
    old = read_marker(out)
    present = present_files(out)
    cmd = f"hpcdiff {marker.command}"
    if old is None:
        if present:
            raise UsageError(
                f"--out {out} holds {len(present)} file(s) that {cmd} did not write ({_names(present)}); they are "
                "left untouched: choose a new or empty folder"
            )
    else:
        listed = set(old.files)
        foreign = [p for p in present if p not in listed and not _is_tmp_of(p, listed)]
        if old.command != marker.command or old.kind != marker.kind:
            raise UsageError(
                f"--out {out} holds the {old.kind} of `hpcdiff {old.command}` ({len(present)} file(s): "
                f"{_names(present)}); {cmd} does not write there, not even with --overwrite: choose another folder"
            )
        if foreign:
            raise UsageError(
                f"--out {out} holds {len(foreign)} file(s) that {cmd} did not write ({_names(foreign)}); they are "
                "left untouched, --overwrite included: move them away or choose another folder"
            )
        if old.plan_sha256 == marker.plan_sha256:
            return True
        if not overwrite:
            raise UsageError(
                f"--out {out} holds {len(present)} file(s) of another {cmd} plan (plan sha256 "
                f"{old.plan_sha256[:12]}..., this one {marker.plan_sha256[:12]}...: other inputs or options): "
                f"{_names(present)}. Give the same inputs and options to resume it, --overwrite to replace it, "
                "or choose another folder"
            )
        _remove(out, old, present)
    write_text_atomic(marker_path(out), marker.to_json())
    return False


def _remove(out: Path, old: Marker, present: list[str]) -> None:
    """Remove what the old marker lists (and its temporaries), the core's state, and folders left empty."""
    for rel in present:
        (out / rel).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    for root, _dirs, _files in sorted(os.walk(out), key=lambda w: -len(w[0])):
        if Path(root) != out and not any(Path(root).iterdir()):
            Path(root).rmdir()
