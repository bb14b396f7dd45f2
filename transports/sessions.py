"""Session slots: the server's own session ids, one slot per live connection, and how a call ends.

API for transports (WebRTC, Twilio, realtime websockets):

- ``hub.admit_offer(client)``: count an offer against ``server.max_offers_per_minute`` for that client address;
  raises :class:`Refused` (429) past it.
- ``hub.reserve(transport, client=...)``: a :class:`Session` with a server-generated ``id`` and ``secret``, or
  :class:`Refused` (503 all slots taken, 429 ``server.max_sessions_per_client`` reached for ``client``; pass
  ``client=None`` for transports whose peers share addresses, e.g. Twilio's media servers). Ids never come from
  the client, so a repeated client id (a Twilio ``streamSid``) cannot share or hide a slot.
- ``hub.release(session)``: free the slot; idempotent, so every exit path may call it. ``hub.run`` (or
  ``hub.start`` in the background) runs the bot and releases the slot when it ends, whatever the reason, or
  earlier, as soon as the transport reports the client gone (``BotContext.client_gone``, called by
  :func:`run_worker`): the bot's teardown that follows no longer holds a slot.
- ``hub.find(session_id, secret)``: the live session whose secret matches (constant-time), else None: what a
  renegotiation or trickled ICE must present.
- ``hub.handshake()``: a context manager around a websocket's time between accept and ``reserve`` (capped by
  ``server.max_pending_handshakes``; raises :class:`Refused` past it).

A call ends when the bot ends, when the client vanishes (no audio frames for ``server.disconnect_timeout_secs``: the
transport is hung up), or politely: after ``server.idle_timeout_secs`` without the caller speaking (VAD), or at
``server.max_call_secs``, the bot is asked to say goodbye (``BotContext.say_goodbye``) and hung up once it has, or
after ``GOODBYE_GRACE_SECS``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from loguru import logger
from mimo_voice.configs.schema import Config
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InputAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frameworks.rtvi.frames import RTVIServerMessageFrame
from pipecat.transports.base_transport import BaseTransport
from pipecat.workers.runner import WorkerRunner

from . import operations
from .metrics import ServerMetrics, TurnMetricsObserver

# How long a new client may take to connect (ICE, DTLS, pipeline start) before its silence counts.
CONNECT_GRACE_SECS = 10.0
# How long a hung-up session's pipeline gets to wind down before its task is cancelled.
BOT_EXIT_GRACE_SECS = 5.0
# How long the bot gets to say goodbye (idle or over time) before the call is hung up anyway.
GOODBYE_GRACE_SECS = 15.0
IDLE_NOTE = (
    "The caller has been silent for a long while. Say a short, friendly goodbye now, and nothing else: the call ends."
)
# How long the "call ended" message gets to reach the page before the connection is closed.
END_MESSAGE_SECS = 0.3
OVERTIME_NOTE = "The call has reached its time limit. Say a short, friendly goodbye now, and nothing else."

TransportName = Literal["webrtc", "twilio", "realtime"]


class Refused(Exception):
    """A request the slots or limits refuse: ``status`` (HTTP), ``reason`` (metrics label) and a message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class InputActivityObserver(BaseObserver):
    """When the client last sent audio (a vanished client stops), and when the conversation last moved: the
    caller's speech or the agent's (a caller listening to a long answer is not idle)."""

    def __init__(self) -> None:
        super().__init__(observe_every_push=False)
        now = time.monotonic()
        self.last_input = now + CONNECT_GRACE_SECS
        self.last_activity = now
        self._speaking: set[str] = set()

    async def on_push_frame(self, data: FramePushed) -> None:
        frame = data.frame
        if isinstance(frame, InputAudioRawFrame):
            self.last_input = time.monotonic()
        elif isinstance(frame, (UserStartedSpeakingFrame, BotStartedSpeakingFrame)):
            self._speaking.add("user" if isinstance(frame, UserStartedSpeakingFrame) else "bot")
        elif isinstance(frame, (UserStoppedSpeakingFrame, BotStoppedSpeakingFrame)):
            self._speaking.discard("user" if isinstance(frame, UserStoppedSpeakingFrame) else "bot")
            self.last_activity = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_input

    def idle_for(self) -> float:
        return 0.0 if self._speaking else time.monotonic() - self.last_activity


@dataclass
class BotContext:
    """What a per-connection bot gets besides its transport. A bot must give ``observers`` to its
    ``PipelineWorker`` (they count its turns and watch that the client is still there), should end with
    :func:`run_worker`, and may set ``say_goodbye`` (given a note for the model) so that idle and over-long calls
    end politely."""

    config: Config
    engine: Any  # mimo_voice.streaming.engine.engine.Engine (None for bots that need none)
    tools: Any  # mimo_voice.tools.registry.ToolRegistry | None
    transport_name: TransportName
    turn_metrics: TurnMetricsObserver
    activity: InputActivityObserver
    say_goodbye: Callable[[str], Awaitable[None]] | None = None
    # Set by the hub: the client has left. The call's slot is freed at once rather than after the bot's teardown
    # (up to a second under load), so that a caller who hangs up and calls straight back is not told "busy".
    client_gone: Callable[[], None] = lambda: None

    @property
    def observers(self) -> list[BaseObserver]:
        """Pass these to the bot's ``PipelineWorker``: metrics, and the liveness watch."""
        return [self.turn_metrics, self.activity]


RunBot = Callable[[BaseTransport, BotContext], Coroutine[Any, Any, None]]


async def run_worker(worker: PipelineWorker, transport: BaseTransport, ctx: BotContext) -> None:
    """Run a bot's worker until the client leaves; every bot ends with this."""
    ctx.turn_metrics.notify = lambda data: worker.queue_frame(RTVIServerMessageFrame(data=data))

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport: BaseTransport, _client: Any) -> None:
        ctx.client_gone()
        await worker.cancel(reason="client disconnected")

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


@dataclass
class Session:
    transport_name: TransportName
    client: str | None
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    started: float = field(default_factory=time.monotonic)
    pc_ids: set[str] = field(default_factory=set)  # WebRTC connection ids answered for this session
    running: bool = False
    end: Callable[[str], Awaitable[None]] | None = None  # tells the caller why, then hangs up (set while it runs)
    lease: Any = None  # with the Ray backend: the call's place on one engine (streaming.cluster.pool.EngineLease)


class SessionHub:
    """What sessions share (config, engine, tools, metrics, the bot) and the slots they hold."""

    def __init__(self, config: Config, *, engine: Any, tools: Any, run_bot: RunBot, metrics: ServerMetrics) -> None:
        self.config, self.engine, self.tools, self.run_bot, self.metrics = config, engine, tools, run_bot, metrics
        self.sessions: dict[str, Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._offers: defaultdict[str, deque[float]] = defaultdict(deque)
        self._pending_handshakes = 0
        self.gate = operations.Gate()  # admission: draining, engine loading or down (operations.py)

    @property
    def is_full(self) -> bool:
        return len(self.sessions) >= self.config.server.max_sessions

    def busy_message(self) -> str:
        if not self.is_full and hasattr(self.engine, "busy_message"):  # a pool of engines said no
            return str(self.engine.busy_message())
        limit = self.config.server.max_sessions
        return f"the server is busy: all {limit} session slot{'s' * (limit != 1)} are in use, try again later"

    def _refuse(self, status: int, reason: str, message: str) -> Refused:
        self.metrics.sessions_refused.inc(reason)
        return Refused(status, reason, message)

    def admit_offer(self, client: str | None) -> None:
        """Count one signalling offer from ``client``; Refused (429) past ``server.max_offers_per_minute``."""
        if client is None:
            return
        now, offers = time.monotonic(), self._offers[client]
        while offers and offers[0] <= now - 60:
            offers.popleft()
        if len(offers) >= self.config.server.max_offers_per_minute:
            raise self._refuse(429, "rate_limited", "too many offers from this address: wait a minute")
        offers.append(now)
        for stale in [address for address, times in self._offers.items() if not times]:
            del self._offers[stale]

    def reserve(self, transport_name: TransportName, *, client: str | None) -> Session:
        """A slot for a new session, or Refused (counted) when all are taken or ``client`` holds its share."""
        if self.is_full:
            raise self._refuse(503, "capacity", self.busy_message())
        limit = self.config.server.max_sessions_per_client
        if client is not None and sum(s.client == client for s in self.sessions.values()) >= limit:
            raise self._refuse(429, "client_limit", f"this address already has {limit} call(s) in progress")
        lease = None
        if hasattr(self.engine, "lease"):  # an engine pool: the call is placed now, on one engine for its lifetime
            lease = self.engine.lease()
            if lease is None:
                raise self._refuse(503, "engines_full", self.busy_message())
        session = Session(transport_name, client, lease=lease)
        self.sessions[session.id] = session
        self.metrics.sessions_active.inc(transport_name)
        self.metrics.sessions_total.inc(transport_name)
        return session

    def release(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            if session.lease is not None:
                session.lease.release()
            self.metrics.sessions_active.dec(session.transport_name)
            lasted = time.monotonic() - session.started
            logger.info(f"session {session.id} ({session.transport_name}) ended after {lasted:.1f} s")

    def find(self, session_id: str | None, secret: str | None) -> Session | None:
        """The live session ``session_id`` (or holding WebRTC connection ``session_id``) if ``secret`` is its own."""
        if not session_id or not secret:
            return None
        session = self.sessions.get(session_id) or next(
            (s for s in self.sessions.values() if session_id in s.pc_ids), None
        )
        if session is None or not secrets.compare_digest(secret.encode(), session.secret.encode()):
            return None
        return session

    @contextmanager
    def handshake(self) -> Iterator[None]:
        """Hold one of ``server.max_pending_handshakes`` while a websocket opens; Refused when none is left."""
        if self._pending_handshakes >= self.config.server.max_pending_handshakes:
            raise self._refuse(503, "handshakes", "too many connections are opening: try again later")
        self._pending_handshakes += 1
        try:
            yield
        finally:
            self._pending_handshakes -= 1

    def start(self, session: Session, transport: BaseTransport, hang_up: Callable[[], Awaitable[None]]) -> None:
        """Run the session in the background (WebRTC: signalling returns at once)."""
        session.running = True
        self._tasks.add(asyncio.create_task(self.run(session, transport, hang_up), name=f"session-{session.id}"))

    async def run(self, session: Session, transport: BaseTransport, hang_up: Callable[[], Awaitable[None]]) -> None:
        """Run the bot until it ends or the call must end; then hang up and free the slot."""
        session.running = True
        this = asyncio.current_task()
        if this is not None:
            self._tasks.add(this)
            this.add_done_callback(self._tasks.discard)
        ctx = BotContext(
            self.config,
            session.lease or self.engine,
            self.tools,
            session.transport_name,
            TurnMetricsObserver(self.metrics, session.transport_name),
            InputActivityObserver(),
        )
        ctx.client_gone = lambda: self.release(session)
        hang_up = _once(hang_up)
        session.end = _ender(ctx, hang_up)
        bot: asyncio.Task[None] = asyncio.create_task(self.run_bot(transport, ctx), name=f"bot-{session.id}")
        engine_lost = asyncio.create_task(_engine_lost(session.lease))
        try:
            ending = await self._watch(session, ctx, bot, engine_lost)
            if ending is not None and not bot.done():
                await self._end_call(session, ctx, bot, hang_up, ending)
        finally:
            for task in (bot, engine_lost):
                task.cancel()
            await asyncio.gather(bot, engine_lost, return_exceptions=True)
            if not bot.cancelled() and bot.exception() is not None:
                logger.opt(exception=bot.exception()).error(f"session {session.id}: the bot failed")
            try:
                await hang_up()
            finally:
                self.release(session)

    async def _watch(
        self, session: Session, ctx: BotContext, bot: asyncio.Task[None], engine_lost: asyncio.Task[str]
    ) -> str | None:
        """Wait for the bot to end (None) or for a reason to end the call: "vanished", "idle", "overtime" or
        "engine_lost" (the Ray engine the call was placed on died)."""
        server = self.config.server
        period = min(0.25, server.disconnect_timeout_secs / 4, server.idle_timeout_secs / 4)
        while not bot.done():
            if ctx.activity.silent_for() >= server.disconnect_timeout_secs:
                return "vanished"
            if ctx.activity.idle_for() >= server.idle_timeout_secs:
                return "idle"
            if time.monotonic() - session.started >= server.max_call_secs:
                return "overtime"
            if engine_lost.done():
                logger.error(f"session {session.id}: {engine_lost.result()}, hanging up")
                return "engine_lost"
            await asyncio.wait({bot, engine_lost}, timeout=period, return_when=asyncio.FIRST_COMPLETED)
        return None

    async def _end_call(
        self,
        session: Session,
        ctx: BotContext,
        bot: asyncio.Task[None],
        hang_up: Callable[[], Awaitable[None]],
        reason: str,
    ) -> None:
        if reason == "engine_lost":
            pass  # logged by _watch; nothing to say goodbye with
        elif reason == "vanished":
            logger.warning(f"session {session.id}: no audio from the client for {ctx.activity.silent_for():.1f} s")
        else:
            logger.info(f"session {session.id}: ending the call ({reason})")
            if ctx.say_goodbye is not None:
                await ctx.say_goodbye(IDLE_NOTE if reason == "idle" else OVERTIME_NOTE)
                await asyncio.wait({bot}, timeout=GOODBYE_GRACE_SECS)
        if not bot.done():
            await hang_up()  # the transport reports the client gone, and the bot winds down
            await asyncio.wait({bot}, timeout=BOT_EXIT_GRACE_SECS)

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


async def _engine_lost(lease: Any) -> str:
    """Returns (why) when the engine a call was placed on dies; never for the local engine."""
    if lease is None:
        await asyncio.get_running_loop().create_future()  # waits until cancelled
    return str(await lease.wait_closed())


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
