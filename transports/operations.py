"""Whether the server takes calls, and how it stops: the admission gate, ``/health``, and graceful drain.

One :class:`Gate` per server answers two questions every route asks: may a new call start (no while the
server drains or the engine is down or loading: 503 with ``Retry-After``), and what ``GET /health`` says.
Its states, in the order they win:

- ``draining``: SIGTERM or Ctrl-C arrived; calls in progress go on for up to ``server.drain_timeout_secs``.
- ``engine_down`` / ``loading``: reported by the engine supervisor (:mod:`.supervisor`), with its detail.
- ``ok``.

Drain (:class:`DrainingServer`): the first SIGTERM or SIGINT closes the gate but keeps HTTP up, so monitors
see ``draining`` and new offers get 503; when the last call has ended, or the timeout has passed and the
remaining calls have been ended with a message, uvicorn shuts down and the process exits 0. A second Ctrl-C
exits at once. Unlike plain uvicorn, the signal is not re-raised afterwards, so the exit status stays 0.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from fastapi import WebSocket
from fastapi.responses import JSONResponse
from loguru import logger

TRY_AGAIN_LATER = 1013  # websocket close code
DRAIN_RETRY_AFTER_SECS = 30  # a restarting server is usually back by then (or another instance takes the call)
ENGINE_RETRY_AFTER_SECS = 5
DRAIN_MESSAGE = "the server is shutting down; please call again"
POLL_SECS = 0.1
FORCED_EXIT_CODE = 130  # a second Ctrl-C: the shell's code for "ended by SIGINT"


@dataclass(frozen=True)
class Refusal:
    """Why a new call is refused now: a 503 with ``Retry-After``."""

    status: str  # draining | engine_down | loading
    detail: str
    retry_after: int

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Gate:
    """The server's admission state; the supervisor sets the engine's part, the drain sets ``draining``."""

    def __init__(self) -> None:
        self.draining = False
        self.engine_status = "ok"  # ok | loading | engine_down
        self.engine_detail = ""

    def set_engine(self, status: str, detail: str = "") -> None:
        self.engine_status, self.engine_detail = status, detail

    def refusal(self) -> Refusal | None:
        """None when a new call may start."""
        if self.draining:
            return Refusal("draining", DRAIN_MESSAGE, DRAIN_RETRY_AFTER_SECS)
        if self.engine_status != "ok":
            return Refusal(self.engine_status, self.engine_detail, ENGINE_RETRY_AFTER_SECS)
        return None

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body fields) of ``GET /health``: 200 ``ok``, else 503 with the status and its detail."""
        refusal = self.refusal()
        if refusal is None:
            return 200, {"status": "ok"}
        return 503, {"status": refusal.status, "detail": refusal.detail}


def resident_bytes(pid: int) -> int | None:
    """A process's resident set size (Linux ``/proc``); None where it cannot be read (other systems, gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def freeze_startup_heap() -> None:
    """Exempt what exists at start-up (torch, pipecat, the app: millions of objects that live as long as the process)
    from the cycle collector. Every call leaves reference cycles behind (pipecat's processor chains, aiortc's
    transports); the collector's full pass, which frees them, waits until new objects reach a quarter of the
    long-lived ones, so without this it ran rarely, slowly (a pause of the event loop), and RSS climbed meanwhile."""
    gc.collect()
    gc.freeze()


async def refuse_websocket(websocket: WebSocket, refusal: Refusal) -> None:
    """A 503 with ``Retry-After`` instead of the websocket handshake (or, where the ASGI server cannot send a
    denial response, a close with 1013 "try again later")."""
    response = JSONResponse({"detail": refusal.detail}, status_code=503, headers=refusal.headers)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:
        await websocket.close(code=TRY_AGAIN_LATER, reason=refusal.detail[:120])


async def drain(
    gate: Gate,
    calls: Callable[[], int],
    end_calls: Callable[[str], Awaitable[None]],
    timeout_secs: float,
) -> None:
    """Closes the gate, waits up to ``timeout_secs`` for ``calls()`` to reach 0, then ends the rest."""
    gate.draining = True
    logger.warning(f"draining: no new calls; {calls()} in progress may go on for up to {timeout_secs:g} s")
    deadline = time.monotonic() + timeout_secs
    while calls() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECS)
    if calls():
        logger.warning(f"drain timeout: ending {calls()} call(s)")
        await end_calls(DRAIN_MESSAGE)
    logger.info("drained: shutting down")


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on the first SIGTERM/SIGINT (``on_drain`` runs as a task, then the server stops)
    and exits at once on a second SIGINT: ``on_force_exit`` (e.g. kill the engine's worker), then ``os._exit``,
    since a clean shutdown is exactly what the operator declined to wait for."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_drain: Callable[[], Awaitable[None]],
        on_force_exit: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.on_force_exit = on_force_exit
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Runs in the signal handler: only flags, and a thread-safe hand-over to the event loop."""
        if self._loop is None:  # not serving yet: nothing to drain
            self.should_exit = True
        elif not self.draining:
            self.draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
        elif sig == signal.SIGINT:
            logger.warning("second interrupt: exiting now")
            try:
                self.on_force_exit()
            finally:
                os._exit(FORCED_EXIT_CODE)
        # a repeated SIGTERM while draining changes nothing: the drain has its own deadline

    def _start_drain(self) -> None:
        self._drain = asyncio.create_task(self._drain_then_exit(), name="drain")

    async def _drain_then_exit(self) -> None:
        try:
            await self.on_drain()
        except Exception:
            logger.exception("drain failed; shutting down")
        finally:
            self.should_exit = True
