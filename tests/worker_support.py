"""Helpers for tests that drive the engine's worker in the test process (its real step phase, without the pipe)."""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch
from mimo_voice.configs.schema import SamplerParams, TaskSampling
from mimo_voice.streaming.bench.ops import checkpoint_paths
from mimo_voice.streaming.engine.conversation import Conversation
from mimo_voice.streaming.engine.events import AudioChunk, AudioPatch, TurnEnd
from mimo_voice.streaming.engine.protocol import EventMessage
from mimo_voice.streaming.engine.worker import Worker
from session_support import cpu_config, voice


def greedy_worker(*overrides: str) -> Worker:
    """A worker on the tiny preset (CPU/float32 unless ``overrides`` say otherwise), greedy text and audio; its
    events are kept in ``worker.outbox``."""
    config = cpu_config(None, list(overrides))
    greedy = SamplerParams(do_sample=False)
    config.sampling["spoken_dialogue"] = TaskSampling(text=greedy, audio=greedy)
    llm_path, codec_path = checkpoint_paths(config)
    outbox = Outbox()
    worker = Worker(config, llm_path, codec_path, None, outbox)
    worker.outbox = outbox
    return worker


class Outbox:
    """Stands in for the worker's pipe: keeps each session's events."""

    def __init__(self) -> None:
        self.events: dict[int, list] = {}

    def send(self, message) -> None:
        if isinstance(message, EventMessage):
            self.events.setdefault(message.session_id, []).append(message.event)


class EndAfter:
    """A text hook that lets the model choose every token, then ends the reply after ``steps`` positions."""

    def __init__(self, steps: int, eostm: int) -> None:
        self.steps, self.eostm = steps, eostm

    def __call__(self, tokens: list[int]) -> int | None:
        return self.eostm if len(tokens) >= self.steps else None


LENGTHS = (9, 14, 6, 11)  # positions per reply: rows leave the batch at different steps


def open_conversation(worker, session_id: int) -> Conversation:
    conversation = Conversation(worker, session_id, task="spoken_dialogue", system_prompt=None)
    conversation.text_hook = EndAfter(LENGTHS[session_id % len(LENGTHS)], worker.special.eostm)
    with torch.inference_mode():
        conversation.feed_audio(voice(0.8, seed=session_id), 16_000)
    return conversation


def respond(worker, conversation: Conversation) -> None:
    with torch.inference_mode():
        conversation.respond("non_thinking", time.perf_counter(), 1)


def run(worker, steps: int | None = None) -> None:
    """Step phases until no reply is active, or ``steps`` of them."""
    with torch.inference_mode():
        while worker.active and (steps is None or steps > 0):
            worker._step_all()
            steps = None if steps is None else steps - 1


class Reply(NamedTuple):
    tokens: list[int]  # the text channel
    patches: list[np.ndarray]  # the audio codes
    reason: str  # of the TurnEnd
    pcm: np.ndarray  # every AudioChunk's samples, in order


def reply(worker, conversation: Conversation) -> Reply:
    events = worker.outbox.events.pop(conversation.session_id)
    end = events[-1]
    assert isinstance(end, TurnEnd)
    patches = [e.codes for e in events if isinstance(e, AudioPatch)]
    chunks = [e.pcm for e in events if isinstance(e, AudioChunk)]
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return Reply(list(conversation.last_response.tokens), patches, end.reason, pcm)


def replies_alone(worker, session_ids) -> dict[int, Reply]:
    """Each conversation's reply generated on its own (batch size 1)."""
    replies = {}
    for session_id in session_ids:
        conversation = open_conversation(worker, session_id)
        respond(worker, conversation)
        run(worker)
        replies[session_id] = reply(worker, conversation)
        conversation.close()
    return replies


def replies_together(worker, session_ids, cancel: int | None = None) -> dict[int, Reply]:
    """The same replies stepped together: the first two start at once, the third joins two steps later, the rest
    one step after it; ``cancel`` is cancelled two steps after that, mid-batch. Rows leave as their replies end."""
    conversations = {session_id: open_conversation(worker, session_id) for session_id in session_ids}
    order = list(conversations.values())
    for conversation in order[:2]:
        respond(worker, conversation)
    run(worker, steps=2)
    for conversation in order[2:3]:
        respond(worker, conversation)
    run(worker, steps=1)
    for conversation in order[3:]:
        respond(worker, conversation)
    run(worker, steps=2)
    assert len(worker.active) == len(order)
    if cancel is not None:
        with torch.inference_mode():
            conversations[cancel].cancel(None)
    run(worker)
    replies = {session_id: reply(worker, conversation) for session_id, conversation in conversations.items()}
    for conversation in order:
        conversation.close()
    return replies
