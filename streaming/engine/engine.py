"""The engine: the model and audio tokenizer on one device, in a worker process that sessions share.

:meth:`Engine.load` resolves the checkpoints (building the embedded ``tiny`` preset once when no
``model.path`` is configured), starts the worker process (:mod:`.worker`, which also documents the step
loop and how it batches) and waits until it has loaded them. No tensor work runs on the asyncio event
loop: sessions send the worker requests (:mod:`.protocol`) over a channel, and a reader thread hands
results and events back to each session's event loop. The main process keeps only the text tokenizer
(``builder``, ``special``), for callers that build token scripts.

Supervision: :attr:`Engine.last_progress`, :attr:`Engine.has_pending_work`, :meth:`Engine.is_alive`,
:attr:`Engine.exit_code` and :meth:`Engine.wait_closed` let a server tell a dead or stalled worker from an
idle one (a stall: ``has_pending_work`` and no progress for a while).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import queue
import subprocess
import sys
import threading
import time
import wave
import weakref
from multiprocessing.connection import Pipe
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
from loguru import logger
from mimo_voice.configs import Config
from mimo_voice.configs.errors import EngineClosed, EngineError
from mimo_voice.streaming.model.audio import pcm16_to_float, resample
from mimo_voice.streaming.model.checkpoint import resolve_checkpoint_dir
from mimo_voice.streaming.model.configuration_audio_tokenizer import AudioTokenizerConfig
from mimo_voice.streaming.model.configuration_mimo_audio import MiMoAudioConfig
from mimo_voice.streaming.model.prompts import PromptBuilder, check_mode, task_format
from mimo_voice.streaming.model.text_tokenizer import SpecialTokens, load_text_tokenizer

from .events import TurnEnd
from .protocol import (
    Call,
    Channel,
    EventMessage,
    Failed,
    Heartbeat,
    History,
    Open,
    PipeChannel,
    Request,
    Result,
    Setup,
    Stop,
    Stopped,
)
from .session import Session

__all__ = ["Engine", "EngineClosed", "EngineError", "read_voice_prompt"]

OFFICIAL_TOKENIZER_REPO = "XiaomiMiMo/MiMo-Audio-Tokenizer"
STOP_TIMEOUT_SECS = 30.0


class Engine:
    """Use :meth:`load`. ``builder``/``special``/``tokenizer`` are the text side, for token scripts."""

    session_class: ClassVar[type[Session]] = Session
    testing: ClassVar[bool] = False  # whether the worker accepts the testing requests (text hooks, inspect)

    def __init__(
        self,
        config: Config,
        *,
        tokenizer: Any,
        model_config: MiMoAudioConfig,
        is_tiny: bool,
        process: subprocess.Popen[bytes],
        connection: Channel,
    ) -> None:
        self.config = config
        self.is_tiny = is_tiny
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.builder = PromptBuilder(tokenizer, self.special, model_config.speech_empty_ids, model_config.group_size)
        # The LLM's audio vocabularies end with their "empty" id: the codebooks proper are one smaller.
        self.codebook_sizes = [size - 1 for size in model_config.speech_vocab_sizes]
        self.last_progress = time.monotonic()
        self.worker_steps = 0
        self._worker_active = 0
        self._process = process
        self._connection = connection
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}
        self._sessions: dict[int, Session] = {}
        self._closed = False
        self._exit_lock = threading.Lock()
        self._exit_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]] = []
        self._reader = threading.Thread(target=self._read, name="mimo-engine-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._write, name="mimo-engine-sender", daemon=True)
        self._sender.start()
        self._watcher = threading.Thread(target=self._watch, name="mimo-engine-watcher", daemon=True)
        self._watcher.start()

    @classmethod
    def load(cls, config: Config) -> Self:
        """Loads the configured model (blocking); the embedded ``tiny`` preset when ``model.path`` is empty."""
        if config.model.path is None:
            from mimo_voice.streaming.presets.tiny_training import ensure_preset_checkpoints

            llm_path, codec_path = ensure_preset_checkpoints(config.model.preset, config.model.cache_dir)
            for line in preset_warning(config.model.preset):
                logger.warning(line)
        else:
            llm_path = resolve_checkpoint_dir(config.model.path)
            codec_path = resolve_checkpoint_dir(config.model.tokenizer_path or OFFICIAL_TOKENIZER_REPO)
        voice = read_voice_prompt(config.agent.voice_prompt_wav) if config.agent.voice_prompt_wav else None
        tokenizer = load_text_tokenizer(llm_path)
        process, connection = _start_worker()
        try:
            connection.send(Setup(list(sys.path), config, llm_path, codec_path, voice, testing=cls.testing))
            reply = connection.recv()
        except (EOFError, OSError):
            process.wait()
            raise EngineClosed(
                f"the engine's worker process died while loading (exit code {process.returncode})"
            ) from None
        if isinstance(reply, Failed):
            process.wait()
            raise reply.error
        return cls(
            config,
            tokenizer=tokenizer,
            model_config=MiMoAudioConfig.from_pretrained(llm_path),
            is_tiny=config.model.path is None,
            process=process,
            connection=connection,
        )

    def new_session(
        self, *, mode: str = "non_thinking", system_prompt: str | None = None, task: str = "spoken_dialogue"
    ) -> Session:
        """A new conversation. ``system_prompt`` None takes ``config.agent.system_prompt``; "" means none."""
        check_mode(mode)
        task_format(task)
        if system_prompt is None:
            system_prompt = self.config.agent.system_prompt
        session_id = next(self._ids)
        session = self._sessions[session_id] = self.session_class(self, session_id, mode=mode, task=task)
        opened = self.call(Open(session_id=session_id, task=task, system_prompt=system_prompt or None))
        opened.add_done_callback(_log_failure)
        return session

    # --- supervision ---

    @property
    def has_pending_work(self) -> bool:
        """Whether the worker owes an answer: a call's result, a response's end, or steps it reported active."""
        return (
            bool(self._futures)
            or self._worker_active > 0
            or any(session.has_pending_response for session in list(self._sessions.values()))
        )

    def expect_work(self) -> None:
        """Called before new work is sent: an idle engine's progress clock restarts, so that the time since
        :attr:`last_progress` measures how long pending work has gone without progress."""
        if not self.has_pending_work:
            self.last_progress = time.monotonic()

    def is_alive(self) -> bool:
        """Whether the worker process is running."""
        return self._process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The worker process's exit status (negative: killed by that signal); None while it runs."""
        return self._process.poll()

    @property
    def pid(self) -> int:
        """The worker process's id (for operators, and tests that signal it)."""
        return self._process.pid

    def kill(self) -> None:
        """Kills the worker process at once (a supervisor's answer to a hung step loop); :meth:`wait_closed`
        then completes and pending work fails with :class:`EngineClosed`."""
        if self._process.poll() is None:
            self._process.kill()

    async def wait_closed(self) -> int:
        """Completes when the worker process has ended, for any reason; returns its exit status."""
        future = asyncio.get_running_loop().create_future()
        with self._exit_lock:
            if self._process.returncode is not None:
                return self._process.returncode
            self._exit_waiters.append((asyncio.get_running_loop(), future))
        return await future

    def _watch(self) -> None:
        """Watcher thread: wakes :meth:`wait_closed` callers when the worker process ends."""
        code = self._process.wait()
        with self._exit_lock:
            waiters, self._exit_waiters = self._exit_waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(_resolve, future, code)

    # --- the channel ---

    def call(self, request: Request) -> concurrent.futures.Future[Any]:
        """Sends ``request`` to the worker; the future gets its result (or its exception)."""
        self.expect_work()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        request_id = next(self._ids)
        self._futures[request_id] = future
        try:
            self._send(Call(request_id, request))
        except BaseException:
            self._futures.pop(request_id, None)
            raise
        return future

    def cast(self, request: Request) -> None:
        """Sends ``request`` to the worker without waiting for or hearing about its result."""
        self._send(request)

    def forget(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)

    def _send(self, message: Call | Request | Stop) -> None:
        """Encodes here (a message that cannot be carried is the caller's error) and leaves the writing to the
        sender thread, so the event loop never blocks on a full pipe while the worker is busy."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        self._outbox.put(self._connection.encode(message))

    def _write(self) -> None:
        """Sender thread: the outbox, in order, into the channel."""
        while (data := self._outbox.get()) is not None:
            try:
                self._connection.send_encoded(data)
            except OSError:  # the worker is gone; the reader reports it
                return

    def _read(self) -> None:
        """Reader thread: results to their futures, events and history to their sessions."""
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                break
            self.last_progress = time.monotonic()
            if isinstance(message, Result):
                future = self._futures.pop(message.request_id, None)
                if future is not None:
                    _settle(future, message)
            elif isinstance(message, (EventMessage, History)):
                session = self._sessions.get(message.session_id)
                if session is not None:
                    session._receive(message)
            elif isinstance(message, Heartbeat):
                self.worker_steps, self._worker_active = message.steps, message.active
            elif isinstance(message, Stopped):
                break
        self._closed = True
        self._worker_active = 0
        self._outbox.put(None)
        self._fail_pending()

    def _fail_pending(self) -> None:
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(EngineClosed("the engine's worker process ended"))
        ended = TurnEnd("error", error="the engine's worker process ended")
        for session_id, session in list(self._sessions.items()):
            session._receive(EventMessage(session_id, None, ended))

    async def aclose(self) -> None:
        """Cancels every response, stops the worker process and waits for it."""
        if not self._closed:
            with contextlib.suppress(EngineClosed, OSError):
                self._send(Stop())
        await asyncio.to_thread(self._reader.join, STOP_TIMEOUT_SECS)
        self._closed = True
        self._outbox.put(None)
        try:
            await asyncio.to_thread(self._process.wait, STOP_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._connection.close()


def preset_warning(preset: str) -> list[str]:
    """What the log says when the embedded model serves: it is not MiMo-Audio-7B, and cannot answer."""
    trained = "only trained on synthetic data" if preset == "tiny" else "random weights"
    banner = "!" * 78
    return [
        banner,
        f"No model weights configured (model.path is empty): serving the embedded `{preset}` model.",
        f"It has the real MiMo-Audio architecture but {trained}: it BABBLES, it cannot understand or answer.",
        "Point model.path and model.tokenizer_path at the official checkpoints for real answers.",
        banner,
    ]


def _settle(future: concurrent.futures.Future[Any], result: Result) -> None:
    if result.error is not None:
        future.set_exception(result.error)
    else:
        future.set_result(result.value)


def _resolve(future: asyncio.Future[int], code: int) -> None:
    if not future.done():
        future.set_result(code)


def _start_worker() -> tuple[subprocess.Popen[bytes], PipeChannel]:
    """A fresh interpreter running :func:`.worker.serve` on one end of a socket pair. Not ``multiprocessing``'s
    spawn, which re-runs the caller's main module; not fork, which would copy OpenMP and CUDA state."""
    connection, child = Pipe()
    command = [sys.executable, "-c", f"from mimo_voice.streaming.engine.worker import serve; serve({child.fileno()})"]
    process = subprocess.Popen(command, pass_fds=[child.fileno()])
    child.close()
    weakref.finalize(connection, _stop_process, process)  # also if the engine is never closed
    return process, PipeChannel(connection)


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _log_failure(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.opt(exception=future.exception()).error("the engine could not open a session")


def check_checkpoints(config: Config) -> None:
    """Reads the configured checkpoints' ``config.json`` files (local folders only; a hub id is checked when the
    engine loads it): a :class:`~mimo_voice.configs.errors.MimoVoiceError` naming the problem, before a server
    starts serving and its supervisor starts retrying loads that cannot succeed."""
    if config.model.path is None:
        return
    llm, codec = Path(config.model.path).expanduser(), Path(config.model.tokenizer_path or "").expanduser()
    if llm.is_dir():
        MiMoAudioConfig.from_pretrained(llm)
    if config.model.tokenizer_path and codec.is_dir():
        AudioTokenizerConfig.from_pretrained(codec)


def read_voice_prompt(path: str | Path) -> np.ndarray:
    """A 16-bit PCM WAV file (any rate, mono or multi-channel) as 24 kHz mono float32."""
    try:
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise wave.Error("only 16-bit PCM WAV files are supported")
            frames = wav.readframes(wav.getnframes())
            channels, rate = wav.getnchannels(), wav.getframerate()
    except (OSError, wave.Error, EOFError) as exc:
        raise ValueError(f"voice prompt {path}: cannot read it as a WAV file ({exc})") from exc
    pcm = pcm16_to_float(frames).reshape(-1, channels).mean(axis=1).astype(np.float32)
    return resample(pcm, rate, 24_000)
