"""Frames a front-end sends MiMoAudioService to drive turns itself instead of (or besides) the pipeline's VAD.

The WebRTC and phone paths never send them: their turns come from the user aggregator's VAD. A protocol front-end
(the OpenAI Realtime endpoint) uses them for client-driven turns, manual responses, cancellation and rollback. They
are system frames so that they stay in order with the user's audio (``InputAudioRawFrame`` is one too).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipecat.frames.frames import SystemFrame


@dataclass
class StartUserTurnFrame(SystemFrame):
    """The user's turn has begun: stream every audio frame that follows into the session."""


@dataclass
class EndUserTurnFrame(SystemFrame):
    """The user's turn is over; the assistant answers at once when ``respond``, else at the next RespondFrame."""

    respond: bool = True


@dataclass
class ClearUserAudioFrame(SystemFrame):
    """Forget the user's audio since the last answer (a client clearing its input buffer)."""


@dataclass
class AddTextFrame(SystemFrame):
    """Put a text turn into the conversation: ``user`` (typed), ``tool`` (a result) or ``system`` (a note)."""

    role: str
    text: str


@dataclass
class RespondFrame(SystemFrame):
    """Answer now. ``instructions`` go in first as a system note for this answer only; ``max_samples`` (24 kHz)
    cuts the answer once that much audio was generated; ``text_only`` (None: the service's default) says the client
    reads the words and plays no audio."""

    instructions: str | None = None
    max_samples: int | None = None
    text_only: bool | None = None


@dataclass
class CancelResponseFrame(SystemFrame):
    """Stop the answer and roll the session back to ``played_samples`` (24 kHz) of it; None: to what the output
    transport played, as a barge-in does."""

    played_samples: int | None = None
