"""The PNG of ``mimo-voice bench live``: latency CDFs, the per-stage bar chart, and one caller's timeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt
import numpy as np

from .metrics import TURN_STAGES
from .server_stats import MILESTONE_ROWS

LATENCY_CURVES = (  # (event kind, label) as pooled into the calls' events
    ("turn", "response after a smooth turn"),
    ("pause", "response after a paused utterance"),
    ("barge_in", "response after a barge-in"),
)
STAGE_COLOURS = ("tab:purple", "tab:orange", "tab:blue")
EVENT_COLOURS = {
    "turn": "tab:blue",
    "pause": "tab:cyan",
    "backchannel": "tab:green",
    "noise": "tab:gray",
    "barge_in": "tab:red",
}


def plot_report(report: dict[str, Any], path: Path) -> Path:
    figure, (cdf, stages, timeline) = plt.subplots(3, 1, figsize=(11, 12), gridspec_kw={"height_ratios": [3, 2, 2]})
    _latency_cdfs(cdf, report["calls"])
    _stage_bars(stages, report["summary"])
    _timeline(timeline, report["calls"][0])
    figure.suptitle(f"bench live: {report['scenario']['name']}, {report['callers']} callers")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _cdf(axes: plt.Axes, values: list[float], label: str) -> None:
    data = np.sort(values)
    fraction = np.arange(len(data) + 1) / len(data)
    # Starts at 0 so that even a single value shows as a step.
    axes.step(np.concatenate([data[:1], data]), fraction, where="post", label=f"{label} (n={len(data)})")


def _latency_cdfs(axes: plt.Axes, calls: list[dict[str, Any]]) -> None:
    events = [e for call in calls if not call["error"] for e in call["events"]]
    for kind, label in LATENCY_CURVES:
        values = [e["latency"] for e in events if e["kind"] == kind and e["latency"] is not None]
        if values:
            _cdf(axes, values, label)
    stops = [e["stop_time"] for e in events if e["kind"] == "barge_in" and e["stop_time"] is not None]
    if stops:
        _cdf(axes, stops, "barge-in stop time")
    axes.set_xlabel("seconds")
    axes.set_ylabel("fraction of events")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title("latency CDFs (from the audio the callers received)")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "no takeover or barge-in measured", ha="center", transform=axes.transAxes)


def _stage_bars(axes: plt.Axes, summary: dict[str, Any]) -> None:
    """One stacked bar: where a turn's latency goes (caller's view); grey bars: the server's own means."""
    left = 0.0
    for (name, figure), colour in zip(list(summary["turn_stages_secs"].items())[: len(TURN_STAGES)], STAGE_COLOURS):
        if figure["mean"] is not None:
            width = figure["mean"] * 1000
            axes.barh("per turn (caller)", width, left=left, color=colour, label=f"{name}: {width:.0f} ms")
            left += width
    server = summary["server"]
    rows = [(f"server stage: {stage}", figure["mean_secs"]) for stage, figure in server["stages"].items()]
    rows += [(f"server: {label}", server[key]["mean_secs"]) for key, label in MILESTONE_ROWS]
    widest = left
    for label, secs in rows:
        if secs is not None:
            axes.barh(label, secs * 1000, color="tab:gray")
            axes.text(secs * 1000, label, f" {secs * 1000:.0f}", va="center")  # type: ignore[arg-type]  # category
            widest = max(widest, secs * 1000)
    axes.set_xlim(0, max(widest, 1.0) * 1.15)  # room for the value labels
    axes.invert_yaxis()
    axes.set_xlabel("milliseconds (means)")
    axes.set_title("where the time goes" + ("" if server["stages"] else " (the server exposes no stage histogram)"))
    axes.grid(axis="x", alpha=0.3)
    if left:
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False)


def _timeline(axes: plt.Axes, call: dict[str, Any]) -> None:
    for event in call["events"]:
        axes.axvspan(event["onset"], event["offset"], 0.55, 0.95, color=EVENT_COLOURS[event["kind"]], alpha=0.7)
        axes.text(event["onset"], 0.97, event["kind"], fontsize=7, va="bottom", transform=axes.get_xaxis_transform())
    for start, end in call["agent_segments"]:
        axes.axvspan(start, end, 0.05, 0.45, color="tab:orange", alpha=0.7)
    for reply in call["replies"]:
        for start, end in reply["underruns"]:
            axes.axvspan(start, end, 0.05, 0.45, color="black")
    axes.set_yticks([0.25, 0.75], ["agent (heard)", "caller"])
    axes.set_ylim(0, 1.1)
    axes.set_xlim(0, max(call["duration_secs"], 1.0))
    axes.set_xlabel("seconds since the call started")
    axes.set_title(f"caller {call['caller']}: timeline (black: underruns)")
