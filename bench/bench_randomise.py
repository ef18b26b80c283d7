"""Permutation inference throughput and memory against nilearn's ``permuted_ols`` on the same data and permutations.

Both run Freedman-Lane t tests of a group column with age and sex as nuisance on gamma-noise data (subjects x
voxels in memory); ours replays nilearn's permutation stream (``n_jobs=1`` draws a known sequence), so the two
max-statistic nulls must agree, and the script checks they do. Each measurement runs in a fresh process, so its
peak RSS (ru_maxrss, children included) is its own. Reported: voxels x permutations x subjects per second, the
ratio, and peak memory; then the tail accelerations: plain N permutations against a fit on N/10, their time and
how far apart their FWE p-values are (max |log10| difference where the long run resolves them); then the cost of
TFCE on one map at 2 mm and 1 mm.

    .venv/bin/python bench/bench_randomise.py [--subjects 100] [--voxels 20000] [--permutations 1000]
    .venv/bin/python bench/bench_randomise.py --tfce-only      (TFCE of one map at 2 mm and at 1 mm, 160x224x160)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def data(subjects: int, voxels: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    group = (np.arange(subjects) % 2).astype(float)
    age, sex = rng.uniform(40, 80, subjects), rng.integers(0, 2, subjects).astype(float)
    y = rng.gamma(2.0, size=(subjects, voxels)) + group[:, None] * np.linspace(0, 1.5, voxels) + 0.01 * age[:, None]
    x = np.column_stack([np.ones(subjects), group, age - age.mean(), sex])
    return x, y


def nilearn_orders(seed: int, n_perm: int, n: int) -> np.ndarray:
    """The design-row orders ``permuted_ols(n_jobs=1, random_state=seed)`` uses (it reshuffles its design)."""
    chunk_seed = np.random.RandomState(seed).randint(1, np.iinfo(np.int32).max - 1)
    rng, order, orders = np.random.RandomState(chunk_seed), np.arange(n), []
    for _ in range(n_perm):
        order = order[rng.permutation(n)]
        orders.append(order)
    return np.array(orders)


def one(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    from nilearn.mass_univariate import permuted_ols
    from threadpoolctl import threadpool_limits

    from hpcdiff.stats.permute import FreedmanLane, permuted_statistics

    x, y = data(args.subjects, args.voxels)
    orders = nilearn_orders(0, args.permutations, args.subjects)
    baseline = _peak_rss_mb()
    with threadpool_limits(limits=args.threads):
        cpu = _cpu_seconds()
        started = time.perf_counter()
        if args.one == "nilearn":
            out = permuted_ols(
                x[:, [1]], y, x[:, 2:], n_perm=args.permutations, random_state=0, n_jobs=args.jobs, output_type="dict"
            )
            null = out["h0_max_t"][0]
        else:
            null = permuted_statistics(y, FreedmanLane(x, [1]), orders, block=64, batch=args.batch).max_null
        seconds = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu
    peak = _peak_rss_mb()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": peak,
        "peak_above_baseline_mb": peak - baseline,
        "null_head": null[:50].tolist(),
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its (finished) children: fair on a shared, loaded machine."""
    usage = [resource.getrusage(r) for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _peak_rss_mb() -> float:
    return max(resource.getrusage(r).ru_maxrss for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024


def measure(args: argparse.Namespace, which: str, threads: int, jobs: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--one", which, "--threads", str(threads), "--jobs", str(jobs)]
    cmd += ["--subjects", str(args.subjects), "--voxels", str(args.voxels), "--permutations", str(args.permutations)]
    cmd += ["--batch", str(args.batch)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def accel(args: argparse.Namespace) -> None:
    from hpcdiff.stats.permtail import fit_tail
    from hpcdiff.stats.permute import FreedmanLane, fwe_p, permutation, permuted_statistics

    x, y = data(args.subjects, args.voxels // 10)
    model = FreedmanLane(x, [1])
    n, long_n = args.subjects, args.permutations * 10
    started = time.perf_counter()
    long = permuted_statistics(y, model, np.stack([permutation(1, k, n) for k in range(long_n)]))
    long_s = time.perf_counter() - started
    ranked = model.ranked(long.stat)
    plain = fwe_p(ranked, long.max_null)
    resolved = plain >= 10 / long_n
    for method in ("gamma", "tail"):
        started = time.perf_counter()
        short = permuted_statistics(y, model, np.stack([permutation(2, k, n) for k in range(args.permutations)]))
        fit = fit_tail(short.max_null, method)
        p = fit.sf(ranked)
        seconds = time.perf_counter() - started
        where = resolved & (ranked > fit.params["threshold"]) if method == "tail" else resolved
        gap = np.abs(np.log10(p[where]) - np.log10(plain[where])).max()
        print(
            f"accel {method}: {args.permutations} permutations {seconds:.2f} s vs plain {long_n} {long_s:.2f} s "
            f"({long_s / seconds:.1f}x); smallest p {p.min():.2e} vs {1 / (long_n + 1):.2e}; max |log10 p gap| "
            f"{gap:.3f} over {where.sum()} voxels; KS p {fit.ks_pvalue:.3f}"
        )


def tfce_cost() -> None:
    from scipy import ndimage

    from hpcdiff.stats.tfce import tfce

    rng = np.random.default_rng(0)
    # 1 mm is the UK Biobank grid of the latent diffusion models (160 x 224 x 160); 2 mm is half of it per axis.
    for label, shape in (("2 mm", (80, 112, 80)), ("1 mm", (160, 224, 160))):
        v = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 2.0)
        v = v / v.std() * 1.5  # a null t-like map, smooth as 2 voxels of FWHM ~4.7
        cpu, started = _cpu_seconds(), time.perf_counter()
        tfce(v)
        wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        print(f"TFCE of one {label} map {shape}: wall {wall:.1f} s, cpu {cpu:.1f} s, peak RSS {_peak_rss_mb():.0f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=100)
    p.add_argument("--voxels", type=int, default=20000)
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--one", choices=["nilearn", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--skip-tfce", action="store_true")
    p.add_argument("--tfce-only", action="store_true", help="only the cost of TFCE on one map at 2 mm and 1 mm")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    if args.tfce_only:
        tfce_cost()
        return
    work = args.voxels * args.permutations * args.subjects
    print(f"{args.subjects} subjects x {args.voxels} voxels x {args.permutations} permutations, gamma noise")
    runs = {
        "nilearn n_jobs=1": measure(args, "nilearn", 1),
        "nilearn n_jobs=2": measure(args, "nilearn", 1, jobs=2),
        "ours 1 thread": measure(args, "ours", 1),
        "ours 2 threads": measure(args, "ours", 2),
    }
    reference = np.array(runs["nilearn n_jobs=1"]["null_head"])
    assert np.allclose(np.array(runs["ours 1 thread"]["null_head"]), reference, atol=1e-6), "nulls differ"
    for name, r in runs.items():
        print(
            f"{name:18s} wall {r['seconds']:7.2f} s  cpu {r['cpu_seconds']:7.2f} s  "
            f"{work / r['seconds'] / 1e9:6.3f} G voxel-perm-subjects/s (wall)  peak RSS {r['peak_rss_mb']:5.0f} MB "
            f"(+{r['peak_above_baseline_mb']:.0f} MB over data and imports)"
        )
    nl1, nl2, us1, us2 = runs.values()
    print(
        f"speed-up, 1 core: wall {nl1['seconds'] / us1['seconds']:.1f}x, "
        f"cpu {nl1['cpu_seconds'] / us1['cpu_seconds']:.1f}x; "
        f"2 cores (nilearn n_jobs=2, ours 2 threads): wall {nl2['seconds'] / us2['seconds']:.1f}x"
    )
    accel(args)
    if not args.skip_tfce:
        tfce_cost()


if __name__ == "__main__":
    main()
