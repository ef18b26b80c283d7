"""What finishing a sliced job costs: records read by the one claimant, against re-hashing the outputs.

A toy job of N outputs of SIZE bytes each is written and recorded through the core; then timed, page cache warm:
  listing    all_listed: the one directory listing every worker does after its slice
  records    all_records: what the claimant reads to finish (one small JSON per output)
  rehash     file_sha256 of every output: what a finisher that re-reads outputs pays (the old ingest finisher
             also decoded every chunk, which costs more)

    .venv/bin/python bench/bench_finish.py --outputs 2000 --size 4194304
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hpcdiff.atomic import file_sha256
from hpcdiff.batch.records import all_listed, all_records, write_record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outputs", type=int, default=2000)
    p.add_argument("--size", type=int, default=4 << 20, help="bytes per output")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        block = bytes(range(256)) * (args.size // 256)
        rows = {"id": [f"sub-{i:05d}" for i in range(64)], "age": [60.0] * 64}
        for i in range(args.outputs):
            (out / f"out-{i}.bin").write_bytes(block)
            write_record(out, i, "plan", [f"out-{i}.bin"], {"subjects": rows})
        timings = {}
        for name, fn in (
            ("listing", lambda: all_listed(out, args.outputs)),
            ("records", lambda: all_records(out, "plan", args.outputs)),
            ("rehash", lambda: [file_sha256(out / f"out-{i}.bin") for i in range(args.outputs)]),
        ):
            fn()  # warm
            t0 = time.perf_counter()
            fn()
            timings[name] = time.perf_counter() - t0
    total = args.outputs * args.size / 2**30
    print(f"{args.outputs} outputs of {args.size / 2**20:.1f} MiB ({total:.1f} GiB), each record 64 subject rows")
    for name, seconds in timings.items():
        print(f"  {name:8} {seconds:8.3f} s  ({timings['rehash'] / seconds:8.1f}x faster than rehash)")


if __name__ == "__main__":
    main()
