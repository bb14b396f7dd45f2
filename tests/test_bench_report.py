"""The output helpers shared by the ``mimo-voice bench`` commands."""

import io
import json

import numpy as np
import pytest
from mimo_voice.streaming.bench.report import (
    ProgressBar,
    Table,
    format_cell,
    rate,
    summarize,
    write_json,
)


def test_summarize_matches_numpy_percentiles_and_ignores_missing_values():
    values = [0.31, 0.12, 0.95, 0.44, None, 0.27, 0.6, float("nan")]
    kept = [v for v in values if v is not None and v == v]
    summary = summarize(values)
    assert summary["n"] == len(kept)
    for q in (50, 90, 99):
        assert summary[f"p{q}"] == pytest.approx(np.percentile(kept, q))
    assert summary["max"] == max(kept) and summary["mean"] == pytest.approx(np.mean(kept))


def test_summarize_of_nothing_is_explicitly_empty():
    assert summarize([]) == {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    assert rate(0, 0) is None and rate(1, 4) == 0.25


def test_table_aligns_numbers_right_and_text_left():
    table = Table("figures", ["metric", "p50"])
    table.add_row("response latency", 0.4321)
    table.add_row("stop", None)
    lines = table.render().splitlines()
    assert lines[0] == "figures"
    assert lines[3].startswith("response latency") and lines[3].endswith("0.432")
    assert lines[4].endswith("-") and len(lines[4]) == len(lines[3])
    with pytest.raises(ValueError, match="2 columns"):
        table.add_row("one cell only")


def test_cells_keep_a_precision_that_suits_their_size():
    assert [format_cell(v) for v in (1234.56, 123.456, 0.012345, 7, None, "x", True)] == [
        "1235",
        "123.5",
        "0.012",
        "7",
        "-",
        "x",
        "True",
    ]


def test_write_json_adds_metadata_and_tables(tmp_path):
    table = Table("t", ["a"])
    table.add_row(np.float32(0.5))
    path = write_json(tmp_path / "deep" / "out.json", {"figures": np.array([1, 2])}, command="bench x", tables=[table])
    document = json.loads(path.read_text())
    assert document["meta"]["command"] == "bench x" and document["meta"]["python"]
    assert document["tables"] == [{"title": "t", "columns": ["a"], "rows": [[0.5]]}]
    assert document["figures"] == [1, 2]


def test_progress_bar_prints_one_line_per_step_when_not_a_terminal():
    stream = io.StringIO()
    with ProgressBar(4, "bench", stream=stream, width=8) as bar:
        bar.advance(note="first")
        bar.advance(2)
        bar.advance(5)  # never past the total
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("bench [--------] 0/4")
    assert lines[1].startswith("bench [##------] 1/4") and lines[1].endswith("first")
    assert lines[-1].startswith("bench [########] 4/4")
