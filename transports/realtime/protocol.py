"""The OpenAI Realtime protocol as mimo-voice speaks it: session configuration, client events, server events.

Client events are validated with pydantic (the beta's flat session fields are accepted next to the GA ones; the
event names themselves did not change). Server events are plain dicts built here, in GA names (a beta client gets
the beta names, see ``BETA_SERVER_NAMES``), so that every event the endpoint sends has one definition. Unknown
session fields are ignored (clients send voice, transcription, tracing... settings that have no meaning here);
known fields with bad values are refused with an ``error`` event.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PCM_RATE = 24_000
G711_RATE = 8_000
# Server events whose beta name differs; a client that sends "OpenAI-Beta: realtime=v1" gets the beta names. (Client
# events kept their names from beta to GA; what changed there is the session's shape, which both parse.)
BETA_SERVER_NAMES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- session configuration ---


class AudioFormat(_Lenient):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: Literal[24000, 8000] = 24000

    @property
    def sample_rate(self) -> int:
        return PCM_RATE if self.type == "audio/pcm" else G711_RATE

    @field_validator("rate")
    @classmethod
    def _rate_matches(cls, rate: int, info: Any) -> int:
        kind = info.data.get("type", "audio/pcm")
        if kind == "audio/pcm" and rate != PCM_RATE:
            raise ValueError("audio/pcm is 24000 Hz")
        return rate


BETA_FORMATS = {
    "pcm16": AudioFormat(type="audio/pcm"),
    "g711_ulaw": AudioFormat(type="audio/pcmu", rate=8000),
    "g711_alaw": AudioFormat(type="audio/pcma", rate=8000),
}


def _format(value: Any) -> Any:
    """A GA format object, or a beta format name."""
    if isinstance(value, str):
        if value not in BETA_FORMATS:
            raise ValueError(f"unsupported audio format {value!r}; use one of {', '.join(BETA_FORMATS)}")
        return BETA_FORMATS[value]
    if isinstance(value, dict) and value.get("type") in ("audio/pcmu", "audio/pcma"):
        return {**value, "rate": value.get("rate", G711_RATE)}
    return value


class ServerVAD(_Lenient):
    """Turns by voice activity (the project's VAD). ``semantic_vad`` is taken as server VAD with its defaults."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(default=300, ge=0, le=5000)
    silence_duration_ms: int = Field(default=500, ge=0, le=10000)
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = Field(default=None, ge=1000)
    eagerness: Literal["low", "medium", "high", "auto"] | None = None


class FunctionTool(_Lenient):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    def schema_for_prompt(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


class ToolChoiceFunction(_Lenient):
    type: Literal["function"]
    name: str


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceFunction
MaxTokens = Annotated[int, Field(ge=1, le=4096)] | Literal["inf"]
Modalities = list[Literal["audio", "text"]]


class MimoExtension(_Lenient):
    """mimo-voice's own session settings (field ``mimo``): ``mode`` picks thinking (reasons in text first, never
    spoken) or non_thinking."""

    mode: Literal["thinking", "non_thinking"] | None = None


class InputAudio(_Lenient):
    format: AudioFormat | None = None
    turn_detection: ServerVAD | None = ServerVAD()  # pydantic copies it per instance

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        return _format(value)


class OutputAudio(_Lenient):
    format: AudioFormat | None = None
    voice: str | None = None
    speed: float | None = None

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        return _format(value)


class AudioConfig(_Lenient):
    input: InputAudio | None = None
    output: OutputAudio | None = None


class SessionUpdate(_Lenient):
    """A ``session.update`` payload: GA fields, or the beta's flat ones."""

    type: Literal["realtime"] | None = None
    model: str | None = None
    instructions: str | None = None
    output_modalities: Modalities | None = None
    modalities: Modalities | None = None  # beta
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    max_output_tokens: MaxTokens | None = None
    max_response_output_tokens: MaxTokens | None = None  # beta
    audio: AudioConfig | None = None
    input_audio_format: AudioFormat | None = None  # beta
    output_audio_format: AudioFormat | None = None  # beta
    turn_detection: ServerVAD | None = None  # beta; "turn_detection" in fields_set with None means off
    mimo: MimoExtension | None = None

    @field_validator("input_audio_format", "output_audio_format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        return _format(value)


def _audio_only() -> Modalities:
    return ["audio"]


class SessionConfig(BaseModel):
    """The session as it stands (what ``session.created``/``updated`` describe)."""

    id: str = Field(default_factory=lambda: new_id("sess"))
    model: str = "mimo-audio"
    instructions: str = ""
    output_modalities: Modalities = Field(default_factory=lambda: _audio_only())
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    max_output_tokens: MaxTokens = "inf"
    input_format: AudioFormat = Field(default_factory=AudioFormat)
    output_format: AudioFormat = Field(default_factory=AudioFormat)
    turn_detection: ServerVAD | None = ServerVAD()  # pydantic copies it per instance
    voice: str = "mimo"
    mode: Literal["thinking", "non_thinking"] = "non_thinking"

    def updated(self, update: SessionUpdate) -> SessionConfig:
        """This session with ``update`` applied (fields it does not name keep their values)."""
        changes: dict[str, Any] = {}
        for name in ("model", "instructions", "tools", "tool_choice"):
            if name in update.model_fields_set and getattr(update, name) is not None:
                changes[name] = getattr(update, name)
        modalities = update.output_modalities or update.modalities
        if modalities:
            changes["output_modalities"] = ["text"] if modalities == ["text"] else ["audio"]
        max_tokens = update.max_output_tokens or update.max_response_output_tokens
        if max_tokens is not None:
            changes["max_output_tokens"] = max_tokens
        if update.input_audio_format is not None:
            changes["input_format"] = update.input_audio_format
        if update.output_audio_format is not None:
            changes["output_format"] = update.output_audio_format
        if "turn_detection" in update.model_fields_set:
            changes["turn_detection"] = update.turn_detection
        if update.audio is not None:
            changes.update(_audio_changes(update.audio))
        if update.mimo is not None and update.mimo.mode is not None:
            changes["mode"] = update.mimo.mode
        return self.model_copy(update=changes)

    def describe(self) -> dict[str, Any]:
        """The GA session object."""
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model,
            "output_modalities": self.output_modalities,
            "instructions": self.instructions,
            "tools": [tool.model_dump() for tool in self.tools],
            "tool_choice": self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump(),
            "max_output_tokens": self.max_output_tokens,
            "audio": {
                "input": {
                    "format": _describe_format(self.input_format),
                    "turn_detection": self.turn_detection.model_dump(exclude_none=True)
                    if self.turn_detection
                    else None,
                    "transcription": None,
                    "noise_reduction": None,
                },
                "output": {"format": _describe_format(self.output_format), "voice": self.voice, "speed": 1.0},
            },
            "mimo": {"mode": self.mode},
        }


def _describe_format(audio_format: AudioFormat) -> dict[str, Any]:
    return {"type": audio_format.type, "rate": audio_format.sample_rate}


def _audio_changes(audio: AudioConfig) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if audio.input is not None:
        if audio.input.format is not None:
            changes["input_format"] = audio.input.format
        if "turn_detection" in audio.input.model_fields_set:
            changes["turn_detection"] = audio.input.turn_detection
    if (output := audio.output) is not None:
        if output.format is not None:
            changes["output_format"] = output.format
        if output.voice:
            changes["voice"] = output.voice
    return changes


# --- client events ---


class ContentPart(_Lenient):
    type: Literal["input_text", "input_audio", "text", "output_text", "audio", "output_audio"]
    text: str | None = None
    audio: str | None = None  # base64, in the session's input format
    transcript: str | None = None


class Item(_Lenient):
    id: str | None = None
    type: Literal["message", "function_call", "function_call_output"]
    role: Literal["user", "assistant", "system"] | None = None
    content: list[ContentPart] = Field(default_factory=list)
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ResponseParams(_Lenient):
    instructions: str | None = None
    output_modalities: Modalities | None = None
    modalities: Modalities | None = None  # beta
    max_output_tokens: MaxTokens | None = None
    max_response_output_tokens: MaxTokens | None = None  # beta
    conversation: Literal["auto", "none"] | str | None = None
    metadata: dict[str, Any] | None = None


class ClientEvent(_Lenient):
    type: str
    event_id: str | None = None


class SessionUpdateEvent(ClientEvent):
    session: dict[str, Any]


class AppendEvent(ClientEvent):
    audio: str


class ItemCreateEvent(ClientEvent):
    item: Item
    previous_item_id: str | None = None


class TruncateEvent(ClientEvent):
    item_id: str
    content_index: int = Field(default=0, ge=0)
    audio_end_ms: int = Field(ge=0)


class ItemIdEvent(ClientEvent):
    item_id: str


class ResponseCreateEvent(ClientEvent):
    response: ResponseParams = Field(default_factory=ResponseParams)


class ResponseCancelEvent(ClientEvent):
    response_id: str | None = None


CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    "session.update": SessionUpdateEvent,
    "input_audio_buffer.append": AppendEvent,
    "input_audio_buffer.commit": ClientEvent,
    "input_audio_buffer.clear": ClientEvent,
    "output_audio_buffer.clear": ClientEvent,
    "conversation.item.create": ItemCreateEvent,
    "conversation.item.truncate": TruncateEvent,
    "conversation.item.delete": ItemIdEvent,
    "conversation.item.retrieve": ItemIdEvent,
    "response.create": ResponseCreateEvent,
    "response.cancel": ResponseCancelEvent,
}


class ProtocolError(ValueError):
    """A client event the server cannot take; becomes an ``error`` event (the socket stays open)."""

    def __init__(self, code: str, message: str, event_id: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.event_id, self.param = code, message, event_id, param

    def event(self) -> dict[str, Any]:
        error: dict[str, str | None] = {"type": "invalid_request_error", "code": self.code, "message": self.message}
        error |= {"param": self.param, "event_id": self.event_id}
        return {"type": "error", "error": error}


def parse_client_event(message: Any) -> ClientEvent:
    """A decoded JSON message as a typed client event, or a ProtocolError that says what is wrong."""
    if not isinstance(message, dict):
        raise ProtocolError("invalid_json", "a client event must be a JSON object")
    event_id = message.get("event_id") if isinstance(message.get("event_id"), str) else None
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("missing_type", "a client event needs a string 'type'", event_id, "type")
    model = CLIENT_EVENTS.get(kind)
    if model is None:
        raise ProtocolError("invalid_event_type", f"unknown client event type {kind!r}", event_id, "type")
    try:
        return model.model_validate(message)
    except ValidationError as exc:
        raise validation_error(exc, event_id) from None


def validation_error(exc: ValidationError, event_id: str | None, prefix: str = "") -> ProtocolError:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return ProtocolError("invalid_value", f"invalid {prefix or 'event'}: {problems}", event_id, param)


def parse_session_update(event: SessionUpdateEvent, current: SessionConfig) -> SessionConfig:
    try:
        return current.updated(SessionUpdate.model_validate(event.session))
    except ValidationError as exc:
        raise validation_error(exc, event.event_id, "session") from None


# --- server events ---


def server_event(kind: str, **fields: Any) -> dict[str, Any]:
    """A server event; the serializer stamps its ``event_id`` when it sends it."""
    return {"type": kind, **fields}


def message_item(item_id: str, role: str, content: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": status,
        "role": role,
        "content": content,
    }


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def function_output_item(item_id: str, call_id: str, output: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call_output",
        "status": "completed",
        "call_id": call_id,
        "output": output,
    }
