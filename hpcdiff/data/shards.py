"""The shard format: HDF5 files of conformed volumes plus a JSON manifest (docs/data-format.md).

Every file is written under a temporary name in the same directory, fsynced, renamed over the final name and the
directory fsynced, so a reader (or a rerun after kill -9) sees either a whole file or none. A shard is "verified"
when it opens, says ``complete``, its tables agree with its images and every chunk decompresses; the manifest holds
each shard's sha256 so a later reader can check that nothing changed since.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # registers the LZ4 filter with h5py: must come before any h5py file access
import numpy as np

from hpcdiff.atomic import atomic_path, file_sha256, write_text_atomic
from hpcdiff.errors import ShardError

FORMAT = "hpcdiff-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.tsv"
SUBJECTS_JSON = "subjects.json"
IMAGES = "images"
SUBJECTS = "subjects"
_STR = h5py.string_dtype("utf-8")
_BLOCK = 1 << 20


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as the manifest lists it."""

    file: str
    num_subjects: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "num_subjects": self.num_subjects, "sha256": self.sha256}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def _column(name: str, values: Sequence[Any]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"subjects[{name!r}] must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "USO":
        return np.array([str(v) for v in arr], dtype=object)
    if arr.dtype.kind in "iufb":
        return arr.astype(np.float64)
    raise ValueError(f"subjects[{name!r}] has unsupported dtype {arr.dtype}: use numbers or strings")


def write_shard(
    path: Path, images: np.ndarray, subjects: Mapping[str, Sequence[Any]], attrs: Mapping[str, Any] | None = None
) -> ShardInfo:
    """Write one shard atomically and return what the manifest needs to know about it.

    Args:
        path: final file name, e.g. ``SHARDS/shard-00003.h5``.
        images: volumes, shape (k, 1, D, H, W); stored as float16, one LZ4 chunk per subject.
        subjects: 1-D columns of length k: ``id``, ``session``, ``source_path``, ``source_sha256`` and covariates
            (strings are stored as utf-8, numbers as float64).
        attrs: extra file attributes (JSON-able scalars or strings), e.g. what the writer needs to skip it later.
    """
    path = Path(path)
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[1] != 1:
        raise ValueError(f"images must have shape (k, 1, D, H, W), got {images.shape}")
    k = images.shape[0]
    for name, col in subjects.items():
        if len(col) != k:
            raise ValueError(f"subjects[{name!r}] has {len(col)} rows for {k} images")
    spatial = images.shape[2:]
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        # maxshape lets a shard whose inputs were all quarantined still hold a (0, 1, D, H, W) dataset.
        dset = f.create_dataset(
            IMAGES,
            shape=images.shape,
            maxshape=(None, 1, *spatial),
            dtype=np.float16,
            chunks=(1, 1, *spatial),
            **hdf5plugin.LZ4(),
        )
        for i in range(k):
            dset[i] = images[i].astype(np.float16)
        group = f.create_group(SUBJECTS)
        for name, col in subjects.items():
            arr = _column(name, col)
            group.create_dataset(name, data=arr, dtype=_STR if arr.dtype == object else np.float64)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["num_subjects"] = k
        f.attrs["complete"] = True  # last: a file that has it was closed after everything above
    return ShardInfo(path.name, k, file_sha256(path))


def _check_open_shard(f: h5py.File, path: Path, expected: int | None) -> int:
    """Return the subject count after checking the file's own consistency; raise ShardError if it is off."""
    if not bool(f.attrs.get("complete", False)):
        raise ShardError(f"{path}: not marked complete (an interrupted write); rerun the job that writes it")
    if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {f.attrs.get('format_version')} != {FORMAT_VERSION}")
    k = int(f.attrs["num_subjects"])
    if IMAGES not in f or SUBJECTS not in f:
        raise ShardError(f"{path}: missing '{IMAGES}' or '{SUBJECTS}'")
    shape = f[IMAGES].shape
    if len(shape) != 5 or shape[0] != k or shape[1] != 1:
        raise ShardError(f"{path}: images have shape {shape}, expected ({k}, 1, D, H, W)")
    for name, dset in f[SUBJECTS].items():
        if dset.shape != (k,):
            raise ShardError(f"{path}: subjects/{name} has shape {dset.shape}, expected ({k},)")
    if expected is not None and k != expected:
        raise ShardError(f"{path}: holds {k} subjects, expected {expected}")
    return k


def verified_shard(path: Path, expected: int | None = None) -> ShardInfo | None:
    """The shard's ShardInfo if it is whole and consistent (every chunk decodes), else None.

    None covers a missing file, a truncated or corrupt one, one never marked complete, and one with a subject count
    other than ``expected``: each means "write it again".
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            k = _check_open_shard(f, path, expected)
            dset = f[IMAGES]
            buf = np.empty(dset.shape[1:], dtype=dset.dtype)
            for i in range(k):
                dset.read_direct(buf, source_sel=np.s_[i])
    except (OSError, ShardError, KeyError, ValueError):
        return None
    return ShardInfo(path.name, k, file_sha256(path))


def write_manifest(
    root: Path,
    *,
    shape: Sequence[int],
    spacing: Sequence[float],
    affine: np.ndarray | Sequence[Sequence[float]],
    covariates: Mapping[str, Any],
    shards: Sequence[ShardInfo],
    provenance: Mapping[str, Any],
    subjects: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Write ``root/manifest.json`` atomically; its presence means every listed shard is complete.

    ``subjects`` (column name -> values in global order, with ``shard`` and ``row``) is written first, atomically,
    to ``root/subjects.json``, so a reader gets the whole table from one small file.
    """
    if subjects is not None:
        columns = {name: list(values) for name, values in subjects.items()}
        write_text_atomic(Path(root) / SUBJECTS_JSON, json.dumps({"columns": columns}) + "\n")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
        "dtype": "float16",
        "num_subjects": int(sum(s.num_subjects for s in shards)),
        "covariates": dict(covariates),
        "shards": [s.to_json() for s in shards],
        "provenance": dict(provenance),
    }
    write_text_atomic(Path(root) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def _decode(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == object or arr.dtype.kind == "S":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr], dtype=str)
    return arr


class ShardSet:
    """Read side of a shard directory, safe to pickle and to use after fork.

    h5py handles do not pickle and must not be shared across fork, so files are opened lazily and the handles are
    keyed by process id: a child process (a DataLoader worker, a dask worker) opens its own.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.shape: tuple[int, int, int] = tuple(int(s) for s in manifest["shape"])  # type: ignore[assignment]
        self.affine = np.asarray(manifest["affine"], dtype=np.float64)
        self.num_subjects = int(manifest["num_subjects"])
        self.covariates: dict[str, Any] = manifest["covariates"]
        self.files = [self.root / s["file"] for s in manifest["shards"]]
        counts = np.array([int(s["num_subjects"]) for s in manifest["shards"]], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        if self._offsets[-1] != self.num_subjects:
            raise ShardError(
                f"{self.root / MANIFEST}: num_subjects {self.num_subjects} != sum over shards {self._offsets[-1]}"
            )
        self._pid = -1
        self._handles: dict[int, h5py.File] = {}
        self._subjects: dict[str, np.ndarray] | None = None

    @classmethod
    def open(cls, root: str | Path, verify: bool = False) -> ShardSet:
        """Open a shard directory; with ``verify`` every file's sha256 is checked against the manifest."""
        root = Path(root)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise ShardError(
                f"no {MANIFEST} in {root}: not a shard directory, or the job that writes it did not finish; "
                f"run (or rerun) `hpcdiff ingest BIDS_DIR --out {root}`"
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ShardError(f"{mpath}: unreadable ({e}); rerun the job that wrote {root}") from e
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{mpath}: format {manifest.get('format')!r} v{manifest.get('format_version')}, "
                f"expected {FORMAT!r} v{FORMAT_VERSION}; rewrite it with this hpcdiff version"
            )
        shards = cls(root, manifest)
        if verify:
            shards.verify()
        return shards

    @property
    def grid(self) -> dict[str, list]:
        """Shape, spacing and affine of the volumes: what a writer of images on the same grid needs."""
        return {k: self.manifest[k] for k in ("shape", "spacing", "affine")}

    def verify(self) -> None:
        """Check every shard file against the manifest's sha256 and subject count."""
        for shard, (entry, path) in enumerate(zip(self.manifest["shards"], self.files)):
            if not path.is_file():
                raise ShardError(f"{path}: listed in {self.root / MANIFEST} but missing; rerun the job that wrote it")
            digest = file_sha256(path)
            if digest != entry["sha256"]:
                raise ShardError(
                    f"{path}: checksum mismatch (sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}...): "
                    "the file changed or is corrupt; delete it and rerun the job that wrote it"
                )
            self._file(shard)

    # ------------------------------------------------------------------ handles
    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():
            # Handles inherited through fork belong to the parent: drop (never close) them and open our own.
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(shard)
        if f is None:
            path = self.files[shard]
            expected = int(self.manifest["shards"][shard]["num_subjects"])
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise ShardError(
                    f"{path}: cannot open ({e}): missing, truncated or corrupt; delete it and rerun the job that "
                    "wrote it"
                ) from e
            try:
                _check_open_shard(f, path, expected)
                if f[IMAGES].shape[2:] != self.shape:
                    raise ShardError(
                        f"{path}: volumes have shape {f[IMAGES].shape[2:]}, manifest says {self.shape}; the shard "
                        "belongs to another ingest: rerun the job that wrote it"
                    )
            except Exception:
                f.close()
                raise
            self._handles[shard] = f
        return f

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, -1
        return state

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._handles.values():
                f.close()
        self._handles = {}

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_subjects

    # ------------------------------------------------------------------ reads
    def locate(self, index: int) -> tuple[Path, int]:
        """The shard file holding global subject ``index`` and its row in that file."""
        shard, row = self._locate(index)
        return self.files[shard], row

    def _locate(self, index: int) -> tuple[int, int]:
        index = int(index)
        if not 0 <= index < self.num_subjects:
            raise IndexError(f"subject index {index} outside 0..{self.num_subjects - 1}")
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return shard, index - int(self._offsets[shard])

    def subjects(self) -> dict[str, np.ndarray]:
        """The whole subjects table in global order: id, session, source_path, source_sha256 and covariates."""
        if self._subjects is None:
            columns: dict[str, list[np.ndarray]] = {}
            for shard in range(len(self.files)):
                for name, dset in self._file(shard)[SUBJECTS].items():
                    columns.setdefault(name, []).append(_decode(dset[()]))
            self._subjects = {name: np.concatenate(parts) for name, parts in columns.items()}
        return self._subjects

    def read_into(self, index: int, out: np.ndarray, selection: tuple[Any, ...] = ()) -> None:
        """Decode subject ``index`` (optionally a sub-selection of (D, H, W)) into ``out`` (float16, no copy)."""
        shard, row = self._locate(index)
        self._file(shard)[IMAGES].read_direct(out, source_sel=np.s_[(row, 0, *selection)])

    def read(self, index: int) -> np.ndarray:
        """One volume, shape (1, D, H, W), float32."""
        return self.read_many([index])[0]

    def read_many(self, indices: Sequence[int], dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Volumes of ``indices`` in that order, shape (n, 1, D, H, W), float32 unless ``dtype`` says otherwise."""
        out = np.empty((len(indices), 1, *self.shape), dtype=np.float16)
        for i, index in enumerate(indices):
            self.read_into(index, out[i, 0])
        return out if out.dtype == np.dtype(dtype) else out.astype(dtype)
