"""MiMo-Audio prompt formats, as upstream builds them (docs/mimo_audio.md §9), as model positions.

A prompt is a sequence of LLM positions. A text position carries its token and every channel's empty
id; an audio position carries ``<|empty|>`` and one 4-frame x 8-codebook patch (:class:`Positions`).
Upstream tokenizes each ``InputSegment`` on its own (``add_special_tokens=False``) and concatenates,
so BPE never merges across a segment boundary: :meth:`PromptBuilder.text` takes the segments
separately for the same reason.

Formats (``T"..."`` text segment, ``A(x)`` = ``<|sosp|>`` + patches + ``<|eosp|>``):

- voice prompt: ``T"<|im_start|>system\\n" T"Your voice should be:" A(voice) T"<|im_end|>\\n"``
- user turn: ``T"<|im_start|>user\\n"`` [first turn only: ``T"{system_prompt}" T"\\n\\n"``] ``A(user) T"<|im_end|>\\n"``
  (text chat puts ``T"{text}"`` in place of the audio, TTS ``T"{template}: {text}"``)
- assistant, speech out: ``T"<|im_start|>assistant\\n<|sostm|>"``, then the 5 text : 5 patch interleave,
  ``<|eot|>`` after the last text token, ``<|eostm|>``; text out: ``T"<|im_start|>assistant\\n"`` plus the
  think switch ``T"<think>\\n\\n</think>\\n"`` (off) or ``T"<think>\\n"`` (on).
- thinking with speech out (no upstream prompt has it; InstructTTS comes closest): ``<think>\\n`` reasoning
  ``</think>\\n``, then ``<|sostm|>`` and the stream.
- an assistant turn ends with ``T"<|im_end|>\\n"`` (after ``<|eostm|>`` for speech).
- tool results and notes, which upstream has no format for, follow Qwen2's chat template:
  ``<|im_start|>user\\n<tool_response>\\n{text}\\n</tool_response><|im_end|>\\n`` and
  ``<|im_start|>system\\n{text}<|im_end|>\\n``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from .text_tokenizer import SpecialTokens

Output = Literal["speech", "text"]

TEXT_CHUNK = 5  # text tokens per interleave chunk (upstream's text_segment_size)
AUDIO_CHUNK = 5  # patches per interleave chunk (audio_segment_size)
VOICE_PROMPT = "Your voice should be:"
THINK_OPEN = "<think>\n"
THINK_CLOSE = "</think>\n"
THINK_OFF = "<think>\n\n</think>\n"
# Tool calls are plain text in the chat format (Qwen2's tags, not special tokens): the engine keeps what lies
# between them out of speech, the tools package parses it.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# Upstream picks a template at random; a fixed one keeps runs reproducible.
TTS_TEMPLATE = {"en": "Please convert this text to speech", "zh": "请将这段文字转换为语音"}
INTERRUPTED_NOTE = "The user interrupted your last reply: they heard it only up to where it stops."


@dataclass(frozen=True)
class TaskFormat:
    """How a task's turns look: what the assistant outputs and which sampling preset it uses."""

    output: Output
    sampling: str


TASKS = {
    "spoken_dialogue": TaskFormat("speech", "spoken_dialogue"),
    "speech2text_dialogue": TaskFormat("text", "spoken_dialogue"),  # upstream samples S2T like S2S
    "text_chat": TaskFormat("text", "text_chat"),
    "tts": TaskFormat("speech", "tts"),
}
MODES = ("non_thinking", "thinking")


def task_format(task: str) -> TaskFormat:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose thinking or non_thinking")
    return mode


@dataclass(frozen=True)
class Positions:
    """LLM positions: ``text_ids`` Long[T] and ``codes`` Long[T, group, channels]."""

    text_ids: Tensor
    codes: Tensor

    def __len__(self) -> int:
        return self.text_ids.shape[0]

    def __add__(self, other: Positions) -> Positions:
        return Positions(torch.cat([self.text_ids, other.text_ids]), torch.cat([self.codes, other.codes]))

    def __getitem__(self, index: slice) -> Positions:
        return Positions(self.text_ids[index], self.codes[index])

    @staticmethod
    def cat(parts: Sequence[Positions]) -> Positions:
        return Positions(torch.cat([p.text_ids for p in parts]), torch.cat([p.codes for p in parts]))

    def batch(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``([1, T], [1, T, group, channels])`` model inputs."""
        return self.text_ids.unsqueeze(0).to(device), self.codes.unsqueeze(0).to(device)


def frames_to_patches(frames: Tensor, group_size: int = 4) -> Tensor:
    """Codec frames ``[T, 8]`` -> patches ``[ceil(T / group), group, 8]``; like upstream, the last frame is
    repeated to fill the last patch."""
    if frames.ndim != 2:
        raise ValueError(f"expected codec frames [T, channels], got {tuple(frames.shape)}")
    short = -frames.shape[0] % group_size
    if short and frames.shape[0]:
        frames = torch.cat([frames, frames[-1:].expand(short, -1)])
    return frames.reshape(-1, group_size, frames.shape[1])


def language_of(text: str) -> str:
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


class PromptBuilder:
    """Turns the prompt formats into :class:`Positions` with a given text tokenizer and codec layout."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, special: SpecialTokens, empty_ids: Sequence[int], group_size: int = 4
    ) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self.empty_row = torch.tensor(list(empty_ids), dtype=torch.long)
        self.group_size = group_size

    # --- primitives ---

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tokens(self, ids: Iterable[int]) -> Positions:
        text_ids = torch.tensor(list(ids), dtype=torch.long)
        return Positions(text_ids, self.empty_row.expand(len(text_ids), self.group_size, -1).clone())

    def text(self, *segments: str) -> Positions:
        """Text segments, each tokenized on its own."""
        return self.tokens([token for segment in segments for token in self.encode(segment)])

    def audio(self, patches: Tensor) -> Positions:
        """Bare audio positions (no ``<|sosp|>``/``<|eosp|>``): ``patches`` Long[P, group, channels]."""
        patches = torch.as_tensor(patches, dtype=torch.long)
        if patches.ndim != 3 or patches.shape[1] != self.group_size or patches.shape[2] != len(self.empty_row):
            want = f"[P, {self.group_size}, {len(self.empty_row)}]"
            raise ValueError(f"expected patches {want}, got {tuple(patches.shape)}")
        return Positions(torch.full((patches.shape[0],), self.special.empty, dtype=torch.long), patches.cpu())

    def speech(self, patches: Tensor) -> Positions:
        """An input speech segment ``A(x)``."""
        return self.tokens([self.special.sosp]) + self.audio(patches) + self.tokens([self.special.eosp])

    def stream(self, text_ids: Sequence[int], patches: Tensor) -> Positions:
        """An assistant speech+text stream as upstream's ``StreamingInputSegment``: ``<|sostm|>``, 5 text
        tokens and 5 patches alternately (``<|eot|>`` closing the text), the rest of the longer one, ``<|eostm|>``."""
        text = list(text_ids)
        text_chunks = [text[i : i + TEXT_CHUNK] for i in range(0, len(text), TEXT_CHUNK)] or [[]]
        text_chunks[-1] = text_chunks[-1] + [self.special.eot]
        audio_chunks = list(torch.as_tensor(patches).split(AUDIO_CHUNK)) if len(patches) else []
        paired = min(len(text_chunks), len(audio_chunks))
        parts = [self.tokens([self.special.sostm])]
        for text_chunk, audio_chunk in zip(text_chunks[:paired], audio_chunks[:paired]):
            parts += [self.tokens(text_chunk), self.audio(audio_chunk)]
        parts += [self.tokens(chunk) for chunk in text_chunks[paired:]]
        parts += [self.audio(chunk) for chunk in audio_chunks[paired:]]
        parts.append(self.tokens([self.special.eostm]))
        return Positions.cat(parts)

    # --- turns ---

    def voice_prompt(self, patches: Tensor) -> Positions:
        return self.text("<|im_start|>system\n", VOICE_PROMPT) + self.speech(patches) + self.text("<|im_end|>\n")

    def user_open(self, system_prompt: str | None) -> Positions:
        """Opens a user turn; the system prompt goes inside the first one (docs/mimo_audio.md §9)."""
        if system_prompt:
            return self.text("<|im_start|>user\n", system_prompt, "\n\n")
        return self.text("<|im_start|>user\n")

    def user_close(self) -> Positions:
        return self.text("<|im_end|>\n")

    def user_speech_turn(self, patches: Tensor, system_prompt: str | None = None) -> Positions:
        return self.user_open(system_prompt) + self.speech(patches) + self.user_close()

    def user_text_turn(self, text: str, system_prompt: str | None = None, task: str = "text_chat") -> Positions:
        if task == "tts":
            text = f"{TTS_TEMPLATE[language_of(text)]}: {text}"
        return self.user_open(system_prompt) + self.text(text) + self.user_close()

    def assistant_prefix(self, output: Output, thinking: bool) -> Positions:
        if output == "speech":
            return self.text("<|im_start|>assistant\n" + (THINK_OPEN if thinking else "<|sostm|>"))
        return self.text("<|im_start|>assistant\n", THINK_OPEN if thinking else THINK_OFF)

    def assistant_close(self, stream_open: bool) -> Positions:
        """What ends an assistant turn in the context: ``<|eostm|>`` if a stream is open, then ``<|im_end|>\\n``."""
        return self.tokens([self.special.eostm] * stream_open) + self.text("<|im_end|>\n")

    def system_turn(self, text: str) -> Positions:
        return self.text("<|im_start|>system\n", text, "<|im_end|>\n")

    def tool_turn(self, text: str) -> Positions:
        return self.text("<|im_start|>user\n", f"<tool_response>\n{text}\n</tool_response>", "<|im_end|>\n")

    def interrupted_note(self) -> Positions:
        return self.system_turn(INTERRUPTED_NOTE)
