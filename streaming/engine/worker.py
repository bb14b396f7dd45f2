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

Messages are the dataclasses of :mod:`.protocol`; :meth:`Worker.dispatch` maps each request type to the
conversation's job. The worker also sends a :class:`~.protocol.Heartbeat` while it generates, so the main
process can tell a stalled step loop from an idle one.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from mimo_voice.configs import Config
from mimo_voice.configs.logging import setup_logging
from mimo_voice.streaming.model.checkpoint import pick_device, pick_dtype
from mimo_voice.streaming.model.fast import FastMiMoAudio
from mimo_voice.streaming.model.kv_pool import KVPool
from mimo_voice.streaming.model.modeling_audio_tokenizer import load_audio_tokenizer
from mimo_voice.streaming.model.modeling_mimo_audio import load_mimo_audio
from mimo_voice.streaming.model.prompts import PromptBuilder, frames_to_patches
from mimo_voice.streaming.presets.real7b import random_on_device

from .conversation import Conversation
from .events import Event
from .generation import Generation
from .heap import keep_freed_memory
from .protocol import (
    HEARTBEAT_SECS,
    TESTING_REQUESTS,
    AddText,
    Call,
    Cancel,
    CaughtUp,
    Channel,
    Close,
    DiscardUserAudio,
    EventMessage,
    Failed,
    FeedAudio,
    FeedCodes,
    Heartbeat,
    History,
    Inspect,
    Open,
    PipeChannel,
    Ready,
    Request,
    Respond,
    Result,
    SetTextHook,
    Setup,
    Stop,
    Stopped,
)
from .scheduler import StepScheduler

TINY_REPLY_PATCHES = (22, 36)  # 3.5-5.8 s of audio; the trained replies have 25-30 patches


class Worker:
    """The model, the audio tokenizer and every session's :class:`~.conversation.Conversation`."""

    def __init__(
        self,
        config: Config,
        llm_path: Path,
        codec_path: Path,
        voice_prompt: np.ndarray | None,
        connection: Channel,
        *,
        testing: bool = False,
    ) -> None:
        self.config = config
        self.connection = connection
        self.testing = testing
        # The embedded tiny model learnt its reply format only ~95 % of the time: its spoken replies are held to
        # the trained length (at least, at most this many patches) so that the default always babbles audibly.
        embedded = config.model.preset if config.model.path is None else None
        self.reply_patches: tuple[int, int] | None = TINY_REPLY_PATCHES if embedded == "tiny" else None
        device = pick_device(config.model.device)
        dtype = pick_dtype(config.model.dtype, device)
        if embedded == "real7b":
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
        self.fast = FastMiMoAudio(self.model, self.pool, compile=config.engine.compile, weights=config.engine.weights)
        config_ = self.model.config
        empty_codes = torch.tensor(config_.speech_empty_ids, device=device).expand(config_.group_size, -1)
        self.scheduler = StepScheduler(self.fast, config_.vocab_size, empty_codes.contiguous(), self.special.empty)
        self.conversations: dict[int, Conversation] = {}
        self.active: list[Generation] = []
        self.steps = 0  # step rounds run, reported in heartbeats
        self._last_beat = 0.0
        self._worked_since_beat = False  # active at some step since the last heartbeat, reported or not

    # --- used by conversations ---

    def activate(self, generation: Generation) -> None:
        self.active.append(generation)

    def emit(self, session_id: int, response_id: int | None, event: Event) -> None:
        self.connection.send(EventMessage(session_id, response_id, event))

    def send_history(self, conversation: Conversation) -> None:
        self.connection.send(History(conversation.session_id, list(conversation.history)))

    # --- the loop ---

    def run(self) -> None:
        with torch.inference_mode():
            while True:
                while self.connection.poll(0 if self.active else None):
                    message = self.connection.recv()
                    if isinstance(message, Stop):
                        self._shutdown()
                        return
                    self._handle(message)
                if self.active:
                    self.steps += 1
                self._step_all()
                self._heartbeat()

    def _handle(self, message: Call | Request) -> None:
        """A call is answered with its result or error; any other request's error is only logged."""
        if not isinstance(message, Call):
            try:
                self.dispatch(message)
            except Exception:
                logger.exception(f"{type(message).__name__} failed")
            return
        try:
            value = self.dispatch(message.request)
        except Exception as exc:  # handed to whoever awaits the call
            self.connection.send(Result(message.request_id, error=_portable(exc)))
        else:
            self.connection.send(Result(message.request_id, value=value))

    def dispatch(self, request: Request) -> Any:
        """Runs one request on its session's state: the one place that maps message types to jobs."""
        if isinstance(request, TESTING_REQUESTS) and not self.testing:
            raise PermissionError(f"{type(request).__name__} is only accepted by a testing engine")
        if isinstance(request, Open):
            self.conversations[request.session_id] = Conversation(
                self, request.session_id, task=request.task, system_prompt=request.system_prompt
            )
            return None
        conversation = self.conversations[request.session_id]
        match request:
            case FeedAudio(pcm=pcm, sample_rate=sample_rate, mode=mode):
                conversation.feed_audio(pcm, sample_rate, mode)
            case FeedCodes(codes=codes):
                conversation.feed_codes(codes)
            case Respond(mode=mode, started=started, response_id=response_id):
                conversation.respond(mode, started, response_id)
            case Cancel(played_samples=played_samples):
                conversation.cancel(played_samples)
            case DiscardUserAudio():
                conversation.discard_user_audio()
            case AddText(role=role, text=text):
                conversation.add_text(role, text)
            case CaughtUp():
                pass  # answering it is the point
            case Close():
                conversation.close()
                del self.conversations[request.session_id]
            case SetTextHook(hook=hook):
                conversation.text_hook = hook
            case Inspect(function=function, args=args):
                return function(conversation, *args)
            case _:
                raise TypeError(f"unknown request {type(request).__name__}")
        return None

    def _heartbeat(self) -> None:
        """Progress at most every HEARTBEAT_SECS while generating, and once on becoming idle: also after work that
        began and ended between two beats (a short reply soon after the last beat), whose steps are then reported."""
        busy = bool(self.active)
        self._worked_since_beat |= busy
        now = time.monotonic()
        if not self._worked_since_beat or (busy and now - self._last_beat < HEARTBEAT_SECS):
            return
        self._last_beat, self._worked_since_beat = now, busy
        self.connection.send(Heartbeat(self.steps, len(self.active)))

    def _step_all(self) -> None:
        """One position for every active response, as one batch (:mod:`.scheduler`)."""
        self.scheduler.step(self.active)
        self.active = [generation for generation in self.active if not generation.done]

    def _shutdown(self) -> None:
        for conversation in self.conversations.values():
            conversation.close()
        self.connection.send(Stopped())


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
    if config.engine.keep_freed_memory:
        keep_freed_memory()


def engine_threads(config: Config, device: torch.device) -> int:
    """``engine.threads``, or by default: on CUDA two (the process only launches kernels); on CPU every core but
    one, left to the main process (event loop, transport, VAD). Batch-1 ops of the small presets gain nothing
    from more threads and, on a busy machine, lose a lot to threads spinning at barriers."""
    if config.engine.threads:
        return config.engine.threads
    cores = len(os.sched_getaffinity(0))
    return min(2, cores) if device.type == "cuda" else max(1, cores - 1)


def serve(fd: int) -> None:
    """Entry point of the worker process: read the set-up, load, say ready (or why not), serve."""
    connection = PipeChannel(Connection(fd))
    setup: Setup = connection.recv()
    sys.path[:] = setup.sys_path  # callables the main process sends (text hooks) must unpickle here as there
    _setup(setup.config)
    began = time.perf_counter()
    try:
        worker = Worker(
            setup.config, setup.llm_path, setup.codec_path, setup.voice_prompt, connection, testing=setup.testing
        )
    except Exception as exc:
        connection.send(Failed(_portable(exc)))
        return
    logger.debug(f"engine worker ready in {time.perf_counter() - began:.1f} s")
    # The model, tokenizers and imports live as long as the process: exempt them from the cycle collector, whose
    # full passes would otherwise walk them all (a pause of every session's steps) and run too rarely to free garbage.
    gc.collect()
    gc.freeze()
    connection.send(Ready())
    with contextlib.suppress(EOFError, BrokenPipeError, KeyboardInterrupt):  # the main process went away
        worker.run()
