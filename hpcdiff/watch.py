"""What rank 0 shows of a training run as it goes: TensorBoard scalars and preview samples.

The loop calls four methods (after each step, before a checkpoint, after one is written, at the end); on other
ranks, and with everything switched off, those calls do nothing. Nothing here feeds back into training.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from hpcdiff import tensorboard_log
from hpcdiff.preview import Previewer

if TYPE_CHECKING:
    from hpcdiff.checkpoint import Saved
    from hpcdiff.runstate import RunDir
    from hpcdiff.train_config import JobConfig

log = logging.getLogger(__name__)


class Watch:
    """TensorBoard and previews of one process (inert unless built by ``open_watch`` on rank 0)."""

    def __init__(
        self,
        run: RunDir | None = None,
        board: tensorboard_log.Board | None = None,
        previewer: Previewer | None = None,
        preview_every: int | None = None,
    ) -> None:
        self.run, self.board, self.previewer = run, board or tensorboard_log.Board(None), previewer
        self.preview_every = preview_every

    def after_step(self, row: dict[str, Any]) -> None:
        """Log a metrics row; draw a preview when its step is a multiple of ``preview_every``."""
        self.board.metrics(row)
        step = int(row["step"])
        if self.previewer is not None and self.preview_every and step % self.preview_every == 0:
            self._preview(step)

    def before_checkpoint(self) -> None:
        """Flush: what was logged up to a checkpoint's step must be on disk before the checkpoint can be resumed."""
        self.board.flush()

    def checkpoint(self, saved: Saved | None) -> None:
        if saved is not None:
            self.board.scalar("checkpoint/stall_s", saved.stall_s, saved.info.step)
            self.board.scalar("checkpoint/write_s", saved.write_s, saved.info.step)

    def flush(self) -> None:
        self.board.flush()

    def close(self) -> None:
        self.board.close()

    def _preview(self, step: int) -> None:
        assert self.previewer is not None and self.run is not None
        try:
            path, rgb, seconds = self.previewer(step)
        except Exception as e:  # a preview is a side view: a failure is reported, training goes on
            log.warning("preview at step %d failed: %s: %s", step, type(e).__name__, e)
            self.run.event("preview_failed", step=step, error=f"{type(e).__name__}: {e}")
            return
        self.board.image("preview/ema", rgb, step)
        self.board.scalar("preview/seconds", seconds, step)
        self.run.event("preview", step=step, path=str(path), seconds=round(seconds, 4))
        log.info("preview at step %d: %s (%.2f s)", step, path, seconds)


def open_watch(
    job: JobConfig,
    run: RunDir,
    is_main: bool,
    resume_step: int,
    *,
    ema: torch.nn.Module,
    objective: Any,
    schema: dict[str, dict],
    grid_shape: list[int],
    device: torch.device,
    channels: int = 1,
) -> Watch:
    """The Watch of this rank for a run resumed at ``resume_step``; every rank calls it (see tensorboard_log)."""
    t = job.train
    tensorboard_on = tensorboard_log.resolve(t.tensorboard)
    if not is_main:
        return Watch()
    board = tensorboard_log.Board(run.root / "tensorboard" if tensorboard_on else None, first_step=resume_step + 1)
    if t.tensorboard == "auto" and not tensorboard_on:
        log.info("TensorBoard logging is off: the tensorboard package is not installed (train.tensorboard: auto)")
    previewer = None
    if t.preview_every and channels > 1:
        log.info("no previews for a latent run: its samples are latents (hpcdiff sample decodes them into images)")
    elif t.preview_every:
        spatial = list(grid_shape)
        if job.data.mode == "2d":
            del spatial[job.data.slice_axis]
        previewer = Previewer(
            ema,
            objective,
            schema,
            tuple(spatial),
            run.root / "previews",
            num=t.preview_subjects,
            steps=t.preview_sampler_steps,
            seed=t.seed,
            device=device,
        )
    return Watch(run, board, previewer, t.preview_every)
