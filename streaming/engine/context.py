"""The conversation as a list of LLM positions, of which the KV cache holds a prefix.

A :class:`Session` never re-prefills history: each new position is appended here and fed to the model
once. The record is kept anyway (ids + codes, a few hundred bytes per position) because three
operations need to rebuild part of the cache from it:

- barge-in roll-back truncates the cache to the last heard patch and re-feeds what came after the
  assistant turn (the user audio of the barge-in, an injected tool result);
- text injected while the user is talking goes *before* the open user turn;
- context management (:meth:`Context.compact`) drops the oldest audio patches, keeping every text
  position, once the context nears the model's window, and the cache is rebuilt from what is kept.

Context management, when and what it costs: when the record passes ``max_context_positions -
context_headroom_positions`` (7680 of 8192 by default) it is cut down to half the window, so it happens
about every 4000 new positions (5 to 7 minutes of conversation, audio of both sides at 6.25 patches/s
plus text) and mostly while the user talks, since their audio is what is being appended. The rebuild is
one prefill of the ~4096 kept positions in chunks: 0.45 s for the tiny preset on a busy 2-core CPU,
roughly 0.1-0.3 s for the 7B in bf16 on one H100 (about 65 TFLOP). The worker steps no other session
meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from mimo_voice.streaming.model.prompts import Positions
from torch import Tensor

SegmentKind = Literal["voice", "user", "assistant", "closure", "tool", "system"]


@dataclass(eq=False)
class Segment:
    """A run of positions with one role. ``pinned`` segments (the voice prompt, the user turn that carries the
    system prompt) are never dropped whole by context management."""

    kind: SegmentKind
    pinned: bool = False


class Entry(NamedTuple):
    text_id: int
    codes: Tensor | None  # [group, channels] for an audio position, None for a text position
    segment: Segment


class Context:
    def __init__(self, empty_token: int, empty_row: Tensor, group_size: int) -> None:
        self.empty_token = empty_token  # the text id of an audio position
        self.empty_row = empty_row  # every channel's empty id: the codes of a text position
        self.group_size = group_size
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, positions: Positions, segment: Segment) -> None:
        for text_id, codes in zip(positions.text_ids.tolist(), positions.codes):
            self.entries.append(Entry(text_id, codes.clone() if text_id == self.empty_token else None, segment))

    def add(self, text_id: int, codes: Tensor | None, segment: Segment) -> None:
        """Appends one generated position (``codes`` [group, channels] on the CPU for an audio one, kept as
        given): the step loop's per-position path, with no tensor built or read back."""
        self.entries.append(Entry(text_id, codes, segment))

    def positions(self, start: int = 0, end: int | None = None) -> Positions:
        entries = self.entries[start:end]
        text_ids = torch.tensor([entry.text_id for entry in entries], dtype=torch.long)
        codes = self.empty_row.expand(len(entries), self.group_size, -1).clone()
        for index, entry in enumerate(entries):
            if entry.codes is not None:
                codes[index] = entry.codes
        return Positions(text_ids, codes)

    def truncate(self, length: int) -> list[Entry]:
        """Drops everything from ``length`` on and returns it."""
        tail = self.entries[length:]
        del self.entries[length:]
        return tail

    def start_of(self, segment: Segment) -> int:
        return next(index for index, entry in enumerate(self.entries) if entry.segment is segment)

    def audio_indices(self, segment: Segment) -> list[int]:
        return [
            index for index, entry in enumerate(self.entries) if entry.segment is segment and entry.codes is not None
        ]

    def compact(self, target: int, protected: int) -> int:
        """Shrinks the record to at most ``target`` positions; returns how many were dropped.

        First the oldest audio positions go (user speech and the assistant's patches; never the voice
        prompt), so every turn's text stays. If text alone still exceeds ``target``, the oldest whole
        turns go (an assistant turn with its closing tokens). The last ``protected`` positions, the
        turn being spoken or generated, are never touched.
        """
        excess = len(self.entries) - target
        if excess <= 0:
            return 0
        frozen_from = max(len(self.entries) - protected, 0)
        dropped: set[int] = set()
        for index, entry in enumerate(self.entries[:frozen_from]):
            if excess <= 0:
                break
            if entry.codes is not None and entry.segment.kind != "voice":
                dropped.add(index)
                excess -= 1
        if excess > 0:
            excess -= self._drop_oldest_turns(excess, frozen_from, dropped)
        self.entries = [entry for index, entry in enumerate(self.entries) if index not in dropped]
        return len(dropped)

    def _drop_oldest_turns(self, excess: int, frozen_from: int, dropped: set[int]) -> int:
        spans: list[tuple[Segment, list[int]]] = []
        for index, entry in enumerate(self.entries):
            if not spans or spans[-1][0] is not entry.segment:
                spans.append((entry.segment, []))
            spans[-1][1].append(index)
        removed, closure_follows = 0, False
        for segment, indices in spans:
            if indices[-1] >= frozen_from:
                break
            if segment.kind == "closure" and not closure_follows:
                continue
            if segment.kind != "closure":
                if removed >= excess:
                    break
                closure_follows = segment.kind == "assistant" and not segment.pinned
                if segment.pinned:
                    continue
            fresh = [index for index in indices if index not in dropped]
            dropped.update(fresh)
            removed += len(fresh)
        return removed
