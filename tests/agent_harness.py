"""Test doubles and pipeline harnesses for the agent tests.

``ScriptedSession`` follows the Session contract (streaming/session.py) with scripted answers, so the service's frame
logic is tested on its own; the tests that drive the real tiny engine live in test_agent_engine.py. ``FakeOutput``
is a pipecat output transport that "plays" audio in real time (scaled by ``speed``), like SmallWebRTC's writes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from mimo_voice.agent.playback import PlaybackTracker
from mimo_voice.agent.service import MiMoAudioService
from mimo_voice.configs import load_config
from mimo_voice.streaming.engine.events import (
    SAMPLE_RATE,
    SAMPLES_PER_PATCH,
    AudioChunk,
    AudioPatch,
    Event,
    TextToken,
    ToolCallText,
    TurnEnd,
)
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    LLMFullResponseEndFrame,
    OutputAudioRawFrame,
    StartFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.turns.user_turn_strategies import ExternalUserTurnStrategies
from pipecat.workers.runner import WorkerRunner

IN_RATE = 16_000
FRAME_SECS = 0.02  # 20 ms input frames, like SmallWebRTC's

# --- scripted answers --------------------------------------------------------------------------------------------


def pcm_for(index: int, samples: int = SAMPLES_PER_PATCH) -> np.ndarray:
    """Recognisable audio: every sample of chunk ``index`` is ``index + 1``."""
    return np.full(samples, index + 1, dtype=np.int16)


def spoken(words: Sequence[str], *, chunks_per_word: int = 1, thinking: Sequence[str] = ()) -> list[Event]:
    """An answer as the session streams it: optional reasoning, then each word followed by its audio."""
    events: list[Event] = [TextToken(text, token_id=i, thinking=True) for i, text in enumerate(thinking)]
    first_sample = index = 0
    for i, word in enumerate(words):
        events.append(TextToken(word, token_id=100 + i))
        for _ in range(chunks_per_word):
            events.append(AudioPatch(np.zeros((4, 8), np.int64), index))
            pcm = pcm_for(index)
            events.append(AudioChunk(pcm, first_sample))
            first_sample += len(pcm)
            index += 1
    events.append(TurnEnd("stop", prompt_positions=40, generated_positions=len(words) + index))
    return events


def tool_call(raw: str, *, ack: Sequence[str] = ()) -> list[Event]:
    """An answer that (after an optional spoken acknowledgement) ends in a tool call."""
    events = spoken(ack)[:-1] if ack else []
    return [*events, ToolCallText(raw), TurnEnd("tool_call", prompt_positions=40, generated_positions=12)]


@dataclass
class Turn:
    role: str
    text: str
    interrupted: bool = False


@dataclass
class ScriptedSession:
    """The Session contract with scripted answers; ``calls`` records every call in order."""

    answers: list[list[Event]]
    mode: str = "non_thinking"
    step_secs: float = 0.005  # pause between events, so that a response takes a little time
    system_prompt: str | None = None
    task: str = "spoken_dialogue"
    calls: list[tuple] = field(default_factory=list)
    history: list[Turn] = field(default_factory=list)
    text_hook: Callable[[list[int]], int | None] | None = None
    fed_samples: int = 0  # user audio since the last respond()
    closed: bool = False
    _cancelled: bool = False

    def set_mode(self, mode: str) -> None:
        if mode not in ("thinking", "non_thinking"):
            raise ValueError(mode)
        self.mode = mode
        self.calls.append(("set_mode", mode))

    async def feed_audio(self, pcm: np.ndarray | bytes, sample_rate: int) -> None:
        if sample_rate not in (8000, 16000, 24000, 48000):
            raise ValueError(f"unsupported sample rate {sample_rate}")
        samples = len(pcm) // 2 if isinstance(pcm, bytes) else len(pcm)
        self.fed_samples += samples
        self.calls.append(("feed_audio", samples, sample_rate))

    async def discard_user_audio(self) -> None:
        self.fed_samples = 0
        self.calls.append(("discard_user_audio",))

    async def add_text(self, role: str, text: str) -> None:
        self.history.append(Turn(role, text))
        self.calls.append(("add_text", role, text))

    async def cancel(self, played_samples: int | None = None) -> None:
        self.calls.append(("cancel", played_samples))
        self._cancelled = True

    async def respond(self):
        self.calls.append(("respond", self.fed_samples, self.mode))
        self.fed_samples = 0
        self._cancelled = False
        if not self.answers:
            raise AssertionError("respond() called more often than scripted")
        for event in self.answers.pop(0):
            await asyncio.sleep(self.step_secs)
            if self._cancelled:  # like the real session: nothing more after cancel(), then TurnEnd
                yield TurnEnd("cancelled")
                return
            yield event

    async def close(self) -> None:
        self.closed = True

    def called(self, name: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == name]


@dataclass
class FakeEngine:
    session: ScriptedSession
    is_tiny: bool = True
    opened: list[dict] = field(default_factory=list)

    def new_session(
        self, *, mode: str = "non_thinking", system_prompt: str | None = None, task: str = "spoken_dialogue"
    ) -> ScriptedSession:
        self.opened.append({"mode": mode, "system_prompt": system_prompt, "task": task})
        self.session.mode, self.session.system_prompt, self.session.task = mode, system_prompt, task
        return self.session

    async def aclose(self) -> None:
        pass


# --- audio and VAD -----------------------------------------------------------------------------------------------


def input_frames(pcm: np.ndarray, sample_rate: int = IN_RATE) -> list[InputAudioRawFrame]:
    """``pcm`` cut into 20 ms input frames."""
    step = int(sample_rate * FRAME_SECS)
    return [InputAudioRawFrame(pcm[i : i + step].tobytes(), sample_rate, 1) for i in range(0, len(pcm), step)]


def tone(secs: float, amplitude: int = 3000, sample_rate: int = IN_RATE) -> np.ndarray:
    t = np.arange(round(secs * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


def silence(secs: float, sample_rate: int = IN_RATE) -> np.ndarray:
    return np.zeros(round(secs * sample_rate), np.int16)


class EnergyVAD(VADAnalyzer):
    """Deterministic VAD: a 20 ms window is speech when its RMS is above 500."""

    def __init__(self, *, start_secs: float = 0.2, stop_secs: float = 0.5) -> None:
        super().__init__(params=VADParams(start_secs=start_secs, stop_secs=stop_secs, min_volume=0.0))

    def num_frames_required(self) -> int:
        return int(self.sample_rate * FRAME_SECS)

    def voice_confidence(self, buffer: bytes) -> float:
        x = np.frombuffer(buffer, np.int16).astype(np.float32)
        return 1.0 if np.sqrt((x * x).mean()) > 500 else 0.0


# --- transports --------------------------------------------------------------------------------------------------


class FakeOutput(BaseOutputTransport):
    """Writes audio at ``speed`` x real time and remembers it (24 kHz int16)."""

    def __init__(self, *, speed: float = 1.0) -> None:
        super().__init__(
            TransportParams(audio_out_enabled=True, audio_out_sample_rate=SAMPLE_RATE, audio_out_end_silence_secs=0)
        )
        self.speed = speed
        self.written = bytearray()

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        await asyncio.sleep(frame.num_frames / frame.sample_rate / self.speed)
        self.written.extend(frame.audio)
        return True


class FakeInput(BaseInputTransport):
    def __init__(self) -> None:
        super().__init__(TransportParams(audio_in_enabled=True, audio_in_sample_rate=IN_RATE))

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)


class FakeTransport(BaseTransport):
    def __init__(self, *, speed: float = 1.0) -> None:
        super().__init__()
        self._input = FakeInput()
        self._output = FakeOutput(speed=speed)

    def input(self) -> FakeInput:
        return self._input

    def output(self) -> FakeOutput:
        return self._output


# --- running pipelines -------------------------------------------------------------------------------------------


class PushLog(BaseObserver):
    """Every frame a processor originates (pushes first), in order: (source, frame, direction)."""

    def __init__(self) -> None:
        super().__init__()
        self.pushes: list[tuple[FrameProcessor, Frame, FrameDirection]] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        if data.first_push:
            self.pushes.append((data.source, data.frame, data.direction))

    def frames(
        self,
        source: FrameProcessor,
        kind: type | tuple[type, ...] = Frame,
        direction: FrameDirection = FrameDirection.DOWNSTREAM,
    ) -> list:
        return [f for s, f, d in self.pushes if s is source and isinstance(f, kind) and d == direction]


class Sink(FrameProcessor):
    """Last processor: remembers what reaches the end of the pipeline."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)

    def of(self, kind: type | tuple[type, ...]) -> list:
        return [f for f in self.frames if isinstance(f, kind)]


class Harness:
    """Runs ``[*processors, Sink]`` (or a ready worker) until the test leaves the ``async with``."""

    def __init__(self, processors: Iterable[FrameProcessor] = (), *, worker: PipelineWorker | None = None) -> None:
        self.log = PushLog()
        self.sink = Sink()
        if worker is None:
            worker = PipelineWorker(
                Pipeline([*processors, self.sink]),
                params=PipelineParams(
                    audio_in_sample_rate=IN_RATE,
                    audio_out_sample_rate=SAMPLE_RATE,
                    enable_metrics=True,
                    enable_usage_metrics=True,
                ),
                enable_rtvi=False,
                cancel_on_idle_timeout=False,
            )
        self.worker = worker
        worker.add_observer(self.log)
        self._runner_task: asyncio.Task | None = None

    async def __aenter__(self) -> Harness:
        started = asyncio.Event()

        @self.worker.event_handler("on_pipeline_started")
        async def _started(worker, frame):
            started.set()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        self._runner_task = asyncio.create_task(runner.run())
        await asyncio.wait_for(started.wait(), 10)
        return self

    async def __aexit__(self, *exc) -> None:
        if not self._runner_task.done():
            await self.worker.queue_frame(EndFrame())
        await asyncio.wait_for(self._runner_task, 20)

    async def send(self, *frames: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> None:
        for frame in frames:
            await self.worker.queue_frame(frame, direction)

    async def play(self, frames: Sequence[InputAudioRawFrame], *, speed: float = 4.0) -> None:
        """Send input audio frames paced at ``speed`` x real time (VAD timers look at the wall clock)."""
        for frame in frames:
            await self.worker.queue_frame(frame)
            await asyncio.sleep(frame.num_frames / frame.sample_rate / speed)

    @property
    def finished(self) -> bool:
        return self._runner_task.done()


async def wait_until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Wait for `condition`; the timeout only bounds a failing test (a loaded 2-core machine is slow)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Agent:
    """user aggregator -> service -> output transport -> assistant aggregator, around a scripted session."""

    def __init__(
        self, answers=(), *, engine=None, overrides=(), tools=None, speed: float = 8.0, step_secs: float = 0.005
    ):
        self.config = load_config(None, list(overrides))
        self.engine = engine or FakeEngine(ScriptedSession(list(answers), step_secs=step_secs))
        self.service = MiMoAudioService(engine=self.engine, config=self.config, tools=tools)
        self.output = FakeOutput(speed=speed)
        # The fake output plays `speed` times faster than real time: so does the tracker's clock.
        self.service.playback = PlaybackTracker(clock=lambda: time.monotonic() * speed)
        self.service.playback.attach(self.output)
        self.context = LLMContext()
        # The test plays the user aggregator's turn decisions itself (UserStarted/Stopped, InterruptionFrame).
        pair = LLMContextAggregatorPair(
            self.context, user_params=LLMUserAggregatorParams(user_turn_strategies=ExternalUserTurnStrategies())
        )
        self.user, self.assistant = pair.user(), pair.assistant()
        self.stopped_turns: list = []

        @self.assistant.event_handler("on_assistant_turn_stopped")
        async def _stopped(aggregator, message):
            self.stopped_turns.append(message)

        self.harness = Harness([self.user, self.service, self.output, self.assistant])

    @property
    def session(self):
        return self.engine.session if isinstance(self.engine, FakeEngine) else self.service.session

    async def __aenter__(self) -> Agent:
        await self.harness.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.harness.__aexit__(*exc)

    def pushed(self, kind, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> list:
        """Frames the service originated."""
        return self.harness.log.frames(self.service, kind, direction)

    async def user_says(self, secs: float = 0.4, stop_secs: float = 0.5) -> float:
        """A user turn as the user aggregator reports it; returns the (back-dated) end of speech."""
        await self.harness.send(VADUserStartedSpeakingFrame(start_secs=0.2), UserStartedSpeakingFrame())
        await self.send_audio(tone(secs))
        stopped = VADUserStoppedSpeakingFrame(stop_secs=stop_secs, timestamp=time.time())
        await self.harness.send(stopped, UserStoppedSpeakingFrame())
        return stopped.timestamp - stop_secs

    async def responses_done(self, count: int = 1) -> None:
        await wait_until(lambda: len(self.pushed(LLMFullResponseEndFrame)) >= count, what=f"{count} responses")

    async def send_audio(self, pcm: np.ndarray) -> None:
        """Input audio, returning once the service has taken all of it in (it forwards what it took)."""
        frames = input_frames(pcm)
        target = len(self.harness.sink.of(InputAudioRawFrame)) + len(frames)
        await self.harness.send(*frames)
        await wait_until(lambda: len(self.harness.sink.of(InputAudioRawFrame)) >= target, what="user audio fed")

    async def played_out(self, count: int = 1) -> None:
        await wait_until(lambda: len(self.harness.sink.of(BotStoppedSpeakingFrame)) >= count, what="playback to finish")
