"""Soak and overload: ``bench live --minutes`` (figures, windows, verdicts, a 2-minute run) and N+4 callers."""

from __future__ import annotations

import json
import shutil

import pytest
from mimo_voice.configs import load_config
from mimo_voice.streaming.bench.report import summarize
from mimo_voice.transports.bench.live import CallPlan, local_server, run_bench
from mimo_voice.transports.bench.metrics import CallAnalysis
from mimo_voice.transports.bench.scenario import FixtureFactory, load_scenario
from mimo_voice.transports.bench.soak import MemorySample, SoakCall, soak_summary

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def _call(started: float, latencies: list[float], error: str | None = None) -> SoakCall:
    return SoakCall(0, started, 20.0, error, latencies, 0.0, CallAnalysis([], [], []))


def test_the_soak_summary_compares_the_first_and_last_windows_and_memory_after_warm_up():
    calls = [_call(at, [0.5, 0.6]) for at in range(0, 600, 30)] + [_call(590, [0.9, 0.9, 0.9])]
    calls.append(_call(300, [], error="signalling refused: HTTP 503"))
    samples = [MemorySample(at, {"server": 100 + at / 100, "engine": 300.0}) for at in range(0, 600, 10)]
    samples.append(MemorySample(599, {"server": 108.0, "engine": 420.0}))  # the engine leaks at the end
    summary = soak_summary(calls, samples, minutes=10)
    assert summary["window_secs"] == 200  # a third of a 10-minute run
    assert summary["calls"] == len(calls)
    assert summary["failed_calls"] == [{"caller": 0, "started_secs": 300, "error": "signalling refused: HTTP 503"}]
    assert summary["latency_first_window"]["n"] == 14 and summary["latency_last_window"]["max"] == 0.9
    assert summary["p90_drift"] > 0.2
    growth = summary["rss_growth_after_window_mb"]
    assert growth["server"] == pytest.approx(108 - 102) and growth["engine"] == pytest.approx(120)
    assert summary["verdicts"] == {"no_failed_calls": False, "rss_growth_ok": False, "latency_steady": False}
    assert len(summary["memory"]) == len(samples)


def test_a_steady_run_passes_every_verdict():
    calls = [_call(at, [0.5, 0.55, 0.6]) for at in range(0, 900, 20)]
    samples = [MemorySample(at, {"server": 150.0 + (at < 300) * at / 10, "engine": 400.0}) for at in range(0, 900, 5)]
    summary = soak_summary(calls, samples, minutes=15)
    assert summary["window_secs"] == 300
    assert summary["rss_growth_after_window_mb"] == {"server": 0.0, "engine": 0.0}
    assert summary["verdicts"] == {"no_failed_calls": True, "rss_growth_ok": True, "latency_steady": True}


@needs_espeak
@pytest.mark.slow
@pytest.mark.xdist_group("soak")  # the two loaded runs take turns, not the CPU from each other
@pytest.mark.timeout(600)
def test_a_two_minute_soak_on_the_tiny_model(tmp_path, capsys):
    from mimo_voice.transports.bench.live import main

    out = tmp_path / "soak.json"
    args = ["--minutes", "2", "--callers", "2", "--scenario", "smoke", "--stagger", "1", "--json", str(out)]
    code = main(load_config(None, []), args)
    printed = capsys.readouterr()
    print(printed.out)
    assert code == 0, printed.out + printed.err
    soak = json.loads(out.read_text())["soak"]
    assert soak["failed_calls"] == [] and soak["calls"] >= 4  # each caller called again
    memory = soak["memory"]
    assert len(memory) >= 10 and all({"server", "engine"} <= set(sample["rss_mb"]) for sample in memory[1:])
    assert "RSS growth after the first window, engine (MB)" in printed.out


def _latencies(results: list[dict]) -> list[float]:
    return [e["latency"] for call in results for e in call["events"] if e["latency"] is not None]


@needs_espeak
@pytest.mark.slow
@pytest.mark.xdist_group("soak")
@pytest.mark.timeout(600)
def test_over_capacity_exactly_the_extra_callers_get_503_and_the_admitted_keep_their_latency():
    capacity = 2
    config = load_config(None, [f"server.max_sessions={capacity}"])
    scenario = load_scenario("smoke")
    fixtures = FixtureFactory(scenario).build_all()
    with local_server(config) as url:
        plan = CallPlan(url, scenario, fixtures, 0.2, None, "WARNING")
        alone = run_bench(plan, capacity, 1)
        crowded = run_bench(plan, capacity + 4, 2)
    assert [call["error"] for call in alone["calls"]] == [None] * capacity
    errors = [call["error"] for call in crowded["calls"]]
    refused = [error for error in errors if error is not None]
    assert len(refused) == 4 and all("HTTP 503" in error for error in refused), errors
    admitted = [call for call in crowded["calls"] if call["error"] is None]
    assert len(admitted) == capacity
    baseline, loaded = summarize(_latencies(alone["calls"]))["p90"], summarize(_latencies(admitted))["p90"]
    assert loaded <= max(baseline * 1.5, baseline + 0.3), (baseline, loaded)
