"""``hpcdiff demo``: the whole pipeline on the built-in cohort, as a user would run it, in minutes on a laptop.

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


def _command(stage: Stage, ranks: int) -> list[str]:
    base = [sys.executable, "-m", "hpcdiff", *stage.args]
    if stage.parallel and ranks > 1 and shutil.which("mpirun"):
        return mpirun_command(ranks, base)
    return base


def run_demo(out: Path, ranks: int = 2) -> int:
    """Run every stage in order; stop at the first failure and return its exit code."""
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    config = Path(str(resources.files("hpcdiff") / "resources" / "demo.yaml"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if os.geteuid() == 0:
        env.update(MPI_ROOT_ENV)
    if ranks > 1 and not shutil.which("mpirun"):
        log.warning("mpirun not found: running every stage as one process (apt-get install openmpi-bin)")
    t_all = time.perf_counter()
    for stage in stages(out, config):
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
