"""One simulated caller for ``mimo-voice bench live``: a real aiortc peer on 127.0.0.1.

It signals through the server's ``POST /api/offer`` like the web page does (transceiver 0 = audio
sendrecv, 1 = video recvonly, a data channel with pings and an RTVI ``client-ready``), plays the
scenario in real-time 20 ms frames, and records what it hears on the clock its own frames run on.

Received audio is laid out the way an adaptive jitter buffer plays it (see :class:`AgentRecorder`), so a
stall of the server or the network shows up as silence inside the agent's reply, as a caller hears it.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from loguru import logger
from pipecat.processors.frameworks.rtvi.models import PROTOCOL_VERSION, Message

from .metrics import SERVER_AUDIO_START, SERVER_TURN_END, TURN_ENDING, DetectorParams, UserEvent
from .scenario import Fixture, Scenario, Step

MIN_PLAYOUT_DELAY_SECS = 0.02  # the caller's jitter buffer holds at least one frame
JITTER_WINDOW_SECS = 2.0  # how long the buffer remembers a late frame
SEND_RATE = 48_000  # Opus' native rate: no resampling on the way out
RECORD_RATE = 24_000  # the agent speaks at 24 kHz: everything it sends, at half the memory of 48 kHz
FRAME_SECS = 0.02
POLL_SECS = 0.02
PING_SECS = 1.0
CONNECT_TIMEOUT_SECS = 30.0
STALL_SECS = 10.0


class CallerError(RuntimeError):
    """The call could not be set up (signalling refused, no connection); the message says why."""


class CallClock:
    """Seconds since the call started; sent and received audio share it."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.origin


@dataclass
class _Playback:
    pcm: np.ndarray  # int16 at SEND_RATE
    not_before: float
    done: asyncio.Future[float]  # its start time, once the last sample has left
    started: float = 0.0
    position: int = 0


class ScriptTrack(MediaStreamTrack):
    """The caller's microphone: silence, or the fixture being played, in 20 ms frames paced on the clock."""

    kind = "audio"

    def __init__(self, clock: CallClock) -> None:
        super().__init__()
        self.clock = clock
        self.samples_per_frame = int(SEND_RATE * FRAME_SECS)
        self.max_lag = 0.0  # how late a frame left (the measuring process was too busy)
        self._first: float | None = None
        self._frames = 0
        self._pending: list[_Playback] = []
        self._playing: _Playback | None = None

    def play(self, pcm: np.ndarray, not_before: float) -> asyncio.Future[float]:
        """Queue ``pcm`` (int16 at 48 kHz) to start on the first frame at or after ``not_before``; the future
        gives its start time once the last sample has been sent."""
        playback = _Playback(pcm, not_before, asyncio.get_running_loop().create_future())
        self._pending.append(playback)
        return playback.done

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._first is None:
            self._first = self.clock.now()
        frame_time = self._first + self._frames * FRAME_SECS
        wait = frame_time - self.clock.now()
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            self.max_lag = max(self.max_lag, -wait)
        samples = self._next_samples(frame_time)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = SEND_RATE
        frame.pts = self._frames * self.samples_per_frame
        frame.time_base = fractions.Fraction(1, SEND_RATE)
        self._frames += 1
        return frame

    def _next_samples(self, frame_time: float) -> np.ndarray:
        if self._playing is None and self._pending and self._pending[0].not_before <= frame_time + 1e-6:
            self._playing = self._pending.pop(0)
            self._playing.started = frame_time
        out = np.zeros(self.samples_per_frame, np.int16)
        playing = self._playing
        if playing is not None:
            chunk = playing.pcm[playing.position : playing.position + self.samples_per_frame]
            out[: len(chunk)] = chunk
            playing.position += self.samples_per_frame
            if playing.position >= len(playing.pcm):
                self._playing = None
                if not playing.done.done():
                    playing.done.set_result(playing.started)
        return out


class AgentRecorder:
    """Records the agent's audio (mono, ``RECORD_RATE``) as the caller's playout buffer plays it, and tracks,
    live, when the agent speaks.

    The buffer is adaptive, like a WebRTC jitter buffer: a frame plays at its RTP timestamp, after the
    network delay of the fastest frame seen, plus the worst extra delay (jitter) of the last
    ``JITTER_WINDOW_SECS``. When frames come late the buffer grows and the caller hears a gap (an underrun
    inside a reply, as when the server stalls); when the jitter settles it shrinks again, skipping audio.
    """

    def __init__(self, clock: CallClock, params: DetectorParams) -> None:
        self.clock = clock
        self.params = params
        self.onsets: list[float] = []  # live, on the playout clock: when the caller heard the agent start
        self.last_active_end: float | None = None
        self._frames: list[tuple[float, float, np.ndarray]] = []  # (RTP timestamp, arrival, pcm)
        self._base_delay = math.inf  # the network delay of the fastest frame so far
        self._jitter = TrailingMax(JITTER_WINDOW_SECS)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RECORD_RATE)

    async def consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            arrival = self.clock.now()
            if not isinstance(frame, av.AudioFrame):
                continue
            for out in self._resampler.resample(frame):
                known = out.pts is not None and out.time_base is not None
                timestamp = float(out.pts * out.time_base) if known else arrival  # type: ignore[operator]
                self.add(out.to_ndarray().reshape(-1), timestamp, arrival)

    def add(self, pcm: np.ndarray, timestamp: float, arrival: float) -> None:
        self._frames.append((timestamp, arrival, pcm))
        self._base_delay = min(self._base_delay, arrival - timestamp)
        jitter = self._jitter.push(timestamp, arrival - timestamp - self._base_delay)
        start = timestamp + self._base_delay + jitter + MIN_PLAYOUT_DELAY_SECS
        level = 10 * np.log10(np.mean((pcm.astype(np.float64) / 32768.0) ** 2) + 1e-20)
        if level >= self.params.speech_dbfs:
            if self.last_active_end is None or start - self.last_active_end > self.params.merge_gap_secs:
                self.onsets.append(start)
            self.last_active_end = start + len(pcm) / RECORD_RATE

    def speaking_at(self, time_: float) -> bool:
        return self.last_active_end is not None and time_ - self.last_active_end <= self.params.merge_gap_secs

    def first_onset_after(self, time_: float) -> float | None:
        return next((t for t in self.onsets if t > time_), None)

    def playout(self) -> np.ndarray:
        """The agent's audio as the caller's buffer played it, on the call clock (the live placement, redone
        with the fastest frame of the whole call)."""
        if not self._frames:
            return np.zeros(0, np.int16)
        base = min(arrival - timestamp for timestamp, arrival, _ in self._frames)
        jitter = TrailingMax(JITTER_WINDOW_SECS)
        placed = []
        for timestamp, arrival, pcm in self._frames:
            start = timestamp + base + jitter.push(timestamp, arrival - timestamp - base) + MIN_PLAYOUT_DELAY_SECS
            placed.append((round(start * RECORD_RATE), pcm))
        out = np.zeros(max(start + len(pcm) for start, pcm in placed), np.int16)
        for start, pcm in placed:
            out[start : start + len(pcm)] = pcm  # a shrinking buffer overwrites: the caller skips that audio
        return out


class TrailingMax:
    """The largest value pushed during the last ``window`` seconds (a monotonic deque: O(1) per push)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._candidates: deque[tuple[float, float]] = deque()  # (time, value), values decreasing

    def push(self, time_: float, value: float) -> float:
        while self._candidates and self._candidates[-1][1] <= value:
            self._candidates.pop()
        self._candidates.append((time_, value))
        while self._candidates[0][0] < time_ - self.window:
            self._candidates.popleft()
        return self._candidates[0][1]


@dataclass
class CallResult:
    caller: int
    events: list[UserEvent] = field(default_factory=list)
    agent_audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    sample_rate: int = RECORD_RATE
    duration: float = 0.0
    max_send_lag: float = 0.0
    server_events: list[tuple[float, str]] = field(default_factory=list)  # (arrival, RTVI type) for turn stages
    notes: list[str] = field(default_factory=list)
    error: str | None = None


class Caller:
    """Plays one scripted call against ``url`` and returns what happened."""

    def __init__(
        self,
        index: int,
        url: str,
        scenario: Scenario,
        fixtures: list[Fixture],
        *,
        token: str | None = None,
        on_step: Callable[[int, str], None] | None = None,
    ) -> None:
        self.index = index
        self.url = url.rstrip("/")
        self.scenario = scenario
        self.fixtures = fixtures
        self.token = token
        self.on_step = on_step or (lambda caller, note: None)
        self.params = scenario.detector.params()
        self.clock = CallClock()
        self.track = ScriptTrack(self.clock)
        self.recorder = AgentRecorder(self.clock, self.params)
        self.result = CallResult(caller=index)
        self._tasks: list[asyncio.Task] = []

    async def run(self) -> CallResult:
        pc = RTCPeerConnection()
        try:
            await self._connect(pc)
            await self._play_script()
        except CallerError as exc:
            self.result.error = str(exc)
        except Exception as exc:  # aiortc or the network failed mid-call: this caller's result says so
            logger.opt(exception=exc).debug(f"caller {self.index} failed")
            self.result.error = f"{type(exc).__name__}: {exc}"
        finally:
            for task in self._tasks:
                task.cancel()
            await pc.close()
            self.result.duration = self.clock.now()
            self.result.agent_audio = self.recorder.playout()
            self.result.max_send_lag = self.track.max_lag
        return self.result

    async def _connect(self, pc: RTCPeerConnection) -> None:
        pc.addTransceiver(self.track, direction="sendrecv")
        pc.addTransceiver("video", direction="recvonly")
        channel = pc.createDataChannel("chat")
        connected = asyncio.Event()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._tasks.append(asyncio.create_task(self.recorder.consume(track)))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                connected.set()

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            self._note_server_event(message)

        @channel.on("open")
        def on_open() -> None:
            ready = Message(
                type="client-ready",
                id=uuid.uuid4().hex,
                data={"version": PROTOCOL_VERSION, "about": {"library": "mimo-voice bench"}},
            )
            channel.send(ready.model_dump_json())
            self._tasks.append(asyncio.create_task(self._ping(channel)))

        await pc.setLocalDescription(await pc.createOffer())
        answer = await self._signal(pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        try:
            await asyncio.wait_for(connected.wait(), CONNECT_TIMEOUT_SECS)
        except TimeoutError:
            raise CallerError(f"no WebRTC connection within {CONNECT_TIMEOUT_SECS:g} s") from None

    async def _signal(self, sdp: str) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_SECS)) as http:
                async with http.post(
                    f"{self.url}/api/offer", json={"sdp": sdp, "type": "offer"}, headers=headers
                ) as response:
                    body = await response.text()
                    if response.status != 200:
                        raise CallerError(f"signalling refused: HTTP {response.status}: {body.strip()[:300]}")
                    answer = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise CallerError(f"signalling failed at {self.url}/api/offer: {exc or type(exc).__name__}") from exc
        if not isinstance(answer, dict) or "sdp" not in answer or "type" not in answer:
            raise CallerError(f"signalling answer without sdp/type: {body.strip()[:300]}")
        return answer

    def _note_server_event(self, message: str | bytes) -> None:
        """Keeps the arrival time of the RTVI events that split a turn's latency into stages."""
        try:
            kind = json.loads(message).get("type")
        except (ValueError, AttributeError):
            return
        if kind in (SERVER_TURN_END, SERVER_AUDIO_START):
            self.result.server_events.append((self.clock.now(), kind))

    @staticmethod
    async def _ping(channel) -> None:
        """Keep-alives as pipecat's JS client sends them; the server uses them to notice a vanished client."""
        while channel.readyState == "open":
            channel.send(f"ping: {int(time.time() * 1000)}")
            await asyncio.sleep(PING_SECS)

    async def _play_script(self) -> None:
        await self._sleep_until(self.scenario.lead_in_secs)
        previous: UserEvent | None = None
        for number, (step, fixture) in enumerate(zip(self.scenario.script, self.fixtures), start=1):
            trigger = await self._wait_for(step, previous, number)
            started = await self._play(fixture, trigger + step.delay_secs)
            previous = UserEvent(step.kind, tuple(s.shifted(started) for s in fixture.speech), step.name)
            self.result.events.append(previous)
            self.on_step(self.index, step.name)
        await self._wait_agent_end(previous, "the end of the call", final=True)

    async def _play(self, fixture: Fixture, not_before: float) -> float:
        """Plays a fixture; its start time. A connection that stops taking audio ends the call."""
        limit = max(0.0, not_before - self.clock.now()) + fixture.duration + STALL_SECS
        try:
            return await asyncio.wait_for(self.track.play(fixture.pcm, not_before), limit)
        except TimeoutError:
            raise CallerError(f"the call stalled: the connection took no audio for {STALL_SECS:g} s") from None

    async def _wait_for(self, step: Step, previous: UserEvent | None, number: int) -> float:
        """The time from which ``step.delay_secs`` counts."""
        if step.trigger == "user_end":
            return previous.offset if previous else self.clock.now()
        if step.trigger == "agent_end":
            return await self._wait_agent_end(previous, f"step {number}")
        if self.recorder.speaking_at(self.clock.now()):
            return self.clock.now()  # already talking (through a backchannel, say): count from now
        since = previous.onset if previous else 0.0
        deadline = (previous.offset if previous else self.clock.now()) + self.params.response_timeout_secs
        while self.clock.now() < deadline:
            onset = self.recorder.first_onset_after(since)
            if onset is not None:
                return onset
            await asyncio.sleep(POLL_SECS)
        self.result.notes.append(f"step {number}: the agent did not start speaking; played anyway")
        return self.clock.now()

    async def _wait_agent_end(self, previous: UserEvent | None, where: str, *, final: bool = False) -> float:
        """Until the agent has answered (if the previous step asks for an answer; anything may be answered at the
        end of the call, where the last reply window must be recorded) and then been quiet a while."""
        since = previous.onset if previous else 0.0
        asked = previous is not None and previous.kind in TURN_ENDING
        expects_reply = asked or (final and previous is not None)
        start = previous.offset if previous else self.clock.now()
        while True:
            now = self.clock.now()
            # Quiet since the agent's last sound and the caller's own: a reply to it may be on its way.
            last = max(self.recorder.last_active_end or 0.0, previous.offset if previous else 0.0)
            quiet = now - last >= self.scenario.quiet_secs
            replied = self.recorder.first_onset_after(since) is not None
            if quiet and (replied or not expects_reply):
                return now
            if quiet and now - start >= self.params.response_timeout_secs:
                if asked:
                    self.result.notes.append(f"{where}: no reply to the previous step")
                return now
            if now - start >= self.scenario.reply_timeout_secs:
                self.result.notes.append(
                    f"{where}: the agent was still speaking "
                    f"{self.scenario.reply_timeout_secs:g} s after the previous step"
                )
                return now
            await asyncio.sleep(POLL_SECS)

    async def _sleep_until(self, time_: float) -> None:
        await asyncio.sleep(max(0.0, time_ - self.clock.now()))
