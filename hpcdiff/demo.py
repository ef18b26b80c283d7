"""``hpcdiff demo``: the whole pipeline on the built-in cohort, as a user would run it, in minutes on a laptop.

``hpcdiff demo --latent`` runs the latent road instead, at 2 mm: autoencoder -> encode -> diffusion on latents ->
sample (decoded into images) -> export -> quality.

Each stage is the real command line (under ``mpirun -n 2`` where Open MPI is present), so the demo exercises
exactly what users run; each stage resumes, so an interrupted demo picks up where it stopped when run again.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hpcdiff.errors import HpcdiffError
from hpcdiff.launch.local import MPI_ROOT_ENV, mpirun_command

log = logging.getLogger(__name__)

SHAPE = ("40", "48", "40")
SUBJECTS = "64"
SYNTHETIC = "16"
LATENT_SHAPE = ("80", "112", "80")  # the cohort at 2 mm: 4x per axis gives a 20x28x20 latent
LATENT_SUBJECTS = "32"


@dataclass(frozen=True)
class Stage:
    """One command of the pipeline; ``parallel`` stages run under mpirun."""

    name: str
    args: tuple[str, ...]
    parallel: bool = False


def stages(out: Path, config: Path) -> list[Stage]:
    """The pipeline: data -> train -> sample -> export -> quality -> statistics."""
    o = {k: str(out / k) for k in ("bids", "shards", "run", "synthetic", "nifti", "quality", "stats")}
    return [
        Stage("cohort", ("cohort", "--out", o["bids"], "--subjects", SUBJECTS, "--shape", *SHAPE), parallel=True),
        Stage("ingest", ("ingest", o["bids"], "--out", o["shards"], "--shape", *SHAPE), parallel=True),
        Stage(
            "train",
            ("train", str(config), "--run-dir", o["run"], "--quiet", "--set", f"data.shards={o['shards']}"),
            parallel=True,
        ),
        Stage("sample", ("sample", "--run-dir", o["run"], "--out", o["synthetic"], "--n", SYNTHETIC), parallel=True),
        Stage("export", ("export", o["synthetic"], "--out", o["nifti"])),
        Stage("quality", ("quality", o["shards"], o["synthetic"], "--out", o["quality"])),
        Stage("template", ("stats", "template", o["shards"], "--out", f"{o['stats']}/template")),
        Stage(
            "groupdiff",
            (
                "stats",
                "groupdiff",
                o["shards"],
                "--group",
                "group",
                "--covariates",
                "age,sex",
                "--out",
                f"{o['stats']}/groupdiff",
            ),
        ),
    ]


def latent_stages(out: Path, autoencoder: Path, diffusion: Path) -> list[Stage]:
    """The latent road: data, autoencoder, encode, diffusion on latents, sample (decoded), export, quality."""
    o = {k: str(out / k) for k in ("bids", "shards", "autoencoder", "latents", "run", "synthetic", "nifti", "quality")}
    quiet = "--quiet"
    return [
        Stage(
            "cohort",
            ("cohort", "--out", o["bids"], "--subjects", LATENT_SUBJECTS, "--shape", *LATENT_SHAPE),
            parallel=True,
        ),
        Stage(
            "ingest",
            ("ingest", o["bids"], "--out", o["shards"], "--shape", *LATENT_SHAPE, "--spacing", "2"),
            parallel=True,
        ),
        Stage(
            "autoencoder",
            ("train", str(autoencoder), "--run-dir", o["autoencoder"], quiet, "--set", f"data.shards={o['shards']}"),
            parallel=True,
        ),
        Stage(
            "encode",
            ("encode", o["shards"], "--run-dir", o["autoencoder"], "--out", o["latents"], "--subjects-per-shard", "8"),
            parallel=True,
        ),
        Stage(
            "diffusion",
            ("train", str(diffusion), "--run-dir", o["run"], quiet, "--set", f"data.shards={o['latents']}"),
            parallel=True,
        ),
        Stage(
            "sample",
            ("sample", "--run-dir", o["run"], "--out", o["synthetic"], "--n", SYNTHETIC, "--subjects-per-shard", "8"),
            parallel=True,
        ),
        Stage("export", ("export", o["synthetic"], "--out", o["nifti"])),
        Stage("quality", ("quality", o["shards"], o["synthetic"], "--out", o["quality"])),
    ]


def _command(stage: Stage, ranks: int) -> list[str]:
    base = [sys.executable, "-m", "hpcdiff", *stage.args]
    if stage.parallel and ranks > 1 and shutil.which("mpirun"):
        return mpirun_command(ranks, base)
    return base


def _resource(name: str) -> Path:
    return Path(str(resources.files("hpcdiff") / "resources" / name))


def run_demo(out: Path, ranks: int = 2, latent: bool = False) -> int:
    """Run every stage in order (the latent road with ``latent``); stop at the first failure."""
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    if latent:
        pipeline = latent_stages(out, _resource("latent-demo.yaml"), _resource("latent-demo-diffusion.yaml"))
    else:
        pipeline = stages(out, _resource("demo.yaml"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if os.geteuid() == 0:
        env.update(MPI_ROOT_ENV)
    if ranks > 1 and not shutil.which("mpirun"):
        log.warning("mpirun not found: running every stage as one process (apt-get install openmpi-bin)")
    t_all = time.perf_counter()
    for stage in pipeline:
        t0 = time.perf_counter()
        print(f"==> {stage.name}: hpcdiff {' '.join(stage.args)}", flush=True)
        rc = subprocess.run(_command(stage, ranks), env=env, check=False).returncode
        if rc != 0:
            raise HpcdiffError(f"demo stage {stage.name!r} failed with exit {rc}; fix it and run the demo again")
        print(f"    {stage.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"demo complete in {time.perf_counter() - t_all:.0f} s. Look at:")
    for png in sorted(out.rglob("*.png")):
        print(f"  {png}")
    return 0
