"""A session's state in the engine's worker process: the context record, its KV cache, the open user turn
and the response being generated (see :mod:`.worker`; :class:`~.session.Session` is the asyncio side).

Latency is won by doing the work while the user talks. Their audio is resampled to 24 kHz, encoded
by the incremental encoder and every finished 160 ms patch is prefilled into the KV cache at once,
so ``respond()`` only has the last patch or two, ``<|eosp|><|im_end|>\\n`` and the assistant prefix left
to feed before the first token; and once the user has paused (``streaming.prepare_reply_after_secs`` of silence,
well before the VAD ends the turn), those are fed too, so that ``respond()`` only has the first step left. Speech
after that undoes it (:class:`PreparedReply`). Nothing already in the cache is fed again: earlier turns stay there,
an assistant turn is closed by appending its closing tokens, text is injected by appending a turn.
The exceptions, each rebuilding only what follows the point it changes, are barge-in roll-back,
text injected while the user is talking (it goes before their open turn), and context management
(see :mod:`.context`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from loguru import logger
from mimo_voice.streaming.model.audio import Resampler, rms_dbfs
from mimo_voice.streaming.model.fast import StepOutput
from mimo_voice.streaming.model.prompts import Positions, frames_to_patches, task_format
from mimo_voice.streaming.model.sampling import Sampler, SamplingParams

from .codec_stream import IncrementalEncoder, StreamingDecoder
from .context import Context, Segment
from .events import SAMPLE_RATE, Event, Turn, TurnEnd
from .generation import Generation

if TYPE_CHECKING:
    from .worker import Worker

PREFILL_CHUNK = 512  # positions per forward when (re)building the cache: bounds activation memory
HELD_MAX_SECS = 10.0  # silence kept while a prepared reply stands (see PreparedReply.hold)


class UserTurn:
    """The user's turn while they talk: streaming resampler -> incremental encoder -> whole patches."""

    def __init__(self, conversation: Conversation, segment: Segment) -> None:
        streaming = conversation.config.streaming
        self.segment = segment
        self.encoder = IncrementalEncoder(
            conversation.codec, streaming.encode_chunk_secs, streaming.encode_overlap_secs
        )
        self.group_size = conversation.model.config.group_size
        self.samples_per_frame = conversation.codec.samples_per_frame
        self.resampler: Resampler | None = None
        self.frames = torch.zeros(0, conversation.model.config.audio_channels, dtype=torch.long)
        self.samples = 0  # at 24 kHz
        self.pending: list[Positions] = []  # positions not yet in the context (a response was being generated)
        self.silent_secs = 0.0  # how long the audio fed last has been silent
        self.preparable = True  # False once preparing its reply failed: not tried again at every piece of silence

    def push(self, pcm: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Audio in -> the patches it completed ``[P, group, channels]``."""
        wav = self._resample(pcm, sample_rate)
        return self._patches(self.encoder.push(wav), final=False)

    def flush_resampler(self) -> torch.Tensor:
        """The resampler's delayed last samples in -> the patches they completed; audio after this point goes
        through a new resampler (its filter restarts: at a pause, in silence, where that cannot be heard)."""
        if self.resampler is None:
            return frames_to_patches(self.frames[:0], self.group_size)
        tail, self.resampler = self.resampler(np.zeros(0, np.float32), last=True), None
        self.samples += len(tail)
        return self._patches(self.encoder.push(tail), final=False)

    def tail_patches(self) -> torch.Tensor:
        """The patches :meth:`finish` would give now (after :meth:`flush_resampler`), leaving the turn open."""
        return frames_to_patches(torch.cat([self.frames, self.encoder.tail().cpu().long()]), self.group_size)

    def push_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Frames encoded elsewhere -> the patches they completed."""
        self.samples += len(codes) * self.samples_per_frame
        return self._patches(codes, final=False)

    def finish(self) -> torch.Tensor:
        """The rest of the utterance; like upstream, the last frame is repeated to fill the last patch."""
        tail = self.resampler(np.zeros(0, np.float32), last=True) if self.resampler is not None else np.zeros(0)
        self.samples += len(tail)
        codes = [self.encoder.push(tail)] if len(tail) else []
        codes.append(self.encoder.finish())
        return self._patches(torch.cat([c.cpu() for c in codes]), final=True)

    def _resample(self, pcm: np.ndarray, sample_rate: int) -> np.ndarray:
        if self.resampler is None or self.resampler.from_rate != sample_rate:
            self.resampler = Resampler(sample_rate, SAMPLE_RATE)
        wav = self.resampler(pcm)
        self.samples += len(wav)
        return wav

    def _patches(self, codes: torch.Tensor, final: bool) -> torch.Tensor:
        frames = torch.cat([self.frames, codes.cpu().long()])
        whole = len(frames) if final else len(frames) // self.group_size * self.group_size
        self.frames = frames[whole:]
        return frames_to_patches(frames[:whole], self.group_size)


@dataclass
class PreparedReply:
    """A reply's start made during a pause in the user's speech: the rest of their audio, their closing tokens and
    the assistant prefix are in the cache, and ``first`` is the output at its last position. The audio that comes
    while it stands is held back: silence, dropped when the reply starts; speech, which undoes the preparation."""

    mode: str
    before: int  # the record's length before the prepared positions: where an undo cuts
    segment: Segment  # the assistant's, holding the prefix
    prefix_length: int
    first: StepOutput | None
    samples: int  # the user's audio it covers, at 24 kHz
    held: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (pcm, rate) fed since
    held_secs: float = 0.0

    def hold(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Keeps a piece of silence, up to HELD_MAX_SECS (a turn left open in silence must not grow without bound;
        past that, silence is dropped: an undo then feeds a shorter pause)."""
        if self.held_secs < HELD_MAX_SECS - 1e-6:  # 0.02 s pieces: sums are inexact
            self.held.append((pcm, sample_rate))
            self.held_secs += len(pcm) / sample_rate


class Conversation:
    """One session's state. Its public methods are the jobs a :class:`~.session.Session` sends (as
    :mod:`.protocol` requests); the worker runs them one at a time, between steps."""

    def __init__(self, worker: Worker, session_id: int, *, task: str, system_prompt: str | None) -> None:
        self.worker = worker
        self.session_id = session_id
        self.config = worker.config
        self.model, self.codec, self.builder = worker.model, worker.codec, worker.builder
        self.tokenizer, self.special = worker.tokenizer, worker.special
        self.task = task
        self.format = task_format(task)
        sampling = self.config.sampling_for(self.format.sampling)
        self.text_sampler = Sampler(SamplingParams(**sampling.text.model_dump()))
        self.audio_sampler = Sampler(SamplingParams(**sampling.audio.model_dump()))
        self.generator = torch.Generator(device=self.model.device).manual_seed(self.config.model.seed)
        special = self.special
        self.structure_ids = {
            special.empty,
            special.eot,
            special.sosp,
            special.eosp,
            special.eostm,
            special.im_start,
            special.im_end,
            special.endoftext,
        }
        self.context = Context(special.empty, self.builder.empty_row, self.model.config.group_size)
        self.fast, self.pool = worker.fast, worker.pool
        try:
            self.slot: int | None = self.pool.allocate()  # this conversation's KV cache in the worker's pool
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: close a session or raise engine.kv_slots") from None
        self.last_output: StepOutput | None = None
        self.system_prompt = system_prompt or None  # goes into the first user turn
        self.user: UserTurn | None = None
        self.deferred: list[tuple[Positions, Segment]] = []  # text injected while a response was generated
        self.generation: Generation | None = None
        self.last_response: Generation | None = None
        self.closure: Segment | None = None  # the closing tokens of last_response
        self.history: list[Turn] = []
        self.text_hook: Callable[[list[int]], int | None] | None = None  # testing engines only
        self.error: str | None = None
        self.compactions = 0
        self.prepared: PreparedReply | None = None
        if worker.voice_patches is not None:
            self.context.append(self.builder.voice_prompt(worker.voice_patches), Segment("voice", pinned=True))

    # --- the KV cache ---

    @property
    def cached(self) -> int:
        """Positions of the record the KV cache holds (always its first ones)."""
        return self.pool.length(self.slot)

    def sync(self) -> StepOutput | None:
        """Feeds the positions of the record the cache does not hold yet; returns the last position's output."""
        while not self.catch_up():
            pass
        return self.last_output

    def catch_up(self) -> bool:
        """Feeds at most one chunk of the positions the cache lacks (after context management, when needed);
        True once it holds them all. A response being generated catches up one chunk per step phase, so
        rebuilding a long context never stalls the other sessions' responses."""
        dropped = self._manage_context()
        begin = self.cached
        if begin < len(self.context):
            end = min(begin + PREFILL_CHUNK, len(self.context))
            began = time.perf_counter()
            positions = self.context.positions(begin, end)  # on the CPU: ids are checked there, without a sync
            self.last_output = self.fast.prefill(self.slot, positions.text_ids, positions.codes)
            if dropped:
                logger.info(
                    f"context management: dropped {dropped} old audio positions; rebuilding the cache from the "
                    f"{len(self.context)} kept, {PREFILL_CHUNK} a step ({time.perf_counter() - began:.3f} s each)"
                )
        return self.cached == len(self.context)

    def ready_to_step(self) -> bool:
        """After a generated position was added to the record: whether the cache lacks exactly that position
        (False when context management just compacted the record: the cache is then rebuilt by ``catch_up``)."""
        return not self._manage_context() and self.cached == len(self.context) - 1

    def _truncate(self, length: int):
        tail = self.context.truncate(length)
        if self.cached > length:
            self.pool.truncate(self.slot, length)
        return tail

    def _manage_context(self) -> int:
        """Near the window's end, drops old audio down to half the window; the cache is then rebuilt (by
        :meth:`catch_up`) from what is kept. Returns how many positions were dropped."""
        streaming = self.config.streaming
        if len(self.context) <= streaming.max_context_positions - streaming.context_headroom_positions:
            return 0
        dropped = self.context.compact(
            target=streaming.max_context_positions // 2, protected=streaming.max_context_positions // 4
        )
        if dropped:  # else everything left is pinned or recent: nothing to gain from a rebuild
            self.pool.truncate(self.slot, 0)
            self.compactions += 1
        return dropped

    # --- the user's turn ---

    def feed_audio(self, pcm: np.ndarray, sample_rate: int, mode: str = "non_thinking") -> None:
        """``mode``: the session's, which a reply prepared in a pause of the user's speech takes."""
        after = self.config.streaming.prepare_reply_after_secs
        silent = after > 0 and _is_silent(pcm, self.config.streaming.silence_dbfs)  # measured only when it is used
        if self.prepared is not None:
            if silent:
                self.prepared.hold(pcm, sample_rate)
                return
            self._unprepare()
        self._feed_pcm(pcm, sample_rate, silent)
        user = self.user
        # (silent_secs sums 0.02 s pieces: ten of them may give 0.1999...)
        if user is not None and user.preparable and after > 0 and user.silent_secs > after - 1e-6:
            self._prepare(mode)

    def _feed_pcm(self, pcm: np.ndarray, sample_rate: int, silent: bool) -> None:
        self._feed(lambda user: user.push(pcm, sample_rate))
        if self.user is not None:
            self.user.silent_secs = self.user.silent_secs + len(pcm) / sample_rate if silent else 0.0

    def feed_codes(self, codes: torch.Tensor) -> None:
        self._unprepare()
        self._feed(lambda user: user.push_codes(codes))

    def _feed(self, patches_of: Callable[[UserTurn], torch.Tensor]) -> None:
        try:
            user = self.user or self._open_user_turn()
            patches = patches_of(user)
            if len(patches):
                user.pending.append(self.builder.audio(patches))
            self._flush_user()
        except Exception as exc:  # reported by the next respond(); the turn is dropped, the session stays usable
            logger.exception("user audio could not be processed")
            self.error = f"user audio could not be processed: {exc}"
            self.discard_user_audio()

    def _open_user_turn(self) -> UserTurn:
        segment = Segment("user", pinned=self.system_prompt is not None)
        self.user = UserTurn(self, segment)
        self.user.pending.append(self.builder.user_open(self.system_prompt) + self.builder.tokens([self.special.sosp]))
        return self.user

    def _flush_user(self, feed: bool = True) -> None:
        """Moves the open user turn's positions into the context and (with ``feed``) the cache, unless a response
        is being generated."""
        if self.generation is not None or self.user is None or not self.user.pending:
            return
        for positions in self.user.pending:
            self.context.append(positions, self.user.segment)
        self.user.pending.clear()
        if feed:
            self.sync()

    def _close_user_turn(self, stages: dict[str, float]) -> None:
        """Encodes the rest of the user's audio and puts it in the record; the caller feeds it with what follows
        (the assistant prefix), in one forward."""
        user = self.user
        began = time.perf_counter()
        patches = user.finish()
        stages["last_encode_ms"] = 1000 * (time.perf_counter() - began)
        user.pending.append(self._user_end(patches))
        self._flush_user(feed=False)
        self._user_closed(user.samples)

    def _user_closed(self, samples: int) -> None:
        self.user = None
        self.system_prompt = None
        self._record(Turn("user", "", audio_seconds=samples / SAMPLE_RATE))

    def _user_in_context(self) -> bool:
        """Whether the open user turn is in the record (it is then its tail) rather than waiting in ``pending``."""
        entries = self.context.entries
        return self.user is not None and bool(entries) and entries[-1].segment is self.user.segment

    def discard_user_audio(self) -> None:
        if self.prepared is not None:  # the held audio goes with the rest
            self._truncate(self.prepared.before)
            self.prepared = None
        if self._user_in_context():
            self._truncate(self.context.start_of(self.user.segment))
        self.user = None

    # --- a reply prepared in a pause ---

    def _prepare(self, mode: str) -> None:
        """Feeds what ``respond(mode)`` would feed, now that the user has paused: the reply then starts without
        it, if they have finished. Skipped while a response runs or the record nears context management (which
        would move the positions an undo cuts at)."""
        streaming = self.config.streaming
        room = streaming.max_context_positions - streaming.context_headroom_positions - len(self.context)
        if self.generation is not None or self.error is not None or not self._user_in_context() or room < 256:
            return
        user = self.user
        assert user is not None
        start = len(self.context)
        try:
            patches = user.flush_resampler()
            if len(patches):
                self.context.append(self.builder.audio(patches), user.segment)
            before = len(self.context)
            self.context.append(self._user_end(user.tail_patches()), user.segment)
            segment = Segment("assistant")
            prefix = self.builder.assistant_prefix(self.format.output, thinking=mode == "thinking")
            self.context.append(prefix, segment)
            first = self.sync()
        except Exception:  # the turn goes on unprepared: respond() then feeds its end as usual
            logger.exception("preparing the reply in the user's pause failed")
            self._truncate(start)
            user.preparable = False
            return
        self.prepared = PreparedReply(mode, before, segment, len(prefix), first, user.samples)

    def _unprepare(self) -> None:
        """Undoes a prepared reply: its positions leave the record and the cache, and the audio held back since is
        fed as usual."""
        prepared, self.prepared = self.prepared, None
        if prepared is None:
            return
        self._truncate(prepared.before)
        for pcm, rate in prepared.held:
            self._feed_pcm(pcm, rate, silent=True)

    def _user_end(self, patches: torch.Tensor) -> Positions:
        """The user's last patches and the tokens that close their turn."""
        return self.builder.audio(patches) + self.builder.tokens([self.special.eosp]) + self.builder.user_close()

    # --- text turns ---

    def add_text(self, role: str, text: str) -> None:
        self._unprepare()
        builder = self.builder
        if role == "user":
            positions = builder.user_text_turn(text, self.system_prompt, self.task)
            segment = Segment("user", pinned=self.system_prompt is not None)
            self.system_prompt = None
        else:
            positions = builder.tool_turn(text) if role == "tool" else builder.system_turn(text)
            segment = Segment(role)
        self._record(Turn(role, text))
        if self.generation is not None:
            self.deferred.append((positions, segment))
            return
        self._insert(positions, segment)

    def _insert(self, positions: Positions, segment: Segment) -> None:
        """Appends a turn; if the user is talking, it goes before their open turn."""
        tail = self._truncate(self.context.start_of(self.user.segment)) if self._user_in_context() else []
        self.context.append(positions, segment)
        self.context.entries.extend(tail)
        self.sync()

    # --- the assistant's turn ---

    def respond(self, mode: str, started: float, response_id: int) -> None:
        def sink(event: Event) -> None:
            self.worker.emit(self.session_id, response_id, event)

        try:
            self._respond(mode, started, sink)
        except Exception as exc:  # the stream still ends, with the reason
            logger.exception("respond() failed")
            sink(TurnEnd("error", error=f"{type(exc).__name__}: {exc}", time=time.perf_counter()))

    def _respond(self, mode: str, started: float, sink: Callable[[Event], None]) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            sink(TurnEnd("error", error=error, time=time.perf_counter()))
            return
        if self.prepared is not None and self.prepared.mode != mode:
            self._unprepare()
        stages = {"last_encode_ms": 0.0, "last_prefill_ms": 0.0, "prepared_in_pause": float(self.prepared is not None)}
        if self.prepared is not None:  # the user paused long enough: the reply's start is ready
            prepared, self.prepared = self.prepared, None
            self._user_closed(prepared.samples)
            segment, prefix_length, first = prepared.segment, prepared.prefix_length, prepared.first
        else:
            if self.user is not None:
                self._close_user_turn(stages)
            segment = Segment("assistant")
            prefix = self.builder.assistant_prefix(self.format.output, thinking=mode == "thinking")
            self.context.append(prefix, segment)
            began = time.perf_counter()
            first = self.sync()  # the user's last patches, their closing tokens and the prefix: one forward
            stages["last_prefill_ms"] = 1000 * (time.perf_counter() - began)
            prefix_length = len(prefix)
        generation = Generation(
            self,
            segment,
            prefix_length,
            output=self.format.output,
            thinking=mode == "thinking",
            started=started,
            sink=sink,
            first=first,
        )
        generation.timings.update(stages)
        self.generation = self.last_response = generation
        self.closure = None
        self.worker.activate(generation)

    def new_decoder(self) -> StreamingDecoder:
        streaming = self.config.streaming
        return StreamingDecoder(self.codec, streaming.decode_left_context_frames, streaming.decode_lookahead_frames)

    def end_generation(self, generation: Generation) -> None:
        """Closes the assistant turn in the record (fed lazily, with what comes next) and lets waiting input in."""
        self.closure = Segment("closure")
        self.context.append(self.builder.assistant_close(generation.stream_open), self.closure)
        self._record(Turn("assistant", generation.spoken_text(), interrupted=generation.reason == "cancelled"))
        self.generation = None
        for positions, segment in self.deferred:
            self.context.append(positions, segment)
        self.deferred.clear()
        self._flush_user()

    def cancel(self, played_samples: int | None) -> None:
        self._unprepare()
        generation = self.generation
        if generation is not None:
            generation.finish("cancelled")
        if played_samples is not None and self.last_response is not None:
            self._roll_back(self.last_response, max(int(played_samples), 0), was_running=generation is not None)

    def _roll_back(self, response: Generation, played_samples: int, was_running: bool) -> None:
        """Cuts the response after the last patch the user heard; what followed it (their barge-in audio, an
        injected turn) is kept and fed again after the new closing tokens."""
        patches, heard = response.heard(played_samples)
        if response.output == "text" or (patches == response.released_patches and not was_running):
            return  # nothing unheard to drop: text goes out whole, or playback had finished
        audio = self.context.audio_indices(response.segment)
        patches = min(patches, len(audio))  # fewer if context management dropped some (a very long reply)
        start = self.context.start_of(response.segment)
        cut = audio[patches - 1] + 1 if patches else start + response.prefix_length
        stream_open = self.special.sostm in (entry.text_id for entry in self.context.entries[start:cut])
        later = [
            entry
            for entry in self._truncate(cut)
            if entry.segment is not response.segment and entry.segment is not self.closure
        ]
        self.closure = Segment("closure")
        self.context.append(self.builder.assistant_close(stream_open) + self.builder.interrupted_note(), self.closure)
        self.context.entries.extend(later)
        turn = next(turn for turn in reversed(self.history) if turn.role == "assistant")
        turn.text, turn.interrupted = heard, True
        self.worker.send_history(self)
        self.last_response = None
        if later:
            self.sync()

    def close(self) -> None:
        if self.generation is not None:
            self.generation.finish("cancelled")
        # A response refers back to its conversation: drop it, so that the call's state goes now rather than
        # at a full garbage collection, which a process with a heap this large runs rarely.
        self.generation = self.last_response = None
        self.user = self.prepared = None
        if self.slot is not None:
            self.pool.free(self.slot)
            self.slot = None

    def _record(self, turn: Turn) -> None:
        self.history.append(turn)
        self.worker.send_history(self)


def _is_silent(pcm: np.ndarray, threshold_dbfs: float) -> bool:
    """Whether a piece of audio (float in [-1, 1], or int16) stays under ``threshold_dbfs`` (RMS)."""
    return not len(pcm) or bool(rms_dbfs(pcm) <= threshold_dbfs)
