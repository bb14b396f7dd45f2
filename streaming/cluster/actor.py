"""The engine as a Ray actor: today's worker step loop, fed by front-ends over Ray instead of a pipe.

One :class:`EngineActor` per GPU (or per ``engine.ray_num_cpus`` CPUs) owns a :class:`~..engine.worker.Worker`
and runs its loop on a thread, so batching stays inside the engine. Any number of front-ends *connect*: each
gets a client number, sends the engine's usual messages with :meth:`EngineActor.submit` (one fire-and-forget
call per message, sequence-numbered because Ray does not promise the order of a threaded actor's calls), and
reads everything addressed to it from one streaming generator, :meth:`EngineActor.stream`, in batches. The
messages are the engine's own (:mod:`..engine.protocol`), as over the local pipe. A front-end numbers its
sessions and requests ``client << CLIENT_SHIFT | n``, so the actor routes the worker's replies by id alone.
The stream also reports the engine's load at least every ``HEARTBEAT_SECS``: a silent stream is how a
front-end tells a hung engine from a busy one. A front-end that stops sending for
``CLIENT_TIMEOUT_SECS`` (it touches the actor every second) is presumed dead: its sessions are closed.
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loguru import logger
from mimo_voice.configs import Config
from mimo_voice.streaming.engine.protocol import Call, Close, EventMessage, History, Request, Result

CLIENT_SHIFT = 32
CLIENT_LIMIT = 2**31  # client numbers are below it, so ids stay within 63 bits
HEARTBEAT_SECS = 1.0
CLIENT_TIMEOUT_SECS = 15.0
SWITCH_INTERVAL_SECS = 0.0005


@dataclass(frozen=True)
class EngineInfo:
    """What a front-end needs besides the messages: the text side of the model, and where the engine runs."""

    client: int
    name: str
    tokenizer: Any
    model_config: Any
    is_tiny: bool
    testing: bool
    node: str
    pid: int
    device: str


class Mailbox:
    """The worker's :class:`~..engine.protocol.Channel` inside the actor (what the pipe is to the worker
    process): an inbox it polls, and one outbox per front-end that its replies are routed to."""

    def __init__(self) -> None:
        self._inbox: collections.deque[Any] = collections.deque()
        self._ready = threading.Condition()
        self.outboxes: dict[int, Outbox] = {}

    # --- the worker's side (Worker uses poll/recv/send like the pipe's Channel) ---

    def poll(self, timeout: float | None) -> bool:
        with self._ready:
            return self._ready.wait_for(lambda: bool(self._inbox), timeout)

    def recv(self) -> Any:
        with self._ready:
            return self._inbox.popleft()

    def send(self, message: Any) -> None:
        """Results, events and histories to the front-end whose id they carry; heartbeats and Stopped to all."""
        if isinstance(message, Result):
            owner: int | None = message.request_id >> CLIENT_SHIFT
        elif isinstance(message, (EventMessage, History)):
            owner = message.session_id >> CLIENT_SHIFT
        else:
            owner = None
        for client, outbox in list(self.outboxes.items()):
            if owner in (None, client):
                outbox.put(message)

    def encode(self, message: Any) -> bytes:
        return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)

    def send_encoded(self, data: bytes) -> None:
        self.send(pickle.loads(data))

    def close(self) -> None:
        pass

    # --- the actor's side ---

    def deliver(self, messages: list[Any]) -> None:
        with self._ready:
            self._inbox.extend(messages)
            self._ready.notify()


class Outbox:
    """Messages for one front-end, and the in-order reassembly of what it sends."""

    def __init__(self) -> None:
        self._messages: collections.deque[Any] = collections.deque()
        self._ready = threading.Condition()
        self.closed = False
        self.last_heard = time.monotonic()
        self.next_seq = 0
        self.early: dict[int, bytes] = {}  # messages that overtook an earlier one

    def put(self, message: Any) -> None:
        with self._ready:
            self._messages.append(message)
            self._ready.notify()

    def take(self, timeout: float) -> list[Any]:
        """Everything queued, waiting up to ``timeout`` for the first message."""
        with self._ready:
            self._ready.wait_for(lambda: bool(self._messages) or self.closed, timeout)
            batch = list(self._messages)
            self._messages.clear()
            return batch

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify()


class EngineActor:
    """A Ray actor (made remote by :func:`engine_actor_class`) that owns one engine's worker."""

    def __init__(self, config: Config, name: str, testing: bool = False) -> None:
        from mimo_voice.configs.logging import setup_logging

        setup_logging(config.logging.level)
        # The step loop and the threads that carry messages share the GIL. Python hands it over only every
        # 5 ms by default: a reply would wait that long behind the loop's Python work between tensor ops.
        sys.setswitchinterval(SWITCH_INTERVAL_SECS)
        self.name = name
        self.config = config
        self.mailbox = Mailbox()
        self._lock = threading.Lock()
        began = time.perf_counter()
        self.worker, self.info = _load_worker(config, self.mailbox, testing)
        logger.info(f"engine {name} ready in {time.perf_counter() - began:.1f} s on {self.info['device']}")
        threading.Thread(target=self._run, name="mimo-engine-loop", daemon=True).start()
        threading.Thread(target=self._reap, name="mimo-engine-reaper", daemon=True).start()

    def connect(self) -> EngineInfo:
        """A new front-end: its client number and what it needs to build prompts. Numbers are random, not
        counted: after a restart, messages a front-end sent to the previous incarnation may still arrive, and
        they must not pass for another front-end's."""
        import ray

        with self._lock:
            client = random.randrange(1, CLIENT_LIMIT)
            while client in self.mailbox.outboxes:
                client = random.randrange(1, CLIENT_LIMIT)
            self.mailbox.outboxes[client] = Outbox()
        return EngineInfo(client=client, name=self.name, node=ray.util.get_node_ip_address(), **self.info)

    def submit(self, client: int, seq: int, data: bytes) -> None:
        """One pickled engine message from a front-end, applied in the order the front-end sent them."""
        outbox = self.mailbox.outboxes.get(client)
        if outbox is None:
            return
        with self._lock:
            outbox.last_heard = time.monotonic()
            outbox.early[seq] = data
            ready = []
            while outbox.next_seq in outbox.early:
                ready.append(pickle.loads(outbox.early.pop(outbox.next_seq)))
                outbox.next_seq += 1
        self.mailbox.deliver([message for message in ready if _may_send(message)])

    def touch(self, client: int) -> bool:
        """The front-end is alive (sent every second); False if the actor no longer knows it."""
        outbox = self.mailbox.outboxes.get(client)
        if outbox is not None:
            outbox.last_heard = time.monotonic()
        return outbox is not None

    def stream(self, client: int) -> Iterator[tuple[dict[str, int], list[Any]]]:
        """The front-end's downlink: (load, messages) batches, at least one every ``HEARTBEAT_SECS``."""
        outbox = self.mailbox.outboxes.get(client)
        while outbox is not None and not outbox.closed:
            messages = outbox.take(HEARTBEAT_SECS)
            yield self.load(), messages

    def disconnect(self, client: int) -> None:
        """A front-end leaves (or was presumed dead): close its sessions, end its stream."""
        outbox = self.mailbox.outboxes.pop(client, None)
        if outbox is None:
            return
        sessions = [sid for sid in list(self.worker.conversations) if sid >> CLIENT_SHIFT == client]
        self.mailbox.deliver([Close(session_id=sid) for sid in sessions])
        outbox.close()

    def load(self) -> dict[str, int]:
        return {"sessions": len(self.worker.conversations), "active": len(self.worker.active)}

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "device": self.info["device"], **self.load()}

    def _run(self) -> None:
        """The step loop. If it fails the engine is broken: end the process, so that Ray restarts it."""
        try:
            self.worker.run()
        except BaseException:
            logger.exception(f"engine {self.name}: the step loop failed; exiting so that Ray restarts the engine")
        os._exit(1)

    def _reap(self) -> None:
        while True:
            time.sleep(HEARTBEAT_SECS)
            now = time.monotonic()
            for client, outbox in list(self.mailbox.outboxes.items()):
                if now - outbox.last_heard > CLIENT_TIMEOUT_SECS:
                    logger.warning(f"engine {self.name}: front-end {client} went silent; closing its sessions")
                    self.disconnect(client)


def _may_send(message: Any) -> bool:
    """Sessions' requests only: a front-end must not stop an engine that others share."""
    if isinstance(message, (Call, Request)):
        return True
    logger.warning(f"dropped a {type(message).__name__} from a front-end: only session requests are accepted")
    return False


def _load_worker(config: Config, mailbox: Mailbox, testing: bool) -> tuple[Any, dict[str, Any]]:
    """The engine's worker in this process, as :meth:`~..engine.engine.Engine.load` starts one in a subprocess."""
    import torch
    from mimo_voice.streaming.engine.engine import OFFICIAL_TOKENIZER_REPO, read_voice_prompt
    from mimo_voice.streaming.engine.heap import keep_freed_memory
    from mimo_voice.streaming.engine.worker import Worker
    from mimo_voice.streaming.model.checkpoint import pick_device, resolve_checkpoint_dir
    from mimo_voice.streaming.model.configuration_mimo_audio import MiMoAudioConfig
    from mimo_voice.streaming.model.text_tokenizer import load_text_tokenizer

    if config.model.path is None:
        from mimo_voice.streaming.presets.tiny_training import ensure_preset_checkpoints

        llm_path, codec_path = ensure_preset_checkpoints(config.model.preset, config.model.cache_dir)
    else:
        llm_path = resolve_checkpoint_dir(config.model.path)
        codec_path = resolve_checkpoint_dir(config.model.tokenizer_path or OFFICIAL_TOKENIZER_REPO)
    device = pick_device(config.model.device)
    if device.type == "cpu":  # the CPUs Ray gave this actor, not the machine's
        torch.set_num_threads(max(1, int(config.engine.ray_num_cpus)))
    if config.engine.keep_freed_memory:
        keep_freed_memory()
    voice = read_voice_prompt(config.agent.voice_prompt_wav) if config.agent.voice_prompt_wav else None
    worker = Worker(config, llm_path, codec_path, voice, mailbox, testing=testing)
    info = {
        "testing": testing,
        "tokenizer": load_text_tokenizer(llm_path),
        "model_config": MiMoAudioConfig.from_pretrained(llm_path),
        "is_tiny": config.model.path is None,
        "pid": os.getpid(),
        "device": str(device),
    }
    return worker, info
