"""Prompt formats as model positions (docs/mimo_audio.md §9), built with the tiny text tokenizer."""

from __future__ import annotations

import pytest
import torch
from mimo_voice.streaming.model.prompts import (
    INTERRUPTED_NOTE,
    Positions,
    PromptBuilder,
    check_mode,
    frames_to_patches,
    task_format,
)
from mimo_voice.streaming.model.text_tokenizer import SpecialTokens, load_text_tokenizer, write_tiny_text_tokenizer

EMPTY_IDS = [1024, 1024, 128, 128, 128, 128, 128, 128]


@pytest.fixture(scope="module")
def builder(tmp_path_factory) -> PromptBuilder:
    folder = tmp_path_factory.mktemp("text_tokenizer")
    write_tiny_text_tokenizer(folder)
    tokenizer = load_text_tokenizer(folder)
    return PromptBuilder(tokenizer, SpecialTokens.from_tokenizer(tokenizer), EMPTY_IDS)


def patches(count: int, start: int = 0) -> torch.Tensor:
    return (torch.arange(count * 32).reshape(count, 4, 8) + start) % 100


def text_of(builder: PromptBuilder, positions: Positions) -> str:
    """The text row, with each audio position shown as [A]."""
    special = builder.special
    return "".join("[A]" if t == special.empty else builder.tokenizer.decode([t]) for t in positions.text_ids.tolist())


def test_text_positions_carry_the_empty_codes_and_audio_positions_their_patch(builder):
    prompt = builder.speech(patches(2))
    assert prompt.text_ids.tolist() == [
        builder.special.sosp,
        builder.special.empty,
        builder.special.empty,
        builder.special.eosp,
    ]
    assert (prompt.codes[0] == torch.tensor(EMPTY_IDS)).all() and (prompt.codes[3] == torch.tensor(EMPTY_IDS)).all()
    assert torch.equal(prompt.codes[1:3], patches(2))


def test_segments_are_tokenized_one_by_one(builder):
    """Upstream tokenizes each InputSegment on its own: BPE never merges across a boundary."""
    whole = builder.encode("Hello there")
    split = builder.text("Hel", "lo there").text_ids.tolist()
    assert split == builder.encode("Hel") + builder.encode("lo there")
    assert split != whole


def test_spoken_dialogue_first_turn_puts_the_system_prompt_inside_the_user_turn(builder):
    prompt = builder.user_speech_turn(patches(3), "Be brief.") + builder.assistant_prefix("speech", thinking=False)
    assert text_of(builder, prompt) == (
        "<|im_start|>user\nBe brief.\n\n<|sosp|>[A][A][A]<|eosp|><|im_end|>\n<|im_start|>assistant\n<|sostm|>"
    )
    expected = builder.text("<|im_start|>user\n", "Be brief.", "\n\n").text_ids.tolist()
    assert prompt.text_ids[: len(expected)].tolist() == expected


def test_later_user_turns_and_the_voice_prompt(builder):
    assert text_of(builder, builder.user_speech_turn(patches(1))) == "<|im_start|>user\n<|sosp|>[A]<|eosp|><|im_end|>\n"
    assert text_of(builder, builder.voice_prompt(patches(2))) == (
        "<|im_start|>system\nYour voice should be:<|sosp|>[A][A]<|eosp|><|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("output", "thinking", "expected"),
    [
        ("speech", False, "<|im_start|>assistant\n<|sostm|>"),
        ("speech", True, "<|im_start|>assistant\n<think>\n"),
        ("text", False, "<|im_start|>assistant\n<think>\n\n</think>\n"),
        ("text", True, "<|im_start|>assistant\n<think>\n"),
    ],
)
def test_assistant_prefixes_and_the_think_switch(builder, output, thinking, expected):
    assert text_of(builder, builder.assistant_prefix(output, thinking)) == expected


def test_stream_interleaves_five_text_tokens_and_five_patches(builder):
    """Upstream's StreamingInputSegment: <|eot|> ends the last text chunk, the longer stream's rest follows."""
    text = list(range(1000, 1012))  # 12 tokens
    stream = builder.stream(text, patches(20))
    special = builder.special
    kinds = ["A" if t == special.empty else t for t in stream.text_ids.tolist()]
    assert kinds == (
        [special.sostm]
        + text[:5]
        + ["A"] * 5
        + text[5:10]
        + ["A"] * 5
        + text[10:]
        + [special.eot]
        + ["A"] * 10
        + [special.eostm]
    )
    assert torch.equal(stream.codes[stream.text_ids == special.empty], patches(20))


def test_stream_with_more_text_than_audio(builder):
    special = builder.special
    text = list(range(1000, 1013))  # 13 tokens, 3 chunks
    stream = builder.stream(text, patches(5))
    kinds = ["A" if t == special.empty else t for t in stream.text_ids.tolist()]
    assert kinds == [special.sostm] + text[:5] + ["A"] * 5 + text[5:10] + text[10:] + [special.eot, special.eostm]


def test_text_turns_follow_the_chat_template(builder):
    assert text_of(builder, builder.user_text_turn("Hi", "Sys")) == "<|im_start|>user\nSys\n\nHi<|im_end|>\n"
    assert text_of(builder, builder.user_text_turn("Hi there", task="tts")) == (
        "<|im_start|>user\nPlease convert this text to speech: Hi there<|im_end|>\n"
    )
    assert text_of(builder, builder.tool_turn('{"a": 1}')) == (
        '<|im_start|>user\n<tool_response>\n{"a": 1}\n</tool_response><|im_end|>\n'
    )
    assert text_of(builder, builder.system_turn("Note.")) == "<|im_start|>system\nNote.<|im_end|>\n"
    assert text_of(builder, builder.interrupted_note()) == f"<|im_start|>system\n{INTERRUPTED_NOTE}<|im_end|>\n"


def test_assistant_close(builder):
    assert text_of(builder, builder.assistant_close(stream_open=True)) == "<|eostm|><|im_end|>\n"
    assert text_of(builder, builder.assistant_close(stream_open=False)) == "<|im_end|>\n"


def test_frames_to_patches_repeats_the_last_frame(builder):
    frames = torch.arange(6 * 8).reshape(6, 8)
    result = frames_to_patches(frames)
    assert result.shape == (2, 4, 8)
    assert torch.equal(result[0], frames[:4])
    assert torch.equal(result[1], torch.stack([frames[4], frames[5], frames[5], frames[5]]))
    assert frames_to_patches(torch.zeros(0, 8, dtype=torch.long)).shape == (0, 4, 8)


def test_bad_shapes_tasks_and_modes_are_clear_errors(builder):
    with pytest.raises(ValueError, match="patches"):
        builder.audio(torch.zeros(2, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown task"):
        task_format("karaoke")
    with pytest.raises(ValueError, match="unknown mode"):
        check_mode("fast")
    assert task_format("text_chat").output == "text" and task_format("tts").output == "speech"
