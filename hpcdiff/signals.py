"""Signals only set a flag; the training loop acts on it at the next step boundary.

Slurm sends USR1 (``--signal=B:USR1@N``) before a time limit or on preemption, submitit uses USR2, and mpirun,
srun and ``scontrol requeue`` send TERM. Acting inside the handler could interrupt a collective or a checkpoint
write half-way; setting a flag cannot.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    """Remembers the first stop signal received; installs and restores its handlers."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
