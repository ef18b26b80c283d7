"""The shard format: HDF5 files of conformed volumes plus a JSON manifest (docs/data-format.md).

Every file is written under a temporary name in the same directory, fsynced, renamed over the final name and the
directory fsynced, so a reader (or a rerun after kill -9) sees either a whole file or none. A shard is "verified"
when it opens, says ``complete``, its tables agree with its images and every chunk decompresses; the manifest holds
each shard's sha256 so a later reader can check that nothing changed since.

At scale (40,000 subjects in hundreds of shards read by hundreds of ranks) a reader must not open every shard: the
subjects table of the whole set is written once, beside the manifest, in ``subjects.json``; a ShardSet reads it
instead of the shards' own tables and opens only the shards it reads, through a bounded cache of handles.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # registers the LZ4 filter with h5py: must come before any h5py file access
import numpy as np

from hpcdiff.atomic import atomic_write, file_sha256, write_text_atomic
from hpcdiff.data.chunks import ChunkReader
from hpcdiff.errors import ShardError, UsageError

FORMAT = "hpcdiff-shards"
FORMAT_VERSION = 1
"""Image shards: one channel. Written for them so that readers of version 1 keep reading every image set."""
LATENT_VERSION = 2
"""Shards of C channels (an autoencoder's latents): the manifest adds ``channels`` and ``latent``."""
VERSIONS = (FORMAT_VERSION, LATENT_VERSION)
MANIFEST = "manifest.json"
SUBJECTS_TABLE = "subjects.json"
LAYOUT_COLUMNS = ("shard", "row")
"""Columns of subjects.json that place each subject: index into the manifest's ``shards`` and row in that file."""
IDENTITY_COLUMNS = ("id", "session", "source_sha256")
"""What the data digest covers, in order: not paths or provenance, which move with the files."""
QUARANTINE = "quarantine.tsv"
IMAGES = "images"
SUBJECTS = "subjects"
_STR = h5py.string_dtype("utf-8")
_BLOCK = 1 << 20
_VOLUME = threading.local()  # per thread: the whole volume a sub-selection is cut from


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


_GROW = 8 << 20  # the in-memory file grows by this much at a time: few reallocations, little slack


def write_shard(
    path: Path, images: np.ndarray, subjects: Mapping[str, Sequence[Any]], attrs: Mapping[str, Any] | None = None
) -> ShardInfo:
    """Write one shard atomically and return what the manifest needs to know about it.

    Args:
        path: final file name, e.g. ``SHARDS/shard-00003.h5``.
        images: volumes, shape (k, C, D, H, W), C = 1 for images; stored as float16, one LZ4 chunk per subject.
        subjects: 1-D columns of length k: ``id``, ``session``, ``source_path``, ``source_sha256`` and covariates
            (strings are stored as utf-8, numbers as float64).
        attrs: extra file attributes (JSON-able scalars or strings), e.g. what the writer needs to skip it later.
    """
    path = Path(path)
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[1] < 1:
        raise ValueError(f"images must have shape (k, C, D, H, W), got {images.shape}")
    k, channels = images.shape[:2]
    for name, col in subjects.items():
        if len(col) != k:
            raise ValueError(f"subjects[{name!r}] has {len(col)} rows for {k} images")
    sample = images.shape[1:]
    # Built in memory, written with one plain write: an HDF5 file whose disk fills up mid-write cannot be closed,
    # and its objects, still alive at exit, crash the process (exit 139) after the error was reported.
    with h5py.File(f"{path}.{os.getpid()}.mem", "w", driver="core", backing_store=False, block_size=_GROW) as f:
        # maxshape lets a shard whose inputs were all quarantined still hold a (0, C, D, H, W) dataset.
        dset = f.create_dataset(
            IMAGES,
            shape=images.shape,
            maxshape=(None, *sample),
            dtype=np.float16,
            chunks=(1, *sample),
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
        f.attrs["format_version"] = FORMAT_VERSION if channels == 1 else LATENT_VERSION
        f.attrs["num_subjects"] = k
        f.attrs["complete"] = True  # last: a file that has it was closed after everything above
        f.flush()
        image = f.id.get_file_image()
    atomic_write(path, image)
    return ShardInfo(path.name, k, hashlib.sha256(image).hexdigest())


def _check_open_shard(f: h5py.File, path: Path, expected: int | None, channels: int | None = None) -> int:
    """Return the subject count after checking the file's own consistency; raise ShardError if it is off.

    ``channels`` (from the manifest) is checked when given; version 1 files hold one channel.
    """
    if not bool(f.attrs.get("complete", False)):
        raise ShardError(f"{path}: not marked complete (an interrupted write); rerun the job that writes it")
    version = int(f.attrs.get("format_version", -1))
    if version not in VERSIONS:
        raise ShardError(f"{path}: format_version {f.attrs.get('format_version')} is not one of {list(VERSIONS)}")
    k = int(f.attrs["num_subjects"])
    if IMAGES not in f or SUBJECTS not in f:
        raise ShardError(f"{path}: missing '{IMAGES}' or '{SUBJECTS}'")
    shape = f[IMAGES].shape
    c = 1 if version == FORMAT_VERSION else channels
    if len(shape) != 5 or shape[0] != k or (c is not None and shape[1] != c):
        raise ShardError(f"{path}: images have shape {shape}, expected ({k}, {c or 'C'}, D, H, W)")
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
        with h5py.File(path, "r", locking=False) as f:
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
    subjects: Mapping[str, Sequence[Any]],
    channels: int = 1,
    latent: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``root/subjects.json`` then ``root/manifest.json``, each atomically; the manifest's presence means every
    listed shard and the subjects table are complete.

    Image shards (one channel, no ``latent``) are written as format version 1, which every reader knows; latent
    shards as version 2, with ``channels`` and the ``latent`` block (scale factor, source grid, autoencoder).

    Args:
        subjects: the whole subjects table in global order (shard by shard, row by row), one column per name:
            ``id``, ``session``, ``source_path``, ``source_sha256`` and the covariates, as written into the shards.
            ``shard`` (index into ``shards``) and ``row`` columns are added; if given they must agree.
    """
    counts = [s.num_subjects for s in shards]
    table = subjects_columns(subjects, counts)
    body = json.dumps({"columns": table}, separators=(",", ":")) + "\n"
    write_text_atomic(Path(root) / SUBJECTS_TABLE, body)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if latent is None and channels == 1 else LATENT_VERSION,
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
        "dtype": "float16",
        "num_subjects": int(sum(counts)),
        "covariates": dict(covariates),
        "shards": [s.to_json() for s in shards],
        "subjects": {
            "file": SUBJECTS_TABLE,
            "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
            "data_sha256": data_sha256(table),
        },
        "provenance": dict(provenance),
    }
    if manifest["format_version"] == LATENT_VERSION:
        manifest["channels"] = int(channels)
        manifest["latent"] = dict(latent or {})
    write_text_atomic(Path(root) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def subjects_columns(subjects: Mapping[str, Sequence[Any]], counts: Sequence[int]) -> dict[str, list[Any]]:
    """The JSON columns of subjects.json: strings and float64 numbers as the shards store them, plus the layout."""
    total = int(sum(counts))
    shard = np.repeat(np.arange(len(counts)), counts)
    row = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, dtype=np.int64)
    layout = {"shard": shard, "row": row}
    table: dict[str, list[Any]] = {}
    for name, values in subjects.items():
        if len(values) != total:
            raise ValueError(f"subjects[{name!r}] has {len(values)} rows, the shards hold {total}")
        if name in layout:
            if not np.array_equal(np.asarray(values, dtype=np.int64), layout[name]):
                raise ValueError(f"subjects[{name!r}] disagrees with the shards' subject counts")
            continue
        arr = _column(name, values)
        table[name] = [str(v) for v in arr] if arr.dtype == object else [float(v) for v in arr]
    if "id" not in table:
        raise ValueError(f"subjects needs an 'id' column (got {sorted(table)})")
    for name, values in layout.items():
        table[name] = [int(v) for v in values]
    return table


def data_sha256(columns: Mapping[str, Sequence[Any]]) -> str:
    """Digest of which subjects, from which source files, in which order: equal digests = same training stream."""
    n = len(columns["id"])
    rows = [[str(v) for v in columns.get(c, [""] * n)] for c in IDENTITY_COLUMNS]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode("utf-8")).hexdigest()


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class ShardSet:
    """Read side of a shard directory, safe to pickle and to use after fork and from several threads.

    h5py handles do not pickle and must not be shared across fork, so files are opened lazily and the handles are
    keyed by process id: a child process (a DataLoader worker, a dask worker) opens its own. At most ``max_open``
    shards stay open (least recently used closed first), opened read-only without HDF5 file locks (which fail or
    linger on Lustre and NFS, and which a reader of files that never change does not need). Batches decode on
    ``threads`` threads.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], max_open: int = 16, threads: int | None = None) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.root = Path(root)
        self.manifest = manifest
        self.shape: tuple[int, int, int] = tuple(int(s) for s in manifest["shape"])  # type: ignore[assignment]
        self.affine = np.asarray(manifest["affine"], dtype=np.float64)
        self.num_subjects = int(manifest["num_subjects"])
        self.covariates: dict[str, Any] = manifest["covariates"]
        self.channels = int(manifest.get("channels", 1))
        self.latent: dict[str, Any] | None = manifest.get("latent")
        self.files = [self.root / s["file"] for s in manifest["shards"]]
        self.max_open = max_open
        self.threads = threads or _threads()
        counts = np.array([int(s["num_subjects"]) for s in manifest["shards"]], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        if self._offsets[-1] != self.num_subjects:
            raise ShardError(
                f"{self.root / MANIFEST}: num_subjects {self.num_subjects} != sum over shards {self._offsets[-1]}"
            )
        self._subjects: dict[str, np.ndarray] | None = None
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._handles: OrderedDict[int, tuple[h5py.File, ChunkReader]] = OrderedDict()
        self._busy: dict[int, int] = {}
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, root: str | Path, verify: bool = False, max_open: int = 16, threads: int | None = None) -> ShardSet:
        """Open a shard directory (reads the manifest only); with ``verify`` every file's sha256 is checked."""
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
        if manifest.get("format") != FORMAT or manifest.get("format_version") not in VERSIONS:
            raise ShardError(
                f"{mpath}: format {manifest.get('format')!r} v{manifest.get('format_version')}, "
                f"expected {FORMAT!r} v{' or v'.join(map(str, VERSIONS))}; rewrite it with this hpcdiff version"
            )
        if not isinstance(manifest.get("subjects"), dict):
            raise ShardError(
                f"{mpath}: no 'subjects' entry (written by an hpcdiff without {SUBJECTS_TABLE}); rerun the job that "
                f"wrote {root} (ingest keeps its shards and only adds the table)"
            )
        shards = cls(root, manifest, max_open=max_open, threads=threads)
        if verify:
            shards.verify()
        return shards

    @property
    def is_latent(self) -> bool:
        """Whether the shards hold an autoencoder's latents (written by ``hpcdiff encode``) rather than images."""
        return self.latent is not None

    def require_images(self, command: str) -> None:
        """Refuse latent shards (exit 2) where images are needed, saying what to give instead."""
        if self.is_latent:
            raise UsageError(
                f"{self.root} holds latent shards ({self.channels} channels of an autoencoder's latent, written by "
                f"hpcdiff encode), not images: {command} needs images. Give an image shard folder (from ingest, or "
                "from hpcdiff sample, which decodes a latent run's samples into images)"
            )

    @property
    def grid(self) -> dict[str, list]:
        """Shape, spacing and affine of the volumes: what a writer of images on the same grid needs."""
        return {k: self.manifest[k] for k in ("shape", "spacing", "affine")}

    def verify(self) -> None:
        """Check every shard file and the subjects table against the manifest's sha256 and subject counts."""
        for shard, (entry, path) in enumerate(zip(self.manifest["shards"], self.files)):
            if not path.is_file():
                raise ShardError(f"{path}: listed in {self.root / MANIFEST} but missing; rerun the job that wrote it")
            digest = file_sha256(path)
            if digest != entry["sha256"]:
                raise ShardError(
                    f"{path}: checksum mismatch (sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}...): "
                    "the file changed or is corrupt; delete it and rerun the job that wrote it"
                )
            with self._open(shard):
                pass
        self.subjects()

    # ------------------------------------------------------------------ handles
    @contextmanager
    def _open(self, shard: int) -> Iterator[ChunkReader]:
        """The reader of ``shard``, opened if needed and kept open (not evicted) while the block runs."""
        if self._pid != os.getpid():
            # Handles inherited through fork belong to the parent: drop (never close) them and open our own.
            self._reset()
        with self._lock:
            entry = self._handles.get(shard)
            if entry is None:
                entry = self._open_file(shard)
                self._handles[shard] = entry
            self._handles.move_to_end(shard)
            self._busy[shard] = self._busy.get(shard, 0) + 1
            self._evict()
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._busy[shard] -= 1
                self._evict()

    def _evict(self) -> None:
        """Close least recently used handles past ``max_open`` (never one a thread is reading); lock held."""
        excess = len(self._handles) - self.max_open
        for shard in [s for s in self._handles if not self._busy.get(s)][: max(excess, 0)]:
            self._handles.pop(shard)[0].close()

    def _open_file(self, shard: int) -> tuple[h5py.File, ChunkReader]:
        path = self.files[shard]
        expected = int(self.manifest["shards"][shard]["num_subjects"])
        try:
            f = h5py.File(path, "r", locking=False)
        except OSError as e:
            raise ShardError(
                f"{path}: cannot open ({e}): missing, truncated or corrupt; delete it and rerun the job that wrote it"
            ) from e
        try:
            _check_open_shard(f, path, expected, self.channels)
            if f[IMAGES].shape[2:] != self.shape:
                raise ShardError(
                    f"{path}: volumes have shape {f[IMAGES].shape[2:]}, manifest says {self.shape}; the shard "
                    "belongs to another ingest: rerun the job that wrote it"
                )
            return f, ChunkReader(f[IMAGES], str(path))
        except Exception:
            f.close()
            raise

    @property
    def open_files(self) -> int:
        """Shard files this process holds open now (at most ``max_open`` plus those being read)."""
        return len(self._handles) if self._pid == os.getpid() else 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_lock", "_handles", "_busy", "_pool"):
            state.pop(key)
        state["_pid"], state["_subjects"] = -1, None  # a dask task reading voxels needs no copy of the table
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def close(self) -> None:
        if self._pid == os.getpid():
            if self._pool is not None:
                self._pool.shutdown()
            with self._lock:
                for f, _ in self._handles.values():
                    f.close()
        self._reset()

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_subjects

    # ------------------------------------------------------------------ the subjects table
    def subjects(self) -> dict[str, np.ndarray]:
        """The whole subjects table in global order: id, session, source_path, source_sha256 and covariates.

        Read from subjects.json (one file, whatever the number of shards), checked against the manifest.
        """
        if self._subjects is None:
            columns = self._read_table()
            self._subjects = {
                name: np.array(values, dtype=str if all(isinstance(v, str) for v in values) else np.float64)
                for name, values in columns.items()
                if name not in LAYOUT_COLUMNS
            }
        return self._subjects

    @property
    def data_sha256(self) -> str:
        """Digest of the subjects' ids, sessions and source checksums in order, as the manifest records it."""
        return str(self.manifest["subjects"]["data_sha256"])

    def _read_table(self) -> dict[str, list[Any]]:
        entry = self.manifest["subjects"]
        path = self.root / str(entry.get("file", SUBJECTS_TABLE))
        fix = f"rerun the job that wrote {self.root}"
        try:
            body = path.read_bytes()
        except OSError as e:
            raise ShardError(f"{path}: cannot read the subjects table ({e}); {fix}") from e
        if hashlib.sha256(body).hexdigest() != entry.get("sha256"):
            raise ShardError(f"{path}: checksum differs from {self.root / MANIFEST} (changed or corrupt); {fix}")
        try:
            columns = json.loads(body)["columns"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardError(f"{path}: not a subjects table ({e}); {fix}") from e
        lengths = {name: len(values) for name, values in columns.items()}
        if set(lengths.values()) != {self.num_subjects} and self.num_subjects:
            raise ShardError(f"{path}: column lengths {lengths}, the manifest lists {self.num_subjects} subjects")
        return columns

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

    def read_into(self, index: int, out: np.ndarray, selection: tuple[Any, ...] = ()) -> None:
        """Decode subject ``index`` (optionally a sub-selection of (D, H, W)) into ``out`` (float16).

        ``out`` has shape (D, H, W) for images and (C, d, h, w) for latent shards (read whole, through h5py: a
        latent is small).
        """
        shard, row = self._locate(index)
        with self._open(shard) as reader:
            if self.channels > 1:
                if selection:
                    raise ValueError(f"{self.root}: latent shards are read whole, not by selection")
                reader.dset.read_direct(out, source_sel=np.s_[row])
                return
            if not selection and out.shape == self.shape:
                reader.read_into(row, out)
                return
            # A chunk holds the whole volume: decoding it is the cost whatever part of it is wanted. One volume
            # buffer per thread, reused: a fresh one costs a page fault per 4 KiB.
            volume = getattr(_VOLUME, "buffer", None)
            if volume is None or volume.shape != self.shape:
                volume = _VOLUME.buffer = np.empty(self.shape, dtype=np.float16)
            reader.read_into(row, volume)
            out[...] = volume[selection]

    def read_batch_into(
        self, indices: Sequence[int], out: np.ndarray, selections: Sequence[tuple[Any, ...]] | None = None
    ) -> None:
        """Decode subjects ``indices`` into ``out[i]`` (float16, shape (n, C, ...)) on several threads."""
        one = self.channels == 1
        jobs = [
            (int(index), out[i, 0] if one else out[i], selections[i] if selections else ())
            for i, index in enumerate(indices)
        ]
        if len(jobs) < 2 or self.threads < 2:
            for job in jobs:
                self.read_into(*job)
            return
        if self._pid != os.getpid():
            self._reset()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="shard-decode")
        for future in [self._pool.submit(self.read_into, *job) for job in jobs]:
            future.result()

    def read(self, index: int) -> np.ndarray:
        """One volume, shape (C, D, H, W) (C = 1 for images), float32."""
        return self.read_many([index])[0]

    def read_many(self, indices: Sequence[int], dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Volumes of ``indices`` in that order, shape (n, C, D, H, W), float32 unless ``dtype`` says otherwise."""
        out = np.empty((len(indices), self.channels, *self.shape), dtype=np.float16)
        self.read_batch_into(indices, out)
        return out if out.dtype == np.dtype(dtype) else out.astype(dtype)
