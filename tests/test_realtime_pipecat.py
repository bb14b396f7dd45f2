"""pipecat's own ``OpenAIRealtimeLLMService`` (pipecat 1.14) pointed at mimo-voice's /v1/realtime gets audio back:
a client written for OpenAI's API runs unchanged against the tiny model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fixtures.speech import track
from pipecat.frames.frames import ErrorFrame, Frame, InputAudioRawFrame, LLMContextFrame, TTSAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.workers.runner import WorkerRunner
from realtime_support import tiny_engine as tiny_engine_fixture  # noqa: F401 (registers the fixture)
from realtime_support import until
from session_support import Script, speech
from transports_support import agent_app, serving

pytestmark = pytest.mark.timeout(300)

CHUNK_SECS = 0.02


class Collector(FrameProcessor):
    """The end of the pipeline: keeps the service's audio and any error, both directions."""

    def __init__(self) -> None:
        super().__init__()
        self.audio: list[TTSAudioRawFrame] = []
        self.errors: list[ErrorFrame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio.append(frame)
        elif isinstance(frame, ErrorFrame):
            self.errors.append(frame)
        await self.push_frame(frame, direction)

    @property
    def seconds(self) -> float:
        return sum(f.num_frames / f.sample_rate for f in self.audio)


async def test_pipecat_openai_realtime_service_gets_audio_from_mimo_voice(tiny_engine):
    app = agent_app(tiny_engine, "server.auth_token=k3y")
    async with serving(app) as base_url:
        llm = OpenAIRealtimeLLMService(api_key="k3y", base_url=base_url.replace("http", "ws") + "/v1/realtime")
        collector = Collector()
        worker = PipelineWorker(
            Pipeline([llm, collector]),
            params=PipelineParams(audio_in_sample_rate=16_000, audio_out_sample_rate=24_000),
        )
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        running = asyncio.create_task(runner.run())
        try:
            assert await until(lambda: any(s.service.session for s in app.state.realtime.values()), timeout=30)
            (state,) = app.state.realtime.values()
            # Forced words, so that each answer surely speaks (babble may end before any audio).
            greeting, reply = speech(tiny_engine, "Hello there.", 8), speech(tiny_engine, "I am fine.", 8)
            state.service.session.text_hook = Script(greeting, reply)
            # The context starts a first answer; then speech, and the silence a microphone goes on sending: server
            # VAD ends the turn and the agent answers it.
            await worker.queue_frame(LLMContextFrame(LLMContext()))
            turn = track(0.3, "Hello, how are you today?", 1.5, sample_rate=16_000)
            step = int(16_000 * CHUNK_SECS)
            for offset in range(0, len(turn.pcm), step):
                chunk = turn.pcm[offset : offset + step].tobytes()
                await worker.queue_frame(InputAudioRawFrame(audio=chunk, sample_rate=16_000, num_channels=1))
                await asyncio.sleep(CHUNK_SECS)
            assert await until(lambda: collector.seconds > 0.5 or bool(collector.errors), timeout=90)
            assert not collector.errors, [e.error for e in collector.errors]
            pcm = np.frombuffer(b"".join(f.audio for f in collector.audio), np.int16)
            assert collector.audio[0].sample_rate == 24_000 and np.abs(pcm).max() > 1000
            assert app.state.hub.sessions, "the client is counted as a session"

            def heard_speech() -> bool:
                return any(t.role == "user" and t.audio_seconds > 1 for t in state.service.session.history)

            assert await until(heard_speech, timeout=60), "the user's speech never made a turn"

            def answered() -> bool:  # the greeting may be cut by the user's speech; the reply to it must come
                return any(t.role == "assistant" and t.text == "I am fine." for t in state.service.session.history)

            assert await until(answered, timeout=90), state.service.session.history
            assert await until(lambda: collector.seconds > 1.2, timeout=30), "the reply's audio did not come back"
        finally:
            await worker.cancel()
            await asyncio.wait_for(running, 30)
        assert await until(lambda: not app.state.hub.sessions, timeout=10)
