"""Phone calls: Twilio Media Streams over a websocket (``/ws/twilio``), 8 kHz mu-law in and out.

Point a TwiML ``<Connect><Stream url="wss://HOST/ws/twilio"/></Connect>`` at the server. Twilio
first sends ``connected`` and ``start`` (stream and call ids, custom parameters), then ``media``
events; pipecat's ``TwilioFrameSerializer`` converts the audio and sends ``clear`` on barge-in.
When ``server.auth_token`` is set, the stream must carry it as the custom parameter ``token``
(``<Parameter name="token" value="..."/>``: Twilio stream URLs cannot carry query strings).
With ``TWILIO_ACCOUNT_SID`` and ``TWILIO_AUTH_TOKEN`` in the environment, the end of the
session also hangs up the call through Twilio's REST API; without them, closing the stream
ends the call when no TwiML follows the ``<Connect>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from typing import TYPE_CHECKING

from fastapi import WebSocket, WebSocketDisconnect
from loguru import logger
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketState

if TYPE_CHECKING:
    from .server import SessionHub

HANDSHAKE_TIMEOUT_SECS = 10.0
# Websocket close codes (RFC 6455 and IANA registry).
POLICY_VIOLATION, TRY_AGAIN_LATER = 1008, 1013


class MediaFormat(BaseModel):
    encoding: str = "audio/x-mulaw"
    sampleRate: int = 8000
    channels: int = 1


class StreamStart(BaseModel):
    """The ``start`` payload of a Twilio Media Stream (fields we use; others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    streamSid: str = Field(min_length=1)
    callSid: str | None = None
    accountSid: str | None = None
    mediaFormat: MediaFormat = Field(default_factory=MediaFormat)
    customParameters: dict[str, str] = Field(default_factory=dict)


class HandshakeError(ValueError):
    """The client did not open the stream the Twilio way; the message says how."""


async def read_stream_start(websocket: WebSocket, timeout: float = HANDSHAKE_TIMEOUT_SECS) -> StreamStart:
    """Skip ``connected``, return the ``start`` event's payload."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = _parse(await _receive_text(websocket))
                if message.get("event") == "start":
                    return _stream_start(message)
                if message.get("event") != "connected":
                    raise HandshakeError(f"expected a 'start' event first, got {message.get('event')!r}")
    except TimeoutError:
        raise HandshakeError(f"no 'start' event within {timeout:g} s") from None


async def _receive_text(websocket: WebSocket) -> str:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is None:
        raise HandshakeError("messages must be Twilio Media Streams JSON text, not binary")
    return message["text"]


def _parse(text: str) -> dict:
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        raise HandshakeError("messages must be Twilio Media Streams JSON") from None
    if not isinstance(message, dict):
        raise HandshakeError("messages must be JSON objects")
    return message


def _stream_start(message: dict) -> StreamStart:
    try:
        start = StreamStart.model_validate(message.get("start"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(('start', *map(str, e['loc'])))}: {e['msg']}" for e in exc.errors())
        raise HandshakeError(f"bad 'start' event: {problems}") from None
    media = start.mediaFormat
    if (media.encoding, media.sampleRate, media.channels) != ("audio/x-mulaw", 8000, 1):
        got = f"{media.encoding} {media.sampleRate} Hz x{media.channels}"
        raise HandshakeError(f"unsupported audio {got}: need 8 kHz mono mu-law")
    return start


def twilio_serializer(start: StreamStart) -> TwilioFrameSerializer:
    """The serializer for this stream; it hangs the call up itself when REST credentials are set."""
    account_sid, auth_token = os.environ.get("TWILIO_ACCOUNT_SID"), os.environ.get("TWILIO_AUTH_TOKEN")
    hang_up = bool(account_sid and auth_token and start.callSid)
    return TwilioFrameSerializer(
        stream_sid=start.streamSid,
        call_sid=start.callSid,
        account_sid=account_sid if hang_up else None,
        auth_token=auth_token if hang_up else None,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=hang_up),
    )


async def handle_twilio(websocket: WebSocket, hub: SessionHub) -> None:
    """One phone call: handshake, checks, then the bot until either side hangs up."""
    await websocket.accept()
    try:
        start = await read_stream_start(websocket)
    except HandshakeError as exc:
        logger.warning(f"twilio: refused a stream: {exc}")
        await _close(websocket, POLICY_VIOLATION, str(exc))
        return
    except WebSocketDisconnect:
        return
    expected = hub.config.server.auth_token
    if expected is not None and not secrets.compare_digest(
        start.customParameters.get("token", "").encode(), expected.encode()
    ):
        hub.metrics.sessions_refused.inc("unauthorized")
        await _close(websocket, POLICY_VIOLATION, "missing or wrong 'token' custom parameter")
        return
    session = hub.reserve("twilio", start.streamSid)
    if session is None:
        await _close(websocket, TRY_AGAIN_LATER, hub.busy_message())
        return
    logger.info(f"session {session.id} (twilio call {start.callSid}) started")
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=twilio_serializer(start)
        ),
    )
    await hub.run(session, transport, lambda: _close(websocket, 1000, "call ended"))


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # the peer went first
            await websocket.close(code=code, reason=reason[:120])  # a close reason must fit 123 bytes
