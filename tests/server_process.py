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

    async def wait_health(self, status: str, timeout: float) -> dict:
        """The ``/health`` body once its status is ``status``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            body = (await self.health()).json()
            if body["status"] == status:
                return body
            await asyncio.sleep(0.05)
        raise AssertionError(f"/health never said {status!r} in {timeout} s; last {body}")

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
