"""`hpcdiff plan` against reality: planned peak memory of a training step vs the peak RSS of a real CPU step.

Each real step runs in a fresh process (tests/workers/step_rss.py: warm-up at a small size, then the baseline RSS,
then two AdamW steps; peak = VmHWM - baseline) with a fixed glibc mmap threshold so RSS follows live tensors.
    .venv/bin/python bench/bench_plan.py --shape 48 48 48
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from hpcdiff.memplan import measure_step
from hpcdiff.train_config import load_job

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "unet": ({"base_channels": 8, "channel_mults": [1, 2]}, {"kind": "flow"}),
    "autoencoder": (
        {"kind": "autoencoder", "base_channels": 8, "channel_mults": [1, 2, 2], "latent_channels": 4},
        {"kind": "autoencoder"},
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48])
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    print(f"shape {args.shape}, batch {args.batch_size}, fp32, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (model, objective) in MODELS.items():
            for checkpointing in (False, True):
                path = Path(tmp) / f"{kind}-{checkpointing}.yaml"
                job = {
                    "data": {"shards": "/nonexistent", "batch_size": args.batch_size},
                    "model": {**model, "checkpointing": checkpointing},
                    "objective": objective,
                    "train": {"steps": 1},
                }
                path.write_text(yaml.safe_dump(job))
                planned = measure_step(load_job(path), args.shape, []).peak_bytes
                worker = [sys.executable, str(ROOT / "tests" / "workers" / "step_rss.py"), str(path)]
                out = subprocess.run([*worker, *map(str, args.shape)], capture_output=True, text=True, env=env)
                measured = json.loads(out.stdout)["peak"]
                print(
                    f"{kind:12s} checkpointing={str(checkpointing).lower():5s} planned {planned / 2**20:7.1f} MiB  "
                    f"measured {measured / 2**20:7.1f} MiB  planned/measured {planned / measured:.2f}"
                )


if __name__ == "__main__":
    main()
