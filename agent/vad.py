"""Voice activity and end-of-turn analyzers for the pipelines, chosen by ``config.vad``.

``webrtcvad`` (the default) is Google's WebRTC GMM detector: no model file, ~10 µs per 20 ms frame,
8/16/32/48 kHz, a binary decision per 10/20/30 ms frame. Silero (pipecat's ONNX model) is
more robust in noise and music, but only runs at 8 or 16 kHz and costs ~0.1 ms per 32 ms window.
smart-turn v3 (pipecat's ONNX model) decides the end of a turn from prosody instead of a fixed
silence: ``create_turn_analyzer`` returns it when ``config.vad.smart_turn`` is on.
"""

from __future__ import annotations

import webrtcvad
from mimo_voice.configs.schema import VADSection
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState

WEBRTCVAD_SAMPLE_RATES = (8000, 16000, 32000, 48000)
SILERO_SAMPLE_RATES = (8000, 16000)

# webrtcvad keeps saying "speech" for a while after speech ends: its hangover for runs longer
# than 6 frames (vad_core.c's kOverHangMax2* tables, per mode, for 10/20/30 ms frames), plus the
# frame that holds the fading tail of the last word (measured on espeak-ng speech).
_HANGOVER_FRAMES = {0: (15, 8, 6), 1: (15, 8, 6), 2: (10, 6, 4), 3: (10, 6, 4)}


class WebrtcvadAnalyzer(VADAnalyzer):
    """pipecat ``VADAnalyzer`` on py-webrtcvad: confidence is 1.0 for a speech frame, else 0.0.

    ``stop_secs`` counts real silence: the detector's own hangover is subtracted from the
    silent frames the base state machine waits for, so "stopped" comes ``stop_secs`` after the
    last voiced frame, not ~100 ms later. (If ``stop_secs`` is shorter than the hangover, the
    stop comes one frame after the hangover.)
    """

    def __init__(
        self,
        *,
        aggressiveness: int = 2,
        frame_ms: int = 20,
        sample_rate: int | None = None,
        params: VADParams | None = None,
    ) -> None:
        if aggressiveness not in _HANGOVER_FRAMES:
            raise ValueError(f"webrtcvad aggressiveness must be 0, 1, 2 or 3, not {aggressiveness!r}")
        if frame_ms not in (10, 20, 30):
            raise ValueError(f"webrtcvad frames must be 10, 20 or 30 ms, not {frame_ms!r}")
        if sample_rate is not None:
            _check_rate(sample_rate, WEBRTCVAD_SAMPLE_RATES, "webrtcvad")
        self._frame_ms = frame_ms
        self._hangover_frames = _HANGOVER_FRAMES[aggressiveness][(10, 20, 30).index(frame_ms)]
        self._vad = webrtcvad.Vad(aggressiveness)
        super().__init__(sample_rate=sample_rate, params=params)

    @property
    def frame_ms(self) -> int:
        return self._frame_ms

    def set_sample_rate(self, sample_rate: int) -> None:
        _check_rate(self._init_sample_rate or sample_rate, WEBRTCVAD_SAMPLE_RATES, "webrtcvad")
        super().set_sample_rate(sample_rate)

    def set_params(self, params: VADParams) -> None:
        super().set_params(params)
        self._vad_stop_frames = max(1, self._vad_stop_frames - self._hangover_frames)

    def num_frames_required(self) -> int:
        return self.sample_rate * self._frame_ms // 1000

    def voice_confidence(self, buffer: bytes) -> float:
        return 1.0 if self._vad.is_speech(buffer, self.sample_rate) else 0.0


def _check_rate(sample_rate: int, supported: tuple[int, ...], name: str) -> None:
    if sample_rate not in supported:
        rates = ", ".join(str(rate) for rate in supported)
        raise ValueError(f"{name} runs at {rates} Hz, not {sample_rate} Hz")


def vad_params(vad: VADSection) -> VADParams:
    return VADParams(
        confidence=vad.confidence, start_secs=vad.start_secs, stop_secs=vad.stop_secs, min_volume=vad.min_volume
    )


def create_vad_analyzer(vad: VADSection, sample_rate: int = 16000) -> VADAnalyzer:
    """The analyzer ``config.vad`` asks for, for a pipeline whose input runs at ``sample_rate``."""
    if vad.analyzer == "silero":
        from pipecat.audio.vad.silero import SileroVADAnalyzer  # loads onnxruntime: only when asked for

        _check_rate(sample_rate, SILERO_SAMPLE_RATES, "Silero VAD")
        return SileroVADAnalyzer(sample_rate=sample_rate, params=vad_params(vad))
    return WebrtcvadAnalyzer(
        aggressiveness=vad.aggressiveness, frame_ms=vad.frame_ms, sample_rate=sample_rate, params=vad_params(vad)
    )


def create_turn_analyzer(vad: VADSection) -> BaseTurnAnalyzer | None:
    """smart-turn v3 (8M parameters, ONNX, CPU) when ``config.vad.smart_turn`` is on, else None.

    Use it in ``TurnAnalyzerUserTurnStopStrategy``; the VAD's ``stop_secs`` should then be short
    (0.2 s) since smart-turn, not the silence, decides when the turn is over.
    """
    if not vad.smart_turn:
        return None
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3

    return LocalSmartTurnAnalyzerV3()


class DelegatingVAD(VADAnalyzer):
    """A VAD analyzer that hands everything to ``inner``; subclasses change :meth:`analyze_audio` only."""

    def __init__(self, inner: VADAnalyzer) -> None:
        super().__init__(params=inner.params)
        self._inner = inner

    @property
    def sample_rate(self) -> int:
        return self._inner.sample_rate

    @property
    def params(self) -> VADParams:
        return self._inner.params

    def num_frames_required(self) -> int:
        return self._inner.num_frames_required()

    def voice_confidence(self, buffer: bytes) -> float:
        return self._inner.voice_confidence(buffer)

    def set_sample_rate(self, sample_rate: int) -> None:
        self._inner.set_sample_rate(sample_rate)

    def set_params(self, params: VADParams) -> None:
        self._inner.set_params(params)

    async def analyze_audio(self, buffer: bytes) -> VADState:
        return await self._inner.analyze_audio(buffer)

    async def cleanup(self) -> None:
        await self._inner.cleanup()
        await super().cleanup()
