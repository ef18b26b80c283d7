"""Atomic, verified checkpoints with a LATEST pointer and retention that never loses the last good one.

A checkpoint is a folder ``step-000000123/`` holding ``state.pt`` and, written last, ``COMPLETE.json`` with the
file's size and sha256. It is assembled under a temporary name, fsynced, then renamed into place: without the
marker (or with a checksum that does not match) it does not exist. Loading walks back from the newest folder to
the newest *valid* one, saying which it skipped and why. In a run of many ranks one rank makes that decision and
the others take it (``resolve``): nobody else re-hashes the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcdiff.atomic import atomic_write, file_sha256, fsync_dir, naming
from hpcdiff.errors import BadCheckpointError, CheckpointError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9})$")
MARKER = "COMPLETE.json"
STATE = "state.pt"
LATEST = "LATEST"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint folder and what verification found."""

    path: Path
    step: int
    valid: bool
    reason: str = ""
    weights_sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "step": self.step,
            "valid": self.valid,
            "reason": self.reason,
            "weights_sha256": self.weights_sha256,
        }


def _without_zip_crc() -> contextlib.AbstractContextManager[Any]:
    """Skip the zip archive's per-record CRC32 (torch >= 2.6): the sha256 of the whole file already guards it."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


def _write_and_hash(path: Path, data: memoryview) -> str:
    """Write and fsync ``data`` while another thread hashes it (hashlib releases the GIL): one pass of wall time."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        with naming(path), open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return digest.result()


def weights_sha256(*state_dicts: Mapping[str, torch.Tensor]) -> str:
    """Digest of tensors in canonical order (name, dtype, shape, bytes): equal digests = bitwise-equal weights."""
    h = hashlib.sha256()
    for i, sd in enumerate(state_dicts):
        for name in sorted(sd):
            t = sd[name].detach().to("cpu").contiguous()
            h.update(f"{i}/{name}/{t.dtype}/{tuple(t.shape)}\n".encode())
            if t.numel():  # flattened first: a 0-d tensor (a counter buffer) cannot be viewed as bytes
                h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:09d}"


def verify(path: Path, deep: bool = True) -> CheckpointInfo:
    """Check a checkpoint folder against its completion marker.

    ``deep`` re-reads the state file and compares its sha256; the shallow check (marker present, size equal) is
    what retention uses for folders older than one already deep-verified.
    """
    m = _NAME.match(path.name)
    step = int(m.group(1)) if m else -1
    marker = path / MARKER
    if not marker.is_file():
        return CheckpointInfo(path, step, False, "no completion marker (interrupted while writing)")
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return CheckpointInfo(path, step, False, f"unreadable marker: {e}")
    state = path / STATE
    if not state.is_file():
        return CheckpointInfo(path, step, False, f"{STATE} missing")
    size = state.stat().st_size
    if size != meta.get("size"):
        return CheckpointInfo(path, step, False, f"{STATE} has {size} bytes, marker says {meta.get('size')}")
    if deep and file_sha256(state, direct=True) != meta.get("sha256"):
        return CheckpointInfo(path, step, False, f"{STATE} checksum differs from the marker (corrupted)")
    return CheckpointInfo(path, step, True, "", meta.get("weights_sha256"))


def list_checkpoints(root: Path, deep: bool = True) -> list[CheckpointInfo]:
    """Every checkpoint folder under ``root``, newest first, verified (``deep``: by checksum)."""
    if not root.is_dir():
        return []
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), reverse=True)
    return [verify(p, deep) for p in dirs]


def latest_valid(root: Path, deep: bool = True) -> CheckpointInfo | None:
    """The newest valid checkpoint; newer invalid ones are reported and skipped.

    ``deep=False`` trusts marker and size (metadata only, constant time whatever the checkpoint's size): what
    ``hpcdiff status`` shows. Loading always takes a deep-verified one.
    """
    for shallow in list_checkpoints(root, deep=False):
        info = verify(shallow.path) if shallow.valid and deep else shallow
        if info.valid:
            return info
        log.warning("skipping checkpoint %s: %s", info.path, info.reason)
    return None


def save(root: Path, step: int, state: dict[str, Any], digest: str, deep_verify: bool = True) -> CheckpointInfo:
    """Write ``state`` as checkpoint ``step`` atomically, then verify it.

    Args:
        root: the run's checkpoints folder.
        step: optimizer steps taken; names the folder.
        state: tensors and plain values only (it must load with ``weights_only=True``).
        digest: ``weights_sha256`` of model and EMA, stored in the marker for ``inspect``.
        deep_verify: re-read the file and compare its checksum now; ``Saver`` does it on a background thread.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    existing = verify(final) if final.exists() else None
    if existing is not None and existing.valid:
        # A resumed run re-reaching a saved step produces the same bytes (exact resume): keep the first copy.
        _point_latest(root, final)
        return existing
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        _write_folder(tmp, step, state, digest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (a full disk) leaves nothing behind
        raise
    if existing is not None:
        # An invalid folder with our name (a torn earlier write) is moved aside, never left half-replaced.
        shutil.rmtree(existing.path)
    os.replace(tmp, final)
    fsync_dir(root)
    info = verify(final, deep=deep_verify)
    if not info.valid:
        raise CheckpointError(f"checkpoint {final} failed verification right after writing: {info.reason}")
    _point_latest(root, final)
    return info


def _write_folder(folder: Path, step: int, state: dict[str, Any], digest: str) -> None:
    # Serialising to memory first lets the write and the checksum run side by side, and torch.save writes a
    # buffer far faster than it writes through a Python file wrapper.
    buffer = io.BytesIO()
    with _without_zip_crc():
        torch.save(state, buffer)
    data = buffer.getbuffer()
    sha256 = _write_and_hash(folder / STATE, data)
    meta = {"step": step, "size": data.nbytes, "sha256": sha256, "weights_sha256": digest, "time": time.time()}
    atomic_write(folder / MARKER, json.dumps(meta, indent=1).encode())


def _point_latest(root: Path, final: Path) -> None:
    atomic_write(root / LATEST, (final.name + "\n").encode())


def load(info: CheckpointInfo, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a verified checkpoint's state with ``weights_only=True`` (no code runs from the file).

    ``mmap`` maps the file instead of reading it: only the tensors the caller touches are read (sampling needs
    the EMA weights alone, not the optimizer's two moments per weight).
    """
    try:
        if mmap:
            return torch.load(str(info.path / STATE), map_location=map_location, weights_only=True, mmap=True)
        with open(info.path / STATE, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False: that would run whatever code the file holds. Not passed on.
        raise BadCheckpointError(
            f"refused to load {info.path / STATE}: it holds Python objects other than tensors and plain values, "
            "which hpcdiff never writes (a file from elsewhere, or tampered with). Do not load it another way: "
            f"remove {info.path} (training resumes from the checkpoint before it)"
        ) from None
    except Exception as e:  # torch raises several kinds for a bad archive
        raise BadCheckpointError(f"cannot load {info.path / STATE}: {e}; remove {info.path}") from e


@dataclass(frozen=True)
class Decision:
    """Which checkpoint a run resumes from, as the deciding rank found it: what the other ranks check against."""

    name: str
    sha256: str
    weights_sha256: str | None


def decide(root: Path) -> Decision | None:
    """The newest valid checkpoint, deep-verified (run on one rank, then broadcast)."""
    info = latest_valid(root)
    if info is None:
        return None
    meta = json.loads((info.path / MARKER).read_text())
    return Decision(info.path.name, str(meta["sha256"]), info.weights_sha256)


def taken(root: Path, decision: Decision) -> CheckpointInfo:
    """The checkpoint another rank decided on, checked by its marker alone (no re-hash on every rank).

    Raises:
        CheckpointError: the folder this rank sees is not the one decided on (a file system that does not show
            every node the same files, or a checkpoint replaced in between).
    """
    info = verify(root / decision.name, deep=False)
    try:
        sha = json.loads((info.path / MARKER).read_text()).get("sha256") if info.valid else None
    except (OSError, json.JSONDecodeError):
        sha = None
    if sha != decision.sha256:
        raise CheckpointError(
            f"{info.path}: this rank sees {'sha256 ' + str(sha)[:12] + '...' if sha else info.reason}, the deciding "
            f"rank verified sha256 {decision.sha256[:12]}...; every rank must see the same {root} (a shared file "
            "system); rerun once it does"
        )
    return info


def apply_retention(
    root: Path, keep_last: int, keep_every: int | None = None, verified: Path | None = None
) -> list[Path]:
    """Delete old checkpoints, keeping the newest ``keep_last`` valid ones and every ``keep_every``-th step.

    Only folders older than the newest valid checkpoint are candidates, so the last valid one always survives
    until a newer one has been verified by checksum (``verified`` names one the caller has just checked, to save
    a second read); older folders are checked by marker and size. Returns the removed folders.
    """
    infos = list_checkpoints(root, deep=False)
    # The newest folder that justifies deleting older ones must pass the checksum, not just the size check.
    for i, info in enumerate(infos):
        if info.valid and info.path != verified:
            infos[i] = verify(info.path)
        if infos[i].valid:
            break
    valid = [i for i in infos if i.valid]
    if not valid:
        return []
    keep = {i.path for i in valid[: max(keep_last, 1)]}
    if keep_every:
        keep |= {i.path for i in valid if i.step % keep_every == 0}
    newest_step = valid[0].step
    removed = []
    for info in infos:
        if info.path not in keep and info.step < newest_step:
            shutil.rmtree(info.path, ignore_errors=True)
            removed.append(info.path)
    for stale in root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return removed


def stage(state: Any) -> Any:
    """A host copy of every tensor in ``state`` (nested dicts, lists, tuples), for writing while training goes on.

    Copying is a memcpy per tensor, several times faster than serialising and writing; the copy then belongs to
    the writer, so the next steps can change the originals freely.
    """
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, Mapping):
        return {k: stage(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(stage(v) for v in state)
    return state


@dataclass(frozen=True)
class Saved:
    """A checkpoint that is on disk and verified, with what it cost: ``stall_s`` in training, ``write_s`` behind."""

    info: CheckpointInfo
    stall_s: float
    write_s: float


class Saver:
    """Stages a host copy of the state on the caller's thread; writes, verifies and prunes it on another.

    Training stalls only for the copy (and for the previous checkpoint, if that one is still being written). The
    write, fsync, rename and checksum read-back overlap the next steps; retention runs only after the read-back,
    so it never removes the last verified checkpoint in favour of one that is not. A checkpoint counts once
    ``wait`` or ``poll`` has returned it; a failed write (OSError: a full disk) or read-back (CheckpointError)
    is raised there.
    """

    def __init__(self, root: Path, keep_last: int, keep_every: int | None = None) -> None:
        self.root = root
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future[Saved] | None = None

    def save(self, step: int, state: dict[str, Any], digest: str) -> Saved | None:
        """Start checkpoint ``step``; returns the previous checkpoint if this call had to wait for it."""
        t0 = time.perf_counter()
        previous = self.wait()
        staged = stage(state)
        stall = time.perf_counter() - t0
        self._pending = self._pool.submit(self._write, step, staged, digest, stall)
        return previous

    def _write(self, step: int, state: dict[str, Any], digest: str, stall: float) -> Saved:
        t0 = time.perf_counter()
        info = save(self.root, step, state, digest, deep_verify=True)
        apply_retention(self.root, self.keep_last, self.keep_every, verified=info.path)
        return Saved(info, stall, time.perf_counter() - t0)

    def poll(self) -> Saved | None:
        """The checkpoint written since the last call, if it is done; never blocks."""
        if self._pending is None or not self._pending.done():
            return None
        return self.wait()

    def wait(self) -> Saved | None:
        """Block until the checkpoint in flight is written and verified; raise its error if it failed."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()
