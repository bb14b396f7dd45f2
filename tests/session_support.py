"""Helpers for the session and engine tests: scripted text, audio, engine variants, event collection."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from mimo_voice.streaming.engine.testing import TestingEngine
from mimo_voice.streaming.engine.events import AudioChunk, AudioPatch, Event, TextToken, TurnEnd


class Script:
    """A ``text_hook``: response n starts with ``scripts[n]`` (token ids), then the model goes on by itself.
    Forced tokens the session adds itself (``</think>``, ``<|sostm|>``) do not consume the script."""

    def __init__(self, *scripts: list[int]) -> None:
        self.scripts = list(scripts)
        self.response = -1
        self.position = 0

    def __call__(self, tokens: list[int]) -> int | None:
        if not tokens:
            self.response, self.position = self.response + 1, 0
        script = self.scripts[self.response] if self.response < len(self.scripts) else []
        if self.position >= len(script):
            return None
        self.position += 1
        return script[self.position - 1]


def speech(engine: TestingEngine, text: str, patches: int, *, end: bool = True) -> list[int]:
    """``text`` in the model's 5:5 interleave with ``patches`` audio positions, then ``<|eostm|>``."""
    ids, empty = engine.builder.encode(text), engine.special.empty
    script = []
    for start in range(0, max(len(ids), 1), 5):
        script += ids[start : start + 5] + [empty] * min(5, patches)
        patches -= min(5, patches)
    return script + [empty] * patches + [engine.special.eostm] * end


def voice(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Speech-like int16 audio: a few harmonics with a syllable-rate envelope plus a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700)))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    signal = 0.2 * wave * envelope + 0.01 * rng.standard_normal(len(t))
    return (signal * 8000).astype(np.int16)


async def collect(events) -> list[Event]:
    return [event async for event in events]


def of(events: list[Event], kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def index_of(events: list[Event], event: Event) -> int:
    """Position of ``event`` itself (events holding arrays do not compare with ==)."""
    return next(i for i, e in enumerate(events) if e is event)


def pcm(events: list[Event]) -> np.ndarray:
    chunks = of(events, AudioChunk)
    return np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.int16)


def spoken(events: list[Event]) -> str:
    return "".join(e.text for e in of(events, TextToken) if not e.thinking)


def end_of(events: list[Event]) -> TurnEnd:
    assert isinstance(events[-1], TurnEnd), events[-1]
    return events[-1]


def patches_of(events: list[Event]) -> list[np.ndarray]:
    return [e.codes for e in of(events, AudioPatch)]


@contextlib.asynccontextmanager
async def opened(engine: TestingEngine, **kwargs):
    session = engine.new_session(**kwargs)
    try:
        yield session
    finally:
        await session.close()


# --- functions run in the engine's worker process on a session's Conversation, through Session.inspect ---


def last_tokens(conversation) -> list[int]:
    """Every text-channel token of the last response."""
    return list(conversation.last_response.tokens)


def record(conversation, start: int = 0, end: int | None = None):
    """The positions of the conversation record."""
    return conversation.context.positions(start, end)


def record_length(conversation) -> int:
    return len(conversation.context)


def cache_length(conversation) -> int:
    return conversation.cache.length


def segment_kinds(conversation) -> list[str]:
    return [entry.segment.kind for entry in conversation.context.entries]


def cache_tensors(conversation) -> list:
    return [(layer.keys.clone(), layer.values.clone()) for layer in conversation.cache.dynamic.layers]


def one_prefill(conversation, positions):
    """The text logits and the KV cache of ``positions`` fed at once into a fresh cache."""
    model = conversation.model
    cache = model.new_cache()
    with torch.inference_mode():
        output = model(*positions.batch(model.device), cache=cache)
    return output.text_logits.clone(), [(layer.keys.clone(), layer.values.clone()) for layer in cache.dynamic.layers]


def user_patches(conversation) -> list[torch.Tensor]:
    """The patches of each user turn in the record, turn by turn."""
    turns: dict[int, list[torch.Tensor]] = {}
    for entry in conversation.context.entries:
        if entry.segment.kind == "user" and entry.codes is not None:
            turns.setdefault(id(entry.segment), []).append(entry.codes)
    return [torch.stack(codes) for codes in turns.values()]


def response_start(conversation) -> tuple[int, int]:
    """Where the last response's segment starts, and its prefix length."""
    response = conversation.last_response
    return conversation.context.start_of(response.segment), response.prefix_length


def count_fed_positions(conversation) -> None:
    """From now on, count the positions fed to the model (see ``fed_positions``)."""
    model, fed = conversation.model, []
    forward = type(model).forward

    def counting(text_ids, codes, cache=None, all_logits=False):
        fed.append(text_ids.shape[1])
        return forward(model, text_ids, codes, cache=cache, all_logits=all_logits)

    model.forward, model.fed = counting, fed


def fed_positions(conversation) -> list[int]:
    """The counts since ``count_fed_positions``, which stops counting."""
    model = conversation.model
    fed = model.fed
    del model.forward, model.fed
    return fed


class FirstLogits(Script):
    """A script that keeps each response's first text logits and the record length they were computed at.
    It runs in the worker; ``attach`` gives it the conversation, ``first_logits`` reads what it kept."""

    def __init__(self, *scripts: list[int]) -> None:
        super().__init__(*scripts)
        self.conversation = None
        self.seen: list[tuple[torch.Tensor, int]] = []

    def __call__(self, tokens):
        if not tokens:
            generation = self.conversation.generation
            self.seen.append((generation.last.text_logits.clone(), len(self.conversation.context)))
        return super().__call__(tokens)


def attach(conversation) -> None:
    conversation.text_hook.conversation = conversation


def first_logits(conversation) -> list[tuple[torch.Tensor, int]]:
    return conversation.text_hook.seen


def context_report(conversation) -> dict:
    """What context management kept: counts per kind, and the last logits next to a one-go prefill's."""
    context, cache = conversation.context, conversation.cache
    users = list(dict.fromkeys(e.segment for e in context.entries if e.segment.kind == "user"))
    last_logits, _ = one_prefill(conversation, context.positions(0, cache.length))
    return {
        "compactions": conversation.compactions,
        "length": len(context),
        "cache_length": cache.length,
        "assistant_text": sum(e.segment.kind == "assistant" and e.codes is None for e in context.entries),
        "user_audio": [len(context.audio_indices(segment)) for segment in users],
        "last_logits": conversation.last_output.text_logits.clone(),
        "one_prefill_logits": last_logits,
    }


def generating(conversation) -> bool:
    return conversation.generation is not None


def voice_prompt_part(conversation) -> list:
    """(text id, codes or None) of each position of the voice prompt."""
    return [(e.text_id, e.codes) for e in conversation.context.entries if e.segment.kind == "voice"]


def _exploding_push(user_turn, pcm, sample_rate):
    raise RuntimeError("encoder exploded")


def break_feeding(conversation) -> None:
    """Makes every user audio push fail in the worker, until ``mend_feeding``."""
    from mimo_voice.streaming.engine.conversation import UserTurn

    _saved["push"] = UserTurn.push
    UserTurn.push = _exploding_push


def mend_feeding(conversation) -> None:
    from mimo_voice.streaming.engine.conversation import UserTurn

    UserTurn.push = _saved.pop("push")


_saved: dict = {}
