"""Sampling speed against the number of steps, and the steps each sampler needs to reach the same MMD to real data.

One run on one machine: the demo cohort (2D axial slices of the built-in cohort at 40x48x40) is made twice, a
training set and a held-out set with another seed; a demo-sized UNet (base 16, mults 1-2-2) is trained for
``--train-steps`` with flow matching and with DDPM (v-prediction, cosine schedule). Each sampler (flow: euler, heun;
DDPM: ancestral, ddim) then draws ``--n`` subjects at each step count of ``--steps``, with the held-out subjects'
covariates, through the same code path as ``hpcdiff sample`` (one generator per subject). Reported: subjects/s,
network evaluations (NFE) per subject, and the unbiased MMD^2 to held-out real slices drawn as the 2D loader draws
them (hpcdiff.quality, bandwidth from the real set), beside the mean + noise baseline and real half vs half.
"Steps to target" is the fewest steps at which a sampler's MMD^2 falls below a target shared by all samplers:
1.25 x the largest of their MMD^2 at the most steps; also the fewest steps within 10% of the sampler's own best.

    .venv/bin/python bench/bench_sampling.py --workdir /tmp/benchsample
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
HPCDIFF = [sys.executable, "-m", "hpcdiff"]
SHAPE = (40, 48, 40)
AXIS = 2


def _run(*args: object) -> None:
    subprocess.run([*HPCDIFF, *map(str, args)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def _prepare(work: Path, subjects: int, held_out: int, train_steps: int) -> dict[str, Path]:
    from hpcdiff.data import ingest, make_cohort

    paths = {}
    for name, n, seed in (("train", subjects, 0), ("heldout", held_out, 1)):
        bids, shards = work / f"{name}-bids", work / f"{name}-shards"
        if not (shards / "manifest.json").exists():
            make_cohort(bids, n, SHAPE, seed)
            ingest(bids, shards, SHAPE)
        paths[name] = shards
    for kind, objective in (("flow", {"kind": "flow"}), ("ddpm", {"kind": "ddpm", "prediction": "v"})):
        job = {
            "data": {"shards": str(paths["train"]), "mode": "2d", "slice_axis": AXIS, "batch_size": 8},
            "model": {"base_channels": 16, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attention_levels": []},
            "objective": objective,
            "optim": {"lr": 1e-3, "warmup_steps": 50, "ema_decay": 0.995},
            "train": {"steps": train_steps, "seed": 0, "checkpoint_every": train_steps, "cond_drop_prob": 0.1},
        }
        (work / f"{kind}.yaml").write_text(yaml.safe_dump(job))
        t0 = time.perf_counter()
        _run("train", work / f"{kind}.yaml", "--run-dir", work / f"run-{kind}", "--quiet")
        print(f"trained {kind}: {train_steps} steps in {time.perf_counter() - t0:.0f} s (0 if already done)")
        paths[kind] = work / f"run-{kind}"
    return paths


def main() -> None:
    from hpcdiff.data.shards import ShardSet
    from hpcdiff.quality import downsample, median_bandwidth, mmd2, pool_factor, training_slices
    from hpcdiff.sample import _tensors, load_generator
    from hpcdiff.seeds import seed_for

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/benchsample"))
    p.add_argument("--subjects", type=int, default=64, help="training cohort")
    p.add_argument("--held-out", type=int, default=64, help="real subjects the MMD is measured against")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--n", type=int, default=64, help="synthetic subjects per (sampler, steps)")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    paths = _prepare(args.workdir, args.subjects, args.held_out, args.train_steps)

    real = ShardSet.open(paths["heldout"])
    idx = range(min(args.n, real.num_subjects))
    x_real = training_slices(real.read_many(range(real.num_subjects))[:, 0], AXIS, range(real.num_subjects))
    factor = pool_factor(x_real.shape[1:])
    f_real = downsample(x_real, factor)
    bw = median_bandwidth(f_real)
    rng = np.random.default_rng(0)
    base = x_real.mean(0) + x_real.std(0) * rng.standard_normal((args.n, *x_real.shape[1:]))
    perm = rng.permutation(len(f_real))
    half = len(perm) // 2
    print(
        f"held-out real {len(f_real)} slices, pooled x{factor}; MMD^2 baseline (mean + noise) "
        f"{mmd2(downsample(base, factor), f_real, bw):.4f}, real half vs half "
        f"{mmd2(f_real[perm[:half]], f_real[perm[half:]], bw):.4f}"
    )
    table = real.subjects()
    results = {}
    print(f"{'objective':9} {'sampler':9} {'steps':>5} {'NFE':>4} {'subjects/s':>10} {'MMD^2':>8}")
    for kind, samplers in (("flow", ("euler", "heun")), ("ddpm", ("ancestral", "ddim"))):
        gen = load_generator(paths[kind], torch.device("cpu"))
        cols = {name: [table[name][i].item() for i in idx] for name in gen.schema}
        cov = _tensors(cols, gen.schema, range(len(idx)), torch.device("cpu"))
        spatial = [s for a, s in enumerate(SHAPE) if a != AXIS]
        for sampler in samplers:
            for steps in args.steps:
                best = float("inf")
                for _ in range(2):  # best of two: the machine is shared; same generators, same output
                    gens = [torch.Generator().manual_seed(seed_for(0, i)) for i in idx]
                    t0 = time.perf_counter()
                    x = gen.objective.sample(gen.model, (len(idx), 1, *spatial), cov, gens, steps, sampler=sampler)
                    best = min(best, time.perf_counter() - t0)
                rate = len(idx) / best
                x = np.expand_dims(x.numpy()[:, 0], 1 + AXIS)
                score = mmd2(downsample(x, factor), f_real, bw)
                nfe = steps * (2 if sampler == "heun" else 1)
                results[(kind, sampler, steps)] = score
                print(f"{kind:9} {sampler:9} {steps:5d} {nfe:4d} {rate:10.1f} {score:8.4f}")
    top = max(args.steps)
    target = 1.25 * max(v for (k, s, st), v in results.items() if st == top)
    print(f"target MMD^2 {target:.4f} (1.25 x the worst sampler at {top} steps)")
    for kind, sampler, _ in sorted({(k, s, 0) for k, s, _ in results}):
        reached = [st for st in sorted(args.steps) if results[(kind, sampler, st)] <= target]
        own = min(results[(kind, sampler, st)] for st in args.steps)
        settled = [st for st in sorted(args.steps) if results[(kind, sampler, st)] <= own + 0.1 * abs(own)]
        print(
            f"  {kind:5} {sampler:9} steps to target: {reached[0] if reached else f'> {top}'}; "
            f"to within 10% of its own best ({own:.4f}): {settled[0]}"
        )


if __name__ == "__main__":
    main()
