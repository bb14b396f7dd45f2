"""What a session reports: the events it streams while the assistant answers, and its transcript's turns.

Plain dataclasses, like pipecat frames, shared by both sides of the engine (:mod:`.protocol`). ``time`` is
``time.perf_counter()`` when the event was produced in the engine's worker process (the same clock as the
main process on one machine), so latency can be measured without the event loop's scheduling delay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from mimo_voice.streaming.model.audio import SAMPLE_RATE, SAMPLES_PER_FRAME, SAMPLES_PER_PATCH

__all__ = ["SAMPLES_PER_FRAME", "SAMPLES_PER_PATCH", "SAMPLE_RATE"]  # re-exported for the agent and transports


@dataclass
class Turn:
    """One turn of the transcript. An assistant turn's text is what the user heard of it; a user's spoken
    turn has no text (there is no transcript), only its duration."""

    role: str  # user | assistant | system | tool
    text: str
    interrupted: bool = False
    audio_seconds: float = 0.0


@dataclass(frozen=True)
class TextToken:
    """A generated text token. ``thinking`` tokens are reasoning: never spoken."""

    text: str
    token_id: int
    thinking: bool = False
    time: float = 0.0


@dataclass(frozen=True)
class AudioPatch:
    """One generated audio position: 4 codec frames x 8 RVQ codebooks (undelayed)."""

    codes: np.ndarray  # int64 [4, 8]
    index: int  # patch number within this response
    time: float = 0.0


@dataclass(frozen=True)
class AudioChunk:
    """Decoded 24 kHz mono int16 PCM; ``first_sample`` counts from the start of this response."""

    pcm: np.ndarray
    first_sample: int
    sample_rate: int = SAMPLE_RATE
    time: float = 0.0


@dataclass(frozen=True)
class ToolCallText:
    """The raw text between ``<tool_call>`` and ``</tool_call>``; nothing of it is spoken."""

    text: str
    time: float = 0.0


TurnEndReason = Literal["stop", "length", "tool_call", "cancelled", "error"]


@dataclass(frozen=True)
class TurnEnd:
    reason: TurnEndReason
    prompt_positions: int = 0
    generated_positions: int = 0
    error: str | None = None
    time: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


Event = TextToken | AudioPatch | AudioChunk | ToolCallText | TurnEnd
