"""Quality of a synthetic cohort from a trained latent model, against the real cohort it was trained on.

Takes the output of ``hpcdiff demo --latent --out DIR`` (real shards, a trained latent run), samples one synthetic
twin per real subject (the same age, sex and group, through ``hpcdiff sample --covariates``), then measures, with
the project's own commands:

- diversity: mean 3D MS-SSIM between synthetic pairs against the same between real pairs (aim: within 0.1);
- conditioning: slope of ventricle volume on the requested age, synthetic against real (aim: the same sign);
- ``hpcdiff stats compare --covariates age,sex``: the synthetic age t map against the real one, and the template;
- MMD of the synthetic set to the real one against the moment-matched Gaussian baseline's (from ``quality``).

The real subjects are the ones the model was trained on (the demo holds none out), so the numbers say whether the
model reproduces its training cohort, not whether it generalises.

    .venv/bin/python -m hpcdiff demo --latent --out /tmp/demo-latent
    .venv/bin/python bench/bench_latent_cohort.py --demo /tmp/demo-latent --steps 50
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hpcdiff.data.shards import ShardSet
from hpcdiff.launch.local import MPI_ROOT_ENV, mpirun_command

COVARIATES = ("age", "sex", "group")


def _hpcdiff(*args: object, ranks: int = 1) -> None:
    argv = [sys.executable, "-m", "hpcdiff", *map(str, args)]
    if ranks > 1 and shutil.which("mpirun"):
        argv = mpirun_command(ranks, argv)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **MPI_ROOT_ENV})


def _twins(real: Path, path: Path) -> int:
    """Write a covariates TSV with one row per real subject; returns the number of rows."""
    with ShardSet.open(real) as shards:
        table = shards.subjects()
    rows = len(table["age"])
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(COVARIATES)
        for i in range(rows):
            w.writerow([table[c][i] for c in COVARIATES])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="output folder of 'hpcdiff demo --latent'")
    ap.add_argument("--steps", type=int, default=50, help="sampler steps")
    ap.add_argument("--ranks", type=int, default=2, help="mpirun ranks for sampling")
    args = ap.parse_args()
    real, run = args.demo / "shards", args.demo / "run"
    out = args.demo / f"bench-twins-{args.steps}"
    out.mkdir(exist_ok=True)
    n = _twins(real, out / "twins.tsv")
    t0 = time.perf_counter()
    synth = out / "synthetic"
    _hpcdiff(
        "sample",
        "--run-dir",
        run,
        "--out",
        synth,
        "--covariates",
        out / "twins.tsv",
        "--steps",
        args.steps,
        "--subjects-per-shard",
        8,
        ranks=args.ranks,
    )
    print(f"{n} synthetic twins, {args.steps} steps, {args.ranks} ranks: {time.perf_counter() - t0:.0f} s")
    _hpcdiff("quality", real, synth, "--out", out / "quality")
    _hpcdiff("stats", "compare", real, synth, "--covariates", "age,sex", "--out", out / "compare")
    q = json.loads((out / "quality" / "summary.json").read_text())
    c = json.loads((out / "compare" / "summary.json").read_text())
    div, cond, mmd = q["diversity"], q["conditioning"], q["mmd"]
    gap = div["ms_ssim_synthetic_pairs"] - div["ms_ssim_real_pairs"]
    print(
        f"MS-SSIM pairs        synthetic {div['ms_ssim_synthetic_pairs']:.3f}  real {div['ms_ssim_real_pairs']:.3f}"
        f"  gap {gap:+.3f} (aim |gap| < 0.1: {'met' if abs(gap) < 0.1 else 'not met'})"
    )
    s, r = cond["synthetic"], cond["real"]
    print(
        f"ventricles ~ age     synthetic {s['slope_ml_per_unit']:+.4f} mL/y (r {s['pearson_r']:+.2f})  real "
        f"{r['slope_ml_per_unit']:+.4f} mL/y (r {r['pearson_r']:+.2f})  same sign: {cond['same_sign']}"
    )
    age = c["covariates"]["age"]
    print(
        f"stats compare age    t-map correlation {age['t_correlation']:+.3f}, "
        f"sign agreement {age['sign_agreement']:.2f}"
        f" over {age['voxels_compared']} voxels ({age['real_significant_voxels']} real FDR-significant)"
    )
    print(
        f"stats compare        template correlation {c['template_correlation']:.3f}, "
        f"std correlation {c['template_std_correlation']:.3f}"
    )
    print(
        f"MMD^2 to real        synthetic {mmd['mmd2_synthetic_vs_real']:.4f}  Gaussian baseline "
        f"{mmd['mmd2_baseline_vs_real']:.4f}  real half vs half {mmd['mmd2_real_half_vs_half']:.4f}"
    )


if __name__ == "__main__":
    main()
