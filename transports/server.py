"""``mimo-voice serve``: the FastAPI app that puts browsers (WebRTC) and phones (Twilio) through to the agent.

Routes: ``GET /`` (the page, transports/static/), ``GET /api/info``, ``GET /health``, ``GET /metrics``
(Prometheus), ``POST``/``PATCH /api/offer`` (WebRTC signalling via pipecat's
``SmallWebRTCRequestHandler``) and ``WS /ws/twilio`` (phone.py). Each connection gets its own
pipeline, built by a :data:`RunBot` function: the real agent by default, anything in tests.

The process has one engine (owned by an :class:`~.supervisor.EngineSupervisor`, which loads it in the
background and restarts it when it dies) and one tool registry, and every session shares them. New calls
pass the admission gate (:mod:`.operations`): none while the engine is loading or down or the server
drains (503 with ``Retry-After``; ``GET /health`` says which). A session holds one of
``config.server.max_sessions`` slots until its pipeline ends; a client that stops sending audio for
``config.server.disconnect_timeout_secs`` is hung up on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiortc.sdp import SessionDescription
from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from loguru import logger
from mimo_voice.agent.vad import create_vad_analyzer
from mimo_voice.configs.schema import Config
from pipecat.frames.frames import InputAudioRawFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frameworks.rtvi.frames import RTVIServerMessageFrame
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    IceCandidate,
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner
from pydantic import BaseModel, Field

from . import operations, phone
from .metrics import CONTENT_TYPE, ServerMetrics, TurnMetricsObserver
from .supervisor import EngineSupervisor

STATIC_DIR = Path(__file__).resolve().parent / "static"
TINY_NOTICE = (
    "tiny: babbles. No weights are configured, so this is the embedded tiny model; set model.path for real answers."
)
# How long a new client may take to connect (ICE, DTLS, pipeline start) before its silence counts.
CONNECT_GRACE_SECS = 10.0
# How long a hung-up session's pipeline gets to wind down before its task is cancelled.
BOT_EXIT_GRACE_SECS = 5.0
# How long the "call ended" message gets to reach the page before the connection is closed.
END_MESSAGE_SECS = 0.3

TransportName = Literal["webrtc", "twilio"]


@dataclass
class BotContext:
    """What a per-connection bot gets besides its transport. A bot must give ``observers`` to its
    ``PipelineWorker`` (they count its turns and watch that the client is still there) and should end
    with :func:`run_worker`."""

    config: Config
    engine: Any  # mimo_voice.streaming.engine.engine.Engine (None for bots that need none)
    tools: Any  # mimo_voice.tools.registry.ToolRegistry | None
    transport_name: TransportName
    turn_metrics: TurnMetricsObserver
    activity: InputActivityObserver

    @property
    def observers(self) -> list[BaseObserver]:
        """Pass these to the bot's ``PipelineWorker``: metrics, and the liveness watch."""
        return [self.turn_metrics, self.activity]


RunBot = Callable[[BaseTransport, BotContext], Awaitable[None]]


class InputActivityObserver(BaseObserver):
    """Remembers when the client last sent audio: a client that vanishes stops sending it."""

    def __init__(self) -> None:
        super().__init__(observe_every_push=False)
        self.last_input = time.monotonic() + CONNECT_GRACE_SECS

    async def on_push_frame(self, data: FramePushed) -> None:
        if isinstance(data.frame, InputAudioRawFrame):
            self.last_input = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_input


async def run_worker(worker: PipelineWorker, transport: BaseTransport, ctx: BotContext) -> None:
    """Run a bot's worker until the client leaves; every bot ends with this."""
    ctx.turn_metrics.notify = lambda data: worker.queue_frame(RTVIServerMessageFrame(data=data))

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport: BaseTransport, _client: Any) -> None:
        await worker.cancel(reason="client disconnected")

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


async def run_agent_bot(transport: BaseTransport, ctx: BotContext) -> None:
    """The MiMo-Audio voice agent (agent/pipeline.py) on one connection."""
    from mimo_voice.agent.pipeline import create_worker

    worker, _service = create_worker(
        transport,
        ctx.config,
        ctx.engine,
        vad_analyzer=create_vad_analyzer(ctx.config.vad),
        observers=ctx.observers,
        tools=ctx.tools,
    )
    await run_worker(worker, transport, ctx)


@dataclass
class Session:
    id: str
    transport_name: TransportName
    started: float = field(default_factory=time.monotonic)
    end: Callable[[str], Awaitable[None]] | None = None  # tells the caller why, then hangs up (set while it runs)


class SessionHub:
    """What sessions share (config, engine, tools, metrics, the bot) and the slots they hold."""

    def __init__(self, config: Config, *, engine: Any, tools: Any, run_bot: RunBot, metrics: ServerMetrics) -> None:
        self.config, self.engine, self.tools, self.run_bot, self.metrics = config, engine, tools, run_bot, metrics
        self.sessions: dict[str, Session] = {}
        self.gate = operations.Gate()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def is_full(self) -> bool:
        return len(self.sessions) >= self.config.server.max_sessions

    def busy_message(self) -> str:
        limit = self.config.server.max_sessions
        return f"the server is busy: all {limit} session slot{'s' * (limit != 1)} are in use, try again later"

    def reserve(self, transport_name: TransportName, session_id: str | None = None) -> Session | None:
        """A slot for a new session, or None (and a refusal counted) when all are taken."""
        if self.is_full:
            self.metrics.sessions_refused.inc("capacity")
            return None
        session = Session(session_id or uuid.uuid4().hex, transport_name)
        self.sessions[session.id] = session
        self.metrics.sessions_active.inc(transport_name)
        self.metrics.sessions_total.inc(transport_name)
        return session

    def release(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.metrics.sessions_active.dec(session.transport_name)
            lasted = time.monotonic() - session.started
            logger.info(f"session {session.id} ({session.transport_name}) ended after {lasted:.1f} s")

    def rename(self, session: Session, session_id: str) -> None:
        self.sessions[session_id] = self.sessions.pop(session.id)
        session.id = session_id

    def start(self, session: Session, transport: BaseTransport, hang_up: Callable[[], Awaitable[None]]) -> None:
        """Run the session in the background (WebRTC: signalling returns at once)."""
        self._tasks.add(asyncio.create_task(self.run(session, transport, hang_up), name=f"session-{session.id}"))

    async def run(self, session: Session, transport: BaseTransport, hang_up: Callable[[], Awaitable[None]]) -> None:
        """Run the bot until it ends or the client goes silent; then hang up and free the slot."""
        this = asyncio.current_task()
        self._tasks.add(this)
        this.add_done_callback(self._tasks.discard)
        ctx = BotContext(
            self.config,
            self.engine,
            self.tools,
            session.transport_name,
            TurnMetricsObserver(self.metrics, session.transport_name),
            InputActivityObserver(),
        )
        hang_up = _once(hang_up)
        session.end = _ender(ctx, hang_up)
        bot = asyncio.create_task(self.run_bot(transport, ctx), name=f"bot-{session.id}")
        watchdog = asyncio.create_task(self._watch(ctx.activity))
        try:
            await asyncio.wait({bot, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if not bot.done():
                logger.warning(
                    f"session {session.id}: no audio from the client for {ctx.activity.silent_for():.1f} s, hanging up"
                )
                await hang_up()  # the transport reports the client gone, and the bot winds down
                await asyncio.wait({bot}, timeout=BOT_EXIT_GRACE_SECS)
        finally:
            for task in (watchdog, bot):
                task.cancel()
            await asyncio.gather(watchdog, bot, return_exceptions=True)
            if not bot.cancelled() and bot.exception() is not None:
                logger.opt(exception=bot.exception()).error(f"session {session.id}: the bot failed")
            try:
                await hang_up()
            finally:
                self.release(session)

    async def _watch(self, activity: InputActivityObserver) -> None:
        timeout = self.config.server.disconnect_timeout_secs
        while activity.silent_for() < timeout:
            await asyncio.sleep(min(0.5, timeout / 4))

    async def end_all(self, reason: str) -> None:
        """Ends every call with ``reason`` shown to the caller, and waits (a while) for their slots to free."""
        running = [session.end(reason) for session in list(self.sessions.values()) if session.end is not None]
        await asyncio.gather(*running, return_exceptions=True)
        deadline = time.monotonic() + BOT_EXIT_GRACE_SECS
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stop every session (server shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


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


def _ender(ctx: BotContext, hang_up: Callable[[], Awaitable[None]]) -> Callable[[str], Awaitable[None]]:
    async def end(reason: str) -> None:
        if ctx.turn_metrics.notify is not None:  # the page shows it (transports/static/app.js)
            await ctx.turn_metrics.notify({"type": "call-ended", "reason": reason})
            await asyncio.sleep(END_MESSAGE_SECS)
        await hang_up()

    return end


def _once(action: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    done = False

    async def run_once() -> None:
        nonlocal done
        if not done:
            done = True
            await action()

    return run_once


class OfferBody(BaseModel):
    sdp: str = Field(min_length=1, description="The client's SDP offer.")
    type: Literal["offer"] = Field(description='Always "offer".')
    pc_id: str | None = Field(None, description="Set when renegotiating an existing connection.")
    restart_pc: bool | None = None


class CandidateBody(BaseModel):
    candidate: str
    sdp_mid: str
    sdp_mline_index: int


class PatchBody(BaseModel):
    pc_id: str
    candidates: list[CandidateBody]


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
    here unless given, and without an ``engine`` an :class:`~.supervisor.EngineSupervisor` loads one in the
    background once the server starts (``/health`` says ``loading`` until then), restarts it when it dies,
    and closes it at shutdown. A given engine is the caller's: neither supervised nor closed."""
    supervised = run_bot is None and engine is None
    if run_bot is None:
        run_bot = run_agent_bot
        if tools is None:
            from mimo_voice.tools.registry import build_registry

            tools = build_registry(config.tools, timeout_secs=config.agent.tool_timeout_secs)
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

    app = FastAPI(title="mimo-voice", lifespan=lifespan)
    app.state.hub = hub
    app.state.gate = hub.gate
    app.state.supervisor = supervisor
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
        sessions = {"sessions": len(hub.sessions), "max_sessions": config.server.max_sessions, "tiny": is_tiny}
        return JSONResponse({**body, **sessions}, status_code=status)

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {
            "model": "tiny" if is_tiny else config.model.path,
            "tiny": is_tiny,
            "notice": TINY_NOTICE if is_tiny else None,
            "mode": config.agent.mode,
            "tools": list(getattr(hub.tools, "names", None) or []),
            "auth_required": config.server.auth_token is not None,
            "ice_servers": config.server.ice_servers,
            "sessions": len(hub.sessions),
            "max_sessions": config.server.max_sessions,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        _sample_memory(hub)
        return PlainTextResponse(hub.metrics.render(), media_type=CONTENT_TYPE)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _add_signalling_routes(app: FastAPI, hub: SessionHub, webrtc: SmallWebRTCRequestHandler) -> None:
    """``POST /api/offer`` (a new call, or a renegotiation by ``pc_id``) and ``PATCH /api/offer`` (trickled ICE)."""
    config = hub.config

    def require_token(request: Request) -> None:
        expected = config.server.auth_token
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
            hub.metrics.sessions_refused.inc("unauthorized")
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.post("/api/offer", dependencies=[Depends(require_token)])
    async def offer(body: OfferBody) -> dict[str, str]:
        _check_offer_sdp(body.sdp)
        if body.pc_id in hub.sessions:  # renegotiation of a live session: no new slot
            return await _answer(webrtc, body, _already_running)
        refusal = hub.gate.refusal()
        if refusal is not None:
            hub.metrics.sessions_refused.inc(refusal.status)
            raise HTTPException(503, refusal.detail, headers=refusal.headers)
        session = hub.reserve("webrtc")
        if session is None:
            raise HTTPException(503, hub.busy_message())

        async def on_connection(connection: SmallWebRTCConnection) -> None:
            hub.rename(session, connection.pc_id)
            transport = SmallWebRTCTransport(
                webrtc_connection=connection, params=TransportParams(audio_in_enabled=True, audio_out_enabled=True)
            )
            hub.start(session, transport, connection.disconnect)
            in_use = f"{len(hub.sessions)}/{config.server.max_sessions}"
            logger.info(f"session {session.id} (webrtc) started; {in_use} in use")

        try:
            return await _answer(webrtc, body, on_connection)
        except BaseException:
            hub.release(session)
            raise

    @app.patch("/api/offer", dependencies=[Depends(require_token)])
    async def candidates(body: PatchBody) -> dict[str, str]:
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


async def _already_running(_connection: SmallWebRTCConnection) -> None:
    """Renegotiation keeps the connection's session."""


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
    loudly when it serves the embedded tiny model)."""
    from mimo_voice.streaming.engine.engine import Engine

    engine = Engine.load(config)
    if not engine.is_tiny:
        logger.info(f"loaded {config.model.path}")
    return engine


def main(config: Config, argv: list[str]) -> int:
    """``mimo-voice serve``: load the engine and the tools once, then serve until interrupted."""
    argparse.ArgumentParser(prog="mimo-voice serve", description="Run the WebRTC/phone server.").parse_args(argv)
    host, port = config.server.host, config.server.port
    try:
        sock = _bind(host, port)  # before the slow part, so that a busy port fails at once
    except OSError as exc:
        logger.error(str(exc))
        return 2
    import uvicorn

    app = create_app(config)
    hub: SessionHub = app.state.hub

    async def on_drain() -> None:
        await operations.drain(hub.gate, lambda: len(hub.sessions), hub.end_all, config.server.drain_timeout_secs)

    def on_force_exit() -> None:
        if hub.engine is not None:
            hub.engine.kill()

    server = operations.DrainingServer(
        uvicorn.Config(app, log_level=config.logging.level.lower()), on_drain, on_force_exit
    )
    logger.info(f"open http://{host}:{sock.getsockname()[1]}/ to talk to the agent")
    with sock:
        server.run(sockets=[sock])
    return 0
