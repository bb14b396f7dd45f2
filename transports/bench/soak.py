"""``mimo-voice bench live --minutes M``: a soak run. Callers keep calling for M minutes, and the run reports
what a long-lived server must keep steady: failed calls, response latency early vs late, and memory.

Each caller plays the scenario (a few turns with barge-ins, backchannels, noise and pauses), hangs up, and
calls again until the time is up. Each call is analysed in the callers' process as soon as it ends, and only
the figures travel back, so a long run does not hoard audio. Meanwhile the bench reads the server's
``GET /metrics`` every few seconds for the resident memory of the server and engine processes
(``mimo_voice_resident_memory_bytes``), the sessions in use and whether the engine is up.

Verdicts (printed, and in the JSON under ``soak``): zero failed calls; resident memory growth after the
warm-up window at most ``MAX_RSS_GROWTH_MB`` per process; p90 response latency of the last window within
``MAX_LATENCY_DRIFT`` of the first. The window is 5 minutes, or a third of shorter runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from mimo_voice.configs.logging import setup_logging
from mimo_voice.streaming.bench.report import Table, summarize

from .caller import Caller
from .metrics import CallAnalysis, analyse_call
from .scenario import Fixture, Scenario
from .server_stats import parse_prometheus

SAMPLE_EVERY_SECS = 5.0
WINDOW_SECS = 300.0
PAUSE_BETWEEN_CALLS_SECS = 1.0
MAX_RSS_GROWTH_MB = 50.0
MAX_LATENCY_DRIFT = 0.20
MEMORY_FAMILY = "mimo_voice_resident_memory_bytes"
PROCESSES = ("server", "engine")


@dataclass(frozen=True)
class SoakPlan:
    """What every callers' process needs (pickled to it)."""

    url: str
    scenario: Scenario
    fixtures: list[Fixture]
    stagger: float
    token: str | None
    log_level: str
    origin: float  # wall clock (time.time()) of the start of the run
    deadline: float  # wall clock after which no caller starts a new call


@dataclass
class SoakCall:
    """One finished call, analysed where it ran (no audio)."""

    caller: int
    started: float  # seconds since the run began
    duration: float
    error: str | None
    latencies: list[float]
    max_send_lag: float
    analysis: CallAnalysis


@dataclass
class MemorySample:
    at: float  # seconds since the run began
    rss_mb: dict[str, float] = field(default_factory=dict)  # process -> MB
    sessions: float | None = None
    engine_up: float | None = None


class MemorySampler:
    """Reads ``/metrics`` every ``every`` seconds in a thread until stopped."""

    def __init__(self, url: str, token: str | None, origin: float, every: float = SAMPLE_EVERY_SECS) -> None:
        self.url, self.token, self.origin, self.every = url.rstrip("/"), token, origin, every
        self.samples: list[MemorySample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="soak-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with http.get(f"{self.url}/metrics") as response:
                        self.samples.append(self._sample(await response.text()))
                if await asyncio.to_thread(self._stop.wait, self.every):
                    return

    def _sample(self, text: str) -> MemorySample:
        sample = MemorySample(time.time() - self.origin)
        for (name, labels), value in parse_prometheus(text).items():
            if name == MEMORY_FAMILY:
                sample.rss_mb[dict(labels).get("process", "?")] = value / 2**20
            elif name == "mimo_voice_sessions_active":
                sample.sessions = (sample.sessions or 0.0) + value
            elif name == "mimo_voice_engine_up":
                sample.engine_up = value
        return sample


def run_soak_callers(plan: SoakPlan, callers: int, processes: int) -> list[SoakCall]:
    """Every caller calls again and again until the deadline, in ``processes`` processes of their own."""
    context = multiprocessing.get_context("spawn")
    finished = context.Queue()
    groups = [list(range(callers))[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(
        processes, mp_context=context, initializer=_init_process, initargs=(finished, plan.log_level)
    ) as pool:
        futures = [pool.submit(_call_group, plan, group) for group in groups]
        calls = failed = 0
        while not all(future.done() for future in futures) or not finished.empty():
            with contextlib.suppress(queue.Empty):
                caller, error = finished.get(timeout=0.5)
                calls, failed = calls + 1, failed + bool(error)
                left = max(0.0, plan.deadline - time.time())
                outcome = f"failed: {error}" if error else "ok"
                print(
                    f"soak: {calls} calls, {failed} failed, {left / 60:.1f} min to go (caller {caller} {outcome})",
                    flush=True,
                )
        return sorted((call for future in futures for call in future.result()), key=lambda c: c.started)


_finished: Any = None  # in a callers' process: where each finished call is announced


def _init_process(finished: Any, log_level: str) -> None:
    global _finished
    _finished = finished
    setup_logging(log_level)


def _call_group(plan: SoakPlan, indices: list[int]) -> list[SoakCall]:
    async def keep_calling(index: int) -> list[SoakCall]:
        await asyncio.sleep(index * plan.stagger)
        calls: list[SoakCall] = []
        while time.time() < plan.deadline:
            started = time.time() - plan.origin
            caller = Caller(index, plan.url, plan.scenario, plan.fixtures, token=plan.token)
            result = await caller.run()
            params = plan.scenario.detector.params()
            analysis = analyse_call(result.agent_audio, result.sample_rate, result.events, params, result.server_events)
            latencies = [event.latency for event in analysis.events if event.latency is not None]
            calls.append(
                SoakCall(index, started, result.duration, result.error, latencies, result.max_send_lag, analysis)
            )
            _finished.put((index, result.error))
            await asyncio.sleep(PAUSE_BETWEEN_CALLS_SECS)
        return calls

    async def all_callers() -> list[SoakCall]:
        groups = await asyncio.gather(*(keep_calling(index) for index in indices))
        return [call for group in groups for call in group]

    return asyncio.run(all_callers())


def soak_summary(calls: list[SoakCall], samples: list[MemorySample], minutes: float) -> dict[str, Any]:
    """Failed calls, early vs late latency, memory growth after the warm-up window, and the verdicts."""
    total = minutes * 60
    window = min(WINDOW_SECS, total / 3)
    first = [v for call in calls if call.started < window and not call.error for v in call.latencies]
    last = [v for call in calls if call.started >= total - window and not call.error for v in call.latencies]
    early, late = summarize(first), summarize(last)
    drift = late["p90"] / early["p90"] - 1 if early["p90"] and late["p90"] is not None else None
    growth = {process: _growth(samples, process, window) for process in PROCESSES}
    failed = [{"caller": c.caller, "started_secs": c.started, "error": c.error} for c in calls if c.error]
    return {
        "minutes": minutes,
        "window_secs": window,
        "calls": len(calls),
        "failed_calls": failed,
        "latency_first_window": early,
        "latency_last_window": late,
        "p90_drift": drift,
        "rss_growth_after_window_mb": growth,
        "memory": [
            {"at_secs": s.at, "rss_mb": s.rss_mb, "sessions": s.sessions, "engine_up": s.engine_up} for s in samples
        ],
        "verdicts": {
            "no_failed_calls": not failed,
            "rss_growth_ok": all(g is not None and g <= MAX_RSS_GROWTH_MB for g in growth.values()),
            "latency_steady": drift is not None and drift <= MAX_LATENCY_DRIFT,
        },
    }


def _growth(samples: list[MemorySample], process: str, window: float) -> float | None:
    """Highest RSS after the warm-up window minus the RSS at its end (MB); None without samples."""
    series = [(s.at, s.rss_mb[process]) for s in samples if process in s.rss_mb]
    after = [rss for at, rss in series if at >= window]
    if not after:
        return None
    return max(after) - after[0]


def soak_table(summary: dict[str, Any]) -> Table:
    table = Table(
        f"soak: {summary['minutes']:g} min, {summary['calls']} calls (windows of {summary['window_secs']:.0f} s)",
        ["figure", "value", "limit", "ok"],
    )
    verdicts = summary["verdicts"]
    table.add_row("failed calls", len(summary["failed_calls"]), 0, verdicts["no_failed_calls"])
    early, late = summary["latency_first_window"], summary["latency_last_window"]
    table.add_row("response latency p90, first window (s)", early["p90"], None, None)
    table.add_row("response latency p90, last window (s)", late["p90"], None, None)
    table.add_row("p90 drift, last vs first", summary["p90_drift"], MAX_LATENCY_DRIFT, verdicts["latency_steady"])
    for process, growth in summary["rss_growth_after_window_mb"].items():
        table.add_row(f"RSS growth after the first window, {process} (MB)", growth, MAX_RSS_GROWTH_MB, None)
    table.add_row("RSS growth within limits", None, None, verdicts["rss_growth_ok"])
    return table
