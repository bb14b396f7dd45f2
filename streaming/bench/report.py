"""Output shared by the ``mimo-voice bench`` commands: percentile summaries, aligned tables, a progress
bar and JSON files that carry the run's metadata.

Every benchmark prints its figures as one or more :class:`Table` s, writes the same tables (plus its
raw figures) with :func:`write_json`, and shows a :class:`ProgressBar` on stderr while it runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

PERCENTILES = (50, 90, 99)


def summarize(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """``n``, ``mean``, ``p50``, ``p90``, ``p99`` and ``max`` of the values that are not None (linear interpolation,
    as numpy's default). The statistics are None when there are no values, so JSON stays explicit."""
    data = sorted(float(v) for v in values if v is not None and not math.isnan(v))
    summary: dict[str, float | int | None] = {"n": len(data), "mean": sum(data) / len(data) if data else None}
    for q in PERCENTILES:
        summary[f"p{q}"] = _percentile(data, q) if data else None
    summary["max"] = data[-1] if data else None
    return summary


def _percentile(sorted_data: list[float], q: float) -> float:
    position = (len(sorted_data) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return sorted_data[low] + (sorted_data[high] - sorted_data[low]) * (position - low)


def rate(hits: int, total: int) -> float | None:
    """``hits / total``, or None when nothing was counted (never a misleading 0)."""
    return hits / total if total else None


def format_cell(value: Any) -> str:
    """Numbers with a precision that suits their size; None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    return f"{value:.3f}"


@dataclass
class Table:
    """A titled table; numeric cells are right-aligned when printed."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def add_row(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def render(self) -> str:
        text = [[format_cell(cell) for cell in row] for row in self.rows]
        widths = [max([len(name)] + [len(row[i]) for row in text]) for i, name in enumerate(self.columns)]
        numeric = [all(_is_number(row[i]) for row in self.rows) and bool(self.rows) for i in range(len(self.columns))]

        def line(cells: Sequence[str]) -> str:
            parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
            return "  ".join(parts).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([self.title, line(self.columns), rule, *(line(row) for row in text)])

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def print_tables(tables: Iterable[Table], file: TextIO | None = None) -> None:
    out = file or sys.stdout
    print("\n\n".join(table.render() for table in tables), file=out, flush=True)


def run_metadata(command: str) -> dict[str, Any]:
    """Where and with what a result was produced; torch is described only if the benchmark imported it."""
    meta: dict[str, Any] = {
        "command": command,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mimo_voice": _version("mimo-voice"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        meta["torch"] = torch.__version__
        if torch.cuda.is_available():
            meta["cuda_device"] = torch.cuda.get_device_name()
    return meta


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def write_json(path: str | Path, payload: dict[str, Any], *, command: str, tables: Iterable[Table] = ()) -> Path:
    """Write ``{"meta": ..., "tables": [...], **payload}``; parent folders are created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": run_metadata(command), "tables": [t.to_dict() for t in tables], **payload}
    target.write_text(json.dumps(document, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return target


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def add_json_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """The ``--json PATH`` option every benchmark shares."""
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=default,
        help="write the figures as JSON here" + (f" (default: {default})" if default else ""),
    )


class ProgressBar:
    """``label [#######-------] 7/15  12.4 s  note`` on stderr.

    On a terminal the line is redrawn in place; otherwise (CI logs) a line is printed each time the count
    changes, so logs stay short but show where a run stalled.
    """

    def __init__(self, total: int, label: str = "", *, width: int = 28, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.width = width
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._interactive = self.stream.isatty()
        self._last_printed = -1

    def __enter__(self) -> ProgressBar:
        self._draw("")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, steps: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + steps)
        self._draw(note)

    def render(self, note: str = "") -> str:
        filled = round(self.width * self.done / self.total)
        elapsed = time.monotonic() - self.started
        bar = "#" * filled + "-" * (self.width - filled)
        return f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:6.1f} s {note}".rstrip()

    def _draw(self, note: str) -> None:
        if self._interactive:
            self.stream.write("\r\x1b[2K" + self.render(note))
        elif self.done != self._last_printed:
            self.stream.write(self.render(note) + "\n")
        self._last_printed = self.done
        self.stream.flush()

    def close(self) -> None:
        if self._interactive:
            self.stream.write("\n")
            self.stream.flush()
