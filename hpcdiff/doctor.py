"""``hpcdiff doctor``: what this machine offers hpcdiff, and the command that fixes what is missing.

Each probe is a small function that never raises: a missing part is a finding, not a crash.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
from typing import Any

_FIX_PIP = "pip install -e . (inside the project's .venv; `make test` sets it up)"


def _run(argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _module_version(name: str) -> dict[str, Any]:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # an import can fail with anything (a broken binary, a missing library)
        return {"present": False, "error": f"{type(e).__name__}: {e}", "fix": _FIX_PIP}
    return {"present": True, "version": getattr(mod, "__version__", "unknown")}


def _torch() -> dict[str, Any]:
    info = _module_version("torch")
    if not info["present"]:
        info["fix"] = "pip install torch==2.13.0 (CPU) or the CUDA build for your driver"
        return info
    import torch

    info["cuda"] = torch.cuda.is_available()
    info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["nccl"] = bool(torch.cuda.is_available() and torch.distributed.is_nccl_available())
    info["gloo"] = torch.distributed.is_gloo_available()
    return info


def _mpi() -> dict[str, Any]:
    info = _module_version("mpi4py")
    launcher = shutil.which("mpirun") or shutil.which("mpiexec")
    info["mpirun"] = launcher
    if info["present"]:
        try:
            from mpi4py import MPI

            info["library"] = MPI.Get_library_version().strip().splitlines()[0]
        except Exception as e:  # no MPI library behind mpi4py
            info["present"] = False
            info["error"] = f"{type(e).__name__}: {e}"
    if not launcher:
        info["present"] = False
        info["fix"] = "apt-get install -y openmpi-bin libopenmpi-dev (or `module load openmpi` on a cluster)"
    return info


def _hdf5() -> dict[str, Any]:
    info = _module_version("h5py")
    if not info["present"]:
        return info
    import h5py

    info["hdf5"] = h5py.version.hdf5_version
    info["lz4"] = False
    try:
        import hdf5plugin

        info["lz4"] = bool(h5py.h5z.filter_avail(hdf5plugin.LZ4_ID))
    except Exception as e:  # hdf5plugin absent or its filters failed to register
        info["lz4_error"] = f"{type(e).__name__}: {e}"
    if not info["lz4"]:
        info["fix"] = "pip install hdf5plugin"
    info["h5dump"] = shutil.which("h5dump")
    return info


def _slurm() -> dict[str, Any]:
    sinfo = shutil.which("sinfo")
    info: dict[str, Any] = {"present": bool(sinfo and shutil.which("sbatch")), "sinfo": sinfo}
    if not sinfo:
        info["fix"] = "apt-get install -y slurm-client (or `module load slurm`); slurm/local/start.sh for a test one"
        return info
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):
        # Every Slurm client, `sinfo --version` included, retries a missing SLURM_CONF for 60 s: ask none.
        info["version"] = None
        info["controller"] = False
        info["partitions"] = []
        info["controller_error"] = f"SLURM_CONF={conf} does not exist"
        info["fix"] = "point SLURM_CONF at the cluster's slurm.conf, or unset it"
        return info
    rc, out = _run(["sinfo", "--version"])
    info["version"] = out.splitlines()[0] if rc == 0 and out else None
    rc, out = _run(["sinfo", "-h", "-o", "%P %a %D %t"])
    info["controller"] = rc == 0
    info["partitions"] = out.splitlines() if rc == 0 else []
    if rc != 0:
        info["controller_error"] = out.splitlines()[-1] if out else f"sinfo exited {rc}"
    return info


def diagnose() -> dict[str, Any]:
    """Probe every part hpcdiff uses; the result is JSON-ready."""
    report: dict[str, Any] = {
        "python": {"present": True, "version": platform.python_version()},
        "torch": _torch(),
        "mpi": _mpi(),
        "hdf5": _hdf5(),
        "slurm": _slurm(),
    }
    for name in ("numpy", "dask", "distributed", "submitit", "nibabel", "nilearn", "yaml"):
        report[name] = _module_version(name)
    from hpcdiff import __version__

    report["hpcdiff"] = {"present": True, "version": __version__}
    report["missing"] = sorted(k for k, v in report.items() if isinstance(v, dict) and not v.get("present"))
    return report


def render(report: dict[str, Any]) -> str:
    """Human-readable lines: one per part, then how to fix what is missing."""
    lines = []
    for name, info in report.items():
        if not isinstance(info, dict):
            continue
        mark = "ok " if info.get("present") else "-- "
        details = {k: v for k, v in info.items() if k not in ("present", "fix") and v not in (None, [], "")}
        lines.append(f"{mark}{name:12s} " + ", ".join(f"{k}={v}" for k, v in details.items()))
    for name in report["missing"]:
        fix = report[name].get("fix")
        if fix:
            lines.append(f"fix {name}: {fix}")
    return "\n".join(lines)
