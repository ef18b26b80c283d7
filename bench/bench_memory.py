"""Peak memory of `hpcdiff quality` and `hpcdiff stats groupdiff` on 1 mm volumes against the number of subjects.

Brain-like shards (an ellipsoid of noisy tissue with age, sex and group columns, as bench/bench_stats.py writes
them) at ``--shape`` for each of ``--subjects``; each command runs in a fresh process and os.wait4 reports its own
peak RSS. Keep the counts small on a shared machine: before blocks, quality's float64 baseline alone took ~35 GB at
256 subjects of 1 mm.

    .venv/bin/python bench/bench_memory.py --subjects 32 64 --shape 160 224 160 [--commands groupdiff]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_stats import make_shards  # noqa: E402


def peak(argv: list[str]) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of one fresh ``hpcdiff`` process."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcdiff", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"hpcdiff {' '.join(argv)} failed:\n{proc.stderr.read()}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 224, 160])
    parser.add_argument("--commands", nargs="+", choices=["quality", "groupdiff"], default=["quality", "groupdiff"])
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given; a temporary one otherwise")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    shape = tuple(args.shape)
    print(f"shape {shape}, {os.cpu_count()} CPUs; peak RSS of a fresh process (MiB), seconds", flush=True)
    print(f"{'subjects':>8s} {'quality':>18s} {'stats groupdiff':>18s}")
    try:
        for n in args.subjects:
            root = work / f"shards-{n}"
            make_shards(root, n, shape, per_shard=16)
            argv = {
                "quality": ["quality", str(root), str(root), "--out", str(work / f"q{n}")],
                "groupdiff": ["stats", "groupdiff", str(root), "--group", "group", "--covariates", "age,sex"]
                + ["--out", str(work / f"g{n}")],
            }
            cells = []
            for name in ("quality", "groupdiff"):
                if name in args.commands:
                    mib, seconds = peak(argv[name])
                    cells.append(f"{mib:7.0f} MiB {seconds:5.0f} s")
                else:
                    cells.append("not run")
            print(f"{n:8d} {cells[0]:>18s} {cells[1]:>18s}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
