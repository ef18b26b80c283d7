"""Step time of ``hpcdiff train`` against a plain hand-written PyTorch loop, measured in the same run.

Both train the same UNet with AdamW and the flow-matching loss on the same batch size. The plain loop keeps its
data in memory and does nothing else; ``hpcdiff train`` reads shards through the loader, seeds per-sample noise,
keeps an EMA, logs every step, writes heartbeats and agrees on stop flags. The ratio is the framework overhead.
Then samples/s of ``hpcdiff train`` at 1 and 2 MPI ranks, and the cost of a preview (the EMA model drawing the
preview set, rendering and writing its montage: the job previews at its last step, after the last logged
timestamp) as a share of the training time between two previews at the default ``train.preview_every``.

    .venv/bin/python bench/bench_train.py [--steps 60] [--repeats 3] [--batch 8] [--mode 2d]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpcdiff.config import build  # noqa: E402
from hpcdiff.data.shards import ShardSet  # noqa: E402
from hpcdiff.models import FlowMatching, UNet, UNetConfig  # noqa: E402
from hpcdiff.train_config import LoopConfig  # noqa: E402

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def plain_loop(shards: Path, model_cfg: dict, batch: int, steps: int, mode: str) -> float:
    """Seconds per step of the simplest loop that trains the same model: the baseline."""
    data = ShardSet.open(shards).read_many(range(batch))
    x = torch.from_numpy(data if mode == "3d" else data[..., data.shape[-1] // 2].copy())
    torch.manual_seed(0)
    model = UNet(build(UNetConfig, {**model_cfg, "dims": 3 if mode == "3d" else 2}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flow = FlowMatching()
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = flow.loss(model, x, None, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[len(times) // 5 :])


def hpcdiff_train(job: Path, run: Path, ranks: int) -> tuple[float, float, float]:
    """Seconds per step, samples/s and seconds of the last-step preview of ``hpcdiff train``, from what it logs."""
    cmd = [sys.executable, "-m", "hpcdiff", "train", str(job), "--run-dir", str(run), "--quiet"]
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none", *cmd]
    subprocess.run(cmd, check=True, env={**os.environ, **MPI_ENV}, capture_output=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in rows[len(rows) // 5 :]]
    per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    preview_s = next(e["seconds"] for e in events if e["event"] == "preview")
    return per_step, rows[0]["world_size"] * yaml.safe_load(job.read_text())["data"]["batch_size"] / per_step, preview_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", choices=("2d", "3d"), default="2d")
    p.add_argument("--shape", type=int, nargs=3, default=(40, 48, 40))
    args = p.parse_args()
    model_cfg = {"base_channels": 16, "channel_mults": [1, 2, 2], "num_res_blocks": 1}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shape = [str(s) for s in args.shape]
        hp = [sys.executable, "-m", "hpcdiff"]
        subprocess.run(
            [*hp, "cohort", "--out", tmp / "bids", "--subjects", "32", "--shape", *shape],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*hp, "ingest", tmp / "bids", "--out", tmp / "shards", "--shape", *shape], check=True, capture_output=True
        )
        job = {
            "data": {
                "shards": str(tmp / "shards"),
                "mode": args.mode,
                "batch_size": args.batch,
                "slice_axis": 2,
                "covariates": [],  # the plain loop is unconditional too
            },
            "model": model_cfg,
            "objective": {"kind": "flow"},
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "train": {
                "steps": args.steps,
                "checkpoint_every": 10 * args.steps,
                "cond_drop_prob": 0.0,
                "log_every": args.steps,
                "preview_every": args.steps,
            },
        }
        job_file = tmp / "job.yaml"
        job_file.write_text(yaml.safe_dump(job))
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        # Alternate the two, several times, and keep each one's best: the machine is shared and noisy.
        bases, ours_runs, sps1s, sps2s, previews = [], [], [], [], []
        for r in range(args.repeats):
            bases.append(plain_loop(tmp / "shards", model_cfg, args.batch, args.steps, args.mode))
            ours, sps1, preview_s = hpcdiff_train(job_file, tmp / f"run1-{r}", 1)
            # 2 ranks x batch b each: the global batch doubles, as it does when a user adds ranks.
            _, sps2, _ = hpcdiff_train(job_file, tmp / f"run2-{r}", 2)
            ours_runs.append(ours)
            previews.append(preview_s)
            sps1s.append(sps1)
            sps2s.append(sps2)
        base, ours, sps1, sps2 = min(bases), min(ours_runs), max(sps1s), max(sps2s)
    print(f"model: UNet {model_cfg}, {args.mode} {args.shape}, batch {args.batch}, 1 thread per process")
    print(f"median step time of each run, best of {args.repeats} alternating runs")
    print(f"plain PyTorch loop      {base * 1e3:8.1f} ms/step")
    print(f"hpcdiff train, 1 rank   {ours * 1e3:8.1f} ms/step   overhead {100 * (ours / base - 1):+.1f}%")
    print(f"samples/s  1 rank {sps1:7.1f}   2 ranks {sps2:7.1f}   ratio {sps2 / sps1:.2f}x")
    loop = LoopConfig(steps=1)
    every, preview = loop.preview_every or 1, min(previews)
    print(
        f"preview ({loop.preview_subjects} subjects, {loop.preview_sampler_steps} sampler steps) {preview:.2f} s"
        f" = {100 * preview / (preview + every * ours):.2f}% of training time at train.preview_every={every}"
    )


if __name__ == "__main__":
    main()
