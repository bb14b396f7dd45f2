"""The engine: the model and audio tokenizer on one device, in a worker process that sessions share.

:meth:`Engine.load` resolves the checkpoints (building the embedded ``tiny`` preset once when no
``model.path`` is configured), starts the worker process (:mod:`.worker`, which also documents the step
loop and how it batches) and waits until it has loaded them. No tensor work runs on the asyncio event
loop: sessions send the worker jobs over a pipe, and a reader thread hands results and events back to
each session's event loop. The main process keeps only the text tokenizer (``builder``, ``special``),
for callers that build token scripts.
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
import wave
import weakref
from multiprocessing.connection import Pipe
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from mimo_voice.configs import Config
from mimo_voice.streaming.model.audio import pcm16_to_float, resample
from mimo_voice.streaming.model.checkpoint import resolve_checkpoint_dir
from mimo_voice.streaming.model.configuration_mimo_audio import MiMoAudioConfig
from mimo_voice.streaming.model.text_tokenizer import SpecialTokens, load_text_tokenizer

from .events import TurnEnd
from .prompts import PromptBuilder, check_mode, task_format
from .session import Session
from .worker import Channel

OFFICIAL_TOKENIZER_REPO = "XiaomiMiMo/MiMo-Audio-Tokenizer"
STOP_TIMEOUT_SECS = 30.0


class EngineClosed(RuntimeError):
    """The engine was closed, or its worker process ended."""


class Engine:
    """Use :meth:`load`. ``builder``/``special``/``tokenizer`` are the text side, for token scripts."""

    def __init__(
        self,
        config: Config,
        *,
        tokenizer,
        model_config: MiMoAudioConfig,
        is_tiny: bool,
        process: subprocess.Popen,
        connection: Channel,
    ) -> None:
        self.config = config
        self.is_tiny = is_tiny
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.builder = PromptBuilder(tokenizer, self.special, model_config.speech_empty_ids, model_config.group_size)
        self._process = process
        self._connection = connection
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._sessions: dict[int, Session] = {}
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="mimo-engine-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._write, name="mimo-engine-sender", daemon=True)
        self._sender.start()

    @classmethod
    def load(cls, config: Config) -> Engine:
        """Loads the configured model (blocking); the embedded ``tiny`` preset when ``model.path`` is empty."""
        if config.model.path is None:
            from mimo_voice.streaming.presets.tiny_training import ensure_preset_checkpoints

            llm_path, codec_path = ensure_preset_checkpoints(config.model.preset, config.model.cache_dir)
            trained = "only trained on synthetic data" if config.model.preset == "tiny" else "random weights"
            logger.warning(
                f"no model.path configured: running the embedded `{config.model.preset}` model. It has the "
                f"real MiMo-Audio architecture but {trained}: IT BABBLES."
            )
        else:
            llm_path = resolve_checkpoint_dir(config.model.path)
            codec_path = resolve_checkpoint_dir(config.model.tokenizer_path or OFFICIAL_TOKENIZER_REPO)
        voice = read_voice_prompt(config.agent.voice_prompt_wav) if config.agent.voice_prompt_wav else None
        tokenizer = load_text_tokenizer(llm_path)
        process, connection = _start_worker()
        try:
            connection.send((list(sys.path), config, llm_path, codec_path, voice))
            reply = connection.recv()
        except (EOFError, OSError):
            process.wait()
            raise EngineClosed(
                f"the engine's worker process died while loading (exit code {process.returncode})"
            ) from None
        if reply[0] == "failed":
            process.wait()
            raise reply[1]
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
        session = self._sessions[session_id] = Session(self, session_id, mode=mode, task=task)
        self.call(session_id, "open", task, system_prompt or None).add_done_callback(_log_failure)
        return session

    # --- the pipe ---

    def call(self, session_id: int, method: str, *args: Any) -> concurrent.futures.Future:
        """Runs ``method(*args)`` on the session's state in the worker; the future gets its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        request_id = next(self._ids)
        self._futures[request_id] = future
        try:
            self._send(("call", request_id, session_id, method, args))
        except BaseException:
            self._futures.pop(request_id, None)
            raise
        return future

    def cast(self, session_id: int, method: str, *args: Any) -> None:
        """Like :meth:`call`, without waiting for or hearing about the result."""
        self._send(("cast", session_id, method, args))

    def forget(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)

    def _send(self, message: tuple) -> None:
        """Pickles here (an unpicklable argument is the caller's error) and leaves the writing to the sender
        thread, so the event loop never blocks on a full pipe while the worker is busy."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        self._outbox.put(Channel.pack(message))

    def _write(self) -> None:
        """Sender thread: the outbox, in order, into the pipe."""
        while (data := self._outbox.get()) is not None:
            try:
                self._connection.send_packed(data)
            except OSError:  # the worker is gone; the reader reports it
                return

    def _read(self) -> None:
        """Reader thread: results to their futures, events and history to their sessions."""
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "result":
                _, request_id, ok, value = message
                future = self._futures.pop(request_id, None)
                if future is not None:
                    future.set_result(value) if ok else future.set_exception(value)
            elif kind in ("event", "history"):
                session = self._sessions.get(message[1])
                if session is not None:
                    session._receive(kind, *message[2:])
            elif kind == "stopped":
                break
        self._closed = True
        self._outbox.put(None)
        self._fail_pending()

    def _fail_pending(self) -> None:
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(EngineClosed("the engine's worker process ended"))
        for session in list(self._sessions.values()):
            session._receive("event", None, TurnEnd("error", error="the engine's worker process ended"))

    async def aclose(self) -> None:
        """Cancels every response, stops the worker process and waits for it."""
        if not self._closed:
            with contextlib.suppress(EngineClosed, OSError):
                self._send(("stop",))
        await asyncio.to_thread(self._reader.join, STOP_TIMEOUT_SECS)
        self._closed = True
        self._outbox.put(None)
        try:
            await asyncio.to_thread(self._process.wait, STOP_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._connection.close()


def _start_worker() -> tuple[subprocess.Popen, Channel]:
    """A fresh interpreter running :func:`.worker.serve` on one end of a socket pair. Not ``multiprocessing``'s
    spawn, which re-runs the caller's main module; not fork, which would copy OpenMP and CUDA state."""
    connection, child = Pipe()
    command = [sys.executable, "-c", f"from mimo_voice.streaming.engine.worker import serve; serve({child.fileno()})"]
    process = subprocess.Popen(command, pass_fds=[child.fileno()])
    child.close()
    weakref.finalize(connection, _stop_process, process)  # also if the engine is never closed
    return process, Channel(connection)


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _log_failure(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.opt(exception=future.exception()).error("the engine could not open a session")


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
