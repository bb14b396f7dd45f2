"""The worker's batched step phase: responses stepped together equal each response stepped alone.

The worker is built in the test process (its real step phase, without the pipe) on the tiny preset, CPU/fp32,
greedy text and audio: several conversations reply at once, joining and leaving the batch at different steps,
and one is cancelled mid-batch; every other one's text tokens and audio codes must equal its reply generated
alone (batch size 1).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from mimo_voice.configs.schema import SamplerParams, TaskSampling
from mimo_voice.streaming.bench.ops import checkpoint_paths
from mimo_voice.streaming.engine.conversation import Conversation
from mimo_voice.streaming.engine.events import AudioPatch, TurnEnd
from mimo_voice.streaming.engine.worker import Worker
from session_support import cpu_config, voice

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class Outbox:
    """Stands in for the worker's pipe: keeps each session's events."""

    def __init__(self) -> None:
        self.events: dict[int, list] = {}

    def send(self, message) -> None:
        if message[0] == "event":
            self.events.setdefault(message[1], []).append(message[3])


class EndAfter:
    """A text hook that lets the model choose every token, then ends the reply after ``steps`` positions."""

    def __init__(self, steps: int, eostm: int) -> None:
        self.steps, self.eostm = steps, eostm

    def __call__(self, tokens: list[int]) -> int | None:
        return self.eostm if len(tokens) >= self.steps else None


@pytest.fixture(scope="module")
def worker():
    config = cpu_config(None)
    greedy = SamplerParams(do_sample=False)
    config.sampling["spoken_dialogue"] = TaskSampling(text=greedy, audio=greedy)
    llm_path, codec_path = checkpoint_paths(config)
    outbox = Outbox()
    worker = Worker(config, llm_path, codec_path, None, outbox)
    worker.outbox = outbox
    return worker


LENGTHS = (9, 14, 6, 11)  # positions per reply: rows leave the batch at different steps


def _open(worker, session_id: int) -> Conversation:
    conversation = Conversation(worker, session_id, task="spoken_dialogue", system_prompt=None)
    conversation.set_text_hook(EndAfter(LENGTHS[session_id % len(LENGTHS)], worker.special.eostm))
    with torch.inference_mode():
        conversation.feed_audio(voice(0.8, seed=session_id), 16_000)
    return conversation


def _respond(worker, conversation: Conversation) -> None:
    with torch.inference_mode():
        conversation.respond("non_thinking", time.perf_counter(), 1)


def _run(worker, steps: int | None = None) -> None:
    """Step phases until no reply is active, or ``steps`` of them."""
    with torch.inference_mode():
        while worker.active and (steps is None or steps > 0):
            worker._step_all()
            steps = None if steps is None else steps - 1


def _reply(worker, conversation: Conversation) -> tuple[list[int], list[np.ndarray], str]:
    events = worker.outbox.events.pop(conversation.session_id)
    end = events[-1]
    assert isinstance(end, TurnEnd)
    patches = [e.codes for e in events if isinstance(e, AudioPatch)]
    return list(conversation.last_response.tokens), patches, end.reason


def test_batched_replies_equal_replies_generated_alone_with_joins_leaves_and_a_cancel(worker):
    alone = {}
    for session_id in range(1, 6):
        conversation = _open(worker, session_id)
        _respond(worker, conversation)
        _run(worker)
        alone[session_id] = _reply(worker, conversation)
        conversation.close()
    assert all(reason == "stop" for _, _, reason in alone.values())
    assert sum(len(patches) for _, patches, _ in alone.values()) > 10  # the replies do speak

    conversations = {session_id: _open(worker, session_id) for session_id in range(1, 6)}

    _respond(worker, conversations[1])
    _respond(worker, conversations[2])
    _run(worker, steps=2)
    _respond(worker, conversations[3])  # joins a running batch
    _run(worker, steps=1)
    _respond(worker, conversations[4])
    _respond(worker, conversations[5])
    _run(worker, steps=2)
    assert len(worker.active) == 5
    with torch.inference_mode():
        conversations[2].cancel(None)  # mid-batch
    _run(worker)

    for session_id, conversation in conversations.items():
        tokens, patches, reason = _reply(worker, conversation)
        want_tokens, want_patches, _ = alone[session_id]
        if session_id == 2:
            assert reason == "cancelled" and 0 < len(tokens) < len(want_tokens)
            want_tokens, want_patches = want_tokens[: len(tokens)], want_patches[: len(patches)]
        else:
            assert reason == "stop"
        assert tokens == want_tokens, f"session {session_id}"
        assert len(patches) == len(want_patches)
        assert all(np.array_equal(a, b) for a, b in zip(patches, want_patches)), f"session {session_id}"
        conversation.close()


def test_a_session_leaving_frees_its_slot_and_a_new_one_gets_a_clean_cache(worker):
    first = _open(worker, 1)
    slot = first.slot
    assert worker.pool.length(slot) == len(first.context) > 0
    first.close()
    assert first.slot is None
    second = _open(worker, 2)
    assert second.cached == len(second.context)
    second.close()
