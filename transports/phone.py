"""Phone calls: Twilio Media Streams over a websocket (``/ws/twilio``), 8 kHz mu-law in and out.

Point a TwiML ``<Connect><Stream url="wss://HOST/ws/twilio"/></Connect>`` at the server. Twilio
first sends ``connected`` and ``start`` (stream and call ids, custom parameters), then ``media``
events; pipecat's ``TwilioFrameSerializer`` converts the audio and sends ``clear`` on barge-in.
When the server has a token, the stream must carry it as the custom parameter ``token``
(``<Parameter name="token" value="..."/>``: Twilio stream URLs cannot carry query strings).

With ``TWILIO_AUTH_TOKEN`` in the environment, the websocket request must carry a valid
``X-Twilio-Signature`` (over ``server.public_url`` + ``/ws/twilio`` when set, else the URL the
request names), or it is refused before the handshake; only such a validated stream's
``callSid`` is used, with ``TWILIO_ACCOUNT_SID``, to hang the call up through Twilio's REST API
at the end of the session. Without them, closing the stream ends the call when no TwiML follows
the ``<Connect>``. Each stream gets its own server session id and slot (``streamSid`` is only
echoed back to Twilio); the wait for ``start`` counts against ``server.max_pending_handshakes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
from typing import TYPE_CHECKING

from fastapi import WebSocket, WebSocketDisconnect
from loguru import logger
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketState

from .security import twilio_signature
from .sessions import Refused

if TYPE_CHECKING:
    from .sessions import SessionHub

HANDSHAKE_TIMEOUT_SECS = 10.0
# Websocket close codes (RFC 6455 and IANA registry).
POLICY_VIOLATION, TRY_AGAIN_LATER = 1008, 1013
CALL_SID = re.compile(r"CA[0-9a-f]{32}")


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


def twilio_serializer(start: StreamStart, *, validated: bool) -> TwilioFrameSerializer:
    """The serializer for this stream; it hangs the call up itself when REST credentials are set and the stream's
    request was signed by Twilio (a client-supplied ``callSid`` never meets the server's credentials)."""
    account_sid, auth_token = os.environ.get("TWILIO_ACCOUNT_SID"), os.environ.get("TWILIO_AUTH_TOKEN")
    call_sid = start.callSid if validated and start.callSid and CALL_SID.fullmatch(start.callSid) else None
    hang_up = bool(account_sid and auth_token and call_sid)
    return TwilioFrameSerializer(
        stream_sid=start.streamSid,
        call_sid=call_sid,
        account_sid=account_sid if hang_up else None,
        auth_token=auth_token if hang_up else None,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=hang_up),
    )


def signed_by_twilio(websocket: WebSocket, auth_token: str, public_url: str | None) -> bool:
    """Whether ``X-Twilio-Signature`` signs this request's URL with ``auth_token``. Behind a TLS proxy the server
    sees ws:// where Twilio asked for wss://, so the schemes Twilio may have used are all tried."""
    given = websocket.headers.get("x-twilio-signature", "")
    if not given:
        return False
    query = f"?{websocket.url.query}" if websocket.url.query else ""
    if public_url:
        urls = [public_url.rstrip("/") + websocket.url.path + query]
    else:
        where = websocket.headers.get("host", websocket.url.netloc) + websocket.url.path + query
        urls = [f"{scheme}://{where}" for scheme in ("wss", "https", "ws", "http")]
    return any(secrets.compare_digest(twilio_signature(auth_token, url).encode(), given.encode()) for url in urls)


async def handle_twilio(websocket: WebSocket, hub: SessionHub) -> None:
    """One phone call: signature, handshake, token, a slot, then the bot until either side hangs up."""
    twilio_token = os.environ.get("TWILIO_AUTH_TOKEN") or None
    if twilio_token and not signed_by_twilio(websocket, twilio_token, hub.config.server.public_url):
        hub.metrics.sessions_refused.inc("unauthorized")
        logger.warning("twilio: refused a stream without a valid X-Twilio-Signature")
        await websocket.close(POLICY_VIOLATION)  # before accept: the client gets HTTP 403
        return
    try:
        with hub.handshake():
            await websocket.accept()
            start = await read_stream_start(websocket)
    except Refused as refused:
        await _close(websocket, TRY_AGAIN_LATER, refused.message)
        return
    except HandshakeError as exc:
        logger.warning(f"twilio: refused a stream: {str(exc)[:200]}")
        await _close(websocket, POLICY_VIOLATION, str(exc))
        return
    except WebSocketDisconnect:
        return
    expected = websocket.app.state.auth_token
    if expected is not None and not secrets.compare_digest(
        start.customParameters.get("token", "").encode(), expected.encode()
    ):
        hub.metrics.sessions_refused.inc("unauthorized")
        await _close(websocket, POLICY_VIOLATION, "missing or wrong 'token' custom parameter")
        return
    try:
        session = hub.reserve("twilio", client=None)  # every call comes from Twilio's media servers
    except Refused as refused:
        await _close(websocket, TRY_AGAIN_LATER, refused.message)
        return
    logger.info(f"session {session.id} (twilio) started")
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=twilio_serializer(start, validated=twilio_token is not None),
        ),
    )
    await hub.run(session, transport, lambda: _close(websocket, 1000, "call ended"))


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.CONNECTING:
        await websocket.accept()  # a close before accept is an HTTP 403, which loses the reason
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # the peer went first
            await websocket.close(code=code, reason=reason[:120])  # a close reason must fit 123 bytes
