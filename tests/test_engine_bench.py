"""``mimo-voice bench engine`` on the tiny preset: a short run prints the table and writes the JSON."""

from __future__ import annotations

import json

from mimo_voice.configs import load_config
from mimo_voice.streaming.bench import engine as bench


def test_bench_engine_prints_a_table_and_writes_json(tmp_path, capsys):
    target = tmp_path / "engine.json"
    code = bench.main(
        load_config(None),
        ["--runs", "2", "--turns", "2", "--patches", "4", "--user-secs", "0.5", "--json", str(target)],
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "per audio group" in table and "first PCM, turn 2 / turn 1" in table
    report = json.loads(target.read_text())
    metrics = report["metrics"]
    assert metrics["group_ms"]["n"] == 2 * 2 and metrics["first_pcm_turn1_s"]["n"] == 2
    assert 0 < metrics["group_ms"]["p50"] <= metrics["group_with_decode_ms"]["p50"]
    assert 0 < metrics["first_patch_turn1_ms"]["p50"] < 1000 * metrics["first_pcm_turn1_s"]["p90"]
    assert report["official"]["group_ms"] == 13.5 and report["meta"]["command"] == "bench engine"


def test_bench_engine_rejects_bad_arguments(capsys):
    assert bench.main(load_config(None), ["--runs", "0"]) == 2
    assert "must be positive" in capsys.readouterr().out
