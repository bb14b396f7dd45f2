"""The text path of a response: detokenization, the tool-call filter, and what was heard at a barge-in."""

from __future__ import annotations

import numpy as np
import pytest
from mimo_voice.streaming.engine.events import AudioPatch, TextToken, ToolCallText
from mimo_voice.streaming.engine.text_stream import Detokenizer, SpokenToken, ToolCallFilter, heard_text
from mimo_voice.streaming.model.text_tokenizer import load_text_tokenizer, write_tiny_text_tokenizer


def token(text: str) -> TextToken:
    return TextToken(text, token_id=1)


def patch() -> AudioPatch:
    return AudioPatch(np.zeros((4, 8), np.int64), index=-1)


def run(items: list[str | None]) -> tuple[list, ToolCallFilter]:
    """Feeds text deltas (None = an audio patch) through a filter, then ends the turn."""
    tool_filter, released = ToolCallFilter(), []
    for item in items:
        released += tool_filter.push(patch()) if item is None else tool_filter.push(token(item), item)
    released += tool_filter.flush()
    return released, tool_filter


def shown(events) -> str:
    return "".join(e.text if isinstance(e, TextToken) else "#" for e in events)


def test_plain_text_and_audio_pass_in_order():
    released, tool_filter = run(["Hi", None, " there", None])
    assert shown(released) == "Hi# there#" and tool_filter.call is None


def test_a_call_and_everything_after_its_tag_is_withheld():
    released, tool_filter = run(
        ["Let", " me", None, " <", "tool", None, "_call", ">", '{"a"', None, ": 1}", "</tool", "_call>", " bye"]
    )
    assert shown(released) == "Let me# "  # the patch written after "<" never goes out
    assert tool_filter.call == ToolCallText('{"a": 1}', time=tool_filter.call.time)


def test_a_partial_tag_waits_and_is_released_when_it_turns_out_to_be_text():
    tool_filter = ToolCallFilter()
    assert tool_filter.push(token("2 <"), "2 <") == []  # could be "<tool_call>"
    assert tool_filter.push(patch()) == []  # audio waits with it
    released = tool_filter.push(token(" 3"), " 3")
    assert shown(released) == "2 <# 3"


def test_an_unclosed_call_at_the_end_of_the_turn_is_reported_raw():
    released, tool_filter = run(["Ok", "<tool_call>", '{"name": "x"'])
    assert shown(released) == "Ok" and tool_filter.call is None
    assert tool_filter.unclosed_call() == '{"name": "x"'


def test_a_token_straddling_the_tag_is_cut_at_it():
    released, tool_filter = run(["Sure.<tool_call>", "{}", "</tool_call>"])
    assert shown(released) == "Sure." and tool_filter.call.text == "{}"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_tokenizer")
    write_tiny_text_tokenizer(folder)
    return load_text_tokenizer(folder)


def test_detokenizer_deltas_add_up_and_wait_for_whole_characters(tokenizer):
    text = "Good morning, café ☕ friends."
    detokenizer = Detokenizer(tokenizer)
    deltas = [detokenizer.push(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_heard_text_follows_the_audio_each_text_run_is_spoken_over():
    # "a b c d e" is spoken over patches 0-4, "f g" over patches 5-9.
    tokens = [SpokenToken(i, t, 0) for i, t in enumerate("abcde")] + [SpokenToken(9, t, 5) for t in "fg"]
    assert heard_text(tokens, total_patches=10, heard_patches=0) == ""
    assert heard_text(tokens, total_patches=10, heard_patches=0.5) == "a"
    assert heard_text(tokens, total_patches=10, heard_patches=3) == "abc"
    assert heard_text(tokens, total_patches=10, heard_patches=5.1) == "abcdef"
    assert heard_text(tokens, total_patches=10, heard_patches=10) == "abcdefg"
