"""Loader throughput against a raw read of the same bytes and against nibabel .nii.gz loads; ingest subjects/s.

All numbers come from one run on one machine, page cache warm (each reader runs once untimed first):
  raw      np.fromfile of one flat float16 copy of every volume (the bytes the loader must deliver)
  loader   hpcdiff Loader, 3d mode, float16 batches as stored (the training step converts them on its
           device), prefetch thread, one rank
  nibabel  nib.load(...).get_fdata(dtype=float32) of the cohort's .nii.gz files, the common baseline
Ingest is timed at 1 and 2 ranks (mpirun) over the same cohort.

    .venv/bin/python bench/bench_loader.py --subjects 64 --shape 96 112 96
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HPCDIFF = [sys.executable, "-m", "hpcdiff"]
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMP_NUM_THREADS": "1",
}


def _timed(fn, repeats: int) -> float:
    fn()  # warm the page cache and any lazy opens
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _run(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(list(map(str, argv)), check=True, env={**os.environ, **MPI_ENV}, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 112, 96])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given; a temporary one otherwise")
    args = parser.parse_args()

    from hpcdiff.data.loader import Loader
    from hpcdiff.data.shards import ShardSet

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-loader-"))
    bids, n, shape = work / "bids", args.subjects, tuple(args.shape)
    shape_args = ["--shape", *shape]
    if not (bids / "participants.tsv").is_file():
        subprocess.run(list(map(str, [*HPCDIFF, "cohort", "--out", bids, "--subjects", n, *shape_args])), check=True)

    t_ingest = {}
    for ranks in (1, 2):
        out = work / f"shards-{ranks}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [*HPCDIFF, "ingest", bids, "--out", out, *shape_args, "--spacing", 2.0, "--subjects-per-shard", 16]
        t_ingest[ranks] = _run(argv if ranks == 1 else ["mpirun", "-n", ranks, "--bind-to", "none", *argv])

    shards = ShardSet.open(work / "shards-1")
    volume_bytes = int(np.prod(shards.shape)) * 2
    total = volume_bytes * n
    raw = work / "raw.f16"
    shards.read_many(range(n), dtype=np.float16).tofile(raw)

    def read_raw() -> None:
        for i in range(0, n, args.batch):
            count = min(args.batch, n - i) * volume_bytes // 2
            np.fromfile(raw, dtype=np.float16, count=count, offset=i * volume_bytes)

    steps = n // args.batch

    def read_loader() -> None:
        loader = Loader(shards, batch_size=args.batch, rank=0, world_size=1, seed=0)
        for _ in islice(iter(loader), steps):
            pass
        loader.close()

    files = sorted(bids.glob("sub-*/anat/*_T1w.nii.gz"))

    def read_nibabel() -> None:
        for f in files:
            nib.load(f).get_fdata(dtype=np.float32)

    t_raw = _timed(read_raw, args.repeats)
    t_loader = _timed(read_loader, args.repeats) * n / (steps * args.batch)
    t_nib = _timed(read_nibabel, args.repeats)
    gb = total / 1e9
    print(f"subjects {n}, shape {shape}, batch {args.batch}, {gb:.3f} GB of float16, {os.cpu_count()} CPUs")
    for name, t in (("raw np.fromfile", t_raw), ("hpcdiff Loader", t_loader), ("nibabel .nii.gz", t_nib)):
        print(f"  {name:16s} {n / t:9.1f} subjects/s {gb / t:7.2f} GB/s")
    print(f"  loader / raw      {t_raw / t_loader:6.2f}x")
    print(f"  loader / nibabel  {t_nib / t_loader:6.2f}x")
    print(f"  shards on disk {sum(p.stat().st_size for p in (work / 'shards-1').glob('*.h5')) / 1e6:.1f} MB")
    for ranks, t in t_ingest.items():
        print(f"  ingest {ranks} rank(s)  {n / t:7.1f} subjects/s ({t:.1f} s incl. start-up)")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
