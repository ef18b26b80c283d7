"""A data job's pinned checkpoint: chosen once when the plan is made, copied into the output folder, checked by digest.

Sampling and encoding read a training run's EMA weights. The run may go on training (and prune checkpoints) while
array tasks of the job start hours apart, so the plan pins one checkpoint by its step and the digest of its EMA
tensors, and rank 0 keeps a copy in ``OUT/.hpcdiff/weights.pt``: every worker of the plan loads that copy and checks
its digest, so 1 process, N ranks and array tasks compute with the same weights.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcdiff import checkpoint
from hpcdiff.atomic import atomic_write
from hpcdiff.batch import STATE_DIR
from hpcdiff.errors import CheckpointError, UsageError

PINNED = "weights.pt"


@dataclass(frozen=True)
class Pin:
    """The checkpoint a plan uses, and the digests that identify its weights."""

    step: int
    checkpoint: str  # the folder it was copied from (it may be pruned since)
    weights_sha256: str | None  # of model and EMA, as the checkpoint's marker says
    ema_sha256: str  # of the EMA tensors alone: what every worker checks its copy against


def resolve(run_dir: Path, step: int | None) -> checkpoint.CheckpointInfo:
    """Checkpoint ``step`` of ``run_dir`` (verified), or the newest valid one when ``step`` is None."""
    root = Path(run_dir) / "checkpoints"
    if step is None:
        info = checkpoint.latest_valid(root)
        if info is None:
            raise UsageError(f"no valid checkpoint in {root}: train the run first")
        return info
    info = checkpoint.verify(checkpoint.step_dir(root, step))
    if not info.valid:
        steps = [c.step for c in checkpoint.list_checkpoints(root, deep=False) if c.valid]
        raise UsageError(f"--checkpoint {step}: {info.path} is not a valid checkpoint ({info.reason}); valid: {steps}")
    return info


def pin_of(info: checkpoint.CheckpointInfo, ema: dict[str, Any]) -> Pin:
    """The pin of a loaded checkpoint: its step, folder, recorded weights digest and its EMA's digest."""
    return Pin(info.step, str(info.path), info.weights_sha256, checkpoint.weights_sha256(ema))


def pinned_path(out: Path) -> Path:
    return Path(out) / STATE_DIR / PINNED


def keep_copy(out: Path, state: dict[str, Any], pin: Pin) -> Path:
    """Write the plan's copy of the pinned state (with its pin) into ``out``'s state folder, atomically."""
    buf = io.BytesIO()
    torch.save({**state, "pin": pin.__dict__}, buf)
    path = pinned_path(out)
    atomic_write(path, buf.getvalue())
    return path


def read_copy(out: Path) -> tuple[Pin, dict[str, Any]]:
    """The plan's copy of the pinned state and its pin (weights only: nothing in it is executed)."""
    path = pinned_path(out)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return Pin(**state.pop("pin")), state
    except Exception as e:  # torch raises several kinds for a bad archive
        raise CheckpointError(
            f"cannot load the plan's pinned weights {path}: {e}; write into a new --out, or pass --overwrite to "
            "pin the checkpoint again"
        ) from e


def check_copy(out: Path, pin: Pin, ema: dict[str, Any]) -> None:
    """Refuse a copy whose EMA tensors are not the ones the plan pinned (the file changed on disk)."""
    found = checkpoint.weights_sha256(ema)
    if found != pin.ema_sha256:
        raise CheckpointError(
            f"{pinned_path(out)}: EMA weights digest {found[:12]}... differs from the plan's {pin.ema_sha256[:12]}... "
            "(the copy changed on disk); rerun with --overwrite to pin again"
        )
