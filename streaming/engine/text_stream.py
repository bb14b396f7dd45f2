"""What happens to generated text on its way out: incremental detokenization, the tool-call filter,
and the estimate of which words the user heard before a barge-in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from mimo_voice.streaming.model.prompts import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from transformers import PreTrainedTokenizerBase

from .events import Event, TextToken, ToolCallText


class Detokenizer:
    """Token ids -> text deltas. Byte-level BPE tokens may end inside a UTF-8 character, so a delta that
    would end in U+FFFD waits for the next token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert isinstance(text, str)  # one sequence in, one text out
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


def _partial_tag_at(text: str, tag: str) -> int:
    """Where a suffix of ``text`` that could still grow into ``tag`` starts (``len(text)`` if none)."""
    for start in range(max(len(text) - len(tag) + 1, 0), len(text)):
        if tag.startswith(text[start:]):
            return start
    return len(text)


@dataclass
class _Held:
    event: Event
    end: int  # characters of answer text up to the end of this event (audio: where it was generated)


class ToolCallFilter:
    """Withholds a ``<tool_call>...</tool_call>`` from the spoken output.

    While the answer text ends with something that could become ``<tool_call>`` (``<``, ``<tool``, ...),
    text *and* audio events wait; they go out once the text turns out to be something else. From the
    opening tag on nothing is released; at the closing tag :attr:`call` holds the raw text between the tags.
    """

    def __init__(self) -> None:
        self.text = ""
        self.call_start: int | None = None  # index of the opening tag in self.text
        self.call: ToolCallText | None = None
        self._held: list[_Held] = []

    @property
    def in_call(self) -> bool:
        return self.call_start is not None

    def push(self, event: Event, delta: str = "") -> list[Event]:
        """An answer TextToken (with its text ``delta``) or an AudioPatch; returns the events to release now."""
        if self.in_call:
            self.text += delta
            self._check_close(event.time)
            return []
        self.text += delta
        self._held.append(_Held(event, len(self.text)))
        start = self.text.find(TOOL_CALL_OPEN)
        if start >= 0:
            self.call_start = start
            released = self._release_until(start, trim=True)
            self._held.clear()
            self._check_close(event.time)
            return released
        return self._release_until(_partial_tag_at(self.text, TOOL_CALL_OPEN))

    def flush(self) -> list[Event]:
        """End of the turn: a partial tag that never completed was just text."""
        if self.in_call:
            return []
        released, self._held = [held.event for held in self._held], []
        return released

    def unclosed_call(self) -> str | None:
        """The call text of a turn that ended inside an unclosed ``<tool_call>``."""
        if self.call_start is not None and self.call is None:
            return self.text[self.call_start + len(TOOL_CALL_OPEN) :]
        return None

    def _check_close(self, time: float) -> None:
        assert self.call_start is not None  # only called inside a call
        body_start = self.call_start + len(TOOL_CALL_OPEN)
        end = self.text.find(TOOL_CALL_CLOSE, body_start)
        if end >= 0 and self.call is None:
            self.call = ToolCallText(self.text[body_start:end], time=time)

    def _release_until(self, limit: int, trim: bool = False) -> list[Event]:
        """Releases the longest prefix of held events whose text ends at or before ``limit``; with ``trim``
        the text event straddling ``limit`` goes out cut at it."""
        released = []
        while self._held:
            held = self._held[0]
            if held.end <= limit:
                released.append(self._held.pop(0).event)
                continue
            if trim and isinstance(held.event, TextToken):
                start = held.end - len(held.event.text)
                if start < limit:
                    released.append(replace(held.event, text=held.event.text[: limit - start]))
            break
        return released


@dataclass(frozen=True)
class SpokenToken:
    token_id: int
    text: str
    patches_before: int  # audio patches released before this token


def heard_text(tokens: Sequence[SpokenToken], total_patches: int, heard_patches: float) -> str:
    """The words of the spoken text the user heard when playback stopped after ``heard_patches`` patches.

    In the interleave a run of text tokens is spoken during the audio run that follows it, so token ``i``
    of a run of ``n`` spoken over patches ``[p0, p1)`` is taken as heard once playback passed
    ``p0 + i * (p1 - p0) / n``.
    """
    runs: list[list[SpokenToken]] = []
    for token in tokens:
        if runs and runs[-1][0].patches_before == token.patches_before:
            runs[-1].append(token)
        else:
            runs.append([token])
    pieces = []
    for index, run in enumerate(runs):
        start = run[0].patches_before
        end = runs[index + 1][0].patches_before if index + 1 < len(runs) else total_patches
        for position, token in enumerate(run):
            if start + position * (end - start) / len(run) < heard_patches:
                pieces.append(token.text)
    return "".join(pieces)
