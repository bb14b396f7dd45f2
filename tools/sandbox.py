"""Tool calls in worker processes that can be killed: a tool that overruns its timeout is really stopped.

A thread cannot be stopped, and a tool holding the GIL (a huge integer power, a regex gone wrong) would stall the
event loop with it. So the server's tools run in a small pool of processes started with ``spawn``: each worker builds
its own tools once from ``factory`` (a picklable callable, e.g. ``functools.partial(enabled_tools, tools_config)``),
then answers ``(name, arguments)`` requests over a pipe. A call that overruns its timeout, or is cancelled, kills its
worker and starts a replacement; the event loop only ever waits on a pipe, from a thread. Each worker's address space
is capped (``memory_mb`` above what it needs after start-up), so a memory bomb fails with ``MemoryError`` instead of
swapping the machine.

Outcomes cross the pipe as plain data: ``("ok", result)``, or ``("refused", message)`` for an error a tool raises on
purpose (``ValueError``/``LookupError``, whose message is written for the model), ``("invalid", message)`` for
arguments that do not fit the tool's schema, or ``("failed", details)`` for
anything else: the details are for the log only, the model gets a generic message.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import resource
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

START_TIMEOUT_SECS = 60.0  # a fresh worker imports langchain-core and builds the tools: seconds on a busy machine
WORKER_NICENESS = 5  # a busy tool yields the CPU to the real-time audio of the server process
MAX_MESSAGE_CHARS = 300  # a refusal's message is cut to this: the model needs the gist, not a dump

Outcome = tuple[str, Any]


class ToolTimeout(Exception):
    """The tool did not answer within its timeout; its worker was killed."""


class SandboxError(RuntimeError):
    """The worker could not run the call (it died, or never started)."""


def run_tool(tools: dict[str, Any], name: str, arguments: dict[str, Any]) -> Outcome:
    """One call of a langchain tool, its outcome as plain data (shared by the worker and in-process calls)."""
    from pydantic import ValidationError

    try:
        return "ok", tools[name].invoke(arguments)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
        return "invalid", f"Invalid arguments for {name}: {details}."[:MAX_MESSAGE_CHARS]
    except (ValueError, LookupError) as exc:
        return "refused", (str(exc) or type(exc).__name__)[:MAX_MESSAGE_CHARS]
    except Exception as exc:  # anything else is a fault of the tool: reported, never raised
        return "failed", f"{type(exc).__name__}: {exc}"


def _cap_memory(memory_mb: int) -> None:
    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * resource.getpagesize()
    limit = in_use + memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(connection: Connection, factory: Callable[[], list[Any]], memory_mb: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it stops its workers
    os.nice(WORKER_NICENESS)
    tools = {tool.name: tool for tool in factory()}
    with contextlib.suppress(OSError, ValueError):  # no /proc or no limit support: run uncapped
        _cap_memory(memory_mb)
    connection.send(("ready", None))
    while True:
        try:
            name, arguments = connection.recv()
        except EOFError:  # the server went away
            return
        connection.send(run_tool(tools, name, arguments))


class _Worker:
    def __init__(self, context: Any, factory: Callable[[], list[Any]], memory_mb: int) -> None:
        self.connection, child = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=_worker_main, args=(child, factory, memory_mb), name="mimo-voice-tools", daemon=True
        )
        self.process.start()
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.connection.poll(START_TIMEOUT_SECS):
            raise SandboxError(f"the tool worker did not start within {START_TIMEOUT_SECS:g} s")
        self.connection.recv()
        self.ready = True

    def round_trip(self, name: str, arguments: dict[str, Any]) -> Outcome:
        self.wait_ready()
        self.connection.send((name, arguments))
        return self.connection.recv()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.connection.close()


class ToolSandbox:
    """A pool of ``workers`` processes running the tools that ``factory`` builds; create it inside the process that
    uses it, and ``close()`` it when done (workers are daemons, so they also end with this process)."""

    def __init__(self, factory: Callable[[], list[Any]], *, workers: int = 2, memory_mb: int = 512) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._factory, self._memory_mb = factory, memory_mb
        self._context = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Worker] | None = None
        self._idle_loop: asyncio.AbstractEventLoop | None = None
        self._workers = [self._spawn() for _ in range(workers)]  # start now: imports overlap the server's start
        self._closed = False

    def _spawn(self) -> _Worker:
        return _Worker(self._context, self._factory, self._memory_mb)

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers if worker.process.pid is not None]

    def _queue(self) -> asyncio.Queue[_Worker]:
        loop = asyncio.get_running_loop()
        if self._idle is None or self._idle_loop is not loop:  # an asyncio queue serves one loop
            self._idle, self._idle_loop = asyncio.Queue(), loop
            for worker in self._workers:
                self._idle.put_nowait(worker)
        return self._idle

    async def call(self, name: str, arguments: dict[str, Any], *, timeout: float) -> Outcome:
        """Run tool ``name`` in a worker; ToolTimeout (worker killed) past ``timeout`` seconds of running."""
        if self._closed:
            raise SandboxError("the tool sandbox is closed")
        idle = self._queue()
        worker = await idle.get()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, worker.wait_ready)  # start-up is not the tool's time
            async with asyncio.timeout(timeout):
                outcome = await loop.run_in_executor(None, worker.round_trip, name, arguments)
        except TimeoutError:
            worker = self._replace(worker)
            raise ToolTimeout(name) from None
        except (asyncio.CancelledError, EOFError, OSError, SandboxError) as exc:
            worker = self._replace(worker)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise SandboxError(f"the tool worker failed: {exc!r}") from None
        finally:
            idle.put_nowait(worker)
        return outcome

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill a worker (its pending read in the executor thread ends with EOFError) and start another."""
        worker.kill()
        fresh = self._spawn()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        self._closed = True
        for worker in self._workers:
            worker.kill()
