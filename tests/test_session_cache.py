"""The KV cache across turns: history is never fed twice, and roll-back leaves exactly what was heard."""

from __future__ import annotations

import pytest
import torch
from mimo_voice.streaming.engine.events import SAMPLES_PER_PATCH, AudioChunk, AudioPatch
from mimo_voice.streaming.model.prompts import INTERRUPTED_NOTE, Positions
from session_support import (
    FirstLogits,
    Script,
    attach,
    cache_length,
    cache_tensors,
    collect,
    count_fed_positions,
    end_of,
    fed_positions,
    first_logits,
    of,
    one_prefill,
    opened,
    record,
    record_length,
    response_start,
    segment_kinds,
    speech,
    user_patches,
    voice,
)


def generated(engine, script: list[int], events) -> Positions:
    """The positions a scripted response put into the cache: its tokens, with the events' patches in order."""
    patches = iter(of(events, AudioPatch))
    parts = [
        engine.builder.audio(torch.as_tensor(next(patches).codes)[None])
        if token == engine.special.empty
        else engine.builder.tokens([token])
        for token in script
    ]
    return Positions.cat(parts)


def assert_same_cache(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (keys_a, values_a), (keys_b, values_b) in zip(a, b):
        torch.testing.assert_close(keys_a, keys_b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values_a, values_b, atol=1e-5, rtol=1e-5)


async def spy_on(session, *scripts: list[int]) -> None:
    session.text_hook = FirstLogits(*scripts)
    await session.inspect(attach)


async def test_a_second_turn_gives_the_logits_of_the_whole_conversation_in_one_prefill(tiny_engine):
    engine, builder = tiny_engine, tiny_engine.builder
    first = speech(engine, "Hello there, nice to meet you.", 7)
    async with opened(engine, system_prompt="Be brief.") as session:
        await spy_on(session, first, speech(engine, "Again.", 5))
        await session.feed_audio(voice(1.2), 16_000)
        reply = await collect(session.respond())
        await session.feed_audio(voice(0.8, seed=1), 16_000)
        await collect(session.respond())
        logits, length = (await session.inspect(first_logits))[1]
        kept = await session.inspect(record)
        heard_user = await session.inspect(user_patches)
        # The same conversation built from the prompt formats, fed at once into a fresh cache.
        whole = (
            builder.user_speech_turn(heard_user[0], "Be brief.")
            + builder.assistant_prefix("speech", False)
            + generated(engine, first[:-1], reply)
            + builder.assistant_close(stream_open=True)
            + builder.user_speech_turn(heard_user[1])
            + builder.assistant_prefix("speech", False)
        )
        one_go, _ = await session.inspect(one_prefill, whole)
    assert len(whole) == length
    assert torch.equal(kept.text_ids[:length], whole.text_ids) and torch.equal(kept.codes[:length], whole.codes)
    torch.testing.assert_close(logits, one_go, atol=1e-4, rtol=1e-4)


async def test_roll_back_leaves_the_cache_of_a_session_that_only_said_the_heard_part(tiny_engine):
    engine, builder = tiny_engine, tiny_engine.builder
    words = "One two three four five six seven eight nine ten eleven twelve."
    full = speech(engine, words, 15)
    heard_part = full[: 5 + 3]  # 5 text tokens, then the 3 patches heard (2.5 played -> the 3rd counts)
    async with opened(engine) as session, opened(engine) as short:
        session.text_hook = Script(full)
        short.text_hook = Script(heard_part + [engine.special.eostm])
        for each in (session, short):
            await each.feed_audio(voice(1.0), 16_000)
        events = await collect(session.respond())
        await collect(short.respond())
        await session.cancel(played_samples=int(2.5 * SAMPLES_PER_PATCH))
        rolled_back = await session.inspect(cache_tensors)
        assert_same_cache(rolled_back, await short.inspect(cache_tensors))  # same seed: the same 3 patches
        cut = await session.inspect(cache_length)
        user_turn = (await session.inspect(user_patches))[0]
        expected = (
            builder.user_speech_turn(user_turn, engine.config.agent.system_prompt)
            + builder.assistant_prefix("speech", False)
            + generated(engine, heard_part, events)
        )
        _, fresh = await session.inspect(one_prefill, expected)
        assert_same_cache(rolled_back, fresh)
        turn = session.history[-1]
        assert turn.interrupted and words.startswith(turn.text) and 0 < len(turn.text) < len(words)
        # What follows the cut: the turn closed, a note that it was interrupted; then the next turn.
        tail = (await session.inspect(record, cut)).text_ids.tolist()
        note = (builder.assistant_close(stream_open=True) + builder.interrupted_note()).text_ids.tolist()
        assert tail == note and INTERRUPTED_NOTE in engine.tokenizer.decode(tail)
        session.text_hook = Script(speech(engine, "Sorry.", 5))
        await session.feed_audio(voice(0.5), 16_000)
        again = await collect(session.respond())
    assert end_of(again).reason == "stop" and session.history[-1].text == "Sorry."


async def test_barge_in_during_generation_keeps_the_users_new_audio(tiny_engine):
    engine = tiny_engine
    async with opened(engine) as session:
        await spy_on(session, speech(engine, "A long answer it is.", 60), speech(engine, "Yes?", 5))
        await session.feed_audio(voice(0.5), 16_000)
        events = []
        async for event in session.respond():
            events.append(event)
            if isinstance(event, AudioChunk):
                await session.feed_audio(voice(1.0, seed=2), 16_000)  # the user talks over the reply
                await session.cancel(played_samples=SAMPLES_PER_PATCH)
        end = end_of(events)
        assert end.reason == "cancelled" and end.generated_positions < 40  # stopped long before its 60 patches
        assert session.history[-1].interrupted
        kinds = await session.inspect(segment_kinds)
        assert kinds[-1] == "user" and kinds.index("closure") < len(kinds) - 1
        await collect(session.respond())
        logits, length = (await session.inspect(first_logits))[1]
        one_go, _ = await session.inspect(one_prefill, await session.inspect(record, 0, length))
        users = await session.inspect(user_patches)
    torch.testing.assert_close(logits, one_go, atol=1e-4, rtol=1e-4)
    assert len(users) == 2 and len(users[1]) >= 5


async def test_cancel_after_playback_finished_changes_nothing(tiny_engine):
    engine = tiny_engine
    async with opened(engine) as session:
        session.text_hook = Script(speech(engine, "Done.", 5))
        await session.feed_audio(voice(0.5), 16_000)
        await collect(session.respond())
        before = await session.inspect(record)
        await session.cancel(played_samples=5 * SAMPLES_PER_PATCH)
        assert torch.equal((await session.inspect(record)).text_ids, before.text_ids)
        assert not session.history[-1].interrupted and session.history[-1].text == "Done."


async def test_discarded_audio_leaves_no_trace(tiny_engine):
    engine = tiny_engine
    async with opened(engine) as session, opened(engine) as clean:
        for each in (session, clean):
            each.text_hook = Script(speech(engine, "Hi.", 5), speech(engine, "Bye.", 5))
            await each.feed_audio(voice(0.5), 16_000)
            await collect(each.respond())
        length = await session.inspect(record_length)  # the last turn's closing tokens wait there, not yet fed
        await session.feed_audio(voice(2.5, seed=3), 16_000)  # noise that never became a turn
        await session.caught_up()
        assert await session.inspect(cache_length) > length
        await session.discard_user_audio()
        assert await session.inspect(record_length) == await session.inspect(cache_length) == length
        for each in (session, clean):
            await each.feed_audio(voice(0.5, seed=4), 16_000)
            await collect(each.respond())
        assert torch.equal((await session.inspect(record)).text_ids, (await clean.inspect(record)).text_ids)
        assert_same_cache(await session.inspect(cache_tensors), await clean.inspect(cache_tensors))
        assert [t.role for t in session.history] == ["user", "assistant", "user", "assistant"]


async def test_injected_text_is_fed_once_and_goes_before_an_open_user_turn(tiny_engine):
    engine, builder = tiny_engine, tiny_engine.builder
    async with opened(engine) as session:
        session.text_hook = Script(speech(engine, "Checking.", 5))
        await session.feed_audio(voice(0.5), 16_000)
        await collect(session.respond())
        held = await session.inspect(cache_length)
        pending = await session.inspect(record_length) - held
        await session.inspect(count_fed_positions)
        await session.add_text("tool", '{"ok": true}')
        fed = await session.inspect(fed_positions)
        assert sum(fed) == pending + len(builder.tool_turn('{"ok": true}'))  # only the new positions
        assert await session.inspect(cache_length) == held + sum(fed)
        await session.feed_audio(voice(1.0), 16_000)
        await session.caught_up()
        await session.add_text("system", "The user is in a hurry.")
        kinds = await session.inspect(segment_kinds)
        after_note = len(kinds) - kinds[::-1].index("system")
        assert kinds[after_note:] == ["user"] * (len(kinds) - after_note)  # the open user turn, after the note
        await collect(session.respond())
    assert [t.role for t in session.history] == ["user", "assistant", "tool", "system", "user", "assistant"]


@pytest.mark.parametrize("mode", ["non_thinking", "thinking"])
async def test_rolled_back_thinking_or_speech_before_any_audio(tiny_engine, mode):
    engine = tiny_engine
    think = engine.builder.encode("Hmm.\n</think>\n") if mode == "thinking" else []
    async with opened(engine, mode=mode) as session:
        session.text_hook = Script(think + speech(engine, "Right away.", 8))
        await session.feed_audio(voice(0.5), 16_000)
        await collect(session.respond())
        start, prefix = await session.inspect(response_start)
        await session.cancel(played_samples=0)
        assert await session.inspect(cache_length) == start + prefix  # nothing generated was heard
        assert session.history[-1].text == "" and session.history[-1].interrupted
