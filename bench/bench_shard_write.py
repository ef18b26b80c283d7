"""Writing one shard: built in memory and written with one plain write (hpcdiff) against h5py writing the file.

hpcdiff builds each shard with HDF5's in-memory driver, then writes the bytes atomically: a full disk then fails a
plain write() with a clean error instead of leaving HDF5 a file it cannot close (a crash at exit). The baseline is
the same content written by h5py straight to disk, then hashed (as the manifest needs). Both files are
fsynced; best of --repeats; same run, same disk.

    .venv/bin/python bench/bench_shard_write.py --subjects 64 --shape 48 56 48
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from hpcdiff.atomic import file_sha256
from hpcdiff.data.shards import write_shard


def _direct(path: Path, images: np.ndarray, subjects: dict) -> None:
    with h5py.File(path, "w") as f:
        dset = f.create_dataset(
            "images", shape=images.shape, dtype=np.float16, chunks=(1, 1, *images.shape[2:]), **hdf5plugin.LZ4()
        )
        for i in range(len(images)):
            dset[i] = images[i].astype(np.float16)
        group = f.create_group("subjects")
        for name, col in subjects.items():
            group.create_dataset(name, data=np.asarray(col, dtype=h5py.string_dtype()))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    file_sha256(path)  # what the manifest records; hpcdiff hashes the bytes it has in memory instead


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--subjects", type=int, default=64)
    p.add_argument("--shape", type=int, nargs=3, default=[48, 56, 48])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    images = rng.random((a.subjects, 1, *a.shape), dtype=np.float32)
    images[:, :, ::2] = 0  # some structure for LZ4, like the background of a brain volume
    subjects = {"id": [f"sub-{i:04d}" for i in range(a.subjects)]}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        times = {"memory+write": [], "h5py to disk": []}
        for r in range(a.repeats):
            t0 = time.perf_counter()
            write_shard(Path(tmp) / f"a{r}.h5", images, subjects)
            times["memory+write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _direct(Path(tmp) / f"b{r}.h5", images, subjects)
            times["h5py to disk"].append(time.perf_counter() - t0)
        size = (Path(tmp) / "a0.h5").stat().st_size
    best = {k: min(v) for k, v in times.items()}
    print(f"shard of {a.subjects} x {'x'.join(map(str, a.shape))}, {size / 2**20:.1f} MiB on disk")
    for k, v in best.items():
        print(f"  {k:14s} {v:.3f} s")
    print(f"  ratio memory+write / h5py to disk: {best['memory+write'] / best['h5py to disk']:.2f}")


if __name__ == "__main__":
    main()
