"""Test hooks that put a worker at a chosen point: killed after N outputs, or paused before one.

Read from the environment in this one place, so tests reach real processes (mpirun ranks, array tasks) without
sleeps: ``HPCDIFF_TEST_KILL_AFTER=N`` makes a worker SIGKILL itself right after its N-th written output;
``HPCDIFF_TEST_PAUSE=INDEX:FILE`` makes the worker that owns output INDEX wait, before writing it, until FILE exists.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

KILL_AFTER = "HPCDIFF_TEST_KILL_AFTER"
PAUSE = "HPCDIFF_TEST_PAUSE"


@dataclass(frozen=True)
class Hooks:
    kill_after: int | None = None
    pause_index: int | None = None
    pause_until: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Hooks:
        kill = int(env[KILL_AFTER]) if env.get(KILL_AFTER) else None
        index, until = None, None
        if env.get(PAUSE):
            head, _, path = env[PAUSE].partition(":")
            index, until = int(head), Path(path)
        return cls(kill, index, until)

    def before(self, index: int) -> None:
        if self.pause_until is not None and index == self.pause_index:
            while not self.pause_until.exists():
                time.sleep(0.01)

    def after(self, written: int) -> None:
        if self.kill_after is not None and written >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def from_environment() -> Hooks:
    return Hooks.from_env(os.environ)
