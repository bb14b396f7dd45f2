"""Context management: old audio goes, text stays, and a 30-minute call keeps running in the 8192 window."""

from __future__ import annotations

import torch
from mimo_voice.streaming.engine.context import Context, Segment
from mimo_voice.streaming.model.prompts import Positions
from session_support import Script, collect, context_report, end_of, opened, record_length, speech

EMPTY = 7  # the text id of an audio position in these unit tests
EMPTY_ROW = torch.tensor([1024, 1024, 128, 128, 128, 128, 128, 128])


def context_of(*spans: tuple[Segment, str]) -> Context:
    """A context from spans written as strings: 't' is a text position, 'a' an audio one."""
    context = Context(EMPTY, EMPTY_ROW, 4)
    for segment, layout in spans:
        ids = torch.tensor([EMPTY if kind == "a" else 1 for kind in layout])
        codes = EMPTY_ROW.expand(len(layout), 4, 8).clone()
        codes[ids == EMPTY] = 3
        context.append(Positions(ids, codes), segment)
    return context


def layout(context: Context) -> list[tuple[str, str]]:
    spans: list[tuple[str, str]] = []
    for entry in context.entries:
        kind = "a" if entry.codes is not None else "t"
        if spans and spans[-1][0] is entry.segment:
            spans[-1] = (entry.segment, spans[-1][1] + kind)
        else:
            spans.append((entry.segment, kind))
    return [(segment.kind, kinds) for segment, kinds in spans]


def test_oldest_audio_goes_first_and_text_stays():
    voice, user1, user2 = Segment("voice", pinned=True), Segment("user", pinned=True), Segment("user")
    bot1, close1 = Segment("assistant"), Segment("closure")
    context = context_of((voice, "taat"), (user1, "ttaaaat"), (bot1, "ttaattaa"), (close1, "tt"), (user2, "taaaat"))
    dropped = context.compact(target=20, protected=6)
    assert dropped == 7
    assert layout(context) == [
        ("voice", "taat"),
        ("user", "ttt"),
        ("assistant", "tttta"),
        ("closure", "tt"),
        ("user", "taaaat"),
    ]  # the protected tail (the turn in progress) is untouched


def test_nothing_changes_below_the_target():
    context = context_of((Segment("user"), "taaat"))
    assert context.compact(target=10, protected=2) == 0 and len(context) == 5


def test_when_text_alone_is_too_long_the_oldest_whole_turns_go():
    first_user = Segment("user", pinned=True)
    context = context_of(
        (first_user, "tat"),
        (Segment("assistant"), "ttttt"),
        (Segment("closure"), "tt"),
        (Segment("tool"), "tttt"),
        (Segment("assistant"), "tttt"),
        (Segment("closure"), "tt"),
        (Segment("user"), "taat"),
    )
    context.compact(target=12, protected=4)
    # The pinned turn (it carries the system prompt) stays, loses its audio; an assistant turn goes with its closure.
    assert layout(context) == [("user", "tt"), ("assistant", "tttt"), ("closure", "tt"), ("user", "taat")]


async def test_a_thirty_minute_call_keeps_running(tiny_engine):
    """30 turns of 60 s of user speech (11,250 patches, more than the 8192-position window) and short replies."""
    engine, turns, frames_per_turn = tiny_engine, 30, 1500
    generator = torch.Generator().manual_seed(0)
    vocab = torch.tensor([1024, 1024] + [128] * 6)
    reply = speech(engine, "Okay.", 3)
    async with opened(engine) as session:
        session.text_hook = Script(*[reply] * turns)
        ends, longest = [], 0
        for _ in range(turns):
            codes = (torch.rand(frames_per_turn, 8, generator=generator) * vocab).long()
            await session.feed_codes(codes)
            ends.append(end_of(await collect(session.respond())))
            longest = max(longest, await session.inspect(record_length))
        report = await session.inspect(context_report)
    assert [end.reason for end in ends] == ["stop"] * turns
    assert report["compactions"] >= 2
    assert longest <= engine.config.streaming.max_context_positions
    prefix = len(engine.builder.assistant_prefix("speech", False))
    assert report["assistant_text"] == turns * (prefix + len(reply) - 4)  # every word of every reply is still there
    assert len(report["user_audio"]) == turns  # every turn is still there...
    assert report["user_audio"][0] == 0  # ...the oldest without its audio
    assert report["user_audio"][-1] == frames_per_turn // 4  # the newest whole
    # The rebuilt cache is the cache of the kept record, as if prefilled in one go.
    assert report["cache_length"] == report["length"] - len(engine.builder.assistant_close(True))
    torch.testing.assert_close(report["last_logits"], report["one_prefill_logits"], atol=1e-4, rtol=1e-4)
