"""``mimo-voice serve`` as a real subprocess on a free 127.0.0.1 port, for tests of signals, drain and restarts."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

LISTENING = re.compile(r"open (http://127\.0\.0\.1:\d+)/")


class ServerProcess:
    def __init__(self, process: asyncio.subprocess.Process, base_url: str, log: list[str]) -> None:
        self.process, self.base_url, self.log = process, base_url, log

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    async def health(self) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as http:
            return await http.get("/health")

    async def metrics(self) -> str:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as http:
            return (await http.get("/metrics")).text

    async def wait_health(self, status: str, timeout: float) -> httpx.Response:
        """``GET /health`` once its status is ``status``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        response = None
        while time.monotonic() < deadline:
            response = await self.health()
            if response.json()["status"] == status:
                return response
            await asyncio.sleep(0.1)
        last = response.json() if response is not None else None
        raise AssertionError(f"/health never said {status!r} in {timeout} s; last {last}")

    async def exit_code(self, timeout: float) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)


async def _pump(stream: asyncio.StreamReader, log: list[str], ready: asyncio.Future[str]) -> None:
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        log.append(text)
        match = LISTENING.search(text)
        if match and not ready.done():
            ready.set_result(match.group(1))
    if not ready.done():
        ready.set_exception(AssertionError("the server exited before listening:\n" + "\n".join(log[-30:])))


@asynccontextmanager
async def server_process(*overrides: str, load_timeout: float = 180) -> AsyncIterator[ServerProcess]:
    """The real CLI with the default (tiny) config plus ``--set`` overrides; killed if still running at the end."""
    sets = [arg for override in ("server.port=0", "vad.stop_secs=0.4", *overrides) for arg in ("--set", override)]
    command = [sys.executable, "-m", "mimo_voice.transports.cli", "serve", *sets]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=dict(os.environ)
    )
    log: list[str] = []
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    pump = asyncio.create_task(_pump(process.stdout, log, ready))
    try:
        base_url = await asyncio.wait_for(ready, load_timeout)
        yield ServerProcess(process, base_url, log)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        pump.cancel()


def engine_worker_pid(server_pid: int) -> int:
    """The engine worker among the server process's children (Linux /proc)."""
    children: list[int] = []
    for task in os.listdir(f"/proc/{server_pid}/task"):
        with open(f"/proc/{server_pid}/task/{task}/children") as listing:
            children += [int(pid) for pid in listing.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if b"streaming.engine.worker" in cmdline.read():
                return pid
    raise AssertionError(f"no engine worker among the children {children} of {server_pid}")
