"""``mimo-voice bench engine`` on the tiny preset: a short run prints the table and writes the JSON."""

from __future__ import annotations

import json

import pytest
from mimo_voice.streaming.bench import engine as bench
from session_support import cpu_config


def test_bench_engine_prints_a_table_and_writes_json(tmp_path, capsys):
    target = tmp_path / "engine.json"
    code = bench.main(
        cpu_config(None),
        ["--runs", "2", "--turns", "2", "--patches", "4", "--user-secs", "0.5", "--json", str(target)],
    )
    table = capsys.readouterr().out
    assert "per audio group" in table and "first PCM, turn 2 / turn 1" in table
    report = json.loads(target.read_text())
    metrics = report["metrics"]
    # The exit status is the later-turn verdict; two short runs on a shared CPU are too noisy to expect it to pass
    # here (tests/test_session_cache.py shows that no turn re-reads the history), but it must follow the figure.
    verdict = 1 if metrics["last_turn_over_turn1"]["p50"] > bench.MAX_TURN_RATIO else 0
    assert code == verdict and ("more than 1.2x" in table) == bool(verdict)
    assert metrics["group_ms"]["n"] == 2 * 2 and metrics["first_pcm_turn1_s"]["n"] == 2
    assert 0 < metrics["group_ms"]["p50"] <= metrics["group_with_decode_ms"]["p50"]
    assert 0 < metrics["first_patch_turn1_ms"]["p50"] < 1000 * metrics["first_pcm_turn1_s"]["p90"]
    assert report["official"]["group_ms"] == 13.5 and report["meta"]["command"] == "bench engine"
    # The speech is followed by the VAD's pause (vad.stop_secs): every reply's start was computed in it.
    assert metrics["prepared_in_pause"]["p50"] == 1 and metrics["last_prefill_ms"]["p90"] == 0
    # Then the end of the turn is the first step, which releases the patch whose PCM each turn's first chunk is.
    # (Not bounded by first_patch_s: that is when the first patch was made; the delay filter may release it later.)
    turns = [turn for run in report["turns"] for turn in run]
    assert all(0 < turn["first_step_ms"] <= 1000 * turn["first_pcm_s"] for turn in turns)


def test_bench_engine_sessions_threads_and_op_profile(tmp_path, capsys):
    target = tmp_path / "engine.json"
    argv = ["--runs", "1", "--turns", "1", "--patches", "3", "--user-secs", "0.5", "--pause-secs", "0"]
    argv += ["--threads", "1"]
    code = bench.main(cpu_config(None), [*argv, "--sessions", "1,2", "--profile-ops", "--json", str(target)])
    assert code == 0
    table = capsys.readouterr().out
    assert "sessions replying at once" in table and "ATen ops per audio group" in table and "1 threads" in table
    report = json.loads(target.read_text())
    entries = report["by_sessions"]
    assert [entry["sessions"] for entry in entries] == [1, 2]
    for entry in entries:
        assert {"sessions", "aggregate_groups_per_s", "per_group_ms_p50", "rtf_p50"} <= set(entry)
        assert entry["aggregate_groups_per_s"] > 0 and entry["per_group_ms_p50"] > 0 and entry["rtf_p50"] > 0
        # The codec's time taken out: faster, by what the codec took.
        assert entry["aggregate_groups_per_s_without_decode"] > entry["aggregate_groups_per_s"]
    # The end of the turn by stage, from the worker's own timings (no pause: nothing was prepared).
    for stage in ("last_encode_ms", "last_prefill_ms", "first_step_ms", "first_decode_ms"):
        assert report["metrics"][stage]["n"] == 1 and report["metrics"][stage]["p50"] > 0
    assert report["metrics"]["prepared_in_pause"]["p50"] == 0
    ops = report["ops"]
    assert ops["groups"] == 3 and set(ops["ops_per_group"]) == {"LLM step", "patch decoder", "patch encoder", "decode"}
    assert all(count > 0 for count in ops["ops_per_group"].values())
    assert ops["ops_per_group_total"] == sum(ops["ops_per_group"].values())
    assert ops["host_reads_per_group_total"] >= 0


def test_op_counter_counts_host_reads_by_part():
    import torch
    from mimo_voice.streaming.bench.ops import OpCounter

    counter, x = OpCounter(), torch.ones(3)
    with torch.no_grad(), counter:
        bool(x.any())
        with counter.labelled("decode"):
            x.tolist()
            _ = x + x
    assert counter.ops == {"LLM step": 2, "decode": 1}  # any + _local_scalar_dense; add
    assert counter.host_reads == {"LLM step": 1, "decode": 1}
    assert torch.Tensor.tolist(x) == [1.0, 1.0, 1.0]  # restored


def test_bench_engine_rejects_bad_arguments(capsys):
    assert bench.main(cpu_config(None), ["--runs", "0"]) == 2
    assert bench.main(cpu_config(None), ["--threads", "0"]) == 2
    assert "must be positive" in capsys.readouterr().out
    assert bench.main(cpu_config(None), ["--pause-secs", "-0.1"]) == 2
    assert "--pause-secs not negative" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        bench.main(cpu_config(None), ["--sessions", "1,x"])
    assert exit_.value.code == 2 and "session counts" in capsys.readouterr().err
