"""Loader throughput on 1 mm volumes against a raw read of the same stored bytes and against nibabel .nii.gz.

Two cohorts of ``--subjects`` volumes at ``--shape`` (default UK Biobank's 160x224x160 at 1 mm), written as shards
(float16, one LZ4 chunk per volume) and as float32 .nii.gz files:
  brain  an ellipsoid of tissue (smooth intensity plus noise) on a zero background, so LZ4 really compresses
  noisy  noise everywhere, as the synthetic cohort's background: LZ4 stores every chunk as one raw block
All numbers come from one run (each reader runs once untimed first, then best of ``--repeats`` interleaved
rounds), every reader in the same page cache state: ``--cache warm`` (the files stay cached) or ``cold`` (their
pages are dropped with posix_fadvise before every pass, so the bytes come from the disk):
  raw file read   the shard files' bytes read in 4 MiB pieces, one thread, into a reused buffer the size of one
                  decoded batch (what the disk or the page cache delivers; GB/s of stored bytes)
  h5py chunks     h5py's own chunk path, one volume at a time (what the loader did before)
  hpcdiff read    ShardSet.read_batch_into a reused batch: stored chunks decoded by hpcdiff on a few threads (and
                  on one)
  hpcdiff Loader  the training loader, 3d, float16 batches as stored, prefetch thread, one rank; one loader for
                  the run, a pass takes the next subjects/batch batches of its stream
  nibabel         nib.load(...).get_fdata(dtype=float32) of the .nii.gz files
Decoded GB/s count the float16 volumes delivered; "vs raw" compares them with the raw read's GB/s of stored bytes.

    .venv/bin/python bench/bench_loader.py --subjects 24 --shape 160 224 160 [--cache cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from hpcdiff.data.loader import Loader
from hpcdiff.data.shards import ShardSet, shard_name, write_manifest, write_shard

_PIECE = 4 << 20  # raw reads in pieces about the size of a stored 1 mm chunk


def _drop(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from the disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _best(readers: dict[str, Callable[[], None]], repeats: int, before: Callable[[], None]) -> dict[str, float]:
    """Best seconds of each reader; rounds interleave the readers, so a burst of load on a shared machine hits
    one round of every reader instead of every round of one."""
    for fn in readers.values():
        fn()  # any lazy opens and allocations; warms the page cache unless ``before`` drops it
    best = dict.fromkeys(readers, float("inf"))
    for _ in range(repeats):
        for name, fn in readers.items():
            before()
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _volume(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=np.float32)
    if kind == "noisy":
        return (0.5 + 0.1 * noise).astype(np.float16)
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    r2 = sum((g / a) ** 2 for g, a in zip(grid, (0.85, 0.9, 0.8)))
    tissue = 0.6 + 0.3 * np.cos(6 * grid[0]) * np.cos(5 * grid[1]) + 0.05 * noise
    return np.where(r2 < 1.0, tissue, 0.0).astype(np.float16)


def make_cohort(root: Path, n: int, shape: tuple[int, ...], kind: str, per_shard: int = 8) -> None:
    """Shards and .nii.gz files of the same ``n`` volumes."""
    rng = np.random.default_rng(0)
    (root / "nifti").mkdir(parents=True)
    infos, ids = [], []
    for s, start in enumerate(range(0, n, per_shard)):
        volumes = np.stack([_volume(rng, shape, kind) for _ in range(start, min(start + per_shard, n))])[:, None]
        batch = [f"sub-{i:04d}" for i in range(start, start + len(volumes))]
        for sid, v in zip(batch, volumes):
            nib.save(nib.Nifti1Image(v[0].astype(np.float32), np.eye(4)), root / "nifti" / f"{sid}.nii.gz")
        infos.append(write_shard(root / shard_name(s), volumes, {"id": batch}))
        ids += batch
    write_manifest(
        root,
        shape=shape,
        spacing=(1.0,) * 3,
        affine=np.eye(4),
        covariates={},
        shards=infos,
        provenance={"writer": "bench/bench_loader.py"},
        subjects={"id": ids},
    )


def run(root: Path, n: int, batch: int, repeats: int, cold: bool) -> dict[str, float]:
    shards = ShardSet.open(root)
    files = sorted(root.glob("shard-*.h5"))
    stored = sum(p.stat().st_size for p in files)
    decoded = n * int(np.prod(shards.shape)) * 2
    niftis = sorted((root / "nifti").glob("*.nii.gz"))
    before = (lambda: _drop(files + niftis)) if cold else (lambda: None)
    # As large as one decoded batch, like the loader's: the bytes land in memory, not in the CPU cache.
    landing = np.empty(batch * decoded // n // _PIECE * _PIECE or _PIECE, dtype=np.uint8)

    def raw() -> None:
        at = 0
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(landing[at : at + _PIECE]):
                    at = (at + _PIECE) % landing.size

    def h5py_chunks() -> None:
        out = np.empty(shards.shape, dtype=np.float16)
        for p in files:
            with h5py.File(p, "r", locking=False) as f:
                for i in range(f["images"].shape[0]):
                    f["images"].read_direct(out, source_sel=np.s_[i, 0])

    one_thread = ShardSet.open(root, threads=1)

    out = np.empty((batch, 1, *shards.shape), dtype=np.float16)

    def hpcdiff_read(s: ShardSet = shards) -> None:
        for i in range(0, n, batch):
            rows = range(i, min(i + batch, n))
            s.read_batch_into(rows, out[: len(rows)])

    steps = n // batch

    # One loader for the whole run, as in training: its prefetch thread and batch buffers outlive a pass.
    stream = iter(Loader(shards, batch_size=batch, rank=0, world_size=1, seed=0))

    def loader() -> None:
        for _ in islice(stream, steps):
            pass

    def nibabel() -> None:
        for f in niftis:
            nib.load(f).get_fdata(dtype=np.float32)

    readers = {
        "raw file read": raw,
        "h5py chunks": h5py_chunks,
        "hpcdiff 1 thread": lambda: hpcdiff_read(one_thread),
        "hpcdiff read": hpcdiff_read,
        "hpcdiff Loader": loader,
        "nibabel .nii.gz": nibabel,
    }
    t = _best(readers, repeats, before)
    t["hpcdiff Loader"] *= n / (steps * batch)
    stream.close()
    shards.close()
    raw_gbs = stored / t["raw file read"] / 1e9
    print(f"  stored {stored / 1e9:.3f} GB for {decoded / 1e9:.3f} GB of float16 ({stored / decoded:.2f}x)")
    print(f"  {'what':16s} {'subj/s':>8s} {'GB/s':>7s} {'vs raw':>7s} {'vs nibabel':>10s}")
    for name, seconds in t.items():
        gbs = (stored if name == "raw file read" else decoded) / seconds / 1e9
        vs_nib = t["nibabel .nii.gz"] / seconds
        print(f"  {name:16s} {n / seconds:8.1f} {gbs:7.2f} {gbs / raw_gbs:6.2f}x {vs_nib:9.2f}x")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 224, 160])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm", help="page cache state of every reader")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given; a temporary one otherwise")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-loader-"))
    shape = tuple(args.shape)
    print(f"{args.subjects} subjects of {shape}, batch {args.batch}, {os.cpu_count()} CPUs, page cache {args.cache}")
    try:
        for kind in ("brain", "noisy"):
            root = work / kind
            if not (root / "manifest.json").exists():
                shutil.rmtree(root, ignore_errors=True)
                make_cohort(root, args.subjects, shape, kind)
            print(f"{kind}:")
            run(root, args.subjects, args.batch, args.repeats, args.cache == "cold")
    finally:
        if args.workdir is None:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
