"""Helpers for the Realtime API tests: the official ``openai`` SDK client against the real server."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import numpy as np
import pytest
from mimo_voice.configs import load_config
from openai import AsyncOpenAI
from pipecat.audio.utils import create_stream_resampler
from transports_support import wait_until as until  # noqa: F401 (re-exported for the realtime tests)

CHUNK_SECS = 0.04


@pytest.fixture(scope="module")
def tiny_engine():
    """The embedded tiny engine, shared by one module's tests; its sessions take a ``text_hook`` (forced words)."""
    from mimo_voice.streaming.engine.testing import TestingEngine

    engine = TestingEngine.load(load_config(None))
    yield engine
    asyncio.run(engine.aclose())


class Events:
    """Every server event of one connection, read in the background, as dicts."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.seen: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.connection:
            self.seen.append(event.model_dump(exclude_none=False))
            self._changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.seen if event["type"] == kind]

    def types(self) -> list[str]:
        return [event["type"] for event in self.seen]

    async def next(self, kind: str, after: int = 0, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """The first event of type ``kind`` (with ``fields``) at index ``after`` or later."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.seen[after:]:
                if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()):
                    return event
            if self._reader.done():
                self._reader.result()
                raise AssertionError(f"the connection ended before {kind}; saw {self.types()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} within {timeout} s; saw {self.types()}")
            self._changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def audio(self, response_id: str) -> bytes:
        deltas = [
            e["delta"]
            for e in self.seen
            if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id
        ]
        return b"".join(base64.b64decode(delta) for delta in deltas)

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


@asynccontextmanager
async def realtime(
    base_url: str, api_key: str = "unused", model: str = "mimo-audio"
) -> AsyncIterator[tuple[Any, Events]]:
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key)
    async with client.realtime.connect(model=model) as connection:
        events = Events(connection)
        try:
            await events.next("session.created", timeout=30)
            yield connection, events
        finally:
            await events.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def resampled(pcm: np.ndarray, rate: int, to_rate: int) -> bytes:
    return await create_stream_resampler().resample(pcm.tobytes(), rate, to_rate)


async def stream(connection: Any, audio: bytes, bytes_per_sec: int, realtime: bool = True) -> None:
    """``input_audio_buffer.append`` in 40 ms chunks, in real time when asked."""
    step = int(bytes_per_sec * CHUNK_SECS) // 2 * 2
    for offset in range(0, len(audio), step):
        await connection.input_audio_buffer.append(audio=b64(audio[offset : offset + step]))
        if realtime:
            await asyncio.sleep(CHUNK_SECS)
