"""Peak memory of one dask worker running `stats groupdiff`, beside the estimate the slurm backend asks for.

One LocalCluster worker (one thread, as each Slurm worker job is) runs groupdiff over shards of the given grid;
its resident set is read before any data (the base) and after (the peak, ``ru_maxrss``). ``worker_memory`` is
what `--backend slurm` puts in each worker job's ``--mem``: it should sit above the peak, not far above.

    .venv/bin/python bench/bench_stats_worker.py --shape 96 112 96 --subjects 32 [--block 2]
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time
from pathlib import Path

from bench_stats import make_shards  # the script's own folder is on sys.path

from hpcdiff.stats import BackendOptions, StatsOptions, backend, run_groupdiff
from hpcdiff.stats.backend import worker_memory
from hpcdiff.stats.source import block_for


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[96, 112, 96])
    parser.add_argument("--subjects", type=int, default=32)
    parser.add_argument("--block", type=int, default=None, help="subjects per task (default: from the grid)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-stats-worker")
    args = parser.parse_args()
    shape = tuple(args.shape)
    voxels = math.prod(shape)
    shards = args.workdir / f"shards-{'x'.join(map(str, shape))}-{args.subjects}"
    make_shards(shards, args.subjects, shape, per_shard=16)
    from distributed import get_client

    with backend("distributed", BackendOptions(workers=1)):
        client = get_client()
        base = max(client.run(_max_rss_bytes).values())
        started = time.perf_counter()
        run_groupdiff(shards, args.workdir / "out", "group", ["age", "sex"], options=StatsOptions(block=args.block))
        seconds = time.perf_counter() - started
        peak = max(client.run(_max_rss_bytes).values())
    block = args.block or block_for(voxels)
    print(f"{args.subjects} subjects of {shape} ({voxels} voxels), block {block}: groupdiff {seconds:.1f} s")
    print(f"worker RSS before data {base / 1e9:.2f} GB, peak {peak / 1e9:.2f} GB")
    print(f"slurm backend's estimate (--mem) {worker_memory(voxels, args.block) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
