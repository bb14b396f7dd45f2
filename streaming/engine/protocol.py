"""The typed boundary between the engine's asyncio side and its worker process: messages and the channel.

Both sides import this module and :mod:`.events`, and nothing of each other. Requests (main -> worker) are
one dataclass per job a :class:`~.session.Session` can send; a request that wants an answer travels inside a
:class:`Call` and is answered by a :class:`Result` with the same ``request_id``, any other is fire-and-forget.
Replies (worker -> main) carry results, the events of a response, transcript snapshots and heartbeats.

The messages are plain picklable dataclasses, so any transport that moves Python objects can carry them:
today a :class:`PipeChannel` over a socket pair to a subprocess; a Ray actor could carry the same ones.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from mimo_voice.configs import Config

from .events import Event, Turn

HEARTBEAT_SECS = 0.5  # the worker reports progress at most this often while it has work

# --- set-up (main -> worker, once) and its answer ---


@dataclass(frozen=True)
class Setup:
    """The first message: what to load. ``sys_path`` lets callables sent later (a test's text hook) unpickle."""

    sys_path: list[str]
    config: Config
    llm_path: Path
    codec_path: Path
    voice_prompt: np.ndarray | None
    testing: bool = False  # accept SetTextHook and Inspect (tests and benchmarks only)


@dataclass(frozen=True)
class Ready:
    """The worker loaded the model and serves requests."""


@dataclass(frozen=True)
class Failed:
    """The worker could not load; ``error`` says why."""

    error: BaseException


# --- requests (main -> worker) ---


@dataclass(frozen=True, kw_only=True)
class Request:
    """A job for one session's state in the worker."""

    session_id: int


@dataclass(frozen=True, kw_only=True)
class Open(Request):
    task: str
    system_prompt: str | None


@dataclass(frozen=True, kw_only=True)
class FeedAudio(Request):
    pcm: np.ndarray  # float32 mono, validated by the session
    sample_rate: int
    mode: str = "non_thinking"  # the session's: a reply prepared in a pause of the user's speech takes it


@dataclass(frozen=True, kw_only=True)
class FeedCodes(Request):
    codes: torch.Tensor  # long [frames, 8], validated by the session


@dataclass(frozen=True, kw_only=True)
class Respond(Request):
    mode: str
    started: float  # time.perf_counter() when respond() was called
    response_id: int


@dataclass(frozen=True, kw_only=True)
class Cancel(Request):
    played_samples: int | None = None


@dataclass(frozen=True, kw_only=True)
class DiscardUserAudio(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class AddText(Request):
    role: str
    text: str


@dataclass(frozen=True, kw_only=True)
class CaughtUp(Request):
    """Does nothing: its answer means every request sent before it has run."""


@dataclass(frozen=True, kw_only=True)
class Close(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class SetTextHook(Request):
    """Testing only: ``hook(tokens so far) -> next text token or None`` overrides the text sampler."""

    hook: Any


@dataclass(frozen=True, kw_only=True)
class Inspect(Request):
    """Testing only: ``function(conversation, *args)`` runs on the session's state; its result comes back."""

    function: Any
    args: tuple[Any, ...] = ()


TESTING_REQUESTS = (SetTextHook, Inspect)


@dataclass(frozen=True)
class Call:
    """A request whose outcome the sender awaits: answered by the :class:`Result` with this ``request_id``."""

    request_id: int
    request: Request


@dataclass(frozen=True)
class Stop:
    """Ends every session and the worker, which answers :class:`Stopped`."""


# --- replies (worker -> main) ---


@dataclass(frozen=True)
class Result:
    """The outcome of a :class:`Call`: its value, or the exception it raised."""

    request_id: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class EventMessage:
    """An event of response ``response_id`` of a session (None: whichever response is current)."""

    session_id: int
    response_id: int | None
    event: Event


@dataclass(frozen=True)
class History:
    """A session's transcript after it changed."""

    session_id: int
    turns: list[Turn] = field(default_factory=list)


@dataclass(frozen=True)
class Heartbeat:
    """Progress: ``steps`` generation steps done since start, ``active`` responses being generated now.

    Sent at most every :data:`HEARTBEAT_SECS` while the worker generates, and once when it becomes idle."""

    steps: int
    active: int


@dataclass(frozen=True)
class Stopped:
    """The worker finished a :class:`Stop`: the last message it sends."""


# --- the channel ---


class Channel(Protocol):
    """One end of a duplex message transport. ``encode`` runs on the sending thread, so a message that cannot
    be carried fails at the caller; ``send_encoded`` may then run on another thread."""

    def encode(self, message: Any) -> bytes: ...

    def send_encoded(self, data: bytes) -> None: ...

    def send(self, message: Any) -> None: ...

    def recv(self) -> Any: ...

    def poll(self, timeout: float | None) -> bool: ...

    def close(self) -> None: ...


class PipeChannel:
    """A :class:`Channel` over a :class:`~multiprocessing.connection.Connection`, plainly pickled. (Its own
    ``send`` pickles with multiprocessing's pickler, into which torch registers tensor sharing through file
    descriptors: that works only between processes multiprocessing started, and the worker is a subprocess.)"""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def encode(self, message: Any) -> bytes:
        return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)

    def send_encoded(self, data: bytes) -> None:
        self.connection.send_bytes(data)

    def send(self, message: Any) -> None:
        self.send_encoded(self.encode(message))

    def recv(self) -> Any:
        return pickle.loads(self.connection.recv_bytes())

    def poll(self, timeout: float | None) -> bool:
        return self.connection.poll(timeout)

    def close(self) -> None:
        self.connection.close()
