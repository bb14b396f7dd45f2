"""The worker's batched step phase: responses stepped together equal each response stepped alone.

The worker is built in the test process (its real step phase, without the pipe) on the tiny preset, CPU/fp32,
greedy text and audio: several conversations reply at once, joining and leaving the batch at different steps,
and one is cancelled mid-batch; every other one's text tokens and audio codes must equal its reply generated
alone (batch size 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mimo_voice.streaming.engine import generation
from session_support import voice
from worker_support import (
    EndAfter,
    greedy_worker,
    open_conversation,
    replies_alone,
    replies_together,
    reply,
    respond,
    run,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def worker():
    return greedy_worker()


def test_batched_replies_equal_replies_generated_alone_with_joins_leaves_and_a_cancel(worker):
    alone = replies_alone(worker, range(1, 6))
    assert all(r.reason == "stop" for r in alone.values())
    assert sum(len(r.patches) for r in alone.values()) > 10  # the replies do speak
    together = replies_together(worker, range(1, 6), cancel=2)
    for session_id, (tokens, patches, reason, pcm) in together.items():
        want_tokens, want_patches, _, want_pcm = alone[session_id]
        if session_id == 2:
            assert reason == "cancelled" and 0 < len(tokens) < len(want_tokens)
            want_tokens, want_patches = want_tokens[: len(tokens)], want_patches[: len(patches)]
            want_pcm = want_pcm[: len(pcm)]  # a cancelled reply's audio stops where it was cut
        else:
            assert reason == "stop"
        assert tokens == want_tokens, f"session {session_id}"
        assert len(patches) == len(want_patches)
        assert all(np.array_equal(a, b) for a, b in zip(patches, want_patches)), f"session {session_id}"
        # The audio too: the rows' decoder windows were decoded as batches (codec_stream.push_together).
        assert pcm.shape == want_pcm.shape and np.abs(pcm.astype(int) - want_pcm).max(initial=0) <= 1


def test_a_session_leaving_frees_its_slot_and_a_new_one_gets_a_clean_cache(worker):
    first = open_conversation(worker, 1)
    slot = first.slot
    assert worker.pool.length(slot) == len(first.context) > 0
    first.close()
    assert first.slot is None
    second = open_conversation(worker, 2)
    assert second.cached == len(second.context)
    second.close()


@pytest.mark.parametrize("part", ["patch decoder", "codec"])
def test_a_failing_batched_call_ends_its_rows_with_the_error_and_the_engine_goes_on(worker, monkeypatch, part):
    def exploding(*args, **kwargs):
        raise RuntimeError(f"{part} exploded")

    # The patch decoder's call for the rows, or the codec's decode of their windows (codec_stream.push_together).
    target, name = (worker.fast, "decode_patch") if part == "patch decoder" else (generation, "push_together")
    monkeypatch.setattr(target, name, exploding)
    conversations = [open_conversation(worker, session_id) for session_id in (1, 3)]
    for conversation in conversations:
        respond(worker, conversation)
    run(worker)
    assert not worker.active
    for conversation in conversations:
        end = worker.outbox.events[conversation.session_id][-1]
        assert end.reason == "error" and f"{part} exploded" in end.error
        reply(worker, conversation)
        conversation.close()
    monkeypatch.undo()
    assert replies_alone(worker, [4])[4].reason == "stop"  # the next reply is generated as usual


def test_more_conversations_than_kv_slots_is_a_clear_error(worker):
    held = [open_conversation(worker, 100 + i) for i in range(worker.pool.slots)]
    try:
        with pytest.raises(RuntimeError, match=r"KV slots are in use: close a session or raise engine\.kv_slots"):
            open_conversation(worker, 99)
    finally:
        for conversation in held:
            conversation.close()
    open_conversation(worker, 98).close()  # a freed slot serves the next one


def test_a_closed_conversation_is_freed_at_once_without_the_cycle_collector(worker):
    """A long-running engine must not wait for a full garbage collection (rare in a process with a large heap)
    to free a finished call: its context, history and tensors go when the call closes."""
    import gc
    import weakref

    from mimo_voice.streaming.engine.protocol import Cancel, Close, Open, Respond

    session_id = 41
    gc.disable()
    try:
        worker.dispatch(Open(session_id=session_id, task="spoken_dialogue", system_prompt="Be brief."))
        conversation = worker.conversations[session_id]
        conversation.text_hook = EndAfter(12, worker.special.eostm)
        conversation.feed_audio(voice(0.8, seed=3), 16_000)
        respond(worker, conversation)
        run(worker, steps=3)
        worker.dispatch(Cancel(session_id=session_id, played_samples=1000))  # a barge-in rolls back
        run(worker)
        worker.dispatch(Respond(session_id=session_id, mode="non_thinking", started=0.0, response_id=2))
        run(worker, steps=2)
        freed = weakref.ref(conversation)
        del conversation
        worker.dispatch(Close(session_id=session_id))  # closed mid-reply
        run(worker)
        worker.outbox.events.pop(session_id, None)
        assert freed() is None, [type(r).__name__ for r in gc.get_referrers(freed())]
    finally:
        gc.enable()


def test_the_embedded_tiny_models_spoken_replies_are_held_to_their_trained_length(worker, monkeypatch):
    """It learnt to end its reply only ~95 % of the time: a stop is banned before the shortest length and forced
    at the longest, so the default always answers audibly and hands the turn back."""
    assert worker.reply_patches == (22, 36)  # the embedded tiny preset
    monkeypatch.setattr(worker, "reply_patches", (3, 5))
    conversation = open_conversation(worker, 7)
    conversation.text_hook = None  # the model chooses every token
    respond(worker, conversation)
    generation = conversation.generation
    stops = {worker.special.eostm, worker.special.im_end, worker.special.endoftext}
    seen_banned = set()
    with torch.inference_mode():
        while worker.active:
            if generation.phase == "stream":
                seen_banned.add((generation.audio_positions, bool(stops & set(generation.banned()))))
            worker._step_all()
    _, patches, reason, _ = reply(worker, conversation)
    assert reason == "stop" and 3 <= generation.audio_positions <= 5
    assert all(banned == (positions < 3) for positions, banned in seen_banned)
    assert len(patches) == generation.audio_positions
    conversation.close()
