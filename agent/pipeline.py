"""The voice-agent pipeline for one connection: transport in, VAD and turns, MiMo-Audio, transport out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mimo_voice.streaming.engine.events import SAMPLE_RATE
from pipecat.audio.vad.vad_analyzer import VADAnalyzer
from pipecat.observers.base_observer import BaseObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy, TurnAnalyzerUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from .service import MiMoAudioService
from .turns import BargeInGuardUserTurnStartStrategy, VoicedSpeechProbe
from .vad import create_turn_analyzer

if TYPE_CHECKING:
    from mimo_voice.configs import Config
    from mimo_voice.streaming.engine.engine import Engine
    from mimo_voice.tools import ToolRegistry

PIPELINE_IN_RATE = 16_000  # Silero and webrtcvad want 8/16 kHz; the session resamples to the model's 24 kHz


def user_turn_strategies(config: Config, probe: VoicedSpeechProbe) -> UserTurnStrategies:
    """Turn start: VAD, guarded against barge-in by short sounds. Turn end: VAD silence (``vad.stop_secs``), or the
    smart-turn model on top of it when ``vad.smart_turn`` is set."""
    guard = BargeInGuardUserTurnStartStrategy(probe=probe, min_speech_secs=config.agent.barge_in_min_speech_secs)
    turn_analyzer = create_turn_analyzer(config.vad)
    stop: TurnAnalyzerUserTurnStopStrategy | SpeechTimeoutUserTurnStopStrategy
    if turn_analyzer is not None:
        stop = TurnAnalyzerUserTurnStopStrategy(turn_analyzer=turn_analyzer, wait_for_transcript=False)
    else:
        stop = SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.0, wait_for_transcript=False)
    return UserTurnStrategies(start=[guard], stop=[stop])


def create_worker(
    transport: BaseTransport,
    config: Config,
    engine: Engine,
    *,
    vad_analyzer: VADAnalyzer,
    observers: Sequence[BaseObserver] = (),
    tools: ToolRegistry | None = None,
) -> tuple[PipelineWorker, MiMoAudioService]:
    """``[transport.input(), user aggregator (VAD, barge-in guard), MiMoAudioService, transport.output(),
    assistant aggregator]`` in a worker with metrics on. ``engine`` is the process-wide loaded engine."""
    service = MiMoAudioService(engine=engine, config=config, tools=tools)
    output = transport.output()
    service.playback.attach(output)

    probe = VoicedSpeechProbe(vad_analyzer)
    user_params = LLMUserAggregatorParams(vad_analyzer=probe, user_turn_strategies=user_turn_strategies(config, probe))
    context = LLMContext(tools=tools.tools_schema()) if tools is not None else LLMContext()
    aggregators = LLMContextAggregatorPair(context, user_params=user_params)
    pipeline = Pipeline([transport.input(), aggregators.user(), service, output, aggregators.assistant()])
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=PIPELINE_IN_RATE,
            audio_out_sample_rate=SAMPLE_RATE,
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
        observers=list(observers),
    )
    return worker, service
