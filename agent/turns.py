"""Barge-in guard: while the agent speaks, a user turn starts only after enough voiced speech.

A cough, a click or an "mm-hm" makes the VAD fire but must not stop the agent. pipecat 1.14 decides when a user turn
starts with start strategies on the user aggregator; ``MinWordsUserTurnStartStrategy`` needs transcripts, which a
speech-to-speech pipeline does not have, so this strategy measures speech on VAD time instead.

Voiced time must not count the pause the VAD waits through before it reports a stop (``stop_secs``, 0.5 s by
default): a 150 ms blip is followed by 500 ms of silence in which the VAD still says "speaking". ``VoicedSpeechProbe``
wraps the pipeline's VAD analyzer and remembers whether its latest window was speech, so the strategy adds only the
audio the VAD itself judged voiced.
"""

from __future__ import annotations

from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADState
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_start import BaseUserTurnStartStrategy

from .vad import DelegatingVAD

_VOICED_STATES = (VADState.STARTING, VADState.SPEAKING)


class VoicedSpeechProbe(DelegatingVAD):
    """A VAD analyzer that delegates to ``inner`` and remembers whether the audio it last analysed was voiced.

    The VAD's own state machine only changes state after ``start_secs``/``stop_secs``; the intermediate
    STARTING/STOPPING states say whether the newest window was speech, which is what a voiced-time count needs.
    """

    def __init__(self, inner: VADAnalyzer) -> None:
        super().__init__(inner)
        self.voiced = False

    async def analyze_audio(self, buffer: bytes) -> VADState:
        state = await self._inner.analyze_audio(buffer)
        self.voiced = state in _VOICED_STATES
        return state


class BargeInGuardUserTurnStartStrategy(BaseUserTurnStartStrategy):
    """Starts a user turn at VAD start, except while the bot speaks: then only after ``min_speech_secs`` of voiced
    speech (counting the ``start_secs`` the VAD needed to fire). Speech that ends sooner never becomes a turn.

    ``probe`` must be the analyzer the user aggregator runs (the aggregator analyses each audio frame before its turn
    strategies see it, so ``probe.voiced`` describes the frame at hand).
    """

    def __init__(self, *, probe: VoicedSpeechProbe, min_speech_secs: float, **kwargs) -> None:
        super().__init__(**kwargs)
        if min_speech_secs < 0:
            raise ValueError("min_speech_secs must be >= 0")
        self._probe = probe
        self._min_speech_secs = min_speech_secs
        self._bot_speaking = False
        self._vad_speaking = False
        self._voiced_secs = 0.0

    async def handle_user_turn_started(self) -> None:
        self._voiced_secs = 0.0

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            if self._vad_speaking:  # the user kept talking after the bot finished: a turn like any other
                return await self._start_turn()
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._vad_speaking = True
            self._voiced_secs = frame.start_secs
            if not self._bot_speaking or self._voiced_secs >= self._min_speech_secs:
                return await self._start_turn()
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._vad_speaking = False
            self._voiced_secs = 0.0
        elif isinstance(frame, InputAudioRawFrame) and self._vad_speaking and self._bot_speaking:
            if self._probe.voiced:
                self._voiced_secs += frame.num_frames / frame.sample_rate
            if self._voiced_secs >= self._min_speech_secs:
                return await self._start_turn()
        return ProcessFrameResult.CONTINUE

    async def _start_turn(self) -> ProcessFrameResult:
        await self.trigger_user_turn_started()
        return ProcessFrameResult.STOP
