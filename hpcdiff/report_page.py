"""``hpcdiff report RUN``: one page of a run's whole life, from its run directory alone.

Loss, learning rate and step time against the step, with checkpoints, restarts, requeues, signals and errors
marked from ``events.jsonl``, and the newest preview montage. Written as ``report.png`` (the figure),
``report.json`` (the figure's data: every series and mark, for scripts and tests) and ``report.html`` (both
figures with a summary), by default into ``RUN/report/``.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcdiff.atomic import atomic_write
from hpcdiff.report import read_status
from hpcdiff.runstate import RunDir

MAX_POINTS = 5000
"""Series longer than this are thinned (every k-th row, the last always kept) to keep the page light."""

MARKS = {
    "checkpoint": ("checkpoint", "#999999", ":"),
    "restart": ("restart", "#d62728", "-"),
    "requeue": ("requeue", "#9467bd", "-"),
    "signal": ("signal", "#ff7f0e", "--"),
    "error": ("error", "#000000", "-"),
    "config_change": ("config change", "#2ca02c", "-."),
}
"""Event kind -> legend label, colour, line style of its vertical marks."""


@dataclass
class ReportFiles:
    png: Path
    json: Path
    html: Path


def report_data(run_path: Path) -> dict[str, Any]:
    """What the page shows, as plain data: status summary, series by step, marks, restarts, newest preview."""
    status = read_status(run_path)
    root = Path(status["run_dir"])
    run = RunDir(root)
    rows, events = run.read_metrics(), run.read_events()
    stride = max(1, -(-len(rows) // MAX_POINTS))
    series = {
        "step": _thin([r["step"] for r in rows], stride),
        "loss": _thin([r.get("loss") for r in rows], stride),
        "lr": _thin([r.get("lr") for r in rows], stride),
        "step_s": _thin(_step_times(rows), stride),
    }
    marks = _marks(events)
    previews = sorted((root / "previews").glob("step-*.png")) if (root / "previews").is_dir() else []
    return {
        "run_dir": str(root),
        "state": status["state"],
        "step": status.get("step", 0),
        "total_steps": status.get("total_steps"),
        "job_ids": status.get("job_ids", []),
        "latest_valid_step": status.get("latest_valid_step"),
        "stride": stride,
        "series": series,
        "marks": marks,
        "restarts": [m for m in marks if m["kind"] in ("restart", "requeue")],
        "checkpoints": [m["step"] for m in marks if m["kind"] == "checkpoint"],
        "newest_preview": str(previews[-1]) if previews else None,
    }


def _thin(values: list[Any], stride: int) -> list[Any]:
    """Every ``stride``-th value, and the last one."""
    kept = values[::stride]
    return kept + values[-1:] if values and (len(values) - 1) % stride else kept


def _step_times(rows: list[dict[str, Any]]) -> list[float | None]:
    """Seconds per step: logged by the loop, or (older runs) the gap between rows' timestamps within one start."""
    out: list[float | None] = []
    for prev, row in zip([None, *rows[:-1]], rows):
        if "step_s" in row:
            out.append(row["step_s"])
        elif prev is not None and row.get("step") == prev.get("step", 0) + 1 and "time" in row and "time" in prev:
            out.append(row["time"] - prev["time"])
        else:
            out.append(None)
    return out


def _marks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events with a step, in order; a restart right after a clean stop on a signal is a requeue."""
    marks: list[dict[str, Any]] = []
    previous = ""
    for e in events:
        kind = e.get("event", "")
        if kind == "restart" and "step" in e and previous == "signal":
            kind = "requeue"
        if kind in MARKS and "step" in e:
            mark = {"kind": kind, "step": e["step"], "time": e.get("time")}
            mark.update({k: e[k] for k in ("reason", "error", "world_size", "seconds") if k in e})
            marks.append(mark)
        if "step" in e:  # the supervisor's own lines carry no step and do not break a signal -> restart pair
            previous = e.get("event", "")
    return marks


def render_figure(data: dict[str, Any], preview: Path | None) -> bytes:
    """The page's figure as PNG bytes: loss, lr and step time against the step, and the newest preview."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 4 if preview is not None else 3
    fig = Figure(figsize=(10, 2.6 * panels), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, height_ratios=[1, 1, 1, 1.6][:panels])
    s = data["series"]
    plots = [("loss", "loss", True), ("lr", "learning rate", False), ("step_s", "step time (s)", False)]
    for ax, (key, label, log_y) in zip(axes, plots):
        points = [(x, y) for x, y in zip(s["step"], s[key]) if y is not None]
        if points:
            ax.plot(*zip(*points), lw=0.8, color="#1f77b4")
        if log_y and points and all(y > 0 for _, y in points):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xlabel("step")
        seen = set()
        for m in data["marks"]:
            name, colour, style = MARKS[m["kind"]]
            ax.axvline(
                m["step"],
                color=colour,
                ls=style,
                lw=0.9 if m["kind"] != "checkpoint" else 0.6,
                label=None if name in seen else name,
            )
            seen.add(name)
    if data["marks"]:
        axes[0].legend(loc="upper right", fontsize=8)
    total = data["total_steps"] or "?"
    axes[0].set_title(
        f"{data['run_dir']}: {data['state']}, step {data['step']}/{total}, {len(data['restarts'])} restart(s)",
        fontsize=9,
    )
    if preview is not None:
        from matplotlib.image import imread

        axes[3].imshow(imread(preview))
        axes[3].set_axis_off()
        axes[3].set_title(f"newest preview: {preview.name}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _html(data: dict[str, Any], files: ReportFiles, preview: Path | None) -> str:
    def row(k: str, v: Any) -> str:
        return f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"

    restarts = ", ".join(f"{m['kind']} at step {m['step']}" for m in data["restarts"]) or "none"
    table = "".join(
        [
            row("run", data["run_dir"]),
            row("state", data["state"]),
            row("step", f"{data['step']}/{data['total_steps'] or '?'}"),
            row("newest valid checkpoint", data["latest_valid_step"]),
            row("checkpoints", len(data["checkpoints"])),
            row("restarts", restarts),
            row("job ids", ", ".join(map(str, data["job_ids"])) or "none"),
        ]
    )
    img = f'<p><img src="{html.escape(files.png.name)}" alt="loss, lr and step time"></p>'
    note = f"<p>Newest preview: {html.escape(str(preview))}</p>" if preview else "<p>No preview yet.</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>hpcdiff report</title></head><body>"
        f"<h1>hpcdiff run report</h1><table>{table}</table>{img}{note}"
        f"<p>Figure data: <a href='{html.escape(files.json.name)}'>{html.escape(files.json.name)}</a></p>"
        "</body></html>\n"
    )


def write_report(run_path: Path, out: Path | None = None) -> ReportFiles:
    """Write report.png, report.json and report.html for the run into ``out`` (default ``RUN/report``)."""
    data = report_data(run_path)
    out = Path(out) if out is not None else Path(data["run_dir"]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / "report.png", out / "report.json", out / "report.html")
    preview = Path(data["newest_preview"]) if data["newest_preview"] else None
    atomic_write(files.png, render_figure(data, preview))
    atomic_write(files.json, json.dumps(data, indent=1).encode())
    atomic_write(files.html, _html(data, files, preview).encode())
    return files
