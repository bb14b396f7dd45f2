"""Helpers for the transport tests: the real server on a free 127.0.0.1 port, around the tiny engine."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from mimo_voice.configs import load_config
from mimo_voice.transports.server import create_app


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn on a free 127.0.0.1 port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def metric(base_url: str, name: str, token: str | None = None) -> float:
    """The value of one sample of ``GET /metrics`` (``name`` includes its labels); 0 when absent."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.get("/metrics", headers=headers)
        response.raise_for_status()
        text = response.text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def tiny_engine():
    """The real embedded tiny engine (built once into the model cache), shared by one module's tests."""
    from mimo_voice.streaming.engine.engine import Engine

    engine = Engine.load(load_config(None))
    yield engine
    asyncio.run(engine.aclose())


def agent_app(engine, *overrides: str, config_name: str | None = None) -> FastAPI:
    """The real server (agent, tools) around the shared engine; ``overrides`` as on the command line."""
    return create_app(load_config(config_name, ["vad.stop_secs=0.4", *overrides]), engine=engine)
