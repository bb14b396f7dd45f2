"""What a caller experiences, measured from audio alone (pure numpy).

The user side is known exactly (the bench plays fixtures whose speech extent it measured); the agent
side is the audio the caller received, cut into 20 ms frames and thresholded on level. Definitions
follow Full-Duplex-Bench v1/v1.5 and voicebench so that figures can be compared:

- agent speech: frames at or above ``speech_dbfs``, merged across gaps up to ``merge_gap_secs``
  (FDB v1.5 merges model gaps <= 0.5 s).
- takeover (FDB TOR): the agent speaks for at least ``takeover_min_secs`` in segments that start after
  the user's (last) speech onset and before the next user event, at most ``response_timeout_secs``
  after the user's speech ends (FDB: shorter output is a backchannel, not a takeover).
- response latency: end of user speech -> onset of the first of those agent segments, clipped at 0
  (FDB v1), for every reply (voicebench; FDB v1 averages over takeovers only, and each event's
  ``takeover`` flag in the JSON allows that filter).
- stop time: user onset -> end of the agent segment that was playing at that onset.
- false barge-in: a backchannel or noise burst during agent speech after which the agent stops within
  ``max_stop_secs``.
- pause takeover: an agent takeover that starts inside a pause of a user's utterance.
- underrun: a run of frames below ``silence_dbfs`` (nothing was playing) inside an agent reply; a
  reply is a run of agent segments during and between which the user did not speak.
- turn stages: for each reply, the server's RTVI events as the caller received them split the
  latency into end of speech -> the server ends the user's turn -> the server starts sending audio ->
  the caller hears it (unclipped; the three add up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from mimo_voice.streaming.model.audio import rms_dbfs

EventKind = Literal["turn", "pause", "backchannel", "noise", "barge_in"]
TURN_ENDING: tuple[EventKind, ...] = ("turn", "pause", "barge_in")  # the events that ask for a reply
SERVER_TURN_END = "user-stopped-speaking"  # RTVI: the server's VAD ended the user's turn
SERVER_AUDIO_START = "bot-started-speaking"  # RTVI: the server started sending the agent's audio
TURN_STAGES = ("end of speech -> server ends the turn", "-> server sends audio", "-> caller hears it")
MAX_STAGE_SKEW_SECS = 1.0  # the data channel and the audio may arrive in either order, but not this far apart


@dataclass(frozen=True)
class Segment:
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    def shifted(self, offset: float) -> Segment:
        return Segment(self.start + offset, self.end + offset)


@dataclass(frozen=True)
class DetectorParams:
    frame_secs: float = 0.02
    speech_dbfs: float = -45.0
    silence_dbfs: float = -70.0
    merge_gap_secs: float = 0.5
    takeover_min_secs: float = 1.0
    response_timeout_secs: float = 8.0
    max_stop_secs: float = 1.5

    def __post_init__(self) -> None:
        if self.frame_secs <= 0:
            raise ValueError("frame_secs must be positive")
        if self.silence_dbfs >= self.speech_dbfs:
            raise ValueError("silence_dbfs must be below speech_dbfs")


@dataclass(frozen=True)
class UserEvent:
    """One scripted user action; ``speech`` lists when it was audible (several parts for a pause)."""

    kind: EventKind
    speech: tuple[Segment, ...]
    label: str = ""

    def __post_init__(self) -> None:
        if not self.speech:
            raise ValueError(f"{self.kind} event {self.label!r} has no audible part")

    @property
    def onset(self) -> float:
        return self.speech[0].start

    @property
    def offset(self) -> float:
        return self.speech[-1].end


@dataclass
class EventResult:
    index: int
    kind: EventKind
    label: str
    onset: float
    offset: float
    agent_was_speaking: bool
    takeover: bool
    reply_onset: float | None = None  # when the caller heard the reply start
    latency: float | None = None
    stop_time: float | None = None
    pause_takeover: bool | None = None
    false_barge_in: bool | None = None


@dataclass
class Reply:
    span: Segment
    underruns: list[Segment] = field(default_factory=list)


@dataclass
class CallAnalysis:
    events: list[EventResult]
    agent_segments: list[Segment]
    replies: list[Reply]
    stages: list[tuple[float, float, float]] = field(default_factory=list)  # per reply, see TURN_STAGES


def frame_levels(pcm: np.ndarray, sample_rate: int, frame_secs: float = 0.02) -> np.ndarray:
    """RMS level of each whole frame in dBFS (int16 full scale, or floats in [-1, 1]); digital silence is -inf."""
    samples = np.asarray(pcm)
    frame = round(frame_secs * sample_rate)
    count = len(samples) // frame
    return rms_dbfs(samples[: count * frame].reshape(count, frame))


def runs(mask: np.ndarray, frame_secs: float) -> list[Segment]:
    """Maximal runs of True frames as time segments."""
    padded = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [Segment(float(start * frame_secs), float(end * frame_secs)) for start, end in zip(edges[::2], edges[1::2])]


def merge_segments(segments: Sequence[Segment], max_gap: float) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if merged and segment.start - merged[-1].end <= max_gap + 1e-9:
            merged[-1] = Segment(merged[-1].start, max(merged[-1].end, segment.end))
        else:
            merged.append(segment)
    return merged


def speech_segments(pcm: np.ndarray, sample_rate: int, params: DetectorParams = DetectorParams()) -> list[Segment]:
    """Agent (or fixture) speech: active frames merged across short gaps."""
    active = frame_levels(pcm, sample_rate, params.frame_secs) >= params.speech_dbfs
    return merge_segments(runs(active, params.frame_secs), params.merge_gap_secs)


def audible_extent(pcm: np.ndarray, sample_rate: int, params: DetectorParams = DetectorParams()) -> Segment | None:
    """From the first to the last active frame (a fixture's speech onset and offset), None if silent."""
    active = runs(frame_levels(pcm, sample_rate, params.frame_secs) >= params.speech_dbfs, params.frame_secs)
    return Segment(active[0].start, active[-1].end) if active else None


def analyse_call(
    agent_pcm: np.ndarray,
    sample_rate: int,
    events: Sequence[UserEvent],
    params: DetectorParams = DetectorParams(),
    server_events: Sequence[tuple[float, str]] = (),
) -> CallAnalysis:
    """Score every scripted event of one call against the agent audio the caller received; ``server_events``
    are (arrival time, RTVI message type) pairs for the turn stages."""
    levels = frame_levels(agent_pcm, sample_rate, params.frame_secs)
    segments = merge_segments(runs(levels >= params.speech_dbfs, params.frame_secs), params.merge_gap_secs)
    ordered = sorted(events, key=lambda e: e.onset)
    results = []
    for index, event in enumerate(ordered):
        next_onset = ordered[index + 1].onset if index + 1 < len(ordered) else math.inf
        results.append(_score_event(index, event, next_onset, segments, params))
    user_speech = [part for event in ordered for part in event.speech]
    replies = [Reply(span, _underruns(levels, span, params)) for span in _reply_spans(segments, user_speech)]
    stages = [
        stage
        for result, event in zip(results, ordered)
        if (stage := _turn_stages(result, event, server_events)) is not None
    ]
    return CallAnalysis(results, segments, replies, stages)


def _score_event(
    index: int, event: UserEvent, next_onset: float, segments: list[Segment], params: DetectorParams
) -> EventResult:
    playing = next((s for s in segments if s.start <= event.onset < s.end), None)
    window_end = min(next_onset, event.offset + params.response_timeout_secs)
    # The reply to the whole utterance: for a pause, what starts after the user resumed.
    response = [s for s in segments if event.speech[-1].start <= s.start < window_end]
    takeover = _spoken(response) >= params.takeover_min_secs - 1e-9
    result = EventResult(
        index=index,
        kind=event.kind,
        label=event.label,
        onset=event.onset,
        offset=event.offset,
        agent_was_speaking=playing is not None,
        takeover=takeover,
        reply_onset=response[0].start if response else None,
        latency=max(0.0, response[0].start - event.offset) if response else None,
        stop_time=playing.end - event.onset if playing else None,
    )
    if event.kind == "pause":
        pauses = [Segment(a.end, b.start) for a, b in zip(event.speech, event.speech[1:])]
        in_pause = [s for s in segments if any(p.start <= s.start < p.end for p in pauses)]
        result.pause_takeover = _spoken(in_pause) >= params.takeover_min_secs - 1e-9
    if event.kind in ("backchannel", "noise") and result.stop_time is not None:
        result.false_barge_in = bool(result.stop_time <= params.max_stop_secs)
    return result


def _turn_stages(
    result: EventResult, event: UserEvent, server_events: Sequence[tuple[float, str]]
) -> tuple[float, float, float] | None:
    """The server's last end of turn after the user's last speech onset and before the reply was heard (none
    when the server ended the turn in a pause only), and its first audio after that."""
    if result.kind not in TURN_ENDING or result.reply_onset is None:
        return None
    heard = result.reply_onset
    ended = [t for t, kind in server_events if kind == SERVER_TURN_END and event.speech[-1].start <= t <= heard]
    if not ended:
        return None
    sent = next((t for t, kind in server_events if kind == SERVER_AUDIO_START and t >= ended[-1]), None)
    if sent is None or abs(heard - sent) > MAX_STAGE_SKEW_SECS:
        return None
    return ended[-1] - result.offset, sent - ended[-1], heard - sent


def _spoken(segments: Sequence[Segment]) -> float:
    return sum(s.duration for s in segments)


def _reply_spans(segments: list[Segment], user_speech: list[Segment]) -> list[Segment]:
    """Join agent segments into replies: a new reply starts after the user spoke during or after the last one."""
    spans: list[Segment] = []
    for segment in segments:
        prompted = bool(spans) and any(u.start < segment.start and u.end > spans[-1].start for u in user_speech)
        if spans and not prompted:
            spans[-1] = Segment(spans[-1].start, segment.end)
        else:
            spans.append(segment)
    return spans


def _underruns(levels: np.ndarray, span: Segment, params: DetectorParams) -> list[Segment]:
    first, last = (round(t / params.frame_secs) for t in (span.start, span.end))
    silent = levels[first:last] < params.silence_dbfs
    return [gap.shifted(span.start) for gap in runs(silent, params.frame_secs)]


@dataclass
class Totals:
    """Raw figures pooled over calls; rates are (hits, total) so that empty categories stay visible."""

    latency: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in TURN_ENDING})
    stop_time: list[float] = field(default_factory=list)
    counts: dict[str, list[int]] = field(default_factory=dict)
    replies: int = 0
    replies_with_underrun: int = 0
    underruns: int = 0
    underrun_secs: float = 0.0
    reply_secs: float = 0.0
    stages: list[tuple[float, float, float]] = field(default_factory=list)

    def count(self, name: str, hit: bool) -> None:
        hits_total = self.counts.setdefault(name, [0, 0])
        hits_total[0] += int(hit)
        hits_total[1] += 1


def pool(analyses: Sequence[CallAnalysis]) -> Totals:
    """Pool per-event results of several calls into the headline categories."""
    totals = Totals()
    for call in analyses:
        totals.stages.extend(call.stages)
        for event in call.events:
            _pool_event(totals, event)
        for reply in call.replies:
            totals.replies += 1
            totals.replies_with_underrun += bool(reply.underruns)
            totals.underruns += len(reply.underruns)
            totals.underrun_secs += sum(gap.duration for gap in reply.underruns)
            totals.reply_secs += reply.span.duration
    return totals


def _pool_event(totals: Totals, event: EventResult) -> None:
    if event.kind in totals.latency and event.latency is not None:
        totals.latency[event.kind].append(event.latency)
    if event.kind == "turn":
        totals.count("takeover_turn", event.takeover)
    elif event.kind == "pause":
        totals.count("takeover_pause", bool(event.pause_takeover))
    elif event.kind == "barge_in":
        totals.count("takeover_interruption", event.takeover)
        totals.count("barge_in_agent_speaking", event.agent_was_speaking)
        if event.stop_time is not None:
            totals.stop_time.append(event.stop_time)
    elif event.kind == "backchannel":
        totals.count("takeover_backchannel", event.takeover)
    if event.false_barge_in is not None:  # a backchannel or noise burst while the agent spoke
        totals.count(f"false_barge_in_{event.kind}", event.false_barge_in)
    elif event.kind == "noise":
        totals.count("spurious_response_noise", event.takeover)
