"""The worker's step phase: every active response advanced by one position, as one batch.

Each active :class:`~.generation.Generation` is a row. One step phase (:meth:`StepScheduler.step`):

1. rows whose cache is being rebuilt (context management) feed one more chunk of it and sit the step out,
   so a long rebuild never stalls the other rows;
2. each row's token: forced (thinking tag, ``<|sostm|>``, a ``text_hook``) or sampled; sampled rows are
   stacked, one ``sample_text`` per group of rows with equal sampling parameters, and the tokens are read
   back to the host once for all rows (the only read of a tensor value in the step);
3. stop tokens end their rows; the rows that emit audio run one ``decode_patch`` (per group of equal
   sampling parameters) and their codes are copied to the host once, for the record and the events;
4. each row's position goes into its record and is routed (events go out here, before the backbone step:
   the first audio patch does not wait for the step that feeds it);
5. one backbone ``step`` of B rows, one position each, rows at different lengths;
6. the audio of each row's new patch is decoded to PCM, the rows' equal-length decoder windows as one batch.

An error in one row's own work (routing, a hook) ends that row only; an error in a batched call ends the
rows of that call. A row stepped alone draws from its session's generator (reproducible for a seed); rows
sampled together share one random stream (see ``_generator``). Greedy rows are identical whatever the batch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, cast

import torch
from loguru import logger
from mimo_voice.streaming.model.fast import FastMiMoAudio, RowSampling, StepOutput
from mimo_voice.streaming.model.sampling import SamplingParams

from .generation import decode_audio_together

if TYPE_CHECKING:
    from .generation import Generation

BAN_MASK_SETS = 256  # combinations of the rows' bans kept (rows come and go; a long-running engine sees many)


class StepScheduler:
    def __init__(self, fast: FastMiMoAudio, vocab_size: int, empty_codes: torch.Tensor, empty_token: int) -> None:
        self.fast = fast
        self.vocab_size = vocab_size
        self.empty_codes = empty_codes  # [group, channels] on the device: the codes of a text position
        self.empty_token = empty_token
        self._ban_masks: dict[tuple[tuple[int, ...], ...], torch.Tensor] = {}
        self._row_samplings: dict[tuple, RowSampling] = {}

    def step(self, generations: Iterable[Generation]) -> None:
        began = time.perf_counter()
        rows = [g for g in generations if not g.done]
        for generation in rows:
            if generation.cancel_requested:
                generation.finish("cancelled")
        rows = [g for g in rows if not g.done and self._caught_up(g)]
        _batched(rows, "step", lambda: self._step(rows, began))

    def _step(self, rows: list[Generation], began: float) -> None:
        if not rows:
            return
        tokens = self._tokens(rows)
        fed = [(g, t) for g, t in zip(rows, tokens) if t is not None and _guarded(g, partial(g.accept, t))]
        audio = [g for g, t in fed if t == self.empty_token]
        codes = self._decode_patches(audio)
        # One copy to the host for every row (a sync on a GPU) and one NumPy conversion of it, not one per row: the
        # events carry a row's array, the record a tensor sharing its memory.
        codes_host = dict(zip(audio, codes.cpu().numpy())) if audio else {}
        for generation, token in fed:
            _guarded(generation, partial(generation.record, token, codes_host.get(generation)))
        batch = [(g, t) for g, t in fed if not g.done and self._one_behind(g)]
        self._backbone_step(batch, audio, codes)
        shared = time.perf_counter() - began
        decoding = self._decode_audio([g for g, _ in fed if not g.done and g.decoder is not None])
        for generation, token in fed:
            if not generation.done:
                kind = "audio" if token == self.empty_token else "text"
                generation.account(kind, shared + decoding.get(generation, 0.0))

    # --- phases ---

    def _caught_up(self, generation: Generation) -> bool:
        """Whether the row's cache holds its record; if not, it feeds one more chunk (its output is then the
        row's next logits) and steps once the cache is complete."""
        conv = generation.conv
        if conv.cached == len(conv.context):
            return True
        ready = _guarded(generation, conv.catch_up)
        if ready and conv.last_output is not None:
            generation.last = conv.last_output
        return False

    def _tokens(self, rows: list[Generation]) -> list[int | None]:
        """Each row's next token (None where its step failed): forced, else sampled in groups of equal
        parameters, with one host read of every sampled token."""
        tokens: list[int | None] = []
        sampled: dict[tuple, list[int]] = defaultdict(list)
        for index, generation in enumerate(rows):
            forced = cast("int | None", _guarded(generation, generation.forced_token))
            tokens.append(forced)
            if forced is None and not generation.done:
                sampled[_key(generation.conv.text_sampler.params)].append(index)
        draws, order = [], []
        for indices in sampled.values():
            group = [rows[i] for i in indices]
            logits = _joined([g.last.text_logits for g in group])
            banned = self._ban_rows(tuple(g.banned() for g in group))
            params = self._rows(group[0].conv.text_sampler.params, len(group))
            draws.append(self.fast.sample_text(logits, params, banned, self._generator(group)))
            order.extend(indices)
        if draws:
            for index, token in zip(order, _joined(draws).tolist()):
                tokens[index] = token
        return tokens

    def _decode_patches(self, rows: list[Generation]) -> torch.Tensor:
        """The patch decoder over the audio rows, in groups of equal sampling parameters:
        codes [len(rows), group, channels] on the device."""
        if not rows:
            return self.empty_codes[None]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, generation in enumerate(rows):
            groups[_key(generation.conv.audio_sampler.params)].append(index)
        if len(groups) == 1:
            return self._decode_group(rows)
        codes = self.empty_codes.expand(len(rows), *self.empty_codes.shape).clone()
        for indices in groups.values():
            codes[indices] = self._decode_group([rows[i] for i in indices])
        return codes

    def _decode_group(self, rows: list[Generation]) -> torch.Tensor:
        local_in = _joined([g.last.local_in for g in rows])
        params = self._rows(rows[0].conv.audio_sampler.params, len(rows))
        return self.fast.decode_patch(local_in, params, self._generator(rows))

    def _rows(self, params: SamplingParams, batch: int) -> RowSampling:
        """``params`` for ``batch`` rows as device tensors, built once per (parameters, batch size)."""
        key = (*_key(params), batch)
        rows = self._row_samplings.get(key)
        if rows is None:
            rows = self._row_samplings[key] = RowSampling.build(params, batch, self.fast.device)
        return rows

    def _generator(self, rows: list[Generation]) -> torch.Generator | None:
        """A lone row draws from its session's generator, as it always did; rows sampled together draw from the
        device's default one (one stream for the batch: a session's draws then depend on its batch), as do
        compiled steps, whose CUDA graphs replay only with the default generator."""
        return rows[0].conv.generator if len(rows) == 1 and not self.fast.compile else None

    def _backbone_step(self, batch: list[tuple[Generation, int]], audio: list[Generation], codes: torch.Tensor) -> None:
        """One backbone step of the rows in ``batch``; ``codes`` are the patch decoder's for the ``audio`` rows."""
        if not batch:
            return
        slots_of = {g: _slot(g) for g, _ in batch}
        batch = sorted(batch, key=lambda row: slots_of[row[0]])  # ascending slots: the pool is read as a view
        slots = [slots_of[g] for g, _ in batch]
        text_ids = [t for _, t in batch]  # ints: the step decides text vs audio from them without a read
        rows = [g for g, _ in batch]
        if rows == audio:  # every row is audio, in the decoder's order: its codes as they are
            step_codes = codes
        else:
            codes_of = dict(zip(audio, codes))
            step_codes = torch.stack([codes_of.get(g, self.empty_codes) for g in rows])
        out = self.fast.step(slots, text_ids, step_codes)
        outputs = [out] if len(rows) == 1 else map(StepOutput, out.text_logits.split(1), out.local_in.split(1))
        for generation, row in zip(rows, outputs):
            generation.last = generation.conv.last_output = row

    @staticmethod
    def _one_behind(generation: Generation) -> bool:
        """Whether the row's cache lacks exactly its new position; else (the context was compacted) the row
        rebuilds its cache in chunks over the next step phases."""
        return bool(_guarded(generation, generation.conv.ready_to_step)) and not generation.done

    def _ban_rows(self, banned: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        """The rows' banned text ids as one bool mask [rows, vocab], made once per combination (a few: the bans
        depend on the mode and the reply's phase), so that a step stacks nothing."""
        mask = self._ban_masks.get(banned)
        if mask is None:
            if len(self._ban_masks) >= BAN_MASK_SETS:
                self._ban_masks.clear()
            mask = torch.zeros(len(banned), self.vocab_size, dtype=torch.bool)
            for row, ids in enumerate(banned):
                mask[row, list(ids)] = True
            mask = self._ban_masks[banned] = mask.to(self.empty_codes.device)
        return mask

    def _decode_audio(self, rows: list[Generation]) -> dict[Generation, float]:
        """Each row's released patches to PCM; returns each row's share of the time. The rows with one new patch
        (the usual case) decode together; a row with several (the delay filter released them at once) alone."""
        seconds: dict[Generation, float] = {}
        together = [g for g in rows if g.undecoded_patches == 1]
        if len(together) > 1:
            began = time.perf_counter()
            _batched(together, "decode", lambda: decode_audio_together(together))
            seconds = dict.fromkeys(together, (time.perf_counter() - began) / len(together))
        for generation in rows:
            if generation not in seconds:
                began = time.perf_counter()
                _guarded(generation, generation.decode_audio)
                seconds[generation] = time.perf_counter() - began
        return seconds


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The rows' tensors as one batch; a lone row's as it is (``cat`` of one tensor is still an op: a copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _key(params: SamplingParams) -> tuple:
    return (params.do_sample, params.temperature, params.top_k, params.top_p)


def _slot(generation: Generation) -> int:
    slot = generation.conv.slot
    if slot is None:  # a closed conversation's rows were finished before the step
        raise RuntimeError("a closed conversation was stepped")
    return slot


def _guarded(generation: Generation, work: Callable[[], object]) -> object:
    """Runs one row's own work; an exception ends that row (with the error) and gives None."""
    try:
        return work()
    except Exception as exc:
        logger.exception("generation step failed")
        generation.finish("error", error=_described(exc))
        return None


def _batched(rows: list[Generation], what: str, work: Callable[[], object]) -> None:
    """Runs a call made for several rows; an exception ends every row still running (with the error), and the
    engine goes on."""
    try:
        work()
    except Exception as exc:
        logger.exception(f"batched {what} failed")
        for generation in rows:
            generation.finish("error", error=_described(exc))  # a no-op for a row already done


def _described(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
