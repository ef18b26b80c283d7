"""Start-up of one training rank against the number of shards: seconds to its first batch and files it opens.

For each count of tiny shards (2 subjects of 4x4x4 each), a fresh process plays rank 5 of 1,024: open the shard
set, build the Loader, take the first batch. Timed without tracing; the files are counted in a second run under
``strace -f -e trace=openat`` (every thread, also files opened and closed again). With ``--baseline REV`` the same
is measured for hpcdiff as of git revision REV (extracted with ``git archive``), in the same run.

    .venv/bin/python bench/bench_startup.py --shards 100 1000 5000 --baseline e3fa7d2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def child(root: Path) -> None:
    """One rank's start-up after its imports (the same whatever the data); prints the seconds it took."""
    from hpcdiff.data.loader import Loader
    from hpcdiff.data.shards import ShardSet

    t = time.perf_counter()
    shards = ShardSet.open(root)
    loader = Loader(shards, batch_size=2, rank=5, world_size=1024, seed=0, prefetch=0)
    next(iter(loader))
    print(time.perf_counter() - t)


def make_shards(root: Path, num_shards: int) -> None:
    from hpcdiff.data.shards import shard_name, write_manifest, write_shard

    root.mkdir(parents=True)
    infos, ids = [], []
    for s in range(num_shards):
        batch = [f"sub-{s:05d}-{i}" for i in range(2)]
        images = np.full((2, 1, 4, 4, 4), s, dtype=np.float16)
        infos.append(write_shard(root / shard_name(s), images, {"id": batch, "age": [40.0, 50.0]}))
        ids += batch
    covariates = {"age": {"kind": "continuous", "min": 40.0, "max": 50.0, "mean": 45.0, "std": 5.0}}
    write_manifest(
        root,
        shape=(4, 4, 4),
        spacing=(1.0,) * 3,
        affine=np.eye(4),
        covariates=covariates,
        shards=infos,
        provenance={"writer": "bench/bench_startup.py"},
        subjects={"id": ids, "age": [40.0, 50.0] * num_shards},
    )


def measure(src: Path, root: Path, repeats: int) -> tuple[float, int]:
    """Best start-up seconds of ``repeats`` fresh processes, and the shard files one of them opens."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, __file__, "--child", str(root)]
    seconds = min(
        float(subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout) for _ in range(repeats)
    )
    with tempfile.NamedTemporaryFile(suffix=".trace") as trace:
        strace = ["strace", "-f", "-qq", "-e", "trace=openat", "-o", trace.name]
        subprocess.run([*strace, *argv], env=env, check=True, capture_output=True)
        paths = set(re.findall(r'openat\([^,]+, "([^"]+)", [^)]*\) = \d+', Path(trace.name).read_text()))
    return seconds, sum(1 for p in paths if Path(p).parent == root and p.endswith(".h5"))


def extract(rev: str, dest: Path) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "hpcdiff"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="git revision to compare with")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given; a temporary one otherwise")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-startup-"))
    sources = {"hpcdiff": ROOT}
    if args.baseline:
        sources[f"hpcdiff@{args.baseline}"] = extract(args.baseline, work / "baseline")
    print(f"rank 5 of 1,024, batch 2, first batch; best of {args.repeats} fresh processes; {os.cpu_count()} CPUs")
    print(f"{'shards':>7s}  " + "  ".join(f"{name:>30s}" for name in sources))
    try:
        for n in args.shards:
            root = work / f"shards-{n}"
            if not (root / "manifest.json").exists():
                shutil.rmtree(root, ignore_errors=True)
                make_shards(root, n)
            cells = []
            for src in sources.values():
                seconds, opened = measure(src, root, args.repeats)
                cells.append(f"{seconds:8.3f} s {opened:6d} shard files")
            print(f"{n:7d}  " + "  ".join(f"{c:>30s}" for c in cells))
    finally:
        if args.workdir is None:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
