"""A reply's start computed in the user's pause (``streaming.prepare_reply_after_secs``): once their audio has been
silent that long, the rest of it, their closing tokens and the assistant prefix are fed, so that ``respond()`` only
has the first step left. It must be invisible in what the model says, and undone without loss when they go on."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from mimo_voice.streaming.engine.conversation import Conversation, UserTurn, _is_silent
from mimo_voice.streaming.engine.events import TurnEnd
from session_support import collect, of, opened, voice
from worker_support import EndAfter, greedy_worker, reply, run

PIECE_SECS = 0.02  # as WebRTC delivers audio
OFF = "streaming.prepare_reply_after_secs=0"


def _pause(seconds: float, rate: int) -> np.ndarray:
    """Quiet noise, about -70 dBFS."""
    return (np.random.default_rng(7).standard_normal(int(seconds * rate)) * 10).astype(np.int16)


def _open(worker, session_id: int = 1) -> Conversation:
    conversation = Conversation(worker, session_id, task="spoken_dialogue", system_prompt=None)
    conversation.text_hook = EndAfter(8, worker.special.eostm)
    return conversation


def _feed(conversation: Conversation, audio: np.ndarray, rate: int, mode: str = "non_thinking") -> None:
    piece = int(PIECE_SECS * rate)
    with torch.inference_mode():
        for start in range(0, len(audio), piece):
            conversation.feed_audio(audio[start : start + piece], rate, mode)


def _reply(worker, conversation: Conversation, mode: str = "non_thinking"):
    """The reply to what was fed, and its TurnEnd timings."""
    with torch.inference_mode():
        conversation.respond(mode, time.perf_counter(), 1)
    run(worker)
    end = worker.outbox.events[conversation.session_id][-1]
    assert isinstance(end, TurnEnd)
    return reply(worker, conversation), end.timings


def _same(a, b) -> bool:
    return a.tokens == b.tokens and len(a.patches) == len(b.patches) and np.array_equal(a.pcm, b.pcm)


@pytest.mark.parametrize("rate", [16_000, 24_000])
def test_a_reply_prepared_in_the_pause_is_the_reply_to_the_audio_up_to_that_point(rate):
    speech, pause = voice(1.3, rate=rate, seed=1), _pause(0.5, rate)
    prepared, plain = greedy_worker(), greedy_worker(OFF)
    conversation = _open(prepared)
    _feed(conversation, np.concatenate([speech, pause]), rate)
    assert conversation.prepared is not None and conversation.prepared.held  # the rest of the pause held back
    got, timings = _reply(prepared, conversation)
    # Without the preparation, the same reply comes from the audio up to 0.2 s into the pause, fed at the end.
    reference = _open(plain)
    _feed(reference, np.concatenate([speech, pause])[: len(speech) + int(0.2 * rate)], rate)
    assert reference.prepared is None
    expected, reference_timings = _reply(plain, reference)
    assert got.reason == expected.reason == "stop" and got.patches
    assert _same(got, expected)
    assert [np.array_equal(a, b) for a, b in zip(got.patches, expected.patches)] == [True] * len(got.patches)
    assert timings["prepared_in_pause"] == 1 and timings["last_prefill_ms"] == timings["last_encode_ms"] == 0
    assert reference_timings["prepared_in_pause"] == 0 and reference_timings["last_prefill_ms"] > 0
    assert conversation.history[-2].audio_seconds == pytest.approx(reference.history[-2].audio_seconds)


def test_speech_after_the_pause_undoes_the_preparation_and_loses_no_audio():
    rate = 24_000  # no resampler: the undone path is then exactly the path never prepared
    audio = np.concatenate([voice(0.7, rate=rate, seed=2), _pause(0.3, rate), voice(0.6, rate=rate, seed=3)])
    prepared, plain = greedy_worker(), greedy_worker(OFF)
    conversation, reference = _open(prepared), _open(plain)
    speech_end = int(0.7 * rate) + int(0.3 * rate)
    _feed(conversation, audio[:speech_end], rate)
    assert conversation.prepared is not None
    _feed(conversation, audio[speech_end:], rate)
    assert conversation.prepared is None  # undone by the speech: no assistant prefix left in the record
    assert [entry.segment.kind for entry in conversation.context.entries] == ["user"] * len(conversation.context)
    _feed(reference, audio, rate)
    got, timings = _reply(prepared, conversation)
    expected, _ = _reply(plain, reference)
    assert timings["prepared_in_pause"] == 0 and _same(got, expected)
    assert conversation.history[-2].audio_seconds == pytest.approx(len(audio) / rate)


def test_another_mode_at_the_turns_end_undoes_the_preparation():
    rate = 24_000
    audio = np.concatenate([voice(0.8, rate=rate, seed=4), _pause(0.4, rate)])
    prepared, plain = greedy_worker(), greedy_worker(OFF)
    conversation, reference = _open(prepared), _open(plain)
    _feed(conversation, audio, rate, mode="non_thinking")
    assert conversation.prepared is not None and conversation.prepared.mode == "non_thinking"
    _feed(reference, audio[: int(0.8 * rate) + int(0.2 * rate)], rate)
    got, timings = _reply(prepared, conversation, mode="thinking")
    expected, _ = _reply(plain, reference, mode="thinking")
    assert timings["prepared_in_pause"] == 0 and _same(got, expected)


def test_text_added_or_audio_discarded_while_prepared_leaves_a_consistent_record():
    rate = 24_000
    audio = np.concatenate([voice(0.8, rate=rate, seed=5), _pause(0.4, rate)])
    worker = greedy_worker()
    conversation = _open(worker)
    _feed(conversation, audio, rate)
    assert conversation.prepared is not None
    with torch.inference_mode():
        conversation.add_text("system", "The user is in a hurry.")
    kinds = [entry.segment.kind for entry in conversation.context.entries]
    assert conversation.prepared is None and "assistant" not in kinds and kinds[-1] == "user"
    assert conversation.cached == len(conversation.context)
    got, timings = _reply(worker, conversation)
    assert got.reason == "stop" and got.patches and timings["prepared_in_pause"] == 0
    _feed(conversation, audio, rate)
    assert conversation.prepared is not None
    length = conversation.prepared.before
    with torch.inference_mode():
        conversation.discard_user_audio()
    assert conversation.prepared is None and conversation.user is None
    assert conversation.cached == len(conversation.context) < length


def test_loud_pauses_and_a_zero_setting_prepare_nothing():
    rate = 24_000
    noisy = (np.random.default_rng(0).standard_normal(int(0.5 * rate)) * 1000).astype(np.int16)  # about -30 dBFS
    for worker, pause in ((greedy_worker(), noisy), (greedy_worker(OFF), _pause(0.5, rate))):
        conversation = _open(worker)
        _feed(conversation, np.concatenate([voice(0.6, rate=rate), pause]), rate)
        assert conversation.prepared is None
        conversation.close()


def test_silence_is_measured_in_dbfs_for_int16_and_float_audio():
    quiet, loud = np.full(480, 100, np.int16), np.full(480, 400, np.int16)  # -50.3 and -38.2 dBFS
    assert _is_silent(quiet, -50.0) and not _is_silent(loud, -50.0)
    assert _is_silent(quiet / 32768.0, -50.0) and not _is_silent(loud.astype(np.float32) / 32768, -50.0)
    assert _is_silent(np.zeros(0, np.float32), -50.0)


async def test_a_session_gets_its_reply_prepared_through_the_worker_process(tiny_engine):
    async with opened(tiny_engine) as session:
        session.text_hook = EndAfter(6, tiny_engine.special.eostm)
        audio = np.concatenate([voice(0.8, seed=6), _pause(0.5, 16_000)])
        for start in range(0, len(audio), 320):
            await session.feed_audio(audio[start : start + 320], 16_000)
        await session.caught_up()
        end = of(await collect(session.respond()), TurnEnd)[0]
    assert end.reason == "stop" and end.timings["prepared_in_pause"] == 1


def test_a_long_silence_after_the_preparation_is_held_up_to_a_bound(monkeypatch):
    from mimo_voice.streaming.engine import conversation as conversation_module

    monkeypatch.setattr(conversation_module, "HELD_MAX_SECS", 0.5)
    rate = 24_000
    worker = greedy_worker()
    conversation = _open(worker)
    _feed(conversation, np.concatenate([voice(0.6, rate=rate), _pause(2.0, rate)]), rate)
    prepared = conversation.prepared
    assert prepared is not None and prepared.held_secs == pytest.approx(0.5)
    assert sum(len(pcm) for pcm, _ in prepared.held) == int(0.5 * rate)
    _feed(conversation, voice(0.3, rate=rate, seed=9), rate)  # speech: undone, the kept silence fed
    assert conversation.prepared is None
    got, _ = _reply(worker, conversation)
    assert got.reason == "stop"
    assert conversation.history[-2].audio_seconds == pytest.approx(0.6 + 0.2 + 0.5 + 0.3)


def test_a_failed_preparation_leaves_the_turn_to_end_as_usual(monkeypatch):
    rate = 24_000
    audio = np.concatenate([voice(0.8, rate=rate, seed=8), _pause(0.4, rate)])
    worker, plain = greedy_worker(), greedy_worker(OFF)
    conversation, reference = _open(worker), _open(plain)
    tail_patches = UserTurn.tail_patches

    def failing(self):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(UserTurn, "tail_patches", failing)
    calls = []
    monkeypatch.setattr(
        Conversation, "_prepare", lambda self, mode, run=Conversation._prepare: calls.append(run(self, mode))
    )
    _feed(conversation, audio, rate)
    assert conversation.prepared is None and conversation.cached == len(conversation.context)
    assert {entry.segment.kind for entry in conversation.context.entries} == {"user"}
    assert len(calls) == 1  # not tried again at every piece of the pause
    monkeypatch.setattr(UserTurn, "tail_patches", tail_patches)
    _feed(reference, audio, rate)
    got, timings = _reply(worker, conversation)
    expected, _ = _reply(plain, reference)
    assert timings["prepared_in_pause"] == 0 and got.reason == "stop" and got.tokens == expected.tokens
