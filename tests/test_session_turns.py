"""Assistant turns on the real tiny engine: the model's own babble, streaming PCM, thinking, tool calls, tasks."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from mimo_voice.configs import load_config
from mimo_voice.streaming.engine.testing import TestingEngine
from mimo_voice.streaming.engine.events import (
    SAMPLES_PER_PATCH,
    AudioChunk,
    AudioPatch,
    TextToken,
    ToolCallText,
    TurnEnd,
)
from session_support import (
    Script,
    collect,
    end_of,
    index_of,
    last_tokens,
    of,
    opened,
    pcm,
    record,
    speech,
    spoken,
    voice,
)


async def test_the_tiny_model_answers_a_spoken_turn_with_audible_babble(tiny_engine):
    """No script: the trained tiny model itself chooses text vs audio, the patch decoder writes the patches
    and the streaming decoder turns them into sound; the turn ends on its own, after a bounded reply."""
    assert tiny_engine.is_tiny
    async with opened(tiny_engine) as session:
        await session.feed_audio(voice(1.5), 16_000)
        events = await collect(session.respond())
        tokens = await session.inspect(last_tokens)
    special = tiny_engine.special
    end = end_of(events)
    assert end.reason == "stop"
    assert 10 <= end.generated_positions <= 120  # a sentence and its audio: a few seconds, not a monologue
    assert special.eot in tokens and tokens.count(special.empty) >= 5
    first_patch = tokens.index(special.empty)
    assert 1 <= first_patch <= 6  # text leads, then audio (the 5:5 interleave)
    audio = pcm(events).astype(np.float32) / 32768
    assert len(audio) == len(of(events, AudioPatch)) * SAMPLES_PER_PATCH  # every patch decoded, exactly once
    assert np.sqrt(np.mean(audio**2)) > 1e-3  # audible, not silence
    assert spoken(events) and session.history[-1].text == spoken(events)


async def test_pcm_streams_while_the_reply_is_still_being_generated(tiny_engine):
    async with opened(tiny_engine) as session:
        session.text_hook = Script(speech(tiny_engine, "One two three four five.", 30))
        await session.feed_audio(voice(1.0), 16_000)
        events = await collect(session.respond())
    chunks, patches = of(events, AudioChunk), of(events, AudioPatch)
    assert len(patches) == 30
    assert index_of(events, chunks[0]) < index_of(events, patches[-1])  # PCM went out before the last patch existed
    assert chunks[0].time < patches[-1].time < end_of(events).time
    starts = [c.first_sample for c in chunks]
    assert starts == [0] + list(np.cumsum([len(c.pcm) for c in chunks])[:-1])  # contiguous, from 0
    timings = end_of(events).timings
    assert 0 < timings["first_pcm_s"] < timings["generation_s"] + timings["prefill_s"]


async def test_events_follow_the_text_audio_order_and_carry_times(tiny_engine):
    async with opened(tiny_engine) as session:
        session.text_hook = Script(speech(tiny_engine, "Hello there, how are you today?", 12))
        await session.feed_audio(voice(0.5, 24_000), 24_000)
        events = await collect(session.respond())
        tokens = await session.inspect(last_tokens)
    assert spoken(events) == "Hello there, how are you today?"
    assert [p.index for p in of(events, AudioPatch)] == list(range(12))
    times = [e.time for e in events]
    assert times == sorted(times) and times[0] > 0
    end = end_of(events)
    assert end.reason == "stop" and end.generated_positions == len(tokens)
    assert end.prompt_positions > 0 and {"prefill_s", "first_text_s", "first_patch_s", "rtf"} <= set(end.timings)


async def test_thinking_text_is_never_spoken_and_speech_follows_it(tiny_engine):
    thought = tiny_engine.builder.encode("The user wants the time.\n</think>\n")
    async with opened(tiny_engine, mode="thinking") as session:
        session.text_hook = Script(thought + speech(tiny_engine, "It is noon.", 6))
        await session.feed_audio(voice(1.0), 16_000)
        events = await collect(session.respond())
        tokens = await session.inspect(last_tokens)
    thoughts = "".join(e.text for e in of(events, TextToken) if e.thinking)
    assert thoughts.startswith("The user wants the time.") and "</think>" in thoughts
    assert spoken(events) == "It is noon." == session.history[-1].text
    last_thought = max(i for i, e in enumerate(events) if isinstance(e, TextToken) and e.thinking)
    assert not any(isinstance(e, AudioPatch) for e in events[:last_thought])
    assert tokens[len(thought)] == tiny_engine.special.sostm  # speech opened for it


@pytest.fixture(scope="module")
def small_limits():
    """The embedded engine with a thinking budget of 6 tokens and replies capped at 12 positions."""
    engine = TestingEngine.load(load_config(None, ["agent.thinking_budget_tokens=6", "agent.max_new_groups=12"]))
    yield engine
    asyncio.run(engine.aclose())


async def test_the_thinking_budget_closes_the_block(small_limits):
    engine = small_limits
    word = engine.builder.encode(" hmm")[0]
    async with opened(engine, mode="thinking") as session:
        session.text_hook = Script([word] * 6 + [word] * 40)  # would think forever
        await session.feed_audio(voice(0.5), 16_000)
        events = await collect(session.respond())
        tokens = await session.inspect(last_tokens)
    assert tokens[:6] == [word] * 6
    closing = engine.builder.encode("\n</think>\n")
    assert tokens[6 : 6 + len(closing)] == closing and tokens[6 + len(closing)] == engine.special.sostm
    assert all(e.thinking for e in of(events, TextToken)[: 6 + len(closing)])


async def test_the_mode_switches_between_turns(tiny_engine):
    async with opened(tiny_engine) as session:
        session.text_hook = Script(
            speech(tiny_engine, "Hi.", 5),
            tiny_engine.builder.encode("Ok.\n</think>\n") + speech(tiny_engine, "Bye.", 5),
        )
        await session.feed_audio(voice(0.5), 16_000)
        first = await collect(session.respond())
        session.set_mode("thinking")
        await session.feed_audio(voice(0.5), 16_000)
        second = await collect(session.respond())
        with pytest.raises(ValueError, match="mode"):
            session.set_mode("sleepy")
    assert not any(e.thinking for e in of(first, TextToken))
    assert any(e.thinking for e in of(second, TextToken)) and spoken(second) == "Bye."


async def test_a_tool_call_is_withheld_from_speech_and_reported(tiny_engine):
    call = '{"name": "current_time", "arguments": {}}'
    script = speech(tiny_engine, "Let me check.", 5, end=False) + speech(
        tiny_engine, f"<tool_call>{call}</tool_call>", 10, end=False
    )
    async with opened(tiny_engine) as session:
        session.text_hook = Script(script, speech(tiny_engine, "It is noon.", 5))
        await session.feed_audio(voice(0.5), 16_000)
        events = await collect(session.respond())
        await session.add_text("tool", '{"time": "12:00"}')
        after = await collect(session.respond())
        history = [(turn.role, turn.text) for turn in session.history]
    assert end_of(events).reason == "tool_call"
    (tool_call,) = of(events, ToolCallText)
    assert json.loads(tool_call.text) == json.loads(call)
    assert spoken(events) == "Let me check."
    assert len(of(events, AudioPatch)) == 5  # none of the patches written with the call
    assert "<" not in "".join(e.text for e in of(events, TextToken))
    assert spoken(after) == "It is noon." and end_of(after).reason == "stop"
    assert history == [
        ("user", ""),
        ("assistant", "Let me check."),
        ("tool", '{"time": "12:00"}'),
        ("assistant", "It is noon."),
    ]


async def test_text_that_only_looks_like_a_tag_is_spoken(tiny_engine):
    async with opened(tiny_engine) as session:
        session.text_hook = Script(speech(tiny_engine, "Is 2 < 3? Yes <tool", 10))
        await session.feed_audio(voice(0.5), 16_000)
        events = await collect(session.respond())
    assert spoken(events) == "Is 2 < 3? Yes <tool" and end_of(events).reason == "stop"
    assert len(of(events, AudioPatch)) == 10


async def test_text_chat_and_speech_to_text_answer_in_text(tiny_engine):
    special = tiny_engine.special
    async with opened(tiny_engine, task="text_chat") as session:
        await session.add_text("user", "Hello!")
        events = await collect(session.respond())
    assert not of(events, AudioPatch) and end_of(events).reason in ("stop", "length")
    assert session.history[0].role == "user" and session.history[0].text == "Hello!"
    async with opened(tiny_engine, task="speech2text_dialogue") as session:
        session.text_hook = Script(tiny_engine.builder.encode("Sure.") + [special.im_end])
        await session.feed_audio(voice(0.5), 16_000)
        events = await collect(session.respond())
    assert spoken(events) == "Sure." and not of(events, AudioPatch) and end_of(events).reason == "stop"


async def test_tts_reads_text_out_as_a_stream(tiny_engine):
    async with opened(tiny_engine, task="tts", system_prompt="") as session:
        session.text_hook = Script(speech(tiny_engine, "Good morning.", 6))
        await session.add_text("user", "Good morning.")
        events = await collect(session.respond())
        context = (await session.inspect(record)).text_ids.tolist()
    assert tiny_engine.builder.encode("Please convert this text to speech: Good morning.")[0] in context
    assert spoken(events) == "Good morning." and len(of(events, AudioPatch)) == 6


async def test_a_reply_that_never_stops_ends_at_the_length_cap(small_limits):
    engine = small_limits
    async with opened(engine) as session:
        session.text_hook = Script([engine.special.empty] * 50)
        await session.feed_audio(voice(0.5), 16_000)
        events = await collect(session.respond())
        await session.feed_audio(voice(0.5), 16_000)
        session.text_hook = Script([engine.special.eostm])
        again = await collect(session.respond())
    assert end_of(events).reason == "length" and end_of(events).generated_positions == 12
    assert len(pcm(events)) == 12 * SAMPLES_PER_PATCH  # the decoder is flushed at the cap
    assert end_of(again).reason == "stop"


async def test_bad_input_gets_clear_errors(tiny_engine):
    async with opened(tiny_engine) as session:
        with pytest.raises(ValueError, match="sample rate"):
            await session.feed_audio(voice(0.1), 44_100)
        with pytest.raises(ValueError, match="mono"):
            await session.feed_audio(np.zeros((2, 160), np.float32), 16_000)
        with pytest.raises(ValueError, match="int16 PCM or float32"):
            await session.feed_audio(np.zeros(160, np.float64), 16_000)
        with pytest.raises(ValueError, match="role"):
            await session.add_text("wizard", "hi")
        with pytest.raises(ValueError, match="codes"):
            await session.feed_codes(np.zeros((4, 7), np.int64))
        with pytest.raises(TypeError, match="picklable"):
            session.text_hook = lambda tokens: None  # it runs in the worker process
        session.text_hook = Script(speech(tiny_engine, "Hi.", 5))
        events = session.respond()
        with pytest.raises(RuntimeError, match="still being generated"):
            session.respond()
        assert isinstance((await collect(events))[-1], TurnEnd)
    with pytest.raises(ValueError, match="unknown task"):
        tiny_engine.new_session(task="karaoke")
    with pytest.raises(RuntimeError, match="closed"):
        await session.feed_audio(voice(0.1), 16_000)
