"""``mimo-voice serve``: the FastAPI app that puts browsers (WebRTC) and phones (Twilio) through to the agent.

Routes: ``GET /`` (the page, transports/static/), ``GET /api/info``, ``GET /health``, ``GET /metrics``
(Prometheus), ``POST``/``PATCH /api/offer`` (WebRTC signalling via pipecat's
``SmallWebRTCRequestHandler``) and ``WS /ws/twilio`` (phone.py). Each connection gets its own
pipeline, built by a :data:`RunBot` function: the real agent by default, anything in tests.

The process has one engine and one tool registry, and every session shares them. A local engine is owned
by an :class:`~.supervisor.EngineSupervisor`, which loads it in the background and restarts it when it dies;
new calls pass the admission gate (:mod:`.operations`): none while the engine is loading or down or the server
drains (503 with ``Retry-After``; ``GET /health`` says which). Slots, session ids and how calls end are in
sessions.py; the token, request limits and start-up checks in security.py; ``/v1/realtime`` in realtime/. A
WebRTC answer carries ``session_id`` and ``session_secret``: a renegotiation (``POST`` with ``pc_id``) or
trickled ICE (``PATCH``) must send the secret back as ``session_secret``, so knowing a ``pc_id`` is not enough
to take a call over.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from aiortc.sdp import SessionDescription
from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from loguru import logger
from mimo_voice.agent.vad import create_vad_analyzer
from mimo_voice.configs import ConfigError
from mimo_voice.configs.schema import Config
from pipecat.frames.frames import LLMMessagesAppendFrame
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    IceCandidate,
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pydantic import BaseModel, Field

from . import operations, phone
from .metrics import CONTENT_TYPE, ServerMetrics
from .realtime import add_realtime_route
from .security import RequestGuard, check_exposure, resolve_auth_token, uvicorn_config
from .sessions import BotContext, Refused, RunBot, Session, SessionHub, run_worker
from .supervisor import EngineSupervisor

__all__ = ["BotContext", "RunBot", "create_app", "main", "run_agent_bot", "run_worker"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
TINY_NOTICE = (
    "tiny: babbles. No weights are configured, so this is the embedded tiny model; set model.path for real answers."
)


async def run_agent_bot(transport: BaseTransport, ctx: BotContext) -> None:
    """The MiMo-Audio voice agent (agent/pipeline.py) on one connection."""
    from mimo_voice.agent.pipeline import create_worker

    worker, service = create_worker(
        transport,
        ctx.config,
        ctx.engine,
        vad_analyzer=create_vad_analyzer(ctx.config.vad),
        observers=ctx.observers,
        tools=ctx.tools,
    )

    async def say_goodbye(note: str) -> None:
        service.end_after_reply()
        await worker.queue_frame(LLMMessagesAppendFrame(messages=[{"role": "system", "content": note}], run_llm=True))

    ctx.say_goodbye = say_goodbye
    await run_worker(worker, transport, ctx)


def _sample_memory(hub: SessionHub) -> None:
    """Resident memory of this process and the engine's worker, as of this scrape (absent where unreadable)."""
    engine_pid = getattr(hub.engine, "pid", None)
    for process, pid in (("server", os.getpid()), ("engine", engine_pid)):
        rss = operations.resident_bytes(pid) if pid is not None else None
        if rss is not None:
            hub.metrics.resident_memory.set(rss, process)
        else:  # no engine (down or loading): no figure rather than a stale one
            hub.metrics.resident_memory.values.pop((process,), None)


def _supervisor(hub: SessionHub) -> EngineSupervisor:
    def use(engine: Any) -> None:
        hub.engine = engine

    return EngineSupervisor(
        hub.config, load=load_engine, gate=hub.gate, metrics=hub.metrics, on_engine=use, end_calls=hub.end_all
    )


class OfferBody(BaseModel):
    sdp: str = Field(min_length=1, description="The client's SDP offer.")
    type: Literal["offer"] = Field(description='Always "offer".')
    pc_id: str | None = Field(None, description="Set when renegotiating an existing connection.")
    restart_pc: bool | None = None
    session_secret: str | None = Field(None, description="The answer's session_secret; needed with pc_id.")


class CandidateBody(BaseModel):
    candidate: str
    sdp_mid: str
    sdp_mline_index: int


class PatchBody(BaseModel):
    pc_id: str
    session_secret: str = Field(description="The answer's session_secret.")
    candidates: list[CandidateBody] = Field(max_length=64)


def _check_offer_sdp(sdp: str) -> None:
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises whatever the line breaks (Assertion, Value, Index...)
        raise HTTPException(400, f"malformed SDP offer: {exc or type(exc).__name__}") from None
    if not any(media.kind == "audio" for media in description.media):
        raise HTTPException(400, "the SDP offer has no audio track: the agent needs the microphone")


def create_app(
    config: Config,
    *,
    engine: Any = None,
    tools: Any = None,
    run_bot: RunBot | None = None,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """The server of one process. With no ``run_bot`` it serves the real agent: the tool registry is loaded
    here unless given, and without an ``engine`` a local one is owned by an :class:`~.supervisor.EngineSupervisor`
    that loads it in the background once the server starts (``/health`` says ``loading`` until then), restarts
    it when it dies, and closes it at shutdown; the Ray pool (``engine.backend: ray``) is connected here (its
    actors are restarted by Ray). A given engine is the caller's: neither supervised nor closed."""
    supervised = run_bot is None and engine is None and config.engine.backend == "local"
    owned_engine = owned_tools = None
    if run_bot is None:
        run_bot = run_agent_bot
        if engine is None and not supervised:
            engine = owned_engine = load_engine(config)
        if tools is None:
            from mimo_voice.tools.registry import build_registry

            tools = owned_tools = build_registry(config.tools, timeout_secs=config.agent.tool_timeout_secs)
    token = resolve_auth_token(config.server)
    hub = SessionHub(config, engine=engine, tools=tools, run_bot=run_bot, metrics=metrics or ServerMetrics())
    webrtc = SmallWebRTCRequestHandler(ice_servers=config.server.ice_servers or None)
    supervisor = _supervisor(hub) if supervised else None
    if supervisor is None:
        hub.metrics.engine_up.set(1)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        supervising = asyncio.create_task(supervisor.run(), name="engine-supervisor") if supervisor else None
        yield
        await webrtc.close()
        await hub.close()
        if supervising is not None:
            supervising.cancel()
            await asyncio.gather(supervising, return_exceptions=True)
        if owned_tools is not None:
            owned_tools.close()
        if owned_engine is not None:
            await owned_engine.aclose()

    docs = config.server.docs
    app = FastAPI(
        title="mimo-voice",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.hub = hub
    app.state.auth_token = token
    app.state.gate = hub.gate
    app.state.supervisor = supervisor

    def count_unauthorized(path: str) -> None:
        if path.startswith("/api/offer"):
            hub.metrics.sessions_refused.inc("unauthorized")

    app.add_middleware(RequestGuard, token=token, server=config.server, on_unauthorized=count_unauthorized)
    app.add_exception_handler(RequestValidationError, _bad_request)
    _add_page_routes(app, hub)
    _add_signalling_routes(app, hub, webrtc)

    @app.websocket("/ws/twilio")
    async def twilio(websocket: WebSocket) -> None:
        refusal = hub.gate.refusal()
        if refusal is not None:
            hub.metrics.sessions_refused.inc(refusal.status)
            await operations.refuse_websocket(websocket, refusal)
            return
        await phone.handle_twilio(websocket, hub)

    add_realtime_route(app, hub)

    return app


async def _bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON or fields: a 400 that names the problem (FastAPI's default is a 422 list)."""
    problems = "; ".join(
        "body: not valid JSON"
        if error["type"] == "json_invalid"
        else f"{'.'.join(str(part) for part in error['loc'][1:]) or 'body'}: {error['msg']}"
        for error in exc.errors()
    )
    return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=400)


def _add_page_routes(app: FastAPI, hub: SessionHub) -> None:
    """The page and what it (and monitoring) reads: model info, health, metrics."""
    config = hub.config
    is_tiny = bool(getattr(hub.engine, "is_tiny", config.model.path is None))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 ``ok`` while new calls are taken; 503 ``draining`` / ``engine_down`` / ``loading`` with a detail."""
        status, body = hub.gate.health()
        health: dict[str, Any] = {
            **body,
            "sessions": len(hub.sessions),
            "max_sessions": config.server.max_sessions,
            "tiny": is_tiny,
            "auth_required": app.state.auth_token is not None,
        }
        if hasattr(hub.engine, "status"):  # the Ray pool: engines, ready, sessions per engine
            pool = health["engines"] = hub.engine.status()
            if pool["ready"] == 0 and status == 200:  # nothing can take a call: a load balancer should send none
                status, health["status"] = 503, "engine_down"
        return JSONResponse(health, status_code=status)

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {
            "model": "tiny" if is_tiny else config.model.path,
            "tiny": is_tiny,
            "notice": TINY_NOTICE if is_tiny else None,
            "mode": config.agent.mode,
            "tools": list(getattr(hub.tools, "names", None) or []),
            "auth_required": app.state.auth_token is not None,
            "ice_servers": config.server.ice_servers,
            "sessions": len(hub.sessions),
            "max_sessions": config.server.max_sessions,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        _sample_memory(hub)
        pool = "".join(hub.engine.metrics()) if hasattr(hub.engine, "metrics") else ""
        return PlainTextResponse(hub.metrics.render() + pool, media_type=CONTENT_TYPE)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _add_signalling_routes(app: FastAPI, hub: SessionHub, webrtc: SmallWebRTCRequestHandler) -> None:
    """``POST /api/offer`` (a new call, or a renegotiation by ``pc_id``) and ``PATCH /api/offer`` (trickled ICE)."""

    @app.post("/api/offer")
    async def offer(body: OfferBody, request: Request) -> dict[str, str]:
        client = request.client.host if request.client else None
        _or_http_error(lambda: hub.admit_offer(client))
        _check_offer_sdp(body.sdp)
        if body.pc_id is not None:
            return await _renegotiate(webrtc, hub, body)
        refusal = hub.gate.refusal()
        if refusal is not None:
            hub.metrics.sessions_refused.inc(refusal.status)
            raise HTTPException(503, refusal.detail, headers=refusal.headers)
        session = _or_http_error(lambda: hub.reserve("webrtc", client=client))
        try:
            return await _new_call(webrtc, hub, session, body)
        finally:
            if not session.running:  # refused, failed or never connected: the slot goes back at once
                hub.release(session)

    @app.patch("/api/offer")
    async def candidates(body: PatchBody) -> dict[str, str]:
        if hub.find(body.pc_id, body.session_secret) is None:
            raise HTTPException(404, "no such connection, or the wrong session_secret")
        request = SmallWebRTCPatchRequest(
            pc_id=body.pc_id,
            candidates=[IceCandidate(c.candidate, c.sdp_mid, c.sdp_mline_index) for c in body.candidates],
        )
        try:
            await webrtc.handle_patch_request(request)
        except HTTPException:
            raise
        except Exception as exc:
            raise HTTPException(400, f"bad ICE candidate: {exc or type(exc).__name__}") from None
        return {"status": "ok"}


def _or_http_error(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Refused as refused:
        raise HTTPException(refused.status, refused.message) from None


async def _new_call(
    webrtc: SmallWebRTCRequestHandler, hub: SessionHub, session: Session, body: OfferBody
) -> dict[str, str]:
    async def on_connection(connection: SmallWebRTCConnection) -> None:
        transport = SmallWebRTCTransport(
            webrtc_connection=connection, params=TransportParams(audio_in_enabled=True, audio_out_enabled=True)
        )
        hub.start(session, transport, connection.disconnect)
        in_use = f"{len(hub.sessions)}/{hub.config.server.max_sessions}"
        logger.info(f"session {session.id} (webrtc) started; {in_use} in use")

    answer = await _answer(webrtc, body.model_copy(update={"restart_pc": False}), on_connection)
    if not session.running:
        raise HTTPException(500, "the call could not be started")
    session.pc_ids.add(answer["pc_id"])
    return {**answer, "session_id": session.id, "session_secret": session.secret}


async def _renegotiate(webrtc: SmallWebRTCRequestHandler, hub: SessionHub, body: OfferBody) -> dict[str, str]:
    """A new offer on a live call (restart_pc included): the same session and slot, never a new one."""
    session = hub.find(body.pc_id, body.session_secret)
    if session is None:
        raise HTTPException(404, "no such connection, or the wrong session_secret")
    stray: list[SmallWebRTCConnection] = []

    async def connection_gone(connection: SmallWebRTCConnection) -> None:
        stray.append(connection)  # pipecat forgot the connection (it closed): no call to renegotiate

    answer = await _answer(webrtc, body, connection_gone)
    if stray:
        await stray[0].disconnect()
        raise HTTPException(409, "the connection has closed: start a new call")
    session.pc_ids.add(answer["pc_id"])
    return {**answer, "session_id": session.id, "session_secret": session.secret}


async def _answer(
    webrtc: SmallWebRTCRequestHandler,
    body: OfferBody,
    on_connection: Callable[[SmallWebRTCConnection], Awaitable[None]],
) -> dict[str, str]:
    request = SmallWebRTCRequest(sdp=body.sdp, type=body.type, pc_id=body.pc_id, restart_pc=body.restart_pc)
    try:
        answer = await webrtc.handle_web_request(request, on_connection)
    except HTTPException:
        raise
    except Exception as exc:  # aiortc refuses what it cannot negotiate (no ICE credentials, no common codec...)
        raise HTTPException(400, f"the SDP offer was rejected: {exc or type(exc).__name__}") from None
    if answer is None:
        raise HTTPException(400, "the SDP offer produced no answer")
    return answer


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def load_engine(config: Config) -> Any:
    """The process's engine (blocking; seconds for the tiny model, minutes for 7B; the engine itself warns
    loudly when it serves the embedded tiny model). With ``engine.backend: ray``, the pool of engine actors
    this front-end shares with others."""
    if config.engine.backend == "ray":
        from mimo_voice.streaming.cluster.pool import EnginePool

        engine: Any = EnginePool.connect(config)
    else:
        from mimo_voice.streaming.engine.engine import Engine

        engine = Engine.load(config)
    if not engine.is_tiny:
        logger.info(f"loaded {config.model.path}")
    return engine


def main(config: Config, argv: list[str]) -> int:
    """``mimo-voice serve``: load the engine and the tools once, then serve until interrupted."""
    argparse.ArgumentParser(prog="mimo-voice serve", description="Run the WebRTC/phone server.").parse_args(argv)
    host, port = config.server.host, config.server.port
    if config.engine.backend == "local":
        from mimo_voice.streaming.engine.engine import check_checkpoints

        check_checkpoints(config)  # a bad checkpoint config is one line from the CLI, not a restart loop
    try:
        check_exposure(config.server, resolve_auth_token(config.server))
        sock = _bind(host, port)  # before the slow part, so that a busy port fails at once
    except (ConfigError, OSError) as exc:
        logger.error(str(exc))
        return 2

    app = create_app(config)
    hub: SessionHub = app.state.hub
    operations.freeze_startup_heap()

    async def on_drain() -> None:
        await operations.drain(hub.gate, lambda: len(hub.sessions), hub.end_all, config.server.drain_timeout_secs)

    def on_force_exit() -> None:
        if hub.engine is not None and hasattr(hub.engine, "kill"):
            hub.engine.kill()

    server = operations.DrainingServer(
        uvicorn_config(app, config.server, log_level=config.logging.level.lower()), on_drain, on_force_exit
    )
    logger.info(f"open http://{host}:{sock.getsockname()[1]}/ to talk to the agent")
    with sock:
        server.run(sockets=[sock])
    return 0
