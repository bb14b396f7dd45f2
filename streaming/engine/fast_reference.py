"""The batched-step interface of the fast model (``KVPool`` + ``FastMiMoAudio``), implemented over the eager model.

The worker's step phase (:mod:`.scheduler`) is written against the fast hot path's interface: a pool of KV
slots, one per conversation; ``prefill`` of a slot; ``step`` of B slots by one position each; ``decode_patch``
and ``sample_text`` over B rows. This module gives that interface with the eager
:class:`~mimo_voice.streaming.model.modeling_mimo_audio.MiMoAudioForCausalLM` underneath (a growing cache per
slot, a per-row loop in ``step``), so the engine batches today and the fused, compiled implementation can
replace it without changes to the engine. It is also the reference the fast one is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from mimo_voice.configs.schema import SamplerParams
from mimo_voice.streaming.model.modeling_mimo_audio import KVCache, MiMoAudioForCausalLM
from mimo_voice.streaming.model.sampling import Sampler
from torch import Tensor


@dataclass
class StepOutput:
    text_logits: Tensor  # [B, vocab] at each row's last new position
    local_in: Tensor  # [B, local_dim]: the patch decoder's first input for each row

    def row(self, index: int) -> StepOutput:
        return StepOutput(self.text_logits[index : index + 1], self.local_in[index : index + 1])


class KVPool:
    """KV slots, one per conversation. Here each slot is an eager :class:`KVCache` that grows as needed."""

    def __init__(self, model: MiMoAudioForCausalLM) -> None:
        self.model = model
        self.caches: dict[int, KVCache] = {}
        self._next = 0

    def allocate(self) -> int:
        slot, self._next = self._next, self._next + 1
        self.caches[slot] = self.model.new_cache()
        return slot

    def free(self, slot: int) -> None:
        del self.caches[slot]

    def length(self, slot: int) -> int:
        return self.caches[slot].length

    def truncate(self, slot: int, length: int) -> None:
        """Roll-back: keep the first ``length`` positions (0 empties the slot)."""
        if length == 0:
            self.caches[slot] = self.model.new_cache()
        else:
            self.caches[slot].truncate(length)

    def layer_kv(self, slot: int) -> list[tuple[Tensor, Tensor]]:
        """Each layer's keys and values of the slot's positions (for tests)."""
        return [(layer.keys, layer.values) for layer in self.caches[slot].dynamic.layers]


class FastMiMoAudio:
    """Prefill, batched step, patch decoder and text sampling over the slots of a :class:`KVPool`."""

    def __init__(self, model: MiMoAudioForCausalLM, pool: KVPool) -> None:
        self.model = model
        self.pool = pool

    def prefill(self, slot: int, text_ids: Tensor, codes: Tensor) -> StepOutput:
        """Appends T positions (``text_ids`` [T], ``codes`` [T, group, channels]) to the slot."""
        out = self.model(text_ids[None], codes[None], cache=self.pool.caches[slot])
        return StepOutput(out.text_logits, out.local_in)

    def step(self, slots: Sequence[int], text_ids: Tensor, codes: Tensor) -> StepOutput:
        """One new position per row: ``text_ids`` [B], ``codes`` [B, group, channels]."""
        outs = [self.prefill(slot, text_ids[i : i + 1], codes[i : i + 1]) for i, slot in enumerate(slots)]
        return StepOutput(torch.cat([o.text_logits for o in outs]), torch.cat([o.local_in for o in outs]))

    def decode_patch(
        self, local_in: Tensor, sampling: SamplerParams, generators: Sequence[torch.Generator | None]
    ) -> Tensor:
        """[B, local_dim] -> undelayed codes [B, group, channels] on the device; row i draws from generators[i]."""
        return self.model.decode_patch(local_in, RowwiseSampler(sampling, generators))

    def sample_text(
        self, logits: Tensor, sampling: SamplerParams, banned: Tensor, generators: Sequence[torch.Generator | None]
    ) -> Tensor:
        """[B, vocab] logits, banned ids as a bool mask [B, vocab] or [vocab] -> token ids [B] on the device."""
        return RowwiseSampler(sampling, generators).sample_masked(logits, banned)


class RowwiseSampler(Sampler):
    """A sampler over rows of several sessions that draws each session's tokens from that session's generator,
    consuming it as batch size 1 would: a session's output does not depend on who it was batched with.
    Rows are batch-minor (``[k * B, vocab]``, as the patch decoder lays out its channels x batch)."""

    def __init__(self, params: SamplerParams, generators: Sequence[torch.Generator | None]) -> None:
        super().__init__(params)
        self.generators = list(generators)

    def sample_masked(self, logits: Tensor, ban: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
        batch = len(self.generators)
        if not self.params.do_sample or batch == 1:
            return super().sample_masked(logits, ban, self.generators[0])
        rows = logits.view(-1, batch, logits.shape[-1])
        bans = None if ban is None else ban.expand_as(logits).reshape(rows.shape)
        tokens = [
            super(RowwiseSampler, self).sample_masked(rows[:, b], None if bans is None else bans[:, b], g)
            for b, g in enumerate(self.generators)
        ]
        return torch.stack(tokens, dim=1).reshape(-1)
