"""RealtimeSerializer: the OpenAI Realtime wire format for pipecat's ``FastAPIWebsocketTransport``.

In: every JSON text message becomes a :class:`ClientEventFrame` (``input_audio_buffer.append`` with its audio
already decoded to 16-bit PCM at the pipeline's input rate), or a :class:`ClientErrorFrame` that says what is wrong.
Audio is not returned as ``InputAudioRawFrame``: the input transport would queue it apart from the other frames,
and a ``commit`` could overtake the audio it commits. The session's input processor turns it into audio frames.

Out: server events (``OutputTransportMessage[Urgent]Frame`` with a dict) are sent as JSON with an ``event_id``;
audio the output transport writes becomes ``response.output_audio.delta`` of the audio part opened last, in the
session's output format. Events that close a response are sent once: after a barge-in the session repeats them
(the output transport may have dropped the queued ones), and the copies that were already sent are skipped.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from pipecat.audio.resamplers.base_audio_resampler import BaseAudioResampler
from pipecat.audio.utils import alaw_to_pcm, create_stream_resampler, pcm_to_alaw, pcm_to_ulaw, ulaw_to_pcm
from pipecat.frames.frames import (
    Frame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    SystemFrame,
)
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.serializers.base_serializer import FrameSerializer

from .protocol import (
    BETA_SERVER_NAMES,
    AppendEvent,
    AudioFormat,
    ClientEvent,
    ProtocolError,
    new_id,
    parse_client_event,
)

CLOSING_EVENTS = {
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
}


@dataclass
class ClientEventFrame(SystemFrame):
    """One client event; ``audio`` is the decoded PCM of an ``input_audio_buffer.append`` (pipeline input rate)."""

    event: ClientEvent = field(default_factory=lambda: ClientEvent(type=""))
    audio: bytes | None = None
    sample_rate: int = 0


@dataclass
class ClientErrorFrame(SystemFrame):
    """A client message that could not be taken; the session answers it with an ``error`` event."""

    error: ProtocolError = field(default_factory=lambda: ProtocolError("invalid_event", ""))


@dataclass
class AudioFormats:
    """The session's current formats, shared with the session (``session.update`` changes them)."""

    input: AudioFormat = field(default_factory=AudioFormat)
    output: AudioFormat = field(default_factory=AudioFormat)


class RealtimeSerializer(FrameSerializer):
    """``beta``: send the beta names of the server events that were renamed for GA. ``done`` collects the ids of
    the responses whose ``response.done`` went out (a shared set: the session reads it)."""

    def __init__(self, formats: AudioFormats, *, beta: bool = False, done: set[str] | None = None) -> None:
        super().__init__()
        self.formats = formats
        self.done = set() if done is None else done  # ids of the responses whose response.done was sent
        self._names = BETA_SERVER_NAMES if beta else {}
        self._in_rate = 16_000  # the pipeline's input rate, from setup()
        self._in_resampler = create_stream_resampler()
        self._out_resampler = create_stream_resampler()
        self._audio_part: dict[str, Any] | None = None  # ids of the audio part that output audio belongs to
        self._closed: set[tuple[str, str, str]] = set()  # closing events already sent

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]  # as FrameSerializer
        self._in_rate = setup.audio_in_sample_rate or self._in_rate

    # --- in ---

    async def deserialize(self, data: str | bytes) -> Frame | None:
        try:
            event = parse_client_event(_json(data))
            if not isinstance(event, AppendEvent):
                return ClientEventFrame(event=event)
            pcm = await self.decode_audio(event.audio, event.event_id)
            return ClientEventFrame(event=event, audio=pcm, sample_rate=self._in_rate)
        except ProtocolError as exc:
            return ClientErrorFrame(error=exc)

    async def decode_audio(self, audio_b64: str, event_id: str | None) -> bytes:
        return await decode_audio(audio_b64, self.formats.input, self._in_rate, self._in_resampler, event_id)

    # --- out ---

    async def serialize(self, frame: Frame) -> str | bytes | None:
        if isinstance(frame, (OutputTransportMessageFrame, OutputTransportMessageUrgentFrame)):
            return self._event(frame.message)
        if isinstance(frame, OutputAudioRawFrame) and self._audio_part is not None:
            audio = await self._encode_audio(frame)
            return self._event({"type": "response.output_audio.delta", **self._audio_part, "delta": audio})
        return None

    def _event(self, event: dict[str, Any]) -> str | None:
        kind = event.get("type", "")
        if kind in CLOSING_EVENTS:
            key = (kind, str(event.get("response_id") or event.get("response", {}).get("id")), _item_id(event))
            if key in self._closed:
                return None
            self._closed.add(key)
        if kind == "response.content_part.added" and event["part"]["type"] == "audio":
            self._audio_part = {key: event[key] for key in ("response_id", "item_id", "output_index", "content_index")}
        elif kind in ("response.output_audio.done", "response.done"):
            self._audio_part = None
        if kind == "response.done":
            self.done.add(event["response"]["id"])
        event = {"event_id": new_id("event"), **event, "type": self._names.get(kind, kind)}
        return json.dumps(event, ensure_ascii=False)

    async def _encode_audio(self, frame: OutputAudioRawFrame) -> str:
        audio_format = self.formats.output
        if audio_format.type == "audio/pcmu":
            data = await pcm_to_ulaw(frame.audio, frame.sample_rate, audio_format.sample_rate, self._out_resampler)
        elif audio_format.type == "audio/pcma":
            data = await pcm_to_alaw(frame.audio, frame.sample_rate, audio_format.sample_rate, self._out_resampler)
        else:
            data = await self._out_resampler.resample(frame.audio, frame.sample_rate, audio_format.sample_rate)
        return base64.b64encode(data).decode()


async def decode_audio(
    audio_b64: str, audio_format: AudioFormat, to_rate: int, resampler: BaseAudioResampler, event_id: str | None
) -> bytes:
    """Base64 audio in ``audio_format`` as 16-bit PCM at ``to_rate``, or a ProtocolError naming the event."""
    try:
        raw = base64.b64decode(audio_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_base64", "audio is not valid base64", event_id, "audio") from None
    if audio_format.type == "audio/pcmu":
        return await ulaw_to_pcm(raw, audio_format.sample_rate, to_rate, resampler)
    if audio_format.type == "audio/pcma":
        return await alaw_to_pcm(raw, audio_format.sample_rate, to_rate, resampler)
    if len(raw) % 2:
        raise ProtocolError("invalid_audio", "audio/pcm must be whole 16-bit samples", event_id, "audio")
    return await resampler.resample(raw, audio_format.sample_rate, to_rate)


def _json(data: str | bytes) -> Any:
    if isinstance(data, bytes):
        raise ProtocolError("invalid_json", "client events are JSON text messages, not binary")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", f"not valid JSON: {exc.msg} at position {exc.pos}") from None


def _item_id(event: dict[str, Any]) -> str:
    item = event.get("item")
    return str(event.get("item_id") or (item.get("id") if isinstance(item, dict) else ""))
