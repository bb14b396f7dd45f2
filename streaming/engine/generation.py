"""One assistant response in progress: the request state the engine's step loop advances one LLM
position at a time, in the engine's worker process (the batched phases are in :mod:`.scheduler`).

Each step follows upstream's generation loop: the text head picks the next token (or a forced one:
the thinking budget's ``</think>``, the ``<|sostm|>`` that opens speech, a test's ``text_hook``);
``<|empty|>`` inside a speech stream means an audio patch, which the patch decoder writes; the new
position goes into the record and is routed, then into the KV cache:

- thinking text (``<think>\\n`` ... ``</think>``) -> ``TextToken(thinking=True)``, never spoken;
- answer text -> the tool-call filter -> ``TextToken`` / withheld ``<tool_call>`` -> ``ToolCallText``;
- audio patch -> the same filter (so audio written during a tool call is never emitted) ->
  ``AudioPatch`` and the streaming decoder -> ``AudioChunk`` (24 kHz int16).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from mimo_voice.streaming.model.audio import float_to_pcm16
from mimo_voice.streaming.model.prompts import THINK_CLOSE, Output

from .codec_stream import StreamingDecoder, push_together
from .context import Segment
from .events import (
    SAMPLE_RATE,
    SAMPLES_PER_PATCH,
    AudioChunk,
    AudioPatch,
    Event,
    TextToken,
    ToolCallText,
    TurnEnd,
    TurnEndReason,
)
from .text_stream import Detokenizer, SpokenToken, ToolCallFilter, heard_text

if TYPE_CHECKING:
    from mimo_voice.streaming.model.fast import StepOutput

    from .conversation import Conversation

THINK_END_TAG = THINK_CLOSE.strip()
PATCH_SECONDS = SAMPLES_PER_PATCH / SAMPLE_RATE


class Generation:
    def __init__(
        self,
        conversation: Conversation,
        segment: Segment,
        prefix_length: int,
        *,
        output: Output,
        thinking: bool,
        started: float,
        sink: Callable[[Event], None],
        first: StepOutput,
    ) -> None:
        self.conv = conversation
        self.segment = segment
        self.prefix_length = prefix_length  # positions of the assistant prefix at the start of the segment
        self.output = output
        self.phase = "thinking" if thinking else ("stream" if output == "speech" else "text")
        self.stream_open = self.phase == "stream"
        self.sink = sink
        self.last = first
        self.started = started  # perf_counter() when respond() was called: the end of the user turn
        self.prompt_positions = len(conversation.context)
        self.tokens: list[int] = []  # every text-channel token of this response (text_hook's input)
        self.forced: deque[int] = deque()
        self.thoughts = Detokenizer(conversation.tokenizer)
        self.answer = Detokenizer(conversation.tokenizer)
        self.filter = ToolCallFilter()
        self.spoken: list[SpokenToken] = []
        self.released_patches = 0
        self.audio_positions = 0  # <|empty|> positions generated (the reply's patches, before the delay filter)
        self.emitted_samples = 0
        self.decoder = conversation.new_decoder() if output == "speech" else None
        self.cancel_requested = False
        self.reason: TurnEndReason | None = None
        self.timings: dict[str, float] = {"prefill_s": time.perf_counter() - started}
        self._step_time = {"audio": 0.0, "text": 0.0}
        self._pcm_time = 0.0  # of which streaming decode
        self._undecoded: deque[np.ndarray] = deque()  # released patches whose PCM comes after the backbone step
        self._step_count = {"audio": 0, "text": 0}
        self._generation_start = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.reason is not None

    # --- one step, in phases driven by the worker's scheduler (:mod:`.scheduler`) for every row at once ---

    def forced_token(self) -> int | None:
        """This step's token when it is forced (the thinking budget's tag, ``<|sostm|>``, a ``text_hook``, the
        embedded tiny model's longest reply); None: the text head samples it."""
        if self.forced:
            return self.forced.popleft()
        hook = self.conv.text_hook
        if hook is not None:
            forced = hook(list(self.tokens))
            if forced is not None:
                return int(forced)
        bounds = self.conv.worker.reply_patches  # after the hook: a test that scripts a long reply gets it
        if bounds is not None and self.phase == "stream" and self.audio_positions >= bounds[1]:
            return self.conv.special.eostm
        return None

    def accept(self, token: int) -> bool:
        """Starts the step with ``token``; False when the token ends the response (it is then not fed)."""
        if token in self._stop_ids():
            self.finish("stop")
            return False
        if token == self.conv.special.empty and self.phase != "stream":  # only a text_hook can; the sampler bans it
            raise ValueError("<|empty|> (an audio patch) forced outside a speech stream")
        return True

    def record(self, token: int, codes: np.ndarray | None) -> None:
        """Appends the new position (``codes`` [group, channels] for a patch) to the record and
        routes it: events go out now, before the backbone step; the patch's PCM is decoded by
        :meth:`decode_audio` after it."""
        conv = self.conv
        conv.context.add(token, None if codes is None else torch.from_numpy(codes), self.segment)
        self.tokens.append(token)
        if codes is not None:
            self.audio_positions += 1
            self._route_patch(codes)
        else:
            self._route_token(token)
        if self.filter.call is not None:
            self.finish("tool_call")
        elif len(self.tokens) >= conv.config.agent.max_new_groups and not self.done:
            self.finish("length")

    def account(self, kind: str, seconds: float) -> None:
        """Adds one step of ``kind`` (audio or text) that took ``seconds`` to the timings."""
        self._step_time[kind] += seconds
        self._step_count[kind] += 1

    def banned(self) -> tuple[int, ...]:
        """Text ids the text head must not sample in the current phase."""
        special = self.conv.special
        if self.phase == "stream":
            bounds = self.conv.worker.reply_patches
            if bounds is not None and self.audio_positions < bounds[0]:  # too short to hear: no stop yet
                return (special.sostm, *self._stop_ids())
            return (special.sostm,)  # a stream opens once
        banned = [special.empty, special.eot, special.eostm]
        if self.phase == "thinking":  # a thought is followed by an answer: no stopping inside the block
            banned += [special.im_end, special.endoftext]
        # Speech may open from thinking (the model skipping </think>); text output never opens a stream.
        return (*banned, *[special.sostm] * (self.output == "text"))

    def _stop_ids(self) -> set[int]:
        special = self.conv.special
        stops = {special.im_end, special.endoftext}
        return stops | {special.eostm} if self.output == "speech" else stops

    # --- routing ---

    def _route_token(self, token: int) -> None:
        if token == self.conv.special.sostm:
            self.phase, self.stream_open = "stream", True
        elif token in self.conv.structure_ids:
            return  # <|eot|> and other structure tokens are never text
        elif self.phase in ("thinking", "closing_think"):
            self._think(token)
        else:
            delta = self.answer.push(token)
            self._release(self.filter.push(TextToken(delta, token, time=time.perf_counter()), delta))

    def _think(self, token: int) -> None:
        delta = self.thoughts.push(token)
        self._emit(TextToken(delta, token, thinking=True, time=time.perf_counter()))
        if self.phase == "thinking":
            text = self.thoughts.text
            end = text.find(THINK_END_TAG)
            if end >= 0:
                # Upstream's block ends "</think>\n"; speech then opens with <|sostm|>.
                newline = not text[end + len(THINK_END_TAG) :].startswith("\n")
                self.forced.extend(self.conv.builder.encode("\n") * newline)
                self.forced.extend([self.conv.special.sostm] * (self.output == "speech"))
                self.phase = "closing_think"
            elif len(self.thoughts.ids) >= self.conv.config.agent.thinking_budget_tokens and not self.forced:
                # Budget spent: close the block; the tag's tokens come through the next steps.
                self.forced.extend(self.conv.builder.encode(("" if text.endswith("\n") else "\n") + THINK_CLOSE))
        if self.phase == "closing_think" and self.output == "text" and not self.forced:
            self.phase = "text"

    def _route_patch(self, codes: np.ndarray) -> None:
        event = AudioPatch(codes, index=-1, time=time.perf_counter())
        self._release(self.filter.push(event))

    def _release(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, AudioPatch):
                self._emit_patch(event)
            else:
                self.spoken.append(SpokenToken(event.token_id, event.text, self.released_patches))
                self._emit(event)

    def _emit_patch(self, event: AudioPatch) -> None:
        index = self.released_patches
        self.released_patches += 1
        self._emit(AudioPatch(event.codes, index=index, time=event.time))
        now = time.perf_counter()
        if "first_patch_s" not in self.timings:
            self.timings["first_patch_s"] = now - self.started
            self.timings["first_step_ms"] = 1000 * (now - self._generation_start)
        self._undecoded.append(event.codes)

    @property
    def undecoded_patches(self) -> int:
        return len(self._undecoded)

    def decode_audio(self) -> None:
        """Streams the released patches not decoded yet to PCM (``AudioChunk``)."""
        while self._undecoded:
            began = time.perf_counter()
            pcm = self.decoder.push(self._next_undecoded())
            self._emit_decoded(pcm, time.perf_counter() - began)

    def _next_undecoded(self) -> torch.Tensor:
        return torch.as_tensor(self._undecoded.popleft(), device=self.conv.codec.device)

    def _emit_decoded(self, pcm: torch.Tensor, seconds: float) -> None:
        self.timings.setdefault("first_decode_ms", 1000 * seconds)
        self._pcm_time += seconds
        self._emit_pcm(pcm)

    def _emit_pcm(self, pcm: torch.Tensor) -> None:
        if pcm.numel() == 0:
            return
        now = time.perf_counter()
        self.timings.setdefault("first_pcm_s", now - self.started)
        samples = float_to_pcm16(pcm.float().cpu().numpy())
        self._emit(AudioChunk(samples, first_sample=self.emitted_samples, time=now))
        self.emitted_samples += len(samples)

    def _emit(self, event: Event) -> None:
        if isinstance(event, TextToken):
            self.timings.setdefault("first_text_s", event.time - self.started)
        self.sink(event)

    # --- the end ---

    def finish(self, reason: TurnEndReason, error: str | None = None) -> None:
        """Ends the response: flushes what is held back, closes the turn in the context, emits TurnEnd."""
        if self.done:
            return
        if reason not in ("cancelled", "error"):
            self._release(self.filter.flush())
            unclosed = self.filter.unclosed_call()
            call = self.filter.call
            if call is None and unclosed is not None:  # the turn ended inside the call: the agent reports it
                call = ToolCallText(unclosed, time=time.perf_counter())
            if call is not None:
                self._emit(call)
                reason = "tool_call"
            if self.decoder is not None:
                self.decode_audio()
                self._emit_pcm(self.decoder.flush())
        self.reason = reason
        try:
            self.conv.end_generation(self)
        finally:  # the stream ends whatever happens
            self._emit(
                TurnEnd(
                    reason,
                    prompt_positions=self.prompt_positions,
                    generated_positions=len(self.tokens),
                    error=error,
                    time=time.perf_counter(),
                    timings=self._final_timings(),
                )
            )

    def _final_timings(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self._generation_start
        audio_s = self.released_patches * PATCH_SECONDS
        timings = dict(self.timings, generation_s=elapsed, audio_s=audio_s, steps=float(len(self.tokens)))
        for kind in ("audio", "text"):
            if self._step_count[kind]:
                timings[f"ms_per_{kind}_step"] = 1000 * self._step_time[kind] / self._step_count[kind]
        if audio_s:
            timings["rtf"] = elapsed / audio_s
            timings["ms_pcm_per_patch"] = 1000 * self._pcm_time / self.released_patches
        return timings

    # --- barge-in ---

    def spoken_text(self) -> str:
        return "".join(token.text for token in self.spoken)

    def heard(self, played_samples: int) -> tuple[int, str]:
        """(patches the user heard, counting one they heard part of; the words they heard)."""
        heard = played_samples / SAMPLES_PER_PATCH
        patches = min(math.ceil(heard), self.released_patches)
        return patches, heard_text(self.spoken, self.released_patches, heard)


def decode_audio_together(generations: list[Generation]) -> None:
    """:meth:`Generation.decode_audio` of speaking generations with one released patch each, their decoder
    windows decoded as batches (:func:`~.codec_stream.push_together`); each is charged an equal share."""
    began = time.perf_counter()
    pushes = [(cast(StreamingDecoder, g.decoder), g._next_undecoded()) for g in generations]
    pcms = push_together(pushes)
    share = (time.perf_counter() - began) / len(generations)
    for generation, pcm in zip(generations, pcms):
        generation._emit_decoded(pcm, share)
