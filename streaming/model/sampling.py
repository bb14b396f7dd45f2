"""Token sampling exactly in upstream's order: temperature, top-k, top-p (always keeping the best
token), then the banned ids, then a multinomial draw (or argmax when not sampling).

Two things differ from upstream's ``MiMoSampler`` in how, not in what:
- the vocabulary is never fully sorted when it need not be: with top-k only the k best are taken
  (all tokens tied with the k-th are kept, as upstream does), and top-p alone looks at the best
  64, 1024, 16384... tokens until the nucleus is known to lie inside them. The nucleus is the same
  set up to float rounding of the cumulative sum at its boundary; logits are handled in float32.
- where upstream would fail (every token that survives the filters is banned: NaN probabilities,
  or an arbitrary id 0 under argmax), the best token that is not banned is taken instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

FIRST_NUCLEUS_GUESS = 64
NUCLEUS_GROWTH = 16
FULL_SORT_BELOW = 4096  # vocabularies this small are simply sorted (the patch decoder's 1025/129 codes)


@dataclass(frozen=True)
class SamplingParams:
    """One channel's sampling settings (the engine converts the app's ``sampling`` config into these)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or (self.top_k is not None and self.top_k < 1):
            raise ValueError(f"invalid sampling parameters {self}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params

    def sample(self, logits: Tensor, banned: Sequence[int] = (), generator: torch.Generator | None = None) -> Tensor:
        """``logits`` [B, V] -> token ids [B]; ``banned`` ids are never returned."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {list(logits.shape)}")
        ban = None
        if len(banned):
            if not all(0 <= token < logits.shape[-1] for token in banned):
                raise ValueError(f"banned ids {list(banned)} are not all inside the vocabulary of {logits.shape[-1]}")
            ban = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            ban[list(banned)] = True
        return self.sample_masked(logits, ban, generator)

    def sample_masked(self, logits: Tensor, ban: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
        """Like :meth:`sample`, with the banned ids as a bool mask broadcastable to ``logits`` (one row per row)."""
        scores = logits.float()
        if not self.params.do_sample:
            return _best_allowed(scores, ban)
        scores = scores / self.params.temperature
        values, ids = self.candidates(scores)
        if ban is not None:
            banned = ban.expand_as(scores) if ids is None else ban.expand_as(scores).gather(-1, ids)
            values = values.masked_fill(banned, float("-inf"))
        dead = torch.isneginf(values).all(-1)  # rows where only banned tokens survived the filters
        any_dead = bool(dead.any())
        if any_dead:
            values = values.masked_fill(dead[:, None], 0.0)
        choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
        tokens = (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)
        return torch.where(dead, _best_allowed(scores, ban), tokens) if any_dead else tokens

    def candidates(self, scores: Tensor) -> tuple[Tensor, Tensor | None]:
        """Temperature-scaled ``scores`` [B, V] -> what survives top-k and top-p: their scores (-inf where
        dropped) and their ids (None when the scores cover the whole vocabulary in order)."""
        top_k, top_p = self.params.top_k, self.params.top_p
        vocab = scores.shape[-1]
        if top_k is not None and top_k < vocab:
            values, ids = _top_k_with_ties(scores, top_k)
            if top_p < 1.0:
                values = _drop_outside_nucleus(values, values.softmax(-1), top_p)
            return values, ids
        if top_p >= 1.0:
            return scores, None
        # Top-p alone: grow a candidate set of the best tokens until it contains the whole nucleus.
        log_total = scores.logsumexp(-1, keepdim=True)
        k = vocab if vocab < FULL_SORT_BELOW else FIRST_NUCLEUS_GUESS
        while True:
            values, ids = scores.sort(-1, descending=True) if k == vocab else scores.topk(k)
            probs = (values - log_total).exp()
            mass = probs.sum(-1)
            if k == vocab or bool((mass >= top_p).all()):  # every later token has >= top_p better than it
                return _drop_outside_nucleus(values, probs, top_p), ids
            # No remaining token is likelier than the last one taken: that bounds how many more are needed.
            needed = int(((top_p - mass) / probs[:, -1].clamp_min(1e-30)).max()) + 1
            k = vocab if k + needed > vocab // 2 else max(k * NUCLEUS_GROWTH, k + needed)


def _top_k_with_ties(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best scores, sorted, plus every token tied with the k-th (upstream drops only scores < k-th)."""
    values, ids = scores.topk(k)
    kth = values[:, -1:]
    survivors = int((scores >= kth).sum(-1).max())
    if survivors > k:
        values, ids = scores.topk(survivors)
        values = values.masked_fill(values < kth, float("-inf"))
    return values, ids


def _drop_outside_nucleus(values: Tensor, probs: Tensor, top_p: float) -> Tensor:
    """``values``/``probs`` sorted best first. Upstream drops a token when the ascending cumulative
    probability up to it is <= 1 - top_p, i.e. when the tokens better than it already hold >= top_p."""
    better = probs.cumsum(-1) - probs
    return values.masked_fill(better >= top_p, float("-inf"))


def _best_allowed(scores: Tensor, ban: Tensor | None) -> Tensor:
    return (scores if ban is None else scores.masked_fill(ban, float("-inf"))).argmax(-1)
