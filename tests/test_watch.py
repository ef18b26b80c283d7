"""Watching a run: TensorBoard scalars read back by TensorBoard's own reader, preview montages, and the proof
that neither changes training (same weights digest and losses with them on, across a SIGKILL and a resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdiff import tensorboard_log
from hpcdiff.config import to_dict
from hpcdiff.errors import ConfigError
from hpcdiff.preview import preview_set
from hpcdiff.train_config import LoopConfig
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, assert_ok, child_env, hpcdiff, wait_for

pytestmark = pytest.mark.slow  # trains models or runs ANTs/mpirun: left out of `make test-quick`

STEPS = 16
TRAIN = {"steps": STEPS, "checkpoint_every": 4, "keep_last": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return blob_shards(tmp_path_factory.mktemp("watch data") / "shards", num_subjects=8, per_shard=4)


def _digest(run: Path) -> str:
    proc = hpcdiff("inspect", run, "--json")
    assert_ok(proc)
    return json.loads(proc.stdout)["weights_sha256"]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(x)["step"] for x in lines if x.endswith("}")), default=0)


def _raw_loss_steps(logdir: Path) -> list[int]:
    """Every train/loss step in the event files as written, duplicates included (no purging)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    steps = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == "train/loss"]
    return steps


def test_preview_set_spans_age_and_sex():
    schema = {
        "age": {"kind": "continuous", "min": 40.0, "max": 80.0, "mean": 60.0, "std": 10.0},
        "sex": {"kind": "categorical", "levels": ["F", "M"]},
    }
    a, b = preview_set(schema, 4, seed=1), preview_set(schema, 4, seed=1)
    assert a.covariates == {"age": [40.0, 160 / 3, 200 / 3, 80.0], "sex": ["F", "M", "F", "M"]}
    assert a.labels == ["40 F", "53 M", "67 F", "80 M"]
    assert a.seeds == b.seeds and len(set(a.seeds)) == 4, "fixed noise, one seed per subject"
    assert preview_set(schema, 4, seed=2).seeds != a.seeds


def test_tensorboard_auto_is_frozen_as_auto_and_true_needs_the_package(monkeypatch):
    assert to_dict(LoopConfig(steps=1))["tensorboard"] == "auto"
    assert tensorboard_log.resolve("auto") is True  # the test extra installs tensorboard
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as on a machine without it
    assert tensorboard_log.resolve("auto") is False and tensorboard_log.resolve(False) is False
    with pytest.raises(ConfigError, match=r"train.tensorboard is true .* pip install tensorboard"):
        tensorboard_log.resolve(True)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """A plain run (no TensorBoard, no previews) and a watched one that is SIGKILLed at step 6 and resumed."""
    tmp = tmp_path_factory.mktemp("watch runs")
    plain = job_yaml(tmp / "plain.yaml", shards, train={**TRAIN, "tensorboard": False, "preview_every": None})
    watched = job_yaml(
        tmp / "watched.yaml",
        shards,
        # heartbeat_s 0.001 flushes TensorBoard every step, so the killed run leaves steps past its checkpoint on disk.
        train={
            **TRAIN,
            "tensorboard": True,
            "preview_every": 4,
            "preview_subjects": 4,
            "preview_sampler_steps": 2,
            "heartbeat_s": 0.001,
        },
    )
    reference = tmp / "plain"
    assert_ok(hpcdiff("train", plain, "--run-dir", reference, "--quiet", timeout=300))
    run = tmp / "watched"
    cmd = [*HPCDIFF, "train", str(watched), "--run-dir", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _logged_step(run) >= 6 or proc.poll() is not None, 240, "step 6")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = _logged_step(run)
    assert_ok(hpcdiff("train", watched, "--run-dir", run, "--quiet", timeout=300))
    restart = [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["event"] == "restart"]
    assert len(restart) == 1 and restart[0]["step"] < killed_at, (restart, killed_at)
    return {"plain": reference, "watched": run}


def test_tensorboard_and_previews_survive_a_kill_and_leave_training_unchanged(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reference, run = runs["plain"], runs["watched"]
    assert not (reference / "tensorboard").exists() and not (reference / "previews").exists()

    # The training stream is the one without TensorBoard and previews, through a kill and a resume.
    assert _digest(run) == _digest(reference)
    assert _losses(run) == _losses(reference)

    # The killed run's steps past its checkpoint are in the files twice; TensorBoard's reader shows each once.
    logdir = run / "tensorboard"
    raw = _raw_loss_steps(logdir)
    assert len(raw) > STEPS and set(raw) == set(range(1, STEPS + 1)), raw
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    expected = _losses(run)
    assert all(e.value == pytest.approx(expected[e.step], rel=1e-6) for e in losses)
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/lr", "train/grad_norm", "train/samples_per_s", "checkpoint/stall_s", "preview/seconds"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert [e.step for e in acc.Scalars("train/lr")] == list(range(1, STEPS + 1))

    # A montage per preview step, on disk and in TensorBoard (each step once).
    previews = sorted(p.name for p in (run / "previews").iterdir())
    assert previews == [f"step-{s:07d}.png" for s in (4, 8, 12, 16)]
    assert all((run / "previews" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in previews)
    assert [e.step for e in acc.Images("preview/ema")] == [4, 8, 12, 16]


def test_report_shows_the_restart_checkpoints_and_newest_preview(runs, tmp_path):
    run = runs["watched"]
    proc = hpcdiff("report", run, "--out", tmp_path / "page")
    assert_ok(proc)
    data = json.loads((tmp_path / "page" / "report.json").read_text())
    restart = next(
        e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["event"] == "restart"
    )
    assert [(m["kind"], m["step"]) for m in data["restarts"]] == [("restart", restart["step"])]
    assert data["series"]["step"] == list(range(1, STEPS + 1))
    assert data["series"]["loss"] == [_losses(run)[s] for s in range(1, STEPS + 1)]
    assert all(t is not None and t > 0 for t in data["series"]["step_s"])
    assert {4, 8, 12, 16} <= set(data["checkpoints"])
    assert data["newest_preview"] == str(run / "previews" / "step-0000016.png")
    assert data["state"] == "completed" and data["step"] == STEPS
    assert (tmp_path / "page" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "page" / "report.html").read_text()
    assert 'src="report.png"' in page and f"restart at step {restart['step']}" in page


def test_report_marks_a_restart_after_a_clean_stop_as_a_requeue():
    from hpcdiff.report_page import _marks

    events = [
        {"event": "start", "step": 0},
        {"event": "checkpoint", "step": 4, "seconds": 0.01},
        {"event": "signal", "step": 5, "reason": "SIGUSR1"},
        {"event": "restart", "exit": 75, "restart": 1, "by": "supervisor"},  # no step: not a mark
        {"event": "restart", "step": 5, "world_size": 2},
        {"event": "error", "step": 7, "error": "FloatingPointError: loss is nan"},
        {"event": "restart", "step": 4, "world_size": 2},
    ]
    assert [(m["kind"], m["step"]) for m in _marks(events)] == [
        ("checkpoint", 4),
        ("signal", 5),
        ("requeue", 5),
        ("error", 7),
        ("restart", 4),
    ]


def test_status_of_several_runs_prints_one_line_each(runs, tmp_path):
    proc = hpcdiff("status", runs["plain"], runs["watched"])
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for line, run in zip(lines, (runs["plain"], runs["watched"])):
        assert line.startswith(str(run)) and "completed" in line and f"step {STEPS}/{STEPS}" in line
        assert "checkpoint" in line and "heartbeat" in line and "job -" in line
    # A pipeline folder among runs keeps its meaning: one line of its stages, from its own records.
    pipe = tmp_path / "pipeline"
    pipe.mkdir()
    stages = [{"name": n, "job_id": j, "array": None} for n, j in (("train", "990001"), ("sample", "990002"))]
    (pipe / "pipeline.json").write_text(json.dumps({"dir": str(pipe), "submitted": 0, "stages": stages}))
    log = [
        {"stage": "train", "task": "", "event": "exit", "rc": "0"},
        {"stage": "sample", "task": "", "event": "start"},
    ]
    (pipe / "stages.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    proc = hpcdiff("status", runs["watched"], pipe)
    assert_ok(proc)
    assert proc.stdout.splitlines()[1] == f"{pipe}  pipeline  train completed, sample running"
    proc = hpcdiff("status", runs["plain"], tmp_path / "nothing", "--json")
    assert proc.returncode == 2, "a folder that is no run makes the exit code 2, after every run is listed"
    listed = json.loads(proc.stdout)
    assert listed[0]["state"] == "completed" and "not a run directory" in listed[1]["error"]
