"""create_worker end to end: a transport, the project's VAD, the barge-in guard and the service (scripted session)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from agent_harness import FakeEngine, FakeTransport, Harness, ScriptedSession, input_frames, spoken, wait_until
from fixtures.speech import spoken as say
from mimo_voice.agent.pipeline import create_worker
from mimo_voice.agent.service import MiMoAudioService
from mimo_voice.agent.vad import create_vad_analyzer
from mimo_voice.configs import load_config
from mimo_voice.streaming.engine.events import SAMPLES_PER_PATCH
from mimo_voice.tools import build_registry
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    UserStartedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection


class Call:
    """One connection through create_worker with a scripted session; the caller speaks through the input."""

    def __init__(self, answers, *, overrides=(), tools=None) -> None:
        self.config = load_config(None, list(overrides))
        self.session = ScriptedSession(answers)
        self.transport = FakeTransport()
        self.worker, self.service = create_worker(
            self.transport,
            self.config,
            FakeEngine(self.session),
            vad_analyzer=create_vad_analyzer(self.config.vad),
            tools=tools,
        )
        self.harness = Harness(worker=self.worker)

    async def __aenter__(self) -> Call:
        await self.harness.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.harness.__aexit__(*exc)

    async def caller(self, *pieces: str | float, speed: float = 4.0) -> None:
        """Phrases (str, spoken by espeak-ng) and pauses (seconds) into the input transport, paced."""
        audio = [say(p, 16000) if isinstance(p, str) else np.zeros(int(p * 16000), np.int16) for p in pieces]
        for frame in input_frames(np.concatenate(audio)):
            await self.transport.input().push_audio_frame(frame)
            await asyncio.sleep(0.02 / speed)

    def pushed(self, kind) -> list:
        return self.harness.log.frames(self.service, kind)

    def output_events(self, kind) -> int:
        """How many ``kind`` frames (BotStarted/StoppedSpeaking) the output transport sent upstream."""
        return len(self.harness.log.frames(self.transport.output(), kind, FrameDirection.UPSTREAM))


async def test_create_worker_wires_the_contract():
    config = load_config(None)
    tools = build_registry(config.tools, timeout_secs=config.agent.tool_timeout_secs)
    transport = FakeTransport()
    worker, service = create_worker(
        transport, config, FakeEngine(ScriptedSession([])), vad_analyzer=create_vad_analyzer(config.vad), tools=tools
    )
    assert isinstance(worker, PipelineWorker) and isinstance(service, MiMoAudioService)
    params = worker.params
    assert (params.audio_in_sample_rate, params.audio_out_sample_rate) == (16000, 24000)
    assert params.enable_metrics and params.enable_usage_metrics
    assert service.playback.attached
    assert all(service.has_function(name) for name in tools.names)


async def test_a_spoken_question_gets_a_spoken_answer():
    async with Call([spoken(["Hi", " there"])]) as call:
        await call.caller(0.3, "What time is it?", 1.0)
        await wait_until(lambda: call.pushed(LLMFullResponseEndFrame), what="the answer")
        await wait_until(lambda: len(call.transport.output().written) >= 2 * 2 * SAMPLES_PER_PATCH, what="playback")
    session = call.session
    ((_, fed, _),) = session.called("respond")
    assert fed >= 0.8 * 16000  # the phrase went in at the pipeline's 16 kHz, pre-roll included
    assert all(rate == 16000 for _, _, rate in session.called("feed_audio"))
    written = np.frombuffer(bytes(call.transport.output().written), np.int16)
    assert np.array_equal(
        written[: 2 * SAMPLES_PER_PATCH], np.concatenate([np.full(SAMPLES_PER_PATCH, i + 1) for i in range(2)])
    )
    (ttfb,) = [d for f in call.pushed(MetricsFrame) for d in f.data if isinstance(d, TTFBMetricsData)]
    assert ttfb.value >= call.config.vad.stop_secs  # back-dated to the end of speech


async def _talk_over_the_bot(utterance: np.ndarray, settled: Callable[[Call], bool], what: str) -> Call:
    """Says ``utterance`` while the bot's long answer plays, then waits until ``settled(call)``."""
    call = Call([spoken(["Hi"]), spoken([f" w{i}" for i in range(15)])])  # the second answer lasts 2.4 s
    async with call:
        await call.caller(0.3, "Hello", 1.0)
        await wait_until(lambda: call.output_events(BotStoppedSpeakingFrame) == 1, what="the first answer")
        await call.caller(0.3, "Tell me a long story", 1.0)
        await wait_until(lambda: call.output_events(BotStartedSpeakingFrame) == 2, what="the long answer to play")
        await asyncio.sleep(0.3)
        for frame in input_frames(np.concatenate([utterance, np.zeros(16000, np.int16)])):
            await call.transport.input().push_audio_frame(frame)
            await asyncio.sleep(0.005)
        await wait_until(lambda: settled(call), what=what)
    return call


async def test_talking_over_the_bot_interrupts_it_and_rolls_back_to_what_was_heard():
    call = await _talk_over_the_bot(
        say("No, stop right there please", 16000),
        lambda call: len(call.session.called("respond")) >= 3,
        "the barge-in to be answered",
    )
    cancels = call.session.called("cancel")
    assert len(cancels) == 1
    played = cancels[0][1]
    assert 0 < played < 15 * SAMPLES_PER_PATCH
    assert len(call.pushed(UserStartedSpeakingFrame)) == 0  # the turn came from the aggregator, not the service
    assert len(call.session.called("respond")) == 3  # the barge-in was answered
    assert not call.session.called("discard_user_audio")


async def test_a_short_sound_over_the_bot_does_not_interrupt_it_and_is_discarded():
    blip = say("Hm", 16000)[: int(0.15 * 16000)]
    call = await _talk_over_the_bot(  # settled: the blip dropped and the long answer played to its end
        blip,
        lambda call: (
            bool(call.session.called("discard_user_audio")) and call.output_events(BotStoppedSpeakingFrame) == 2
        ),
        "the blip to be discarded and the answer to finish",
    )
    assert not call.session.called("cancel")
    assert call.session.called("discard_user_audio")  # the VAD heard it; it never became a turn
    assert len(call.session.called("respond")) == 2
    interruptions = [f for s, f, d in call.harness.log.pushes if isinstance(f, InterruptionFrame)]
    assert len(interruptions) == 2 * 2  # one broadcast (up + down) per real user turn, none for the blip
    assert len(call.pushed(TTSAudioRawFrame)) == 1 + 15
