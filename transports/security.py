"""Who may talk to the server, and how much: the token, request limits, Twilio signatures, safe start-up.

- **Token.** ``server.auth_token`` (or the name of an environment variable in ``server.auth_token_env``, or a file
  in ``server.auth_token_file``: keep it out of ``ps`` and of config files) is resolved once by
  :func:`resolve_auth_token`; an empty one is a configuration error. With a token, every HTTP route but
  ``/health``, the page (``/``) and its ``/static/`` files needs ``Authorization: Bearer <token>``:
  :class:`RequestGuard` checks it before the body is read. Websocket routes check it themselves with
  :func:`require_auth` (``Authorization`` header) or their own way (Twilio: the ``token`` custom parameter).
- **Requests.** :class:`RequestGuard` refuses a body over ``server.max_body_bytes`` (413, from
  ``Content-Length`` or while streaming) and one that takes longer than ``server.body_timeout_secs`` (408).
  :func:`uvicorn_config` closes connections whose request headers take over ``server.header_timeout_secs`` and
  caps websocket messages at ``server.max_body_bytes``.
- **Twilio.** :func:`twilio_signature` is Twilio's documented request signature (HMAC-SHA1 with the account's auth
  token over the URL, then each POST parameter's name and value in name order, base64).
- **Start-up.** :func:`check_exposure`: a bind to a non-loopback address without a token is refused unless
  ``server.allow_public_without_auth`` says it is intended.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import HTTPException, WebSocketException
from mimo_voice.configs import ConfigError
from mimo_voice.configs.schema import ServerSection
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

PUBLIC_PATHS = frozenset({"/", "/health", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
POLICY_VIOLATION = 1008  # websocket close code


def resolve_auth_token(server: ServerSection) -> str | None:
    """The token from the config, the environment or a file; ConfigError when a named source is missing or empty."""
    if server.auth_token_env is not None:
        token = os.environ.get(server.auth_token_env, "")
        where = f"server.auth_token_env: the environment variable {server.auth_token_env}"
    elif server.auth_token_file is not None:
        try:
            token = Path(server.auth_token_file).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"server.auth_token_file: cannot read {server.auth_token_file}: {exc.strerror}") from None
        where = f"server.auth_token_file: {server.auth_token_file}"
    else:
        return server.auth_token
    token = token.strip()
    if not token:
        raise ConfigError(f"{where} is empty or unset; give a token, or remove the key to run without one")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(server: ServerSection, token: str | None) -> None:
    """ConfigError for a server reachable from the network with no token, unless explicitly allowed."""
    if token is None and not is_loopback(server.host) and not server.allow_public_without_auth:
        raise ConfigError(
            f"server.host {server.host} is reachable from the network but no token is set: set server.auth_token_env "
            "(or auth_token_file / auth_token), or server.allow_public_without_auth: true if that is intended"
        )


def bearer_matches(connection: HTTPConnection, token: str | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (always true without a token)."""
    if token is None:
        return True
    scheme, _, given = connection.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.encode())


def require_auth(connection: HTTPConnection) -> None:
    """For routes the guard does not cover (websockets): HTTPException 401, or for a websocket a close with 1008,
    unless the bearer token matches ``app.state.auth_token``."""
    if bearer_matches(connection, connection.app.state.auth_token):
        return
    if connection.scope["type"] == "websocket":
        raise WebSocketException(POLICY_VIOLATION, "missing or wrong bearer token")
    raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def twilio_signature(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """``X-Twilio-Signature`` for a request to ``url`` (with its query string) carrying POST ``params``."""
    values = params or {}
    payload = url + "".join(f"{name}{values[name]}" for name in sorted(values))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class _BodyRefused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


async def _send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Pure ASGI middleware: the token before anything is read, then the body's size and time limits.

    ``on_unauthorized(path)`` is called for each refused request (for metrics)."""

    def __init__(self, app: ASGIApp, *, token: str | None, server: ServerSection, on_unauthorized: Any = None) -> None:
        self.app, self.token, self.server, self.on_unauthorized = app, token, server, on_unauthorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        if not public and not bearer_matches(HTTPConnection(scope), self.token):
            if self.on_unauthorized is not None:
                self.on_unauthorized(path)
            await _send_json(send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])
            return
        limit = self.server.max_body_bytes
        declared = HTTPConnection(scope).headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > limit:
            await _send_json(send, 413, f"the request body is over {limit} bytes")
            return
        with contextlib.suppress(_BodyRefused):  # already answered
            await self.app(scope, *_limited(receive, send, self.server))


def _limited(receive: Receive, send: Send, server: ServerSection) -> tuple[Receive, Send]:
    """``receive`` with the body's size and time limits, and ``send``. A body over a limit is answered (413 or
    408) at once, from inside ``receive``: frameworks turn an error raised there into their own 400, which the
    returned ``send`` then drops, as it drops anything sent after that answer."""
    deadline = asyncio.get_running_loop().time() + server.body_timeout_secs
    received, done, started, refused = 0, False, False, False

    async def refuse(status: int, detail: str) -> None:
        nonlocal refused
        if not started:
            await _send_json(send, status, detail)
        refused = True
        raise _BodyRefused(status, detail)

    async def limited_receive() -> Message:
        nonlocal received, done
        if done:  # after the body only a disconnect can come: no deadline for that wait
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            await refuse(408, "the request body took too long")
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            done = not message.get("more_body", False)
            if received > server.max_body_bytes:
                await refuse(413, f"the request body is over {server.max_body_bytes} bytes")
        return message

    async def tracked_send(message: Message) -> None:
        nonlocal started
        if refused:
            return
        started = started or message["type"] == "http.response.start"
        await send(message)

    return limited_receive, tracked_send


class _HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive in time (slowloris)."""

    header_timeout = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._waiting_for = self.cycle  # headers have arrived once cycle is another one
        self._deadline: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.get_protocol() is self and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._waiting_for or self.transport.get_protocol() is not self:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, server: ServerSection, **options: Any) -> uvicorn.Config:
    """uvicorn settings with the server's limits (header timeout, websocket message size, header size)."""
    protocol = type("HeaderTimeoutH11", (_HeaderTimeoutH11,), {"header_timeout": server.header_timeout_secs})
    return uvicorn.Config(
        app,
        http=protocol,
        ws_max_size=server.max_body_bytes,
        h11_max_incomplete_event_size=16 * 1024,
        timeout_keep_alive=5,
        **options,
    )
