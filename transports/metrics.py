"""Server metrics in the Prometheus text format (``GET /metrics``), fed by a per-session observer.

A small registry instead of ``prometheus_client`` (not a dependency): counters, gauges and
histograms with labels, rendered as text exposition format 0.0.4.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    InterruptionFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import ProcessingMetricsData, TTFBMetricsData
from pipecat.observers.base_observer import FramePushed
from pipecat.observers.user_bot_latency_observer import UserBotLatencyObserver
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_output import BaseOutputTransport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TRANSPORTS = ("webrtc", "twilio")
LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
TTFB_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
TOOL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[str, ...]


class Metric:
    """A named family of samples, one per combination of label values."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Labels = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, labelnames

    def _key(self, labels: Labels) -> Labels:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labels}")
        return labels

    def _labels(self, labels: Labels, **extra: str) -> str:
        pairs = [*zip(self.labelnames, labels), *extra.items()]
        if not pairs:
            return ""
        return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs) + "}"

    def samples(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self) -> str:
        header = f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
        return header + "".join(f"{line}\n" for line in self.samples())


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Labels = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.values: dict[Labels, float] = {} if labelnames else {(): 0.0}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[str]:
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{self._labels(labels)} {_number(value)}"


class Gauge(Counter):
    kind = "gauge"

    def dec(self, *labels: str) -> None:
        self.inc(*labels, amount=-1.0)

    def set(self, value: float, *labels: str) -> None:
        self.values[self._key(labels)] = value


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...], labelnames: Labels = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        counts = self.counts.setdefault(key, [0] * len(self.buckets))
        for i, bound in enumerate(self.buckets):
            counts[i] += value <= bound
        self.sums[key] = self.sums.get(key, 0.0) + value

    def count(self, *labels: str) -> int:
        return self.counts.get(self._key(labels), [0])[-1]

    def samples(self) -> Iterator[str]:
        for labels, counts in sorted(self.counts.items()):
            for bound, count in zip(self.buckets, counts):
                yield f"{self.name}_bucket{self._labels(labels, le=_number(bound))} {count}"
            yield f"{self.name}_sum{self._labels(labels)} {_number(self.sums[labels])}"
            yield f"{self.name}_count{self._labels(labels)} {counts[-1]}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


class ServerMetrics:
    """Everything ``/metrics`` reports: sessions, turns, latencies, generation speed, tool calls."""

    def __init__(self) -> None:
        self.sessions_active = Gauge("mimo_voice_sessions_active", "Sessions running now.", ("transport",))
        self.sessions_total = Counter("mimo_voice_sessions_total", "Sessions started.", ("transport",))
        self.sessions_refused = Counter(
            "mimo_voice_sessions_refused_total", "Connection attempts refused, by reason.", ("reason",)
        )
        self.user_turns = Counter("mimo_voice_user_turns_total", "User turns (end of user speech).", ("transport",))
        self.bot_responses = Counter(
            "mimo_voice_bot_responses_total", "Agent responses that started playing.", ("transport",)
        )
        self.interruptions = Counter(
            "mimo_voice_interruptions_total", "Agent responses cut short by the user (barge-in).", ("transport",)
        )
        self.tool_calls = Counter("mimo_voice_tool_calls_total", "Tool calls dispatched.", ("tool",))
        self.response_latency = Histogram(
            "mimo_voice_response_latency_seconds",
            "End of user speech to the agent's first audio leaving the server.",
            LATENCY_BUCKETS,
            ("transport",),
        )
        self.ttfb = Histogram(
            "mimo_voice_ttfb_seconds", "Service time to first byte, per processor.", TTFB_BUCKETS, ("processor",)
        )
        self.generation_time = Counter(
            "mimo_voice_generation_seconds_total", "Seconds spent generating responses (service processing time)."
        )
        self.generated_audio = Counter("mimo_voice_generated_audio_seconds_total", "Seconds of agent audio generated.")
        self.tool_latency = Histogram(
            "mimo_voice_tool_call_seconds", "Tool call duration (dispatch to result).", TOOL_BUCKETS, ("tool",)
        )
        self.engine_up = Gauge("mimo_voice_engine_up", "1 while the engine serves, 0 while it is down or loading.")
        self.engine_restarts = Counter(
            "mimo_voice_engine_restarts_total",
            "Engine deaths (process exit or stalled step loop) that led to a restart.",
        )
        self.resident_memory = Gauge(
            "mimo_voice_resident_memory_bytes", "Resident memory of the server and engine processes.", ("process",)
        )
        self.engine_load_failures = Counter("mimo_voice_engine_load_failures_total", "Engine loads that failed.")
        self._families: list[Metric] = [value for value in vars(self).values() if isinstance(value, Metric)]
        for transport in TRANSPORTS:  # so that dashboards see zeros rather than no series
            self.sessions_active.inc(transport, amount=0)
            self.sessions_total.inc(transport, amount=0)

    def render(self) -> str:
        return "".join(metric.render() for metric in self._families)


Notify = Callable[[dict[str, Any]], Awaitable[None]]


class TurnMetricsObserver(UserBotLatencyObserver):
    """Counts one session's turns into :class:`ServerMetrics` and reports each to the client.

    The response latency is pipecat's user-to-bot latency (VAD end of speech, back-dated by
    ``stop_secs``, to ``BotStartedSpeakingFrame``). ``notify``, when set, receives one small
    dict per turn latency and per tool call, for the page.
    """

    def __init__(self, metrics: ServerMetrics, transport: str, notify: Notify | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # e.g. time_source, for tests
        self.metrics, self.transport, self.notify = metrics, transport, notify
        self.turns = 0
        self._bot_speaking = False
        self._tool_starts: dict[str, tuple[str, float]] = {}
        self.add_event_handler("on_latency_measured", self._on_latency_measured)

    async def on_push_frame(self, data: FramePushed) -> None:
        await super().on_push_frame(data)
        if data.direction != FrameDirection.DOWNSTREAM:
            return
        frame = data.frame
        if isinstance(frame, UserStoppedSpeakingFrame):
            self.turns += 1
            self.metrics.user_turns.inc(self.transport)
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
            self.metrics.bot_responses.inc(self.transport)
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
        elif isinstance(frame, InterruptionFrame) and self._bot_speaking:
            self.metrics.interruptions.inc(self.transport)
        elif isinstance(frame, TTSAudioRawFrame) and not isinstance(data.source, BaseOutputTransport):
            # (the output transport re-chunks audio into new frames of the same type as it plays them)
            self.metrics.generated_audio.inc(amount=frame.num_frames / frame.sample_rate)
        elif isinstance(frame, MetricsFrame):
            for item in frame.data:
                if isinstance(item, TTFBMetricsData) and item.value > 0:
                    self.metrics.ttfb.observe(item.value, item.processor)
                elif isinstance(item, ProcessingMetricsData):
                    self.metrics.generation_time.inc(amount=item.value)
        elif isinstance(frame, FunctionCallInProgressFrame):
            await self._on_tool_call(frame)
        elif isinstance(frame, FunctionCallResultFrame):
            await self._on_tool_result(frame)

    async def _on_latency_measured(self, _observer: Any, latency_secs: float) -> None:
        self.metrics.response_latency.observe(latency_secs, self.transport)
        await self._notify({"type": "turn-latency", "turn": self.turns, "latency_ms": round(latency_secs * 1000)})

    async def _on_tool_call(self, frame: FunctionCallInProgressFrame) -> None:
        self.metrics.tool_calls.inc(frame.function_name)
        self._tool_starts[frame.tool_call_id] = (frame.function_name, time.monotonic())
        await self._notify(
            {"type": "tool-call", "id": frame.tool_call_id, "name": frame.function_name, "arguments": frame.arguments}
        )

    async def _on_tool_result(self, frame: FunctionCallResultFrame) -> None:
        name, started = self._tool_starts.pop(frame.tool_call_id, (frame.function_name, None))
        duration = None if started is None else time.monotonic() - started
        if duration is not None:
            self.metrics.tool_latency.observe(duration, name)
        await self._notify(
            {
                "type": "tool-result",
                "id": frame.tool_call_id,
                "name": name,
                "result": _jsonable(frame.result),
                "duration_ms": None if duration is None else round(duration * 1000),
            }
        )

    async def _notify(self, message: dict[str, Any]) -> None:
        if self.notify is not None:
            await self.notify(message)


def _jsonable(value: Any) -> Any:
    """A tool result as the page can show it: whatever JSON cannot hold becomes its text."""
    return json.loads(json.dumps(value, default=str))
