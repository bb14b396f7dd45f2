"""The server's engine supervisor: loads the engine, notices when it dies or hangs, and brings it back.

The engine's worker process can die (an OOM kill, a CUDA fault) or hang (a stuck kernel, a deadlock).
:class:`EngineSupervisor` owns the engine for the server's lifetime:

- it loads the engine in a thread (``/health`` says ``loading``, new calls get 503);
- it watches the running engine: the worker process's exit is seen at once (``wait_closed``), and a step loop
  that has work pending but made no progress for ``engine.watchdog_secs`` is killed and treated as dead;
- on a death it marks the engine down (``/health`` 503 ``engine_down`` with the reason), ends every call in
  progress with "the model restarted; call again", and restarts it after an exponential backoff
  (``engine.restart_backoff_secs``, doubling up to ``engine.restart_backoff_max_secs``; reset once an engine
  has served for a while). A load that fails is retried the same way, its error shown in ``/health``.

``/metrics``: ``mimo_voice_engine_up``, ``mimo_voice_engine_restarts_total``,
``mimo_voice_engine_load_failures_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from loguru import logger
from mimo_voice.configs.schema import Config

from .metrics import ServerMetrics
from .operations import Gate

RESTART_MESSAGE = "the model restarted; call again"
WATCH_INTERVAL_SECS = 0.25
HEALTHY_RUN_SECS = 60.0  # an engine that served this long resets the backoff


class SupervisedEngine(Protocol):
    """What the supervisor needs of an engine (``streaming.engine.engine.Engine`` has it)."""

    last_progress: float

    @property
    def has_pending_work(self) -> bool: ...

    @property
    def exit_code(self) -> int | None: ...

    def is_alive(self) -> bool: ...

    def kill(self) -> None: ...

    async def wait_closed(self) -> int: ...

    async def aclose(self) -> None: ...


class EngineSupervisor:
    """Run :meth:`run` as a task for the server's lifetime; ``on_engine`` hears of every new engine (or None)."""

    def __init__(
        self,
        config: Config,
        *,
        load: Callable[[Config], Any],
        gate: Gate,
        metrics: ServerMetrics,
        on_engine: Callable[[Any], None],
        end_calls: Callable[[str], Awaitable[None]],
    ) -> None:
        self.config, self.gate, self.metrics = config, gate, metrics
        self._load, self._on_engine, self._end_calls = load, on_engine, end_calls
        self.engine: SupervisedEngine | None = None
        self.restarts = 0
        gate.set_engine("loading", "the model is loading")  # until run() has one: no call may start before

    async def run(self) -> None:
        settings = self.config.engine
        backoff = settings.restart_backoff_secs
        try:
            while True:
                engine = await self._load_engine()
                if engine is None:
                    self.gate.set_engine("engine_down", f"{self.gate.engine_detail}; retrying in {backoff:g} s")
                else:
                    started = time.monotonic()
                    reason = await self._serve(engine)
                    if time.monotonic() - started > HEALTHY_RUN_SECS:
                        backoff = settings.restart_backoff_secs
                    self.gate.set_engine("engine_down", f"{reason}; restarting in {backoff:g} s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, settings.restart_backoff_max_secs)
        finally:
            if self.engine is not None:
                engine, self.engine = self.engine, None
                await engine.aclose()

    async def _load_engine(self) -> SupervisedEngine | None:
        self.gate.set_engine("loading", "the model is loading")
        self.metrics.engine_up.set(0)
        load = asyncio.ensure_future(asyncio.to_thread(self._load, self.config))
        try:
            engine = await asyncio.shield(load)
        except asyncio.CancelledError:  # server shutdown mid-load: close what the thread still brings
            load.add_done_callback(_close_when_loaded)
            raise
        except Exception as exc:
            self.metrics.engine_load_failures.inc()
            logger.opt(exception=exc).error("the engine failed to load")
            self.gate.set_engine("engine_down", f"the model failed to load: {type(exc).__name__}: {exc}")
            return None
        self.engine = engine
        self._on_engine(engine)
        self.gate.set_engine("ok")
        self.metrics.engine_up.set(1)
        return engine

    async def _serve(self, engine: SupervisedEngine) -> str:
        """Watches a running engine until it dies; then ends the calls and returns why it died."""
        reason = await self._watch(engine)
        logger.error(f"engine down: {reason}")
        self.engine = None
        self._on_engine(None)
        self.gate.set_engine("engine_down", reason)
        self.metrics.engine_up.set(0)
        self.metrics.engine_restarts.inc()
        self.restarts += 1
        await self._end_calls(RESTART_MESSAGE)
        with contextlib.suppress(Exception):
            await engine.aclose()
        return reason

    async def _watch(self, engine: SupervisedEngine) -> str:
        watchdog = self.config.engine.watchdog_secs
        closed = asyncio.ensure_future(engine.wait_closed())
        try:
            while True:
                done, _ = await asyncio.wait({closed}, timeout=WATCH_INTERVAL_SECS)
                if done or not engine.is_alive():
                    return f"the engine process exited (status {engine.exit_code})"
                stalled_for = time.monotonic() - engine.last_progress
                if engine.has_pending_work and stalled_for > watchdog:
                    engine.kill()
                    return f"the engine stalled (no progress for {stalled_for:.1f} s with work pending) and was killed"
        finally:
            closed.cancel()


def _close_when_loaded(load: asyncio.Future[Any]) -> None:
    if not load.cancelled() and load.exception() is None:
        load.result().kill()
