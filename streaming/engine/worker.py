"""The engine's worker process: the model, the audio tokenizer and every session's state, driven by one loop.

It is a process, not a thread, so that the asyncio event loop never waits for it: a thread shares the
GIL with the loop, and when the OS preempts a worker thread that holds the GIL (a busy machine does,
for tens to hundreds of ms), the loop stalls with it. Here the two only exchange messages over a pipe.

Step loop, designed for batching. A session's state (:class:`~.conversation.Conversation`: context record,
KV cache, codec streams) is a *request state*; a response being generated is an *active request*
(:class:`~.generation.Generation`). The worker loops::

    run every queued job, in arrival order      (short: a few patches of prefill, a cache cut)
    advance every active request by one position (one batch)
    (block on the pipe when nothing is active)

so several sessions share the device fairly, a cancel takes effect before the next step, and user audio
arriving for one session is prefilled between the steps of another. The step phase is batched
(:mod:`.scheduler`): every active request is a row of one backbone step over the worker's KV pool (one slot per
conversation, rows at different lengths) and of one patch-decoder call, through the fast hot path
(:class:`~mimo_voice.streaming.model.fast.FastMiMoAudio`).

Messages, main -> worker: ``("call", request_id, session_id, method, args)`` (answered with
``("result", request_id, ok, value)``), ``("cast", session_id, method, args)`` (no answer), ``("stop",)``;
worker -> main: results, ``("event", session_id, response_id, event)``, ``("history", session_id, turns)``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from mimo_voice.configs import Config
from mimo_voice.configs.logging import setup_logging
from mimo_voice.streaming.model.checkpoint import pick_device, pick_dtype
from mimo_voice.streaming.model.fast import FastMiMoAudio
from mimo_voice.streaming.model.kv_pool import KVPool
from mimo_voice.streaming.model.modeling_audio_tokenizer import load_audio_tokenizer
from mimo_voice.streaming.model.modeling_mimo_audio import load_mimo_audio
from mimo_voice.streaming.presets.real7b import random_on_device

from .conversation import Conversation
from .events import Event
from .generation import Generation
from .prompts import PromptBuilder, frames_to_patches
from .scheduler import StepScheduler

SESSION_METHODS = {
    "feed_audio",
    "feed_codes",
    "respond",
    "cancel",
    "discard_user_audio",
    "add_text",
    "set_text_hook",
    "caught_up",
    "inspect",
    "close",
}


class Channel:
    """One end of the pipe, carrying plainly pickled messages. (``Connection.send`` pickles with multiprocessing's
    pickler, into which torch registers tensor sharing through file descriptors: that works only between
    processes multiprocessing started, and the worker is started by subprocess.)"""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    @staticmethod
    def pack(message: Any) -> bytes:
        return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)

    def send(self, message: Any) -> None:
        self.connection.send_bytes(self.pack(message))

    def send_packed(self, data: bytes) -> None:
        self.connection.send_bytes(data)

    def recv(self) -> Any:
        return pickle.loads(self.connection.recv_bytes())

    def poll(self, timeout: float | None) -> bool:
        return self.connection.poll(timeout)

    def close(self) -> None:
        self.connection.close()


class Worker:
    def __init__(self, config: Config, llm_path: Path, codec_path: Path, voice_prompt, connection: Channel) -> None:
        self.config = config
        self.connection = connection
        device = pick_device(config.model.device)
        dtype = pick_dtype(config.model.dtype, device)
        if config.model.path is None and config.model.preset == "real7b":
            self.model, self.tokenizer, self.special = random_on_device(llm_path, device, dtype, config.model.seed)
        else:
            self.model, self.tokenizer, self.special = load_mimo_audio(llm_path, device=device, dtype=dtype)
        self.codec = load_audio_tokenizer(codec_path, device=device, dtype=dtype)
        self.builder = PromptBuilder(
            self.tokenizer, self.special, self.model.config.speech_empty_ids, self.model.config.group_size
        )
        self.voice_patches = None
        if voice_prompt is not None:
            with torch.inference_mode():
                frames = self.codec.encode(torch.from_numpy(voice_prompt).to(device)).cpu()
            self.voice_patches = frames_to_patches(frames, self.model.config.group_size)
        self.pool = KVPool(
            self.model.config, config.engine.kv_slots, config.streaming.max_context_positions, device, dtype
        )
        self.fast = FastMiMoAudio(self.model, self.pool, compile=config.engine.compile)
        config_ = self.model.config
        empty_codes = torch.tensor(config_.speech_empty_ids, device=device).expand(config_.group_size, -1)
        self.scheduler = StepScheduler(self.fast, config_.vocab_size, empty_codes.contiguous(), self.special.empty)
        self.conversations: dict[int, Conversation] = {}
        self.active: list[Generation] = []

    # --- used by conversations ---

    def activate(self, generation: Generation) -> None:
        self.active.append(generation)

    def emit(self, session_id: int, response_id: int, event: Event) -> None:
        self.connection.send(("event", session_id, response_id, event))

    def send_history(self, conversation: Conversation) -> None:
        self.connection.send(("history", conversation.session_id, list(conversation.history)))

    # --- the loop ---

    def run(self) -> None:
        with torch.inference_mode():
            while True:
                while self.connection.poll(0 if self.active else None):
                    message = self.connection.recv()
                    if message[0] == "stop":
                        self._shutdown()
                        return
                    self._handle(*message)
                self._step_all()

    def _handle(self, kind: str, *message: Any) -> None:
        if kind == "cast":
            session_id, method, args = message
            self._run(session_id, method, args)
            return
        request_id, session_id, method, args = message
        try:
            value = self._open(session_id, *args) if method == "open" else self._run(session_id, method, args)
        except Exception as exc:  # handed to whoever awaits the call
            self.connection.send(("result", request_id, False, _portable(exc)))
        else:
            self.connection.send(("result", request_id, True, value))

    def _open(self, session_id: int, task: str, system_prompt: str | None) -> None:
        self.conversations[session_id] = Conversation(self, session_id, task=task, system_prompt=system_prompt)

    def _run(self, session_id: int, method: str, args: tuple) -> Any:
        if method not in SESSION_METHODS:
            raise ValueError(f"unknown session method {method!r}")
        conversation = self.conversations[session_id]
        value = getattr(conversation, method)(*args)
        if method == "close":
            del self.conversations[session_id]
        return value

    def _step_all(self) -> None:
        """One position for every active response, as one batch (:mod:`.scheduler`)."""
        self.scheduler.step(self.active)
        self.active = [generation for generation in self.active if not generation.done]

    def _shutdown(self) -> None:
        for conversation in self.conversations.values():
            conversation.close()
        self.connection.send(("stopped",))


def _portable(exc: Exception) -> Exception:
    """The exception itself if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _setup(config: Config) -> None:
    setup_logging(config.logging.level)
    device = pick_device(config.model.device)
    if device.type == "cuda":
        # `cuda:N`: that device becomes the process's default, for every allocation and kernel launch.
        torch.cuda.set_device(device)
    torch.set_num_threads(engine_threads(config, device))


def engine_threads(config: Config, device: torch.device) -> int:
    """``engine.threads``, or by default: on CUDA two (the process only launches kernels); on CPU every core but
    one, left to the main process (event loop, transport, VAD). Batch-1 ops of the small presets gain nothing
    from more threads and, on a busy machine, lose a lot to threads spinning at barriers."""
    if config.engine.threads:
        return config.engine.threads
    cores = len(os.sched_getaffinity(0))
    return min(2, cores) if device.type == "cuda" else max(1, cores - 1)


def serve(fd: int) -> None:
    """Entry point of the worker process: read the set-up message, load, say ready (or why not), serve."""
    connection = Channel(Connection(fd))
    path, config, llm_path, codec_path, voice_prompt = connection.recv()
    sys.path[:] = path  # callables the main process sends (text hooks) must unpickle here as there
    _setup(config)
    began = time.perf_counter()
    try:
        worker = Worker(config, llm_path, codec_path, voice_prompt, connection)
    except Exception as exc:
        connection.send(("failed", _portable(exc)))
        return
    logger.debug(f"engine worker ready in {time.perf_counter() - began:.1f} s")
    connection.send(("ready",))
    with contextlib.suppress(EOFError, BrokenPipeError, KeyboardInterrupt):  # the main process went away
        worker.run()
