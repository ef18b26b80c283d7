"""Which outputs a process writes when a batch job is spread over Slurm array tasks *and* MPI ranks.

Worker ``task * W + rank`` of ``T * W`` writes outputs ``worker, worker + T*W, ...``. Plain arithmetic, so it is
testable without a launcher, and a rerun with any other (T, W) still finds every output by its index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hpcdiff.errors import UsageError


@dataclass(frozen=True)
class Worker:
    """One process's place among ``num_tasks`` array tasks of ``world_size`` ranks each."""

    task: int
    num_tasks: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.num_tasks < 1:
            raise UsageError(f"--num-tasks must be at least 1, got {self.num_tasks}")
        if not 0 <= self.task < self.num_tasks:
            raise UsageError(
                f"--task {self.task} is outside 0..{self.num_tasks - 1} (--num-tasks {self.num_tasks}); "
                "a Slurm array must be contiguous (e.g. --array=0-7, not 0-14:2)"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    @property
    def index(self) -> int:
        return self.task * self.world_size + self.rank

    @property
    def count(self) -> int:
        return self.num_tasks * self.world_size

    def indices(self, num_outputs: int) -> range:
        """Indices of the outputs this worker writes."""
        return range(self.index, num_outputs, self.count)


def array_task(env: Mapping[str, str]) -> tuple[int, int]:
    """(task, num_tasks) of a Slurm array job from its environment; (0, 1) outside one.

    ``SLURM_ARRAY_TASK_ID`` counts from ``SLURM_ARRAY_TASK_MIN``, which need not be 0 (``--array=1-8``).
    """
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
    except ValueError as e:
        raise UsageError(f"unreadable Slurm array variables ({e}); pass --task and --num-tasks") from e
    return task, count


def task_of(task: int | None, num_tasks: int | None, env: Mapping[str, str]) -> tuple[int, int]:
    """(task, num_tasks) of a data job from ``--task``/``--num-tasks``, else from the Slurm array around it.

    ``--task`` alone (a hand-run slice) means one task unless ``--num-tasks`` says otherwise; with neither given, a
    Slurm array task reads both from its environment (see ``array_task``) and anything else is task 0 of 1.
    """
    env_task, env_tasks = array_task(env)
    if task is None:
        return env_task, env_tasks if num_tasks is None else num_tasks
    return task, 1 if num_tasks is None else num_tasks
