"""Which T1w images of a subject go in: sessions (``--session``) and repeated runs (``--run``).

A longitudinal dataset has one image per session; a repeated acquisition adds ``run-<n>`` images. By default every
session is kept and, of repeated runs, one (the last: a run is usually repeated because an earlier one was poor);
every choice is logged, so nothing disappears unsaid. Images that differ in more than their run (``acq-``, ``rec-``,
or one without a run entity beside ones with it) are not a choice this rule can make: they stay together and ingest
quarantines them as duplicates.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

from hpcdiff.errors import UsageError

log = logging.getLogger(__name__)

RUN_RULES = ("first", "last", "all")
_RUN = re.compile(r"_run-(\d+)(?=_)")


class Image(Protocol):
    subject: str
    session: str
    source_path: str


@dataclass
class Selection:
    """The images grouped by what must be unique (subject and session; also the run with ``--run all``)."""

    groups: list[list[Image]]
    not_chosen: list[str]  # source paths left out by the rules, each logged


def _natural(label: str) -> tuple:
    """Sort key: ses-2 before ses-10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label))


def _run(image: Image) -> int | None:
    m = _RUN.search(PurePosixPath(image.source_path).name)
    return int(m.group(1)) if m else None


def _sessions(images: Sequence[Image], session: str) -> tuple[list[Image], list[str]]:
    if session == "all":
        return list(images), []
    if session == "first":
        first: dict[str, str] = {}
        for im in images:
            if im.subject not in first or _natural(im.session) < _natural(first[im.subject]):
                first[im.subject] = im.session
        kept = [im for im in images if im.session == first[im.subject]]
    else:
        label = session if session.startswith("ses-") else f"ses-{session}"
        kept = [im for im in images if im.session == label]
        if not kept:
            found = sorted({im.session for im in images if im.session}, key=_natural)
            raise UsageError(f"--session {session}: no image has {label}; sessions found: {found or 'none'}")
    ids = {id(im) for im in kept}
    dropped = [im.source_path for im in images if id(im) not in ids]
    if dropped:
        log.info("ingest: --session %s leaves out %d image(s) of other sessions", session, len(dropped))
    return kept, dropped


def select_images(images: Sequence[Image], session: str = "all", run: str = "last") -> Selection:
    """Apply ``--session LABEL|first|all`` and ``--run first|last|all``; log every image a rule leaves out."""
    if run not in RUN_RULES:
        raise UsageError(f"--run {run!r}: use one of {', '.join(RUN_RULES)}")
    kept, not_chosen = _sessions(images, session)
    by_key: dict[tuple[str, str], list[Image]] = {}
    for im in kept:
        by_key.setdefault((im.subject, im.session), []).append(im)
    groups: list[list[Image]] = []
    for (subject, ses), group in sorted(by_key.items()):
        runs = [_run(im) for im in group]
        stems = {_RUN.sub("", PurePosixPath(im.source_path).name) for im in group}
        if len(group) == 1 or None in runs or len(stems) > 1 or len(set(runs)) < len(runs):
            groups.append(group)  # one image, or a duplicate no run rule can settle
            continue
        ordered = [im for _, im in sorted(zip(runs, group), key=lambda pair: pair[0])]
        if run == "all":
            groups += [[im] for im in ordered]
            continue
        chosen = ordered[0] if run == "first" else ordered[-1]
        left = [im.source_path for im in ordered if im is not chosen]
        log.info(
            "ingest: %s%s: %d runs; --run %s keeps %s, leaves out %s",
            subject,
            f" {ses}" if ses else "",
            len(group),
            run,
            chosen.source_path,
            ", ".join(left),
        )
        groups.append([chosen])
        not_chosen += left
    return Selection(groups, sorted(not_chosen))
