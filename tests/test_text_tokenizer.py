"""The text tokenizer: the tiny stand-in, special tokens, loading a checkpoint's tokenizer."""

import json

import pytest
from mimo_voice.streaming.model.text_tokenizer import (
    SpecialTokens,
    TokenizerError,
    load_text_tokenizer,
    write_tiny_text_tokenizer,
)

OFFICIAL_IDS = {
    "endoftext": 151643,
    "im_start": 151644,
    "im_end": 151645,
    "sosp": 151665,
    "eosp": 151666,
    "empty": 151667,
    "sostm": 151670,
    "eostm": 151671,
    "eot": 151672,
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_tokenizer")
    write_tiny_text_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    return load_text_tokenizer(tiny_folder)


def test_special_tokens_sit_at_their_official_ids(tokenizer):
    assert SpecialTokens.from_tokenizer(tokenizer) == SpecialTokens(**OFFICIAL_IDS)
    assert tokenizer.convert_ids_to_tokens([151668, 151669]) == ["<|Human|>", "<|SpeechLM|>"]
    assert len(tokenizer) == 151673  # every id below the last special token exists


def test_chatml_and_markup(tokenizer):
    ids = tokenizer("<|im_start|>user\nWhat time is it?<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == OFFICIAL_IDS["im_start"] and ids[-1] == OFFICIAL_IDS["im_end"]
    # Reasoning and tool-call markup is plain text, as in MiMo: several ordinary tokens each.
    for markup in ("<think>", "</think>", "<tool_call>", "</tool_call>"):
        pieces = tokenizer(markup, add_special_tokens=False).input_ids
        assert len(pieces) > 1 and max(pieces) < OFFICIAL_IDS["endoftext"]


def test_text_round_trips_including_bytes_outside_the_corpus(tokenizer):
    text = "Hello there! Order 4815, 12:30 p.m.\n<think>\nOK</think>\nCafé ünïcödé 你好 🙂"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # the BPE merged something


def test_writing_is_deterministic(tiny_folder, tmp_path):
    write_tiny_text_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_folder / name).read_bytes()


def test_a_missing_special_token_is_named(tiny_folder, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        data = json.loads((tiny_folder / name).read_text())
        if name == "tokenizer.json":
            data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|eot|>"]
        else:
            data["added_tokens_decoder"] = {
                k: v for k, v in data["added_tokens_decoder"].items() if v["content"] != "<|eot|>"
            }
        (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=r"<\|eot\|>"):
        SpecialTokens.from_tokenizer(load_text_tokenizer(tmp_path))


def test_a_folder_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no usable text tokenizer"):
        load_text_tokenizer(tmp_path)
