"""Streaming use of the audio tokenizer: decode generated codes patch by patch, encode user audio while they talk.

Decoding (:class:`StreamingDecoder`). The decoder is not frame-synchronous: its two GroupNorms normalise over the
whole decoded chunk, its 32-layer transformer is causal but unbounded, and the vocoder looks 10 frames (100 Hz)
ahead per layer, 40 codec frames (1.6 s) over its 16 layers. So each push re-decodes a window
``[left context | frames not yet played | look-ahead]`` and plays only the middle part, as upstream's
``streaming_decode`` does (there with 250 frames of context and 40 of look-ahead). Look-ahead frames are decoded
but held back until later codes arrive, so they cost latency (40 ms each) and buy accuracy; left context costs
compute only. A response decoded with a look-ahead that reaches its end is exactly the offline decode of it
(:meth:`MiMoAudioTokenizer.decode`, one chunk up to 1500 frames); shorter look-aheads differ, by the amounts that
``mimo-voice bench codec`` measures. Only the summed code vectors are cached between pushes (plus the RoPE
tables and masks, per window length): the GroupNorm statistics of every window differ, so nothing downstream of
them can be reused. The config defaults (24 frames of context, 8 of look-ahead: windows of at most 36 frames)
keep a push at a fixed, small cost however long the response; a look-ahead of 0 is a poor choice, since the
last samples of a window lack the ISTFT overlap and the vocoder's right context (errors concentrate at chunk
edges), while the look-ahead beyond that trades latency (40 ms per frame) for accuracy.

Encoding (:class:`IncrementalEncoder`). The encoder is bidirectional over up to 60 s, so codes depend on audio on
both sides. Audio is encoded in windows ``[overlap | chunk | overlap]`` aligned to code frames; the chunk's codes
become final once the right overlap has arrived. Codes near chunk edges can differ from a whole-utterance encode;
``mimo-voice bench codec`` reports how many.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from mimo_voice.streaming.model.modeling_audio_tokenizer import MiMoAudioTokenizer
from torch import Tensor

from .events import SAMPLE_RATE, SAMPLES_PER_FRAME

FRAME_RATE = SAMPLE_RATE // SAMPLES_PER_FRAME  # 25 code frames per second


def _empty_pcm() -> Tensor:
    return torch.zeros(0)


class StreamingDecoder:
    """Codes in (usually one 4-frame patch per push), 24 kHz float32 PCM out (on the CPU), in order and without
    gaps: over a response, the concatenated outputs have exactly ``960 x frames`` samples.

    ``left_context_frames``: already-played frames re-decoded before the new ones, for continuity.
    ``lookahead_frames``: frames decoded but held back until that many later frames have arrived.
    After :meth:`flush`, the next :meth:`push` starts a new response (``emitted_samples`` restarts at 0).
    """

    def __init__(self, tokenizer: MiMoAudioTokenizer, left_context_frames: int, lookahead_frames: int) -> None:
        if left_context_frames < 0 or lookahead_frames < 0:
            raise ValueError(
                f"left context and look-ahead must be >= 0 frames, got {left_context_frames}, {lookahead_frames}"
            )
        self.tokenizer = tokenizer
        self.left_context_frames = left_context_frames
        self.lookahead_frames = lookahead_frames
        self.reset()

    def reset(self) -> None:
        """Forget the current response (e.g. after barge-in)."""
        self._hidden = torch.zeros(0, self.tokenizer.config.d_model, device=self.tokenizer.device)
        self._first_cached = 0  # response frame index of self._hidden[0]
        self._frames = 0  # frames pushed
        self._played = 0  # frames whose audio was returned
        self._flushed = False
        self._held: Tensor | None = None  # the last window's audio after the frames it returned
        self._held_from = 0  # the response frame index where _held starts
        self._start = self._until = 0  # the window being decoded: its first frame, and the end of what it plays
        self.emitted_samples = 0

    @torch.inference_mode()
    def push(self, codes: Tensor | np.ndarray) -> Tensor:
        window = self.prepare(codes)
        return _empty_pcm() if window is None else self.take(self.tokenizer.decode_hidden(window))

    def prepare(self, codes: Tensor | np.ndarray) -> Tensor | None:
        """The first half of :meth:`push`: adds the codes; returns the window of summed code vectors to decode
        (None when no new frame is ready), whose audio :meth:`take` then receives."""
        codes = self.tokenizer.check_codes(codes)
        with torch.inference_mode():
            return self.prepare_vectors(self.tokenizer.quantizer.decode(codes))

    def prepare_vectors(self, vectors: Tensor) -> Tensor | None:
        """:meth:`prepare` of codes already summed to their code vectors ``[frames, d_model]``."""
        if self._flushed:
            self.reset()
        self._hidden = torch.cat([self._hidden, vectors])
        self._frames += vectors.shape[0]
        ready = self._frames - self.lookahead_frames
        return self._window(ready) if ready > self._played else None

    @torch.inference_mode()
    def flush(self) -> Tensor:
        """The audio of every frame not yet returned: the held-back look-ahead frames as the last window decoded
        them (as upstream's last chunk: the usual left context, the window ending at the last frame), so the
        tail costs no decode, and is not re-decoded in a shorter window with less left context."""
        if self._frames == self._played:
            pcm = _empty_pcm()
        elif self._held is not None and self._held_from == self._played:
            pcm, self._played = self._held, self._frames
            self.emitted_samples += pcm.numel()
        else:  # no window reached the last frame yet: decode that window now
            pcm = self.take(self.tokenizer.decode_hidden(self._window(self._frames)))
        self._held = None
        self._flushed = True
        return pcm

    def _window(self, until: int) -> Tensor:
        """The window around frames ``[played, until)``: left context, those frames, and what follows them."""
        self._start, self._until = max(self._first_cached, self._played - self.left_context_frames), until
        return self._hidden[self._start - self._first_cached :]

    def take(self, wav: Tensor) -> Tensor:
        """The decoded window's audio -> the audio of its frames ``[played, until)``; the audio of the frames
        after ``until`` (the look-ahead) is kept for :meth:`flush`."""
        start, until, spf = self._start, self._until, self.tokenizer.samples_per_frame
        pcm = wav[(self._played - start) * spf : (until - start) * spf].cpu()
        self._held, self._held_from = wav[(until - start) * spf :].cpu(), until
        self._played = until
        self.emitted_samples += pcm.numel()
        drop = self._played - self.left_context_frames - self._first_cached
        if drop > 0:  # frames that no later window will include
            self._hidden = self._hidden[drop:]
            self._first_cached += drop
        return pcm


@torch.inference_mode()
def push_together(pushes: Sequence[tuple[StreamingDecoder, Tensor | np.ndarray]]) -> list[Tensor]:
    """Each decoder's :meth:`~StreamingDecoder.push`, with the windows of one tokenizer and one length decoded as
    one batch: the same audio (the decoder normalises each window on its own), in fewer, larger ops. Past the
    first second of a reply every window has the same length, so the sessions stepped together decode together."""
    windows = _prepare_together(pushes)
    batches: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, window in enumerate(windows):
        if window is not None:
            batches[(id(pushes[index][0].tokenizer), window.shape[0])].append(index)
    out = [_empty_pcm() for _ in pushes]
    for indices in batches.values():
        tokenizer = pushes[indices[0]][0].tokenizer
        wavs = tokenizer.decoder(torch.stack([cast(Tensor, windows[i]) for i in indices]))
        for index, wav in zip(indices, wavs):
            out[index] = pushes[index][0].take(wav)
    return out


def _prepare_together(pushes: Sequence[tuple[StreamingDecoder, Tensor | np.ndarray]]) -> list[Tensor | None]:
    """Each decoder's :meth:`~StreamingDecoder.prepare`, the code vectors of one tokenizer's pushes summed in one
    call (a patch's 4 frames alone cost as many ops as all of them)."""
    checked = [decoder.tokenizer.check_codes(codes) for decoder, codes in pushes]
    tokenizer = pushes[0][0].tokenizer if pushes else None
    if (
        tokenizer is None
        or any(d.tokenizer is not tokenizer for d, _ in pushes)
        or len({c.shape[1] for c in checked}) > 1
    ):
        return [d.prepare_vectors(d.tokenizer.quantizer.decode(codes)) for (d, _), codes in zip(pushes, checked)]
    vectors = tokenizer.quantizer.decode(torch.cat(checked)).split([c.shape[0] for c in checked])
    return [decoder.prepare_vectors(v) for (decoder, _), v in zip(pushes, vectors)]


class IncrementalEncoder:
    """24 kHz float audio in (any chunk size), final codes ``[n, n_q]`` out as soon as they are final.

    Audio is encoded in windows of ``chunk_secs`` plus ``overlap_secs`` on each side (both rounded to whole
    40 ms frames); a chunk's codes are final when its right overlap has arrived. :meth:`finish` encodes the rest
    at the end of the utterance, after which the encoder is ready for the next one. Over an utterance, the codes
    returned have the same count as ``tokenizer.encode`` of the whole utterance.
    """

    def __init__(self, tokenizer: MiMoAudioTokenizer, chunk_secs: float, overlap_secs: float, n_q: int = 8) -> None:
        if chunk_secs <= 0 or overlap_secs < 0:
            raise ValueError(f"need chunk_secs > 0 and overlap_secs >= 0, got {chunk_secs}, {overlap_secs}")
        self.tokenizer = tokenizer
        self.chunk_frames = max(1, round(chunk_secs * FRAME_RATE))
        self.overlap_frames = round(overlap_secs * FRAME_RATE)
        self.n_q = n_q
        self._reset()

    def _reset(self) -> None:
        self._pieces: list[np.ndarray] = []
        self._first_sample = 0  # utterance sample index of the first buffered sample
        self._samples = 0  # samples pushed
        self._final = 0  # frames returned

    def push(self, wav24k: Tensor | np.ndarray) -> Tensor:
        wav = torch.as_tensor(wav24k).detach().cpu().numpy() if isinstance(wav24k, Tensor) else np.asarray(wav24k)
        if wav.ndim != 1 or not np.issubdtype(wav.dtype, np.floating):
            raise ValueError(f"expected mono float audio at 24 kHz (a 1-D float array), got {wav.shape} {wav.dtype}")
        self._pieces.append(wav.astype(np.float32, copy=False))
        self._samples += wav.size
        spf = self.tokenizer.samples_per_frame
        out = []
        while self._samples >= (self._final + self.chunk_frames + self.overlap_frames) * spf:
            start = max(0, self._final - self.overlap_frames)
            end = (self._final + self.chunk_frames + self.overlap_frames) * spf
            out.append(self._encode(start, end)[self._final - start : self._final - start + self.chunk_frames])
            self._final += self.chunk_frames
            self._drop_audio_before(max(0, self._final - max(self.overlap_frames, 1)))
        return torch.cat(out) if out else self._no_codes()

    def finish(self) -> Tensor:
        """Codes of the rest of the utterance (none if the whole utterance is under 20 ms); the encoder is then
        ready for the next utterance."""
        codes = self.tail()
        self._reset()
        return codes

    def tail(self) -> Tensor:
        """What :meth:`finish` would return now, leaving the utterance open (more audio may still come)."""
        spf = self.tokenizer.samples_per_frame
        start = max(0, self._final - self.overlap_frames)
        if start and self._samples - start * spf <= self.tokenizer.config.nfft // 2:
            start -= 1  # the mel front end needs more than half a window of audio
        if self._samples - start * spf <= self.tokenizer.config.nfft // 2:
            return self._no_codes()
        return self._encode(start, self._samples)[self._final - start :]

    def _audio(self) -> np.ndarray:
        """The buffered audio as one array (pieces are joined once, when a window needs them)."""
        if len(self._pieces) > 1:
            self._pieces = [np.concatenate(self._pieces)]
        return self._pieces[0]

    def _encode(self, start_frame: int, end_sample: int) -> Tensor:
        first = start_frame * self.tokenizer.samples_per_frame - self._first_sample
        window = torch.from_numpy(self._audio()[first : end_sample - self._first_sample])
        return self.tokenizer.encode(window, n_q=self.n_q)

    def _drop_audio_before(self, frame: int) -> None:
        cut = frame * self.tokenizer.samples_per_frame - self._first_sample
        if cut > 0:
            self._pieces = [self._audio()[cut:]]
            self._first_sample += cut

    def _no_codes(self) -> Tensor:
        return torch.zeros(0, self.n_q, dtype=torch.long, device=self.tokenizer.device)
