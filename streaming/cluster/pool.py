"""The front-end's view of the engines on Ray: connects to each, places calls, notices deaths, reports the pool.

:class:`EnginePool` finds (or creates) the named engine actors of ``engine.ray_namespace``. Per actor, a
:class:`PoolMember` keeps one :class:`RemoteEngine`: the same :class:`~..engine.engine.Engine` the local
backend uses, over a :class:`RayChannel` instead of a pipe, so :class:`~..engine.session.Session` is unchanged.
A call first takes an :class:`EngineLease` (:meth:`EnginePool.lease`: the ready engine with the most free
slots, or None when all are full, which the server answers with 503); all of its sessions go to that engine.

When an actor dies (its stream raises a Ray actor error) or goes silent for ``engine.ray_health_timeout_secs``
(it is then killed, so that Ray restarts it), every session on it ends at once with a ``TurnEnd("error")``
naming the engine, its leases' :meth:`EngineLease.wait_closed` return, and placement skips it until the
restarted actor has loaded its model and answered ``connect`` again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import pickle
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from loguru import logger
from mimo_voice.configs import Config, ConfigError
from mimo_voice.configs.errors import EngineClosed
from mimo_voice.streaming.engine.engine import Engine, preset_warning
from mimo_voice.streaming.engine.events import TurnEnd
from mimo_voice.streaming.engine.protocol import EventMessage
from mimo_voice.streaming.engine.session import Session
from mimo_voice.streaming.engine.testing import TestingEngine

from .actor import CLIENT_SHIFT, HEARTBEAT_SECS, EngineActor, EngineInfo

ENGINE_PREFIX = "mimo-engine-"
ACTOR_GONE = -1  # the "exit code" of an engine actor whose stream ended (Ray does not report one)
RECONNECT_SECS = 0.5
CONNECT_POLL_SECS = 2.0  # how long one connect attempt waits, so that closing the pool is never held up long
OBJECT_STORE_BYTES = 256 * 1024**2  # only for a private cluster: the engines pass small messages, no tensors


class EnginesFull(RuntimeError):
    """Every engine of the pool is full or down."""


def connect_ray(config: Config, *, num_cpus: int | None = None) -> None:
    """Joins the cluster ``engine.ray_address`` names (``local``: starts a private one in this process)."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ConfigError("engine.backend: ray needs Ray: pip install 'mimo-voice[ray]'") from None
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"namespace": config.engine.ray_namespace, "log_to_driver": False}
    if config.engine.ray_address == "local":
        options |= {"num_cpus": num_cpus, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES}
    else:
        options["address"] = config.engine.ray_address
    try:
        ray.init(**options)
    except ConnectionError as exc:
        hint = "start one with `ray start --head`, or set engine.ray_address"
        raise ConfigError(
            f"engine.ray_address={config.engine.ray_address}: no Ray cluster there ({hint}): {exc}"
        ) from None


def engine_handle(config: Config, name: str, *, testing: bool = False) -> Any:
    """The named engine actor, created (detached, restarted by Ray without limit) if it does not exist yet.
    ``testing``: its worker accepts the testing requests (text hooks, inspect), for tests and benchmarks."""
    import ray

    num_gpus = config.engine.ray_num_gpus
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 and config.model.device != "cpu" else 0
    remote = ray.remote(EngineActor)
    return remote.options(
        name=name,
        namespace=config.engine.ray_namespace,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_concurrency=64,  # one blocked stream per front-end, plus submits
        num_cpus=config.engine.ray_num_cpus,
        num_gpus=num_gpus,
    ).remote(config, name, testing)


class RayChannel:
    """The front-end end of one engine actor: a :class:`~..engine.protocol.Channel`, like the local pipe."""

    def __init__(self, handle: Any, info: EngineInfo) -> None:
        self.handle = handle
        self.client = info.client
        self._seq = itertools.count()
        self._stream = handle.stream.remote(info.client)
        self._batch: collections.deque[Any] = collections.deque()
        self.last_heard = time.monotonic()
        self.load = {"sessions": 0, "active": 0}
        self.error: str | None = None

    def encode(self, message: Any) -> bytes:
        return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)

    def send_encoded(self, data: bytes) -> None:
        # Called by the engine's sender thread alone, so sequence numbers follow the engine's order.
        self.handle.submit.remote(self.client, next(self._seq), data)

    def send(self, message: Any) -> None:
        self.send_encoded(self.encode(message))

    def poll(self, timeout: float | None) -> bool:
        return bool(self._batch)

    def recv(self) -> Any:
        """The next message; EOFError when the actor is gone (``error`` says how)."""
        import ray

        while not self._batch:
            try:
                self.load, messages = ray.get(next(self._stream))
            except StopIteration:
                raise EOFError from None
            except ray.exceptions.RayError as exc:
                self.error = f"{type(exc).__name__}"
                raise EOFError from None
            self.last_heard = time.monotonic()
            self._batch.extend(messages)
        return self._batch.popleft()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.disconnect.remote(self.client)


class ActorProcess:
    """What :class:`~..engine.engine.Engine`'s supervision reads of its worker process, for an engine actor as
    one front-end sees it: running until its stream ends, then gone with :data:`ACTOR_GONE`."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.gone = threading.Event()

    @property
    def returncode(self) -> int | None:
        return ACTOR_GONE if self.gone.is_set() else None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.gone.wait(timeout):
            raise subprocess.TimeoutExpired("engine actor", timeout or 0)
        return ACTOR_GONE

    def kill(self) -> None:
        """Ray restarts it (the way to end a hung engine)."""
        import ray

        ray.kill(self.handle, no_restart=False)


class RemoteEngine(Engine):
    """An :class:`~..engine.engine.Engine` whose worker is an engine actor: the same sessions, messages,
    threads and supervision API, over :class:`RayChannel`. Closing it disconnects this front-end only."""

    def __init__(
        self, config: Config, handle: Any, info: EngineInfo, on_down: Callable[[], None] | None = None
    ) -> None:
        self.name = info.name
        self.on_down = on_down  # told first, before any session: placement must not see it ready after
        self.info = info
        self.channel = RayChannel(handle, info)
        self.actor = ActorProcess(handle)
        self.down_reason = ""
        self.left = False  # this front-end closed it: its end is no death
        self._down_lock = threading.Lock()
        super().__init__(
            config,
            tokenizer=info.tokenizer,
            model_config=info.model_config,
            is_tiny=info.is_tiny,
            process=self.actor,  # type: ignore[arg-type]  # the part of Popen that Engine uses
            connection=self.channel,
        )
        # Ids unique on the actor across front-ends: it routes replies by ``id >> CLIENT_SHIFT``.
        self._ids = itertools.count((info.client << CLIENT_SHIFT) + 1)

    @property
    def down(self) -> threading.Event:
        return self.actor.gone

    def abandon(self, why: str) -> None:
        """Gives the engine up now (a failed health check), without waiting for Ray to see it die."""
        self.channel.error = why
        self._closed = True
        self._outbox.put(None)
        self._fail_pending()

    def _fail_pending(self) -> None:
        """The stream ended: the engine died (or this front-end left). Every waiter learns why."""
        with self._down_lock:  # once, whether the health check or the reader thread gets here first
            if self.down_reason:
                return
            self.down_reason = f"engine {self.name} is gone ({self.channel.error or 'stream ended'})"
        if self.on_down is not None:
            self.on_down()
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(EngineClosed(self.down_reason))
        ended = TurnEnd("error", error=self.down_reason)
        for session_id, session in list(self._sessions.items()):
            session._receive(EventMessage(session_id, None, ended))
        self.actor.gone.set()  # wakes wait_closed()

    async def aclose(self) -> None:
        """Leaves the engine (its sessions of this front-end close there); never stops the shared actor."""
        self.left = True
        self._closed = True
        self._outbox.put(None)
        self.channel.close()
        await asyncio.to_thread(self._reader.join, HEARTBEAT_SECS * 3)


class TestingRemoteEngine(RemoteEngine):
    """A :class:`RemoteEngine` whose sessions take text hooks (the actor must be a testing one)."""

    __test__ = False
    session_class = TestingEngine.session_class
    testing = True


class PoolMember:
    """One named engine actor: connects, watches its health, reconnects once Ray has restarted it."""

    def __init__(self, config: Config, name: str, *, testing: bool = False) -> None:
        self.config = config
        self.name = name
        self.handle = engine_handle(config, name, testing=testing)
        self.engine: RemoteEngine | None = None
        self.leases: set[EngineLease] = set()
        self.restarts = 0
        self.state = "starting"  # starting | ready | down
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name=f"mimo-pool-{name}", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        """Sessions on the engine: this front-end's leases, or what the engine reported if more (other
        front-ends' calls; as of its last report, under a second old)."""
        reported = self.engine.channel.load["sessions"] if self.engine is not None else 0
        return max(len(self.leases), reported)

    def free_slots(self) -> int:
        return self.config.engine.sessions_per_engine - self.load

    def status(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "name": self.name,
            "state": self.state,
            "sessions": self.load,
            "calls_here": len(self.leases),
            "limit": self.config.engine.sessions_per_engine,
            "restarts": self.restarts,
            "node": engine.info.node if engine else None,
            "pid": engine.info.pid if engine else None,
            "device": engine.info.device if engine else None,
        }

    def _supervise(self) -> None:
        with contextlib.suppress(SystemExit):  # what Ray raises in threads waiting on it when this process leaves
            self._serve()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            engine = self._connect()
            if engine is None:
                return
            self.engine, self.state = engine, "ready"
            self.ready.set()
            logger.info(f"engine {self.name} ready (pid {engine.info.pid} on {engine.info.node})")
            self._watch(engine)
            if self._stopping.is_set() or engine.left:
                return
            self.restarts += 1
            logger.error(f"{engine.down_reason}: its {len(self.leases)} call(s) here end; Ray restarts it")
            self.leases.clear()  # those calls are over: the restarted engine starts empty

    def _mark_down(self) -> None:
        self.ready.clear()
        self.state = "down"

    def _connect(self) -> RemoteEngine | None:
        """Waits for the actor to answer ``connect`` (it does once its model is loaded). One request at a time,
        polled, so that closing the pool is never held up long and a slow load leaves no extra clients behind."""
        import ray

        pending = None
        while not self._stopping.is_set():
            pending = pending or self.handle.connect.remote()
            ready, _ = ray.wait([pending], timeout=CONNECT_POLL_SECS)
            if not ready:
                continue
            try:
                info = ray.get(pending)
            except ray.exceptions.RayError as exc:  # dead or restarting: ask the next incarnation
                logger.debug(f"engine {self.name} not ready: {type(exc).__name__}")
                pending = None
                self._stopping.wait(RECONNECT_SECS)
                continue
            engine_class = TestingRemoteEngine if info.testing else RemoteEngine
            return engine_class(self.config, self.handle, info, on_down=self._mark_down)
        return None

    def _watch(self, engine: RemoteEngine) -> None:
        """Until the engine goes down: touch it every second; kill it if its stream goes silent."""
        import ray

        timeout = self.config.engine.ray_health_timeout_secs
        while not engine.down.wait(HEARTBEAT_SECS):
            if self._stopping.is_set():
                return
            self.handle.touch.remote(engine.channel.client)
            silent = time.monotonic() - engine.channel.last_heard
            if silent > timeout:
                logger.error(f"engine {self.name} silent for {silent:.1f} s: killing it so that Ray restarts it")
                engine.abandon(f"no heartbeat for {silent:.1f} s")
                ray.kill(self.handle, no_restart=False)
                return

    async def aclose(self) -> None:
        self._stopping.set()
        if self.engine is not None:
            await self.engine.aclose()
        await asyncio.to_thread(self._thread.join, CONNECT_POLL_SECS + HEARTBEAT_SECS)


class EngineLease:
    """One call's place on one engine. The agent uses it as its engine: sessions made here go to that engine."""

    def __init__(self, member: PoolMember, engine: RemoteEngine) -> None:
        self.member = member
        self.engine = engine
        self.config = engine.config
        self.is_tiny = engine.is_tiny
        self.tokenizer, self.special, self.builder = engine.tokenizer, engine.special, engine.builder
        member.leases.add(self)

    @property
    def name(self) -> str:
        return self.member.name

    def new_session(self, **options: Any) -> Session:
        return self.engine.new_session(**options)

    async def wait_closed(self) -> str:
        """Returns, with the reason, when the engine this call is on dies."""
        await self.engine.wait_closed()
        return self.engine.down_reason

    def release(self) -> None:
        self.member.leases.discard(self)


class EnginePool:
    """The engines of a Ray cluster as one engine for a front-end. Use :meth:`connect`."""

    def __init__(self, config: Config, members: list[PoolMember]) -> None:
        self.config = config
        self.members = members

    @classmethod
    def connect(
        cls, config: Config, *, wait_secs: float = 600.0, names: list[str] | None = None, testing: bool = False
    ) -> EnginePool:
        """Joins the cluster and the pool (creating missing engines), and waits until one engine is ready.
        ``names``: other engine actors than the configured pool's; ``testing``: create them as testing ones."""
        connect_ray(config)
        names = names or [f"{ENGINE_PREFIX}{i}" for i in range(config.engine.ray_engines)]
        pool = cls(config, [PoolMember(config, name, testing=testing) for name in names])
        if not pool.wait_ready(1, wait_secs):
            raise EngineClosed(f"no engine of the Ray pool became ready within {wait_secs:.0f} s")
        if pool.is_tiny:
            for line in preset_warning(config.model.preset):
                logger.warning(line)
        return pool

    def wait_ready(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while sum(member.ready.is_set() for member in self.members) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def lease(self) -> EngineLease | None:
        """A place for a new call on the ready engine with the most free slots; None when all are full."""
        ready = [(member, member.engine) for member in self.members if member.ready.is_set() and member.engine]
        candidates = [(member, engine) for member, engine in ready if member.free_slots() > 0]
        if not candidates:
            return None
        # Ties are broken at random, so that front-ends placing at the same moment do not all pick the first.
        member, engine = max(candidates, key=lambda pair: (pair[0].free_slots(), random.random()))
        return EngineLease(member, engine)

    def new_session(self, **options: Any) -> Session:
        """A session on the least loaded engine (for callers that do not hold a lease per call)."""
        lease = self.lease()
        if lease is None:
            raise EnginesFull(self.busy_message())
        return lease.new_session(**options)

    def busy_message(self) -> str:
        ready = sum(member.ready.is_set() for member in self.members)
        return f"every engine is full or down ({ready}/{len(self.members)} ready), try again later"

    @property
    def _any(self) -> RemoteEngine:
        for member in self.members:
            if member.engine is not None:
                return member.engine
        raise EngineClosed("no engine of the pool has connected yet")

    @property
    def is_tiny(self) -> bool:
        return self._any.is_tiny

    @property
    def builder(self) -> Any:
        return self._any.builder

    @property
    def special(self) -> Any:
        return self._any.special

    @property
    def tokenizer(self) -> Any:
        return self._any.tokenizer

    def status(self) -> dict[str, Any]:
        engines = [member.status() for member in self.members]
        return {
            "backend": "ray",
            "engines": len(engines),
            "ready": sum(engine["state"] == "ready" for engine in engines),
            "per_engine": engines,
        }

    def metrics(self) -> Iterator[str]:
        """Prometheus lines for the pool (rendered after the server's own metrics)."""
        yield "# HELP mimo_voice_engine_ready 1 when the engine takes calls.\n# TYPE mimo_voice_engine_ready gauge\n"
        for member in self.members:
            yield f'mimo_voice_engine_ready{{engine="{member.name}"}} {int(member.ready.is_set())}\n'
        yield "# HELP mimo_voice_engine_sessions Sessions on the engine.\n# TYPE mimo_voice_engine_sessions gauge\n"
        for member in self.members:
            yield f'mimo_voice_engine_sessions{{engine="{member.name}"}} {member.load}\n'
        yield "# HELP mimo_voice_engine_restarts_total Engine deaths seen.\n"
        yield "# TYPE mimo_voice_engine_restarts_total counter\n"
        for member in self.members:
            yield f'mimo_voice_engine_restarts_total{{engine="{member.name}"}} {member.restarts}\n'

    def kill(self) -> None:
        """Ends this pool's engine actors for good (a benchmark's own engine; not a shared pool's)."""
        import ray

        for member in self.members:
            ray.kill(member.handle, no_restart=True)

    async def aclose(self) -> None:
        """Leaves the pool; the engines serve on for other front-ends."""
        await asyncio.gather(*(member.aclose() for member in self.members))
