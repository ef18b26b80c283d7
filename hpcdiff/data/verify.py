"""``hpcdiff verify SHARDS``: the full re-read of a shard directory, sliced over array tasks and ranks.

Every shard the manifest lists is hashed against the manifest's sha256 and every chunk is decoded. Each worker
names every bad file of its slice and exits 3 when it found any, without waiting for the others (the work is
uneven; nothing follows it). An I/O failure that a rerun can fix (EIO, a stale handle, too many open files) is not a
bad file: it is raised, and the command exits 75.
"""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hpcdiff.atomic import file_sha256
from hpcdiff.batch import Worker
from hpcdiff.data.shards import FORMAT, MANIFEST, _check_open_shard
from hpcdiff.errors import RETRY_ERRNOS, DataError, ShardError, retry_cause

log = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    root: Path
    num_shards: int
    checked: list[str]
    bad: list[str]  # "FILE: what is wrong", this worker's slice only


def _manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ShardError(f"no {MANIFEST} in {root}: not a shard directory, or its job did not finish") from e
    except ValueError as e:
        raise ShardError(f"{path}: unreadable ({e}); rerun the job that wrote {root}") from e
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _problem(path: Path, entry: dict) -> str | None:
    """What is wrong with one shard, or None; passing I/O failures are raised, not reported as bad data."""
    try:
        if not path.is_file():
            return "missing"
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            return f"sha256 {digest[:12]}... differs from the manifest's {entry['sha256'][:12]}..."
        with h5py.File(path, "r", locking=False) as f:
            k = _check_open_shard(f, path, int(entry["num_subjects"]))
            dset = f["images"]
            buf = np.empty(dset.shape[1:], dtype=dset.dtype)
            for i in range(k):
                dset.read_direct(buf, source_sel=np.s_[i])
    except ShardError as e:
        return str(e).removeprefix(f"{path}: ")
    except OSError as e:
        if retry_cause(e) is not None or e.errno in RETRY_ERRNOS or e.errno == errno.EINTR:
            raise
        return f"unreadable ({e})"
    return None


def verify(root: str | Path, worker: Worker) -> VerifyResult:
    """Re-read this worker's slice of the shards; raise DataError (exit 3) naming every bad file in it."""
    root = Path(root)
    manifest = _manifest(root)
    entries = manifest["shards"]
    checked, bad = [], []
    for index in worker.indices(len(entries)):
        entry = entries[index]
        problem = _problem(root / entry["file"], entry)
        checked.append(entry["file"])
        if problem is not None:
            bad.append(f"{root / entry['file']}: {problem}")
        log.debug("verify: %s %s", entry["file"], problem or "ok")
    if bad:
        error = DataError(
            f"{len(bad)} of the {len(checked)} shard(s) this worker checked are bad:\n  "
            + "\n  ".join(bad)
            + "\nremove those files and rerun the command that wrote them: it writes only what is missing"
        )
        error.on_every_rank = True  # nobody waits on this worker: no abort of its peers
        raise error
    return VerifyResult(root, len(entries), checked, bad)
