"""`hpcdiff status` time against checkpoint size: it reads metadata, never the checkpoint.

For each size a run directory with one checkpoint (model + EMA + AdamW of N million parameters) is written, then
``report.read_status`` (what `hpcdiff status` prints) is timed, best of ``--repeats``, beside the deep check that
status used to make (sha256 of the whole state file), in the same run. The deep check may be served from the
page cache (the writer's read-back uses O_DIRECT and leaves the written pages cached), so it is if anything an
underestimate of what a fresh node pays.

    .venv/bin/python bench/bench_status.py --params-m 1 10 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_checkpoint import state_of  # noqa: E402
from hpcdiff import checkpoint, report  # noqa: E402


def _best(repeats: int, fn, *args) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=float, nargs="+", default=[1, 10, 50])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-status-"))
    print(f"{'params':>8s} {'checkpoint':>11s} {'status':>10s} {'deep check':>11s}")
    try:
        for millions in args.params_m:
            run = work / f"run-{millions}"
            (run / "checkpoints").mkdir(parents=True)
            (run / "status.json").write_text(json.dumps({"state": "running", "step": 1}))
            state = state_of(int(millions * 1e6))
            info = checkpoint.save(run / "checkpoints", 1, state, checkpoint.weights_sha256(state["model"]))
            size = (info.path / checkpoint.STATE).stat().st_size
            deep = _best(1, checkpoint.verify, info.path, True)  # one read, from the disk
            status = _best(args.repeats, report.read_status, run)
            assert report.read_status(run)["latest_valid_step"] == 1
            print(f"{millions:7g}M {size / 2**20:8.0f} MiB {status * 1e3:7.2f} ms {deep * 1e3:8.0f} ms")
            shutil.rmtree(run)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
