"""Registration cost: seconds per subject on one core, ingest subjects/s with and without it, 40,000 subjects.

Inputs: nilearn's MNI152 brain at 1 mm, each subject moved by its own rigid transform (rotations up to 15 degrees,
shifts up to 12 mm) and stored at 1 mm, and the same subjects resampled to 2 mm. One ITK thread, one process.
  register 1 mm / 2 mm   hpcdiff's registration (rigid then affine, both at 2 mm) of one input and its resampling
                         onto a 2 mm output grid (96 x 112 x 96), per subject
  at 1 mm (reference)    the same rigid + affine run at 1 mm against the 1 mm template
  ingest                 `hpcdiff ingest` (one rank) of the 1 mm inputs, --register none vs the default
  1mm                    the 1 mm pipeline: 1 mm inputs and MNI152 at 1 mm as --template, output grid
                         160 x 224 x 160 at 1 mm; rigid and affine, each in a fresh process (its peak RSS), plus a
                         head tilted 15 degrees about two axes: its correlation and largest displacement from the truth
CPU seconds (this process, or the ingest child) are the robust number on a shared machine; wall is printed too.

    .venv/bin/python bench/bench_register.py --subjects 3
    .venv/bin/python bench/bench_register.py --subjects 2 --parts 1mm
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from nibabel.processing import resample_to_output  # noqa: E402

import hpcdiff.data.register as register  # noqa: E402
from hpcdiff.data.ingest import load_checked  # noqa: E402

SHAPE = (96, 112, 96)
SPACING = 2.0
SHAPE_1MM = (160, 224, 160)
TILT = (15.0, 15.0)  # degrees about x, then z: a plain affine from ANTs' default start does not recover it


def _tilt() -> np.ndarray:
    """The tilted head's rigid transform V (a template point p lies at V @ p in its world)."""
    a, b = np.radians(TILT)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    v = np.eye(4)
    v[:3, :3] = rz @ rx
    v[:3, 3] = (6.0, -8.0, 10.0)
    return v


def _moved(brain: nib.Nifti1Image, rng: np.random.Generator) -> nib.Nifti1Image:
    angles = np.radians(rng.uniform(-15, 15, size=3))
    m = np.eye(4)
    for axis, a in enumerate(angles):
        r = np.eye(4)
        i, j = [k for k in range(3) if k != axis]
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        m = r @ m
    m[:3, 3] = rng.uniform(-12, 12, size=3)
    data = np.asarray(brain.dataobj, dtype=np.float32) * rng.uniform(600, 1400)
    return nib.Nifti1Image(data.astype(np.int16), m @ brain.affine)


def _make(root: Path, n: int) -> dict[str, list[Path]]:
    from nilearn.datasets import load_mni152_template

    brain = load_mni152_template(resolution=1)
    paths: dict[str, list[Path]] = {"1mm": [], "2mm": []}
    lines = ["participant_id\tage"]
    for i in range(n):
        img = _moved(brain, np.random.default_rng(i))
        for res, image in (("1mm", img), ("2mm", resample_to_output(img, voxel_sizes=(2.0, 2.0, 2.0), order=1))):
            sid = f"sub-{res}{i:03d}"
            path = root / res / sid / "anat" / f"{sid}_T1w.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(image, path)
            paths[res].append(path)
        lines.append(f"sub-1mm{i:03d}\t{50 + i}")
    (root / "1mm" / "participants.tsv").write_text("\n".join(lines) + "\n")
    tilted = root / "tilted" / "sub-tilt" / "anat" / "sub-tilt_T1w.nii.gz"
    tilted.parent.mkdir(parents=True)
    data = (np.asarray(brain.dataobj, dtype=np.float32) * 900.0).astype(np.int16)
    nib.save(nib.Nifti1Image(data, _tilt() @ brain.affine), tilted)
    paths["tilted"] = [tilted]
    return paths


def _register_each(paths: list[Path], options: register.RegisterOptions, root: Path) -> tuple[float, float, float]:
    """(cpu s, wall s, lowest correlation) per subject of registering and resampling each input."""
    placement = register.Placement(register.Space(options, SHAPE, SPACING), root)
    cpu, wall, r = [], [], []
    for path in paths:
        c, w = time.process_time(), time.perf_counter()
        img, lo, hi = load_checked(path)
        _, record = placement.place(img, lo, hi, path.name, (0.5, 99.5), None)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
        r.append(record.correlation)
    return float(np.mean(cpu)), float(np.mean(wall)), float(min(r))


def _children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def _ingest(bids: Path, out: Path, *extra: str) -> tuple[float, float]:
    c, w = _children_cpu(), time.perf_counter()
    cmd = [sys.executable, "-m", "hpcdiff", "ingest", str(bids), "--out", str(out), "--shape", *map(str, SHAPE)]
    subprocess.run([*cmd, "--spacing", str(SPACING), *extra], check=True, capture_output=True)
    return _children_cpu() - c, time.perf_counter() - w


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _one_mm(root: Path, method: str) -> None:
    """In a fresh process: register each 1 mm input onto the 1 mm grid, then the tilted head; print what it cost."""
    import json

    tpl = root / "tpl-MNI152at1mm_T1w.nii.gz"
    options = register.RegisterOptions(mode=method, template=tpl)  # type: ignore[arg-type]
    space = register.Space(options, SHAPE_1MM, 1.0)
    placement = register.Placement(space, root)
    register._ants()  # imported before the baseline memory is read
    _ = space.template, space.grid
    base = _peak_rss_gb()
    inputs = sorted((root / "1mm").glob("sub-*/anat/*.nii.gz")) + [root / "tilted/sub-tilt/anat/sub-tilt_T1w.nii.gz"]
    rows = []
    for path in inputs:
        c, w = time.process_time(), time.perf_counter()
        img, lo, hi = load_checked(path)
        volume, record = placement.place(img, lo, hi, path.name, (0.5, 99.5), None)
        rows.append(
            {
                "subject": path.parent.parent.name,
                "cpu": time.process_time() - c,
                "wall": time.perf_counter() - w,
                "r": record.correlation,
                "transform": record.transform.tolist(),
            }
        )
        del volume
    print(json.dumps({"rows": rows, "base_gb": base, "peak_gb": _peak_rss_gb()}))


def _displacement(transform: np.ndarray, grid: np.ndarray) -> float:
    """Largest distance (mm) between where a brain point of the template lands and where it should, for the tilt."""
    ijk = np.stack(np.meshgrid(*[np.arange(0, n, 4) for n in SHAPE_1MM], indexing="ij"), -1).reshape(-1, 3)
    p = grid @ np.c_[ijk, np.ones(len(ijk))].T
    inside = np.linalg.norm(p[:3] - np.array([[0.0], [-18.0], [8.0]]), axis=0) < 60  # the brain, roughly
    q = (np.linalg.inv(_tilt()) @ transform @ p[:, inside])[:3]
    return float(np.linalg.norm(q - p[:3, inside], axis=0).max())


def _report_1mm(root: Path) -> None:
    import json

    from nilearn.datasets import load_mni152_template

    nib.save(load_mni152_template(resolution=1), root / "tpl-MNI152at1mm_T1w.nii.gz")
    print(
        f"1 mm: output grid {SHAPE_1MM} at 1.0 mm, template MNI152 1 mm, registration at "
        f"{register.REGISTRATION_SPACING_MM} mm, ITK threads {os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS']}"
    )
    grid = register.Space(register.RegisterOptions(template=root / "tpl-MNI152at1mm_T1w.nii.gz"), SHAPE_1MM, 1.0)
    for method in ("rigid", "affine"):
        cmd = [sys.executable, __file__, "--one-mm", method, "--root", str(root)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        moved = [r for r in result["rows"] if r["subject"] != "sub-tilt"]
        tilt = next(r for r in result["rows"] if r["subject"] == "sub-tilt")
        cpu = np.mean([r["cpu"] for r in moved])
        wall = np.mean([r["wall"] for r in moved])
        print(
            f"  {method:6} {cpu:6.1f} CPU s/subject ({wall:6.1f} s wall), lowest r {min(r['r'] for r in moved):.3f}, "
            f"peak RSS {result['peak_gb']:.2f} GB ({result['base_gb']:.2f} GB after imports)"
        )
        error = _displacement(np.asarray(tilt["transform"]), grid.grid)
        print(
            f"         tilted {TILT[0]:g}/{TILT[1]:g} degrees: r {tilt['r']:.3f}, largest displacement {error:.2f} mm,"
            f" {tilt['cpu']:.1f} CPU s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument(
        "--parts", default="register,reference,ingest", help="comma-separated: register, reference, ingest, 1mm"
    )
    parser.add_argument("--one-mm", choices=("rigid", "affine"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_mm:
        _one_mm(args.root, args.one_mm)
        return
    parts = set(args.parts.split(","))
    n = args.subjects
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = _make(root, n)
        print(f"subjects {n}, output grid {SHAPE} at {SPACING} mm, ITK threads 1, {os.cpu_count()} CPUs")
        for res in ("1mm", "2mm") if "register" in parts else ():
            cpu, wall, r = _register_each(paths[res], register.RegisterOptions(mode="affine"), root)
            print(f"  register {res} input    {cpu:6.1f} CPU s/subject  ({wall:6.1f} s wall)  lowest r {r:.3f}")
        if "reference" in parts:
            from nilearn.datasets import load_mni152_template

            tpl = root / "tpl-MNI152at1mm_T1w.nii.gz"
            nib.save(load_mni152_template(resolution=1), tpl)
            register.REGISTRATION_SPACING_MM = 1.0
            cpu, wall, r = _register_each(paths["1mm"], register.RegisterOptions(mode="affine", template=tpl), root)
            register.REGISTRATION_SPACING_MM = 2.0
            print(f"  register at 1 mm (ref) {cpu:6.1f} CPU s/subject  ({wall:6.1f} s wall)  lowest r {r:.3f}")
        if "1mm" in parts:
            _report_1mm(root)
        if "ingest" not in parts:
            return
        plain_cpu, plain_wall = _ingest(root / "1mm", root / "plain", "--register", "none")
        reg_cpu, reg_wall = _ingest(root / "1mm", root / "registered")
        print(f"  ingest --register none {n / plain_wall:6.3f} subjects/s wall, {plain_cpu / n:6.1f} CPU s/subject")
        print(f"  ingest (registering)   {n / reg_wall:6.3f} subjects/s wall, {reg_cpu / n:6.1f} CPU s/subject")
        per = reg_cpu / n
        print(f"  40,000 subjects: {40000 * per / 3600:,.0f} core-hours (ingest CPU/subject, start-up shared over {n})")


if __name__ == "__main__":
    main()
