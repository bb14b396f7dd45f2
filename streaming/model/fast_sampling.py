"""Sync-free token sampling for the batched hot path: the filters of ``sampling.py`` in the same
order (temperature, top-k keeping ties, top-p keeping the best token, then the bans), with per-row
parameters held in device tensors, and the draw made as argmax(log p - log q), q ~ Exp(1)
(an exponential race: the same distribution as a multinomial draw, without its host sync).

No Python branch depends on a tensor's value: a row where every surviving token is banned falls
back to the best allowed token through ``torch.where``. Python-side flags (all rows greedy, how
many candidates to look at) are fixed when a :class:`RowSampling` is built, so a CUDA graph
captured for one such set of flags stays valid for every parameter value.

Candidates: when every sampled row has a top-k, the ``max(top_k) + TIE_SLACK`` best are taken
(ties with the k-th beyond that slack are dropped, where the reference keeps them: exact fp32
ties are rare). Otherwise the whole vocabulary is sorted when it is small (the patch decoder's
1025/129 codes) or on CUDA; on the CPU a 151,680-token sort costs tens of ms, so top-p alone
looks at the ``NUCLEUS_CANDIDATES`` best (a nucleus wider than that is cut to it; a trained
model's nucleus is far narrower). ``full_sort=True`` (what a captured graph uses) always sorts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .sampling import SamplingParams

FULL_SORT_BELOW = 4096
TIE_SLACK = 8
NUCLEUS_CANDIDATES = 2048


@dataclass(frozen=True)
class RowSampling:
    """Sampling parameters of B rows as device tensors, plus the Python flags that shape the work."""

    # Per-row parameters as [B, 1] columns: they broadcast over the vocabulary without a reshape op.
    temperature: Tensor  # [B, 1] float32
    top_k: Tensor  # [B, 1] long; a huge value where a row has no top-k
    top_p: Tensor  # [B, 1] float32; +inf where a row has no top-p (so rounding never drops a token)
    greedy: Tensor  # [B, 1] bool
    mode: str  # "greedy" (every row), "sample" (every row) or "mixed"
    max_top_k: int | None  # the largest top-k of the sampled rows; None when one of them has none
    any_top_k: bool  # some sampled row filters by top-k
    any_top_p: bool  # some sampled row filters by top-p
    any_filter: bool  # some sampled row filters by top-k or top-p (else the draw is over the whole vocabulary)

    @property
    def batch(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls, params: SamplingParams | Sequence[SamplingParams], batch: int, device: torch.device | str
    ) -> RowSampling:
        """One shared ``SamplingParams`` for all ``batch`` rows, or one per row."""
        rows = [params] * batch if isinstance(params, SamplingParams) else list(params)
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} sampler params for {batch} rows")
        sampled = [p for p in rows if p.do_sample]
        mode = "greedy" if not sampled else "sample" if len(sampled) == batch else "mixed"
        no_k = torch.iinfo(torch.int64).max
        values = (
            [p.temperature for p in rows],
            [p.top_k or no_k for p in rows],
            [p.top_p if p.top_p < 1.0 else float("inf") for p in rows],
            [not p.do_sample for p in rows],
        )
        temperature, top_k, top_p, greedy = (
            torch.tensor(v, dtype=dtype)[:, None].to(device, non_blocking=True)
            for v, dtype in zip(values, (torch.float32, torch.long, torch.float32, torch.bool))
        )
        max_top_k = None if any(p.top_k is None for p in sampled) else max((p.top_k or 1) for p in sampled or rows)
        any_top_k = any(p.top_k is not None for p in sampled)
        any_top_p = any(p.top_p < 1.0 for p in sampled)
        return cls(temperature, top_k, top_p, greedy, mode, max_top_k, any_top_k, any_top_p, any_top_k or any_top_p)

    @classmethod
    def generic(cls, batch: int, device: torch.device | str) -> RowSampling:
        """Flags that serve every parameter value (a full sort, greedy decided per row): what a
        captured CUDA graph runs; the tensors are meant to be overwritten in place before each replay."""
        base = cls.build(SamplingParams(do_sample=False), batch, device)
        return cls(base.temperature, base.top_k, base.top_p, base.greedy, "mixed", None, True, True, True)

    def copy_rows_(self, other: RowSampling) -> None:
        """Write ``other``'s rows into the first rows of these tensors; the rest become greedy rows."""
        n = other.batch
        self.greedy.fill_(True)
        for mine, theirs in (
            (self.temperature, other.temperature),
            (self.top_k, other.top_k),
            (self.top_p, other.top_p),
            (self.greedy, other.greedy),
        ):
            mine[:n].copy_(theirs)


def best_allowed(scores: Tensor, ban: Tensor | None, keepdim: bool = False) -> Tensor:
    """Argmax over the tokens that are not banned (``ban`` broadcastable to ``scores``)."""
    return (scores if ban is None else scores.masked_fill(ban, float("-inf"))).argmax(-1, keepdim=keepdim)


def sample_rows(
    logits: Tensor,
    sampling: RowSampling,
    ban: Tensor | None,
    generator: torch.Generator | None = None,
    full_sort: bool | None = None,
    race_noise: Tensor | None = None,
) -> Tensor:
    """``logits`` [..., B, V] (any leading dims: the patch decoder passes [channels, B, V]) -> ids [..., B]
    on the device, with no host sync. ``ban`` (bool, broadcastable to ``logits``) is applied after the
    filters, as the reference sampler does. ``race_noise`` ([..., B, >= candidates], from :func:`race_noises`)
    is the draw made beforehand; else it is drawn here from ``generator``."""
    scores = logits if logits.dtype == torch.float32 else logits.float()  # .float() of float32 is still an op
    if sampling.mode == "greedy":
        return best_allowed(scores, ban)
    values, ids = filtered(scores, sampling, ban, full_sort)
    if race_noise is None:
        race_noise = race_noises(values.numel(), generator, values.device)[0].view(values.shape)
    width = values.shape[-1]
    race = values + (race_noise if race_noise.shape[-1] == width else race_noise[..., :width])
    best, choice = race.max(-1, keepdim=True)
    tokens = choice if ids is None else ids.gather(-1, choice)
    fallback = torch.isneginf(best)  # only banned tokens survived the filters
    if sampling.mode == "mixed":
        fallback = fallback | sampling.greedy
    return torch.where(fallback, best_allowed(scores, ban, keepdim=True), tokens).squeeze(-1)


def race_noises(
    sizes: int | Sequence[int], generator: torch.Generator | None, device: torch.device | str
) -> tuple[Tensor, ...]:
    """Flat float32 draws of -log q, q = -log u ~ Exp(1), u ~ U[0, 1), one per size, made by one draw:
    argmax(log p - log q) is a draw from p (an exponential race). The patch decoder draws all of its steps'
    noise at once, so that each of its samplers adds it instead of drawing."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    noise = torch.empty(sum(sizes), device=device).uniform_(generator=generator)
    return noise.log_().neg_().log_().neg_().split(sizes)


def filtered(
    scores: Tensor, sampling: RowSampling, ban: Tensor | None, full_sort: bool | None = None
) -> tuple[Tensor, Tensor | None]:
    """Float32 ``scores`` [..., B, V] -> the tempered scores of the candidates, -inf where a filter or a
    ban drops them, and the candidates' ids (None when the candidates are the whole vocabulary in order)."""
    values = scores / sampling.temperature
    ids = None
    if sampling.any_filter:
        values, ids = _candidates(values, sampling, scores.shape[-1], full_sort)
        if sampling.any_top_k:
            last = values.shape[-1] - 1
            kth = values.gather(-1, (sampling.top_k - 1).clamp(max=last).expand_as(values[..., :1]))
            values = values.masked_fill(values < kth, float("-inf"))
        if sampling.any_top_p:
            probs = values.softmax(-1)
            values = values.masked_fill(probs.cumsum(-1) - probs >= sampling.top_p, float("-inf"))
    if ban is not None:
        ban = ban.expand_as(scores)
        values = values.masked_fill(ban if ids is None else ban.gather(-1, ids), float("-inf"))
    return values, ids


def _candidates(scaled: Tensor, sampling: RowSampling, vocab: int, full_sort: bool | None) -> tuple[Tensor, Tensor]:
    """The best tokens, sorted: all of them, or enough to hold every row's top-k (plus ties) or nucleus."""
    if not full_sort:
        if sampling.max_top_k is not None:
            wanted = sampling.max_top_k + TIE_SLACK
        elif full_sort is None and (vocab < FULL_SORT_BELOW or scaled.is_cuda):
            wanted = vocab
        else:
            wanted = NUCLEUS_CANDIDATES
        if wanted < vocab:
            return scaled.topk(wanted)
    return scaled.sort(-1, descending=True)
