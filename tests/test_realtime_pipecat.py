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
from realtime_support import until
from transports_support import agent_app, serving
from transports_support import tiny_engine as tiny_engine_fixture  # noqa: F401 (registers the fixture)

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
            # Speech, then the silence a microphone goes on sending: server VAD ends the turn, the agent answers.
            turn = track(0.3, "Hello, how are you today?", 1.5, sample_rate=16_000)
            await worker.queue_frame(LLMContextFrame(LLMContext()))
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
            (state,) = app.state.realtime.values()

            def heard_speech() -> bool:
                return any(t.role == "user" and t.audio_seconds > 1 for t in state.service.session.history)

            assert await until(heard_speech, timeout=60), "the user's speech never made a turn"
        finally:
            await worker.cancel()
            await asyncio.wait_for(running, 30)
        assert await until(lambda: not app.state.hub.sessions, timeout=10)
