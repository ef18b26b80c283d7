"""Sub-commands that make data: the synthetic cohort, ingest into shards, sampling, export and the quality report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpcdiff.cli.common import add_task_options, positive, shape


# ---------------------------------------------------------------- cohort
def add_cohort(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cohort", help="synthetic multi-subject BIDS dataset with planted group effects")
    p.add_argument("--out", required=True, help="BIDS directory to create (a rerun completes it)")
    p.add_argument("--subjects", required=True, type=shape, metavar="N", help="number of subjects")
    p.add_argument("--shape", nargs=3, type=shape, default=[48, 56, 48], metavar=("D", "H", "W"), help="grid")
    p.add_argument("--seed", type=int, default=0, help="with the subject index, fixes each subject")
    add_task_options(p)
    p.set_defaults(handler=_run_cohort)


def _run_cohort(args: argparse.Namespace) -> int:
    import os

    from hpcdiff.batch import task_of
    from hpcdiff.data.cohort import TRUTH_DIR, make_cohort
    from hpcdiff.dist import detect_topology

    task, num_tasks = task_of(args.task, args.num_tasks, os.environ)
    subjects = make_cohort(
        Path(args.out),
        args.subjects,
        tuple(args.shape),
        args.seed,
        task=task,
        num_tasks=num_tasks,
        overwrite=args.overwrite,
    )
    if detect_topology().is_main:
        where = f"ground truth in {Path(args.out) / TRUTH_DIR}"
        print(f"cohort: task {task} of {num_tasks}: {len(subjects)} subjects planned in {args.out}; {where}")
    return 0


# ---------------------------------------------------------------- ingest
def add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="BIDS T1w images -> conformed HDF5 shards (resumable, sliced across ranks)")
    p.add_argument("bids_dir", help="root of a BIDS dataset (participants.tsv, sub-*/[ses-*/]anat/*_T1w.nii[.gz])")
    p.add_argument("--out", required=True, help="shard directory to create (a rerun completes it)")
    p.add_argument("--shape", nargs=3, type=shape, default=[48, 56, 48], metavar=("D", "H", "W"), help="grid")
    p.add_argument("--spacing", type=float, default=None, metavar="MM", help="isotropic voxel size (mm)")
    p.add_argument("--subjects-per-shard", type=shape, default=64, metavar="K", help="subjects per shard")
    p.add_argument("--strict", action="store_true", help="exit 3 if any input is quarantined")
    p.add_argument(
        "--register",
        choices=("auto", "affine", "rigid", "none"),
        default="auto",
        help="registration to the template (default auto: affine unless the inputs declare its space)",
    )
    p.add_argument("--template", metavar="FILE", help="study template (NIfTI); default: MNI152 (nilearn)")
    p.add_argument("--mask", metavar="FILE", help="brain mask in template space; normalise inside it")
    p.add_argument("--seed", type=int, default=0, help="registration's sampling seed (default 0)")
    p.add_argument("--categorical", type=_names, default=[], metavar="COL[,COL]", help="covariates that are codes")
    p.add_argument("--continuous", type=_names, default=[], metavar="COL[,COL]", help="covariates that are numbers")
    p.add_argument("--session", default="all", metavar="LABEL|first|all", help="sessions to keep (default all)")
    p.add_argument(
        "--run", choices=("first", "last", "all"), default="last", help="of repeated runs, keep (default last)"
    )
    add_task_options(p)
    p.set_defaults(handler=_run_ingest)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _run_ingest(args: argparse.Namespace) -> int:
    import os

    from hpcdiff.batch import task_of
    from hpcdiff.data.ingest import ingest
    from hpcdiff.data.register import RegisterOptions
    from hpcdiff.data.shards import QUARANTINE
    from hpcdiff.dist import detect_topology

    task, num_tasks = task_of(args.task, args.num_tasks, os.environ)
    r = ingest(
        Path(args.bids_dir),
        Path(args.out),
        tuple(args.shape),
        args.spacing,
        args.subjects_per_shard,
        args.strict,
        task=task,
        num_tasks=num_tasks,
        register=RegisterOptions(
            mode=args.register,
            template=Path(args.template) if args.template else None,
            mask=Path(args.mask) if args.mask else None,
            seed=args.seed,
        ),
        categorical=args.categorical,
        continuous=args.continuous,
        session=args.session,
        run=args.run,
        overwrite=args.overwrite,
    )
    if not detect_topology().is_main:
        return 0
    counts = f"{r.shards_written} written, {r.shards_skipped} already complete"
    if r.manifest_written:
        print(
            f"ingest: {r.num_subjects} subjects in {r.num_shards} shards in {r.out} ({counts}); "
            f"{len(r.quarantined)} quarantined, listed in {r.out / QUARANTINE}"
        )
    elif r.finished:
        print(f"ingest: task {task} of {num_tasks} in {r.out}: {counts}; the job was already finished")
    else:
        print(f"ingest: task {task} of {num_tasks} in {r.out}: {counts}; other workers' shards still missing")
    return 0


# ---------------------------------------------------------------- sample
def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="synthetic subjects from a run into shards (resumable, sliced across ranks and tasks)"
    )
    p.add_argument("--run-dir", required=True, help="training run whose EMA weights are sampled")
    p.add_argument(
        "--checkpoint",
        type=int,
        metavar="STEP",
        help="training step to sample from (default: the newest valid checkpoint when the plan is first made; "
        "the plan keeps its own copy of those weights)",
    )
    p.add_argument("--out", required=True, help="shard directory to create (a rerun completes it)")
    p.add_argument("--n", type=positive, help="subjects (optional with --covariates: one per row)")
    p.add_argument("--covariates", metavar="FILE.tsv", help="one row per subject, one column per trained covariate")
    p.add_argument("--steps", type=positive, default=50, help="sampler steps (default 50)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
    p.add_argument("--sampler", help="euler|heun (flow), ancestral|ddim (DDPM); default: the objective's")
    p.add_argument("--seed", type=int, default=0, help="with the subject index, fixes each subject")
    p.add_argument("--subjects-per-shard", type=positive, default=64, metavar="K", help="subjects per shard")
    p.add_argument("--batch-size", type=positive, default=8, help="subjects sampled together")
    p.add_argument(
        "--threads", type=positive, default=1, help="intra-op threads per worker, part of the plan (default 1)"
    )
    add_task_options(p)
    p.set_defaults(handler=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    import os

    from hpcdiff.batch import task_of
    from hpcdiff.dist import detect_topology
    from hpcdiff.sample import SampleOptions, sample

    task, num_tasks = task_of(args.task, args.num_tasks, os.environ)
    opts = SampleOptions(
        n=args.n,
        covariates=Path(args.covariates) if args.covariates else None,
        steps=args.steps,
        guidance=args.guidance,
        sampler=args.sampler,
        seed=args.seed,
        subjects_per_shard=args.subjects_per_shard,
        batch_size=args.batch_size,
        checkpoint=args.checkpoint,
        threads=args.threads,
    )
    r = sample(args.run_dir, args.out, opts, task, num_tasks, overwrite=args.overwrite)
    if r.manifest_written:
        done = "manifest written: all shards done"
    else:
        done = "already finished" if r.finished else "other workers' shards still missing"
    rank = detect_topology().rank
    print(
        f"sample: task {task} of {num_tasks}, rank {rank}: {r.shards_written} shard(s) written, "
        f"{r.shards_skipped} already complete, of {r.num_shards} ({r.num_subjects} subjects, step {r.step}) "
        f"in {r.out}; {done}"
    )
    return 0


# ---------------------------------------------------------------- encode
def add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode", help="image shards -> latent shards through an autoencoder run (resumable, sliced across ranks)"
    )
    p.add_argument("shards", help="image shard directory (from ingest)")
    p.add_argument("--run-dir", required=True, help="autoencoder run (model.kind autoencoder) whose EMA weights encode")
    p.add_argument(
        "--checkpoint",
        type=int,
        metavar="STEP",
        help="autoencoder step (default: the newest valid checkpoint when the plan is first made; the plan keeps "
        "its own copy of those weights)",
    )
    p.add_argument("--out", required=True, help="latent shard directory to create (a rerun completes it)")
    p.add_argument("--subjects-per-shard", type=positive, default=64, metavar="K", help="subjects per shard")
    p.add_argument(
        "--threads", type=positive, default=1, help="intra-op threads per worker, part of the plan (default 1)"
    )
    add_task_options(p)
    p.set_defaults(handler=_run_encode)


def _run_encode(args: argparse.Namespace) -> int:
    import os

    from hpcdiff.batch import task_of
    from hpcdiff.dist import detect_topology
    from hpcdiff.encode import EncodeOptions, encode

    task, num_tasks = task_of(args.task, args.num_tasks, os.environ)
    opts = EncodeOptions(subjects_per_shard=args.subjects_per_shard, checkpoint=args.checkpoint, threads=args.threads)
    r = encode(args.shards, args.run_dir, args.out, opts, task, num_tasks, overwrite=args.overwrite)
    if r.manifest_written:
        done = "manifest written: all shards done"
    else:
        done = "already finished" if r.finished else "other workers' shards still missing"
    print(
        f"encode: task {task} of {num_tasks}, rank {detect_topology().rank}: {r.shards_written} shard(s) written, "
        f"{r.shards_skipped} already complete, of {r.num_shards} ({r.num_subjects} subjects, autoencoder step "
        f"{r.step}) in {r.out}; {done}"
    )
    return 0


# ---------------------------------------------------------------- export
def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="shards -> NIfTI (float32) in a BIDS-derivatives layout (resumable)")
    p.add_argument("shards", help="shard directory (real or synthetic)")
    p.add_argument("--out", required=True, help="derivatives folder to create (a rerun completes it)")
    add_task_options(p)
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import os

    from hpcdiff.batch import task_of
    from hpcdiff.data.export import export
    from hpcdiff.dist import detect_topology

    task, num_tasks = task_of(args.task, args.num_tasks, os.environ)
    r = export(args.shards, args.out, task=task, num_tasks=num_tasks, overwrite=args.overwrite)
    if detect_topology().is_main:
        state = "complete" if r.finished else "other workers' images still missing"
        print(
            f"export: {r.num_images} images in {r.out} ({r.written} written here, {r.skipped} already there); {state}"
        )
    return 0


# ---------------------------------------------------------------- verify
def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-read every shard (checksums, every chunk); exit 3 naming each bad file")
    p.add_argument("shards", help="shard directory with a manifest.json")
    p.add_argument("--task", type=int, help="array task index (default: from the Slurm array, else 0)")
    p.add_argument("--num-tasks", type=positive, help="array tasks (default: from the Slurm array, else 1)")
    p.set_defaults(handler=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    import os

    from hpcdiff.batch import Worker, task_of
    from hpcdiff.data.verify import verify
    from hpcdiff.dist import detect_topology

    topology = detect_topology()
    worker = Worker(*task_of(args.task, args.num_tasks, os.environ), topology.rank, topology.world_size)
    r = verify(args.shards, worker)
    print(f"verify: worker {worker.index} of {worker.count}: {len(r.checked)} of {r.num_shards} shard(s) good")
    return 0


# ---------------------------------------------------------------- quality
def add_quality(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quality", help="synthetic vs held-out real: montage, mean/std maps, MMD beside a baseline")
    p.add_argument("real", help="shards of real subjects held out of training")
    p.add_argument("synth", help="shards written by 'hpcdiff sample'")
    p.add_argument("--out", required=True, help="folder for montage.png, maps.png, maps and summary.json")
    p.add_argument("--max-subjects", type=positive, default=256, help="subjects read from each set (default 256)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_run_quality)


def _run_quality(args: argparse.Namespace) -> int:
    from hpcdiff.quality import quality

    s = quality(args.real, args.synth, args.out, max_subjects=args.max_subjects)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        m = s["mmd"]
        print(
            f"quality: MMD^2 synthetic {m['mmd2_synthetic_vs_real']:.4g}, baseline {m['mmd2_baseline_vs_real']:.4g}, "
            f"real half vs half {m['mmd2_real_half_vs_half']:.4g}; mean map r={s['maps']['corr_mean']:.3f}, "
            f"std map r={s['maps']['corr_std']:.3f}"
        )
        if s["diversity"]:
            d = s["diversity"]
            print(
                f"quality: MS-SSIM synthetic pairs {d['ms_ssim_synthetic_pairs']:.4f}, "
                f"real pairs {d['ms_ssim_real_pairs']:.4f}"
            )
        cond = s["conditioning"]
        for name in ("synthetic", "real"):
            if cond and cond[name]:
                c = cond[name]
                print(
                    f"quality: {name} ventricle volume vs {cond['covariate']}: "
                    f"slope {c['slope_ml_per_unit']:+.4g} mL per unit, r={c['pearson_r']:+.3f}"
                )
        print(f"quality: wrote {Path(args.out) / 'summary.json'}")
    return 0
