"""The text tokenizer: the official one loaded from a checkpoint folder, its special-token ids, and
the small stand-in the ``tiny``/``small`` presets ship with.

Special-token ids are always read from the tokenizer (never hard-coded in the model). The stand-in
is a byte-level BPE trained on a short built-in English text, padded so that the Qwen2/MiMo
special tokens sit at their official ids; it tokenizes like Qwen2 (same normalizer and
pre-tokenizer), so markup such as ``<think>`` or ``</tool_call>`` is plain text, as in MiMo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from mimo_voice.configs.errors import TokenizerError
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# SpecialTokens field -> token text (reference notes, section 2.8).
SPECIAL_TOKEN_TEXT = {
    "sosp": "<|sosp|>",
    "eosp": "<|eosp|>",
    "empty": "<|empty|>",
    "sostm": "<|sostm|>",
    "eostm": "<|eostm|>",
    "eot": "<|eot|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "endoftext": "<|endoftext|>",
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens that structure MiMo-Audio prompts and replies."""

    sosp: int
    eosp: int
    empty: int
    sostm: int
    eostm: int
    eot: int
    im_start: int
    im_end: int
    endoftext: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerFast) -> SpecialTokens:
        ids = {}
        for field in fields(cls):
            text = SPECIAL_TOKEN_TEXT[field.name]
            token_id = tokenizer.convert_tokens_to_ids(text)
            # Unknown tokens come back as None or as the unk id, which maps to another text.
            if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != text:
                raise TokenizerError(f"the text tokenizer has no {text} token; is this a MiMo-Audio tokenizer?")
            ids[field.name] = token_id
        return cls(**ids)


def load_text_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in a checkpoint folder, read offline."""
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{folder}: no usable text tokenizer ({exc})") from exc


# --- the stand-in tokenizer of the tiny/small presets ---------------------------------------------

# Official layout: the BPE vocabulary fills ids below 151643, Qwen2's added tokens follow, then MiMo's.
FIRST_ADDED_ID = 151643
QWEN2_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIMO_ADDED_FIRST_ID = 151665
MIMO_ADDED = ["<|sosp|>", "<|eosp|>", "<|empty|>", "<|Human|>", "<|SpeechLM|>", "<|sostm|>", "<|eostm|>", "<|eot|>"]
TRAINED_VOCAB_SIZE = 2048

# Qwen2's pre-tokenizer split (digits one by one, words with their leading space, punctuation runs).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

CORPUS = """\
Hello! How can I help you today? Hi there, thanks for calling. Good morning, good afternoon, good evening.
I am MiMo, a friendly voice assistant. I can answer questions, tell you the time, do a quick calculation,
look up an order or open a support ticket. Please tell me what you need, and I will do my best to help.
Sure, one moment please. Let me check that for you. Here is what I found. Is there anything else?
The current time is ten past three in the afternoon. Today is Monday, the first of June.
The weather is sunny and warm, with a light breeze from the west and a high of twenty four degrees.
Your order number is 4 8 1 5 1 6 2 3 4 2. It shipped yesterday and should arrive on Thursday.
I have created a ticket for your request. A member of our team will contact you within two days.
Two plus two is four. Seven times eight is fifty six. One hundred divided by four is twenty five.
I'm sorry, I didn't catch that. Could you say it again, a little more slowly? Of course, no problem.
Thank you for your patience. You're welcome! Have a great day, and goodbye.
What would you like to talk about? We could talk about music, books, films, travel, food or science.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Water boils at one hundred degrees Celsius at sea level. The Earth goes around the Sun once a year.
Let me think about it. First, we look at the question. Then we work out the answer step by step.
<think>
The user wants the time. I should call the tool and then answer briefly.
</think>
<tool_call>
{"name": "current_time", "arguments": {"timezone": "Europe/London"}}
</tool_call>
"""


def _added_token(content: str, token_id: int) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _train_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    return tokenizer


def _official_layout(trained: Tokenizer) -> dict:
    """The trained tokenizer's JSON with reserved tokens filling every id up to the official special ids.

    Added-token ids must be contiguous after the BPE vocabulary (the tokenizers library renumbers
    them otherwise), so both gaps are filled: the BPE one with unreachable reserved entries, the
    one between Qwen2's and MiMo's added tokens with reserved special tokens.
    """
    data = json.loads(trained.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), FIRST_ADDED_ID)})
    names = QWEN2_ADDED + [
        f"<|reserved_special_{i}|>" for i in range(FIRST_ADDED_ID + len(QWEN2_ADDED), MIMO_ADDED_FIRST_ID)
    ]
    names += MIMO_ADDED
    data["added_tokens"] = [_added_token(name, FIRST_ADDED_ID + offset) for offset, name in enumerate(names)]
    return data


def write_tiny_text_tokenizer(folder: str | Path) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` that ``load_text_tokenizer`` reads like the official ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = _official_layout(_train_bpe())
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
