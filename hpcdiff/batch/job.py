"""Run a sliced batch job: write this worker's outputs (skipping those done), then finish if every record is in.

A job is a plan fixed by its digest, cut into outputs by index. Each output is written atomically and then
recorded (``records``); a rerun skips outputs whose record matches the plan. After its own slice a worker looks
at the records: when every one is there, it claims the finish (an exclusive create, so one worker finishes even
when several find the job done at once) and writes the job's finishing files (manifest, quarantine) from the
records alone. No collective follows the uneven part: a worker whose slice is done simply leaves.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from hpcdiff.atomic import remove_stale_tmp, write_text_atomic
from hpcdiff.batch.hooks import from_environment
from hpcdiff.batch.owner import STATE_DIR, Marker, take
from hpcdiff.batch.records import Record, all_listed, all_records, is_done, write_record
from hpcdiff.batch.slices import Worker

CLAIM = "finish.json"
STALE_CLAIM_S = 600.0
"""A finishing claim this old whose holder cannot be checked (another host) is taken over."""

P = TypeVar("P")
log = logging.getLogger(__name__)


class Job(Protocol):
    """What the core needs from a command: its plan's outputs, how to write one, and how to finish."""

    out: Path
    plan_sha256: str
    num_outputs: int
    finish_files: tuple[str, ...]  # what finishing writes (relative to ``out``); all there = finished

    def files(self, index: int) -> list[str]:
        """Files (relative to ``out``) that output ``index`` consists of."""
        ...

    def write(self, index: int) -> dict[str, Any]:
        """Write output ``index`` atomically; return what its record keeps for the finisher (JSON-able)."""
        ...

    def finish(self, records: list[Record]) -> Any:
        """Write the finishing files from every output's record; the result is handed back to the caller."""
        ...


@dataclass
class Outcome:
    """What one worker did."""

    written: int = 0
    skipped: int = 0
    mine: dict[int, Record] = field(default_factory=dict)
    finished: bool = False  # the finishing files are there (written here or by another worker)
    finished_here: bool = False
    summary: Any = None  # what Job.finish returned, when it ran here


def plan_once(
    ctx: Any,
    make: Callable[[], P],
    marker: Callable[[P], Marker],
    out: Path,
    overwrite: bool,
    prepare: Callable[[P], None] | None = None,
) -> P:
    """Plan on rank 0, take the output folder for it there, and hand every rank the plan (or the error).

    ``prepare`` runs on rank 0 once the folder is the plan's (e.g. to keep a copy of pinned inputs in it). This is
    the one collective of a job, before any uneven work.
    """

    def on_main() -> P:
        plan = make()
        take(out, marker(plan), overwrite)
        if prepare is not None:
            prepare(plan)
        return plan

    return ctx.run_on_main(on_main)


def run(job: Job, worker: Worker) -> Outcome:
    """Write (or skip) this worker's outputs, then finish the job if every output is recorded."""
    hooks = from_environment()
    outcome = Outcome()
    for index in worker.indices(job.num_outputs):
        files = job.files(index)
        record = is_done(job.out, index, job.plan_sha256, files)
        if record is not None:
            outcome.skipped += 1
        else:
            hooks.before(index)
            for name in files:
                remove_stale_tmp(job.out / name)
            data = job.write(index)
            record = write_record(job.out, index, job.plan_sha256, files, data)
            outcome.written += 1
            hooks.after(outcome.written)
        outcome.mine[index] = record
    finish_if_done(job, outcome)
    return outcome


def finish_if_done(job: Job, outcome: Outcome) -> None:
    """Finish the job if every output is recorded and nobody else finishes or has finished it.

    Only the worker holding the claim reads the records, so a thousand workers ending together cost a thousand
    directory listings, not a thousand reads of every record.
    """
    if not all_listed(job.out, job.num_outputs):
        return
    claim = job.out / STATE_DIR / CLAIM
    state = _claim(claim, job.plan_sha256)
    if state == "done" and all((job.out / f).is_file() for f in job.finish_files):
        outcome.finished = True
        return
    if state == "done":  # finished once, but a finishing file was removed since: finish again
        claim.unlink(missing_ok=True)
        state = _claim(claim, job.plan_sha256)
    if state == "busy":
        return
    records = all_records(job.out, job.plan_sha256, job.num_outputs)
    if records is None:  # a record of another plan: not done after all
        claim.unlink(missing_ok=True)
        return
    try:
        outcome.summary = job.finish(records)
    except BaseException:
        claim.unlink(missing_ok=True)
        raise
    write_text_atomic(claim, json.dumps({"plan_sha256": job.plan_sha256, "done": True}) + "\n")
    outcome.finished = outcome.finished_here = True
    log.info("%s: finished here from %d records", job.out, len(records))


def _claim(path: Path, plan_sha256: str) -> str:
    """'mine' when this process now holds the finish, 'done' when it was finished, 'busy' when another holds it."""
    me = {"plan_sha256": plan_sha256, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                held = {}  # being written this instant, or a torn write of a killed holder
                if time.time() - _mtime(path) < STALE_CLAIM_S:
                    return "busy"
            if held.get("plan_sha256") == plan_sha256 and held.get("done"):
                return "done"
            if held and held.get("plan_sha256") == plan_sha256 and _alive(held):
                return "busy"
            path.unlink(missing_ok=True)  # a dead holder's (or another plan's): take it over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return "mine"
    return "busy"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(held: dict[str, Any]) -> bool:
    """Whether a claim's holder may still be finishing: alive on this host, or recent on another."""
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True
    return time.time() - float(held.get("time", 0)) < STALE_CLAIM_S
