"""A live conversation with MiMo-Audio: :class:`Session`, the asyncio API the agent uses.

Every call turns into a request (a :mod:`.protocol` message) for the engine's worker process, where the
session's state lives (:class:`~.conversation.Conversation`, which also explains how latency is won), and
the response's events come back through the engine's reader thread into this session's event loop. Input is
validated here, so bad audio or a bad role is a ``ValueError`` at the call, not an error later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from loguru import logger
from mimo_voice.streaming.model.audio import check_codes, pcm16_to_float
from mimo_voice.streaming.model.prompts import check_mode

from .events import Event, Turn, TurnEnd
from .protocol import (
    AddText,
    Cancel,
    CaughtUp,
    Close,
    DiscardUserAudio,
    EventMessage,
    FeedAudio,
    FeedCodes,
    History,
    Request,
    Respond,
)

if TYPE_CHECKING:
    from .engine import Engine

INPUT_RATES = (8_000, 16_000, 24_000, 48_000)
TEXT_ROLES = ("user", "system", "tool")


def to_float_pcm(pcm: np.ndarray | bytes, sample_rate: int) -> np.ndarray:
    """Validates user audio: int16 (bytes or array) or float32, mono, at a supported rate."""
    if sample_rate not in INPUT_RATES:
        raise ValueError(f"unsupported sample rate {sample_rate} Hz; use one of {', '.join(map(str, INPUT_RATES))}")
    if isinstance(pcm, (bytes, bytearray, memoryview)) or np.asarray(pcm).dtype == np.int16:
        pcm = pcm16_to_float(pcm)
    pcm = np.asarray(pcm)
    if pcm.dtype != np.float32:
        raise ValueError(f"audio must be int16 PCM or float32, got {pcm.dtype}")
    if pcm.ndim != 1:
        raise ValueError(f"audio must be mono (a 1-D array), got shape {pcm.shape}")
    return pcm


class _Response:
    """The loop-side end of one respond(): its events arrive here from the engine's reader thread."""

    def __init__(self, response_id: int, loop: asyncio.AbstractEventLoop) -> None:
        self.id = response_id
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False  # a TurnEnd was queued
        self.cancelled = False

    def put(self, event: Event) -> None:
        if not self.done:
            self.done = isinstance(event, TurnEnd)
            self.queue.put_nowait(event)


class Session:
    """One conversation; many share an :class:`~.engine.Engine`. Make it with ``engine.new_session()``."""

    def __init__(self, engine: Engine, session_id: int, *, mode: str, task: str) -> None:
        self.mode = check_mode(mode)
        self.task = task
        self._engine = engine
        self._id = session_id
        self._history: list[Turn] = []
        self._response: _Response | None = None
        self._responses = 0
        self._closed = False

    @property
    def history(self) -> list[Turn]:
        """The transcript so far (a copy kept in step with the worker: current after each TurnEnd and call)."""
        return self._history

    def set_mode(self, mode: str) -> None:
        """``thinking`` or ``non_thinking``; takes effect at the next respond()."""
        self.mode = check_mode(mode)

    async def feed_audio(self, pcm: np.ndarray | bytes, sample_rate: int) -> None:
        """User audio while they talk (int16 bytes/array or float32, mono, 8/16/24/48 kHz); resampled, encoded
        and prefilled in the background: this returns at once."""
        pcm = to_float_pcm(pcm, sample_rate)
        self._cast(FeedAudio(session_id=self._id, pcm=pcm, sample_rate=sample_rate, mode=self.mode))

    async def feed_codes(self, codes: torch.Tensor | np.ndarray) -> None:
        """User speech already encoded by the MiMo audio tokenizer (``[frames, 8]`` codes at 25 Hz), e.g. by a
        client or a batched encoder; it joins the user turn exactly like encoded audio."""
        self._cast(FeedCodes(session_id=self._id, codes=check_codes(codes, self._engine.codebook_sizes).cpu()))

    def respond(self) -> AsyncIterator[Event]:
        """Ends the user turn and streams the assistant's: events up to and including a TurnEnd."""
        if self._response is not None and not self._response.done:
            raise RuntimeError("a response is still being generated: cancel() it or read it to its TurnEnd first")
        started = time.perf_counter()
        self._responses += 1
        self._engine.expect_work()
        response = self._response = _Response(self._responses, asyncio.get_running_loop())
        self._cast(Respond(session_id=self._id, mode=self.mode, started=started, response_id=response.id))
        return self._events(response)

    async def _events(self, response: _Response) -> AsyncIterator[Event]:
        try:
            while True:
                event = await response.queue.get()
                if isinstance(event, TurnEnd):
                    yield event
                    return
                if not response.cancelled:
                    yield event
        finally:
            if not response.done and not self._closed:  # the reader left early: stop generating for nobody
                response.cancelled = True
                with contextlib.suppress(RuntimeError):  # the engine is gone already
                    self._cast(Cancel(session_id=self._id))

    async def cancel(self, played_samples: int | None = None) -> None:
        """Stops generation within one step. With ``played_samples`` (24 kHz samples of this response the
        user actually heard), the cache and history go back to the last heard patch and the turn is
        marked interrupted."""
        if self._response is not None:
            self._response.cancelled = True
        await self._call(Cancel(session_id=self._id, played_samples=played_samples))

    async def discard_user_audio(self) -> None:
        """Forgets the audio fed since the last respond() (noise, a false barge-in)."""
        await self._call(DiscardUserAudio(session_id=self._id))

    async def add_text(self, role: str, text: str) -> None:
        """Injects a turn: ``tool`` (a tool result), ``system`` (a note) or ``user`` (typed text)."""
        if role not in TEXT_ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(TEXT_ROLES)}")
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        await self._call(AddText(session_id=self._id, role=role, text=text))

    async def caught_up(self) -> None:
        """Returns once the worker has done everything sent before (e.g. prefilled all audio fed so far)."""
        await self._call(CaughtUp(session_id=self._id))

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self._call(Close(session_id=self._id))
        finally:
            self._closed = True
            self._engine.forget(self._id)

    @property
    def has_pending_response(self) -> bool:
        """Whether a response was requested and its TurnEnd has not arrived yet."""
        return self._response is not None and not self._response.done

    # --- plumbing ---

    def _cast(self, request: Request) -> None:
        if self._closed:
            raise RuntimeError("this session is closed")
        self._engine.cast(request)

    async def _call(self, request: Request) -> Any:
        if self._closed:
            raise RuntimeError("this session is closed")
        return await asyncio.wrap_future(self._engine.call(request))

    def _receive(self, message: EventMessage | History) -> None:
        """Engine reader thread: a transcript snapshot, or an event of a response (``response_id`` None: the
        current one)."""
        if isinstance(message, History):
            self._history = message.turns
            return
        response = self._response
        if response is None or response.done or message.response_id not in (None, response.id):
            return
        try:
            response.loop.call_soon_threadsafe(response.put, message.event)
        except RuntimeError:  # that event loop is closed: nobody is listening
            logger.debug("dropped an event for a closed event loop")
