"""The barge-in guard: while the bot speaks, only speech of barge_in_min_speech_secs starts a user turn."""

from __future__ import annotations

import numpy as np
import pytest
from agent_harness import FRAME_SECS, EnergyVAD, Harness, input_frames, silence, tone, wait_until
from mimo_voice.agent.pipeline import user_turn_strategies
from mimo_voice.agent.turns import BargeInGuardUserTurnStartStrategy, VoicedSpeechProbe
from mimo_voice.configs import load_config
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    UserStartedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregator, LLMUserAggregatorParams


class UserSide:
    """A user aggregator with the agent's VAD probe and turn strategies, fed synthetic audio."""

    def __init__(self, *, vad_start_secs: float = 0.1, vad_stop_secs: float = 0.5, overrides=()) -> None:
        self.config = load_config(None, list(overrides))
        self.probe = VoicedSpeechProbe(EnergyVAD(start_secs=vad_start_secs, stop_secs=vad_stop_secs))
        params = LLMUserAggregatorParams(
            vad_analyzer=self.probe, user_turn_strategies=user_turn_strategies(self.config, self.probe)
        )
        self.harness = Harness([LLMUserAggregator(LLMContext(), params=params)])

    async def __aenter__(self) -> UserSide:
        await self.harness.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.harness.__aexit__(*exc)

    async def bot_speaks(self) -> None:
        await self.harness.send(BotStartedSpeakingFrame())

    async def user(self, *pieces: np.ndarray) -> None:
        await self.harness.play(input_frames(np.concatenate(pieces)))

    def frames(self, kind) -> list:
        return self.harness.sink.of(kind)

    def speech_frames_before_turn(self) -> int:
        """Loud input frames that went by before the user turn started."""
        count = 0
        for frame in self.harness.sink.frames:
            if isinstance(frame, UserStartedSpeakingFrame):
                return count
            if isinstance(frame, InputAudioRawFrame) and np.abs(np.frombuffer(frame.audio, np.int16)).max() > 1000:
                count += 1
        raise AssertionError("no user turn started")


async def test_a_150ms_blip_while_the_bot_speaks_does_not_interrupt_it():
    async with UserSide() as side:  # VAD start_secs 0.1: the VAD does fire on the blip
        await side.bot_speaks()
        await side.user(silence(0.2), tone(0.15), silence(0.8))
        await wait_until(lambda: side.frames(VADUserStoppedSpeakingFrame), what="VAD stop")
    assert side.frames(VADUserStartedSpeakingFrame)
    assert not side.frames(UserStartedSpeakingFrame) and not side.frames(InterruptionFrame)


async def test_a_150ms_blip_with_default_vad_settings_does_not_interrupt():
    config = load_config(None)
    async with UserSide(vad_start_secs=config.vad.start_secs, vad_stop_secs=config.vad.stop_secs) as side:
        await side.bot_speaks()
        await side.user(silence(0.2), tone(0.15), silence(0.8))
    assert not side.frames(UserStartedSpeakingFrame) and not side.frames(InterruptionFrame)


async def test_a_600ms_utterance_interrupts_once_it_has_lasted_the_minimum():
    async with UserSide() as side:
        await side.bot_speaks()
        await side.user(silence(0.2), tone(0.6), silence(0.8))
        await wait_until(lambda: side.frames(InterruptionFrame), what="the interruption")
    assert len(side.frames(UserStartedSpeakingFrame)) == 1
    voiced_secs = side.speech_frames_before_turn() * FRAME_SECS
    assert 0.4 <= voiced_secs < 0.6  # not at VAD start (0.1 s), not only at the end of the utterance


async def test_the_minimum_is_configurable():
    async with UserSide(overrides=["agent.barge_in_min_speech_secs=0.2"]) as side:
        await side.bot_speaks()
        await side.user(silence(0.2), tone(0.3), silence(0.8))
        await wait_until(lambda: side.frames(InterruptionFrame), what="the interruption")
    assert 0.2 <= side.speech_frames_before_turn() * FRAME_SECS < 0.3


async def test_silence_before_the_vad_reports_a_stop_is_not_speech():
    async with UserSide() as side:  # 0.3 s of speech, then 0.45 s of silence the VAD still calls "speaking"
        await side.bot_speaks()
        await side.user(tone(0.3), silence(0.45), silence(0.5))
    assert side.frames(VADUserStartedSpeakingFrame) and not side.frames(UserStartedSpeakingFrame)


async def test_speech_across_a_short_pause_adds_up():
    async with UserSide() as side:
        await side.bot_speaks()
        await side.user(tone(0.25), silence(0.2), tone(0.25), silence(0.8))
        await wait_until(lambda: side.frames(InterruptionFrame), what="the interruption")
    assert side.speech_frames_before_turn() * FRAME_SECS >= 0.4


async def test_when_the_bot_is_silent_a_turn_starts_at_vad_start():
    async with UserSide() as side:
        await side.user(silence(0.2), tone(0.15), silence(0.8))
        await wait_until(lambda: side.frames(InterruptionFrame), what="the turn")
    assert side.speech_frames_before_turn() * FRAME_SECS <= 0.15


async def test_a_user_still_talking_when_the_bot_stops_gets_the_turn():
    async with UserSide() as side:
        await side.bot_speaks()
        await side.user(tone(0.25))
        assert not side.frames(UserStartedSpeakingFrame)
        await side.harness.send(BotStoppedSpeakingFrame())
        await wait_until(lambda: side.frames(UserStartedSpeakingFrame), what="the turn")


def test_negative_minimum_is_rejected():
    with pytest.raises(ValueError):
        BargeInGuardUserTurnStartStrategy(probe=VoicedSpeechProbe(EnergyVAD()), min_speech_secs=-1)
