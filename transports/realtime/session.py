"""The state of one Realtime connection, shared by its two processors (client_events.py, responses.py).

The pipeline is the agent's own (agent/pipeline.py) with two processors added around ``MiMoAudioService``:
``RealtimeInput`` after the transport input (client events: session config, audio, manual turns, items, response
control) and ``RealtimeOutput`` after the service (responses: ``response.created`` ... ``response.done``, server-VAD
events, function-call items). Both share one :class:`RealtimeState`. Events tied to a response's audio go out in
order with it (through the output transport's queue); acknowledgements and errors go out at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mimo_voice.agent.service import MiMoAudioService
from mimo_voice.agent.vad import DelegatingVAD
from mimo_voice.streaming.engine.events import SAMPLE_RATE, SAMPLES_PER_PATCH
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState
from pipecat.metrics.metrics import LLMUsageMetricsData

from .protocol import (
    ServerVAD,
    SessionConfig,
    message_item,
    new_id,
    server_event,
)
from .serializer import AudioFormats

if TYPE_CHECKING:
    from mimo_voice.configs import Config


SAMPLES_PER_MS = SAMPLE_RATE // 1000


class SwitchableVAD(DelegatingVAD):
    """The project's VAD, silenced while the client drives turns itself (``turn_detection: null``)."""

    def __init__(self, inner: VADAnalyzer) -> None:
        super().__init__(inner)
        self.enabled = True

    async def analyze_audio(self, buffer: bytes) -> VADState:
        return await self._inner.analyze_audio(buffer) if self.enabled else VADState.QUIET


@dataclass
class ResponseOptions:
    """What one ``response.create`` asked for (server-VAD responses take the session's settings)."""

    text_only: bool = False
    max_samples: int | None = None


@dataclass
class Response:
    id: str
    item_id: str
    options: ResponseOptions
    samples: int = 0  # 24 kHz samples of audio generated
    transcript: list[str] = field(default_factory=list)
    status: str = "completed"
    awaiting_call: str | None = None  # the tool call that ended it, until its item is out
    outputs: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False


@dataclass
class RealtimeState:
    """What the two processors share: the session config, the conversation's items, the response in flight."""

    config: SessionConfig
    formats: AudioFormats
    vad: SwitchableVAD
    vad_params: VADParams
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id, in conversation order
    next_response: ResponseOptions | None = None
    response: Response | None = None
    pending_calls: dict[str, Any] = field(default_factory=dict)  # call_id -> pipecat result callback
    usage: LLMUsageMetricsData | None = None
    latest_answer: str | None = None  # item id of the newest assistant message: the only one that can be cut
    answer_ms: dict[str, float] = field(default_factory=dict)  # audio generated per assistant item
    done_sent: set[str] = field(default_factory=set)  # responses whose response.done went out (the serializer adds)
    service: MiMoAudioService = field(init=False)  # set once the pipeline that creates it is built

    def last_item_id(self) -> str | None:
        return next(reversed(self.items), None)

    def add_item(self, item: dict[str, Any]) -> dict[str, Any]:
        event = server_event("conversation.item.added", previous_item_id=self.last_item_id(), item=item)
        self.items[item["id"]] = item
        return event

    def commit_user_audio(self, item_id: str | None = None) -> list[dict[str, Any]]:
        """The events of a committed user audio turn (its item has no transcript: nothing transcribes it)."""
        item = message_item(item_id or new_id("item"), "user", [{"type": "input_audio", "transcript": None}])
        committed = server_event(
            "input_audio_buffer.committed", previous_item_id=self.last_item_id(), item_id=item["id"]
        )
        return [committed, self.add_item(item), server_event("conversation.item.done", item=item)]

    def session_options(self) -> ResponseOptions:
        return ResponseOptions(
            text_only=self.config.output_modalities == ["text"], max_samples=max_samples(self.config.max_output_tokens)
        )


def max_samples(max_tokens: int | str) -> int | None:
    """Output tokens, counted as MiMo's audio positions (one 4-frame patch each): the audio they can make."""
    return None if max_tokens == "inf" else int(max_tokens) * SAMPLES_PER_PATCH


def initial_config(config: Config, model: str | None) -> SessionConfig:
    """The session before any update: this server's VAD settings, instructions and mode."""
    vad = ServerVAD(threshold=config.vad.confidence, silence_duration_ms=round(config.vad.stop_secs * 1000))
    return SessionConfig(
        model=model or "mimo-audio", instructions=config.agent.system_prompt, mode=config.agent.mode, turn_detection=vad
    )
