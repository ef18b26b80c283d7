"""TensorBoard scalars and images of a training run, written by rank 0 to ``RUN/tensorboard/``.

TensorBoard is optional: ``train.tensorboard: auto`` logs when the ``tensorboard`` package is importable and
stays silent otherwise, so a frozen config that says ``auto`` resumes on a machine without it. A resumed run opens
its writer with ``purge_step`` = the first step it will log: TensorBoard's reader then drops whatever the killed
run wrote past its checkpoint, so every step appears once, as in ``metrics.jsonl`` (which is truncated instead).
The writer is flushed at each heartbeat and before each checkpoint: everything up to a checkpoint's step is on
disk before that checkpoint can be chosen to resume from, so a resume leaves no gap either.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hpcdiff.errors import ConfigError

log = logging.getLogger(__name__)

Setting = bool | Literal["auto"]

SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "samples_per_s": "train/samples_per_s",
    "step_s": "train/step_s",
    "data_wait_s": "train/data_wait_s",
}
"""metrics.jsonl key -> TensorBoard tag."""


def available() -> bool:
    """Whether torch's TensorBoard writer can be imported (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(setting: Setting) -> bool:
    """True when this process should log; ``true`` without the package is a ConfigError naming the key.

    Every rank calls it, so a refusal ends every rank the same way instead of leaving peers in a collective.
    """
    if setting == "auto":
        return available()
    if setting and not available():
        raise ConfigError(
            "train.tensorboard is true but the tensorboard package is not installed here: "
            "pip install tensorboard, or set train.tensorboard to auto or false"
        )
    return bool(setting)


class Board:
    """A TensorBoard writer, or nothing at all when logging is off (every method is then a no-op)."""

    def __init__(self, logdir: Path | None, first_step: int = 1) -> None:
        """Open the writer in ``logdir`` (None: off); ``first_step`` is the first step this process logs."""
        self.writer: Any = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # flush_secs is a fallback only: flush() runs at heartbeats and checkpoints.
            self.writer = SummaryWriter(str(logdir), purge_step=first_step, flush_secs=60)

    @property
    def on(self) -> bool:
        return self.writer is not None

    def metrics(self, row: dict[str, Any]) -> None:
        """The scalars of one metrics.jsonl row, at its step."""
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["step"])

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """An image of shape (H, W, 3 or 4), uint8."""
        if self.writer is not None:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
