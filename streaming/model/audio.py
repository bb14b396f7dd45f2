"""Audio helpers of the MiMo-Audio front end: int16 <-> float PCM, resampling to 24 kHz, the log-mel
features the audio tokenizer's encoder reads, and the check of audio-tokenizer codes.

The log-mel reproduces upstream's ``torchaudio.transforms.MelSpectrogram(sample_rate=24000, n_fft=960,
hop_length=240, n_mels=128, power=1.0, center=True)`` followed by ``log(clip(mel, 1e-7))``: periodic Hann window,
reflect padding, HTK mel scale, no filter normalisation, all in float32 in torchaudio's order of operations
(torchaudio itself is not a dependency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import soxr
import torch
from torch import Tensor

SAMPLE_RATE = 24_000  # the audio tokenizer's rate
SAMPLES_PER_FRAME = 960  # one 25 Hz codec frame
SAMPLES_PER_PATCH = 4 * SAMPLES_PER_FRAME  # one LLM audio position: 160 ms

N_FFT = 960
HOP_LENGTH = 240
N_MELS = 128
LOG_FLOOR = 1e-7


# -- PCM formats ------------------------------------------------------------------------------------------
def pcm16_to_float(pcm: np.ndarray | bytes) -> np.ndarray:
    """Little-endian int16 PCM (bytes or an int16 array) -> float32 in [-1, 1)."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        if len(pcm) % 2:
            raise ValueError(f"int16 PCM needs an even number of bytes, got {len(pcm)}")
        pcm = np.frombuffer(pcm, dtype="<i2")
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise TypeError(f"expected int16 PCM, got an array of {pcm.dtype}")
    return pcm.astype(np.float32) / 32768.0


def rms_dbfs(samples: np.ndarray) -> np.ndarray:
    """RMS level over the last axis in dBFS (int16 full scale, or floats in [-1, 1]); digital silence is -inf."""
    samples = np.asarray(samples)
    scale = 32768.0 if samples.dtype == np.int16 else 1.0
    scaled = samples.astype(np.float64) / scale
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(np.mean(scaled * scaled, axis=-1))


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float audio -> int16, clipped; the exact inverse of :func:`pcm16_to_float` on its outputs."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


# -- resampling -------------------------------------------------------------------------------------------
def _check_rates(from_rate: int, to_rate: int) -> None:
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")


def _mono_float32(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 1:
        raise ValueError(f"expected mono audio (a 1-D array), got shape {pcm.shape}")
    return pcm


def resample(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """One whole clip, float32 mono, with libsoxr's high-quality filter."""
    _check_rates(from_rate, to_rate)
    pcm = _mono_float32(pcm)
    if from_rate == to_rate:
        return pcm.copy()
    return soxr.resample(pcm, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


class Resampler:
    """Resampling of a live stream chunk by chunk: the filter state carries over, so chunk edges leave no clicks
    (resampling each 20 ms chunk on its own would). The output lags the input by the filter's delay."""

    def __init__(self, from_rate: int, to_rate: int = SAMPLE_RATE) -> None:
        _check_rates(from_rate, to_rate)
        self.from_rate, self.to_rate = from_rate, to_rate
        self._stream = None if from_rate == to_rate else soxr.ResampleStream(from_rate, to_rate, 1, "float32", "HQ")

    def __call__(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        pcm = _mono_float32(pcm)
        if self._stream is None:
            return pcm.copy()
        return self._stream.resample_chunk(pcm, last=last)


# -- log-mel ----------------------------------------------------------------------------------------------
def _hz_to_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(
    n_freqs: int = N_FFT // 2 + 1,
    n_mels: int = N_MELS,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> Tensor:
    """Triangular HTK-mel filters without normalisation, ``[n_freqs, n_mels]`` float32 (torchaudio's
    ``melscale_fbanks(..., norm=None, mel_scale="htk")``)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    bin_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    edges = _mel_to_hz(torch.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    widths = edges[1:] - edges[:-1]
    offsets = edges.unsqueeze(0) - bin_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def log_mel(
    wav: Tensor | np.ndarray,
    n_mels: int = N_MELS,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> Tensor:
    """24 kHz mono float audio ``[N]`` -> natural-log mel magnitudes ``[n_mels, N // hop + 1]`` (float32)."""
    wav = torch.as_tensor(wav)
    if wav.ndim != 1 or not wav.is_floating_point():
        raise ValueError(f"log_mel expects 1-D float audio, got {tuple(wav.shape)} {wav.dtype}")
    if wav.numel() <= n_fft // 2:
        raise ValueError(f"audio too short for the mel front end: {wav.numel()} samples, need > {n_fft // 2}")
    wav = wav.float()
    window = torch.hann_window(n_fft, device=wav.device)
    spec = torch.stft(
        wav,
        n_fft,
        hop_length=hop_length,
        win_length=n_fft,
        window=window,
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    ).abs()
    fbank = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max).to(wav.device)
    mel = torch.matmul(spec.transpose(-1, -2), fbank).transpose(-1, -2)
    return torch.log(torch.clamp(mel, min=LOG_FLOOR))


# -- codes ------------------------------------------------------------------------------------------------
def check_codes(codes: Tensor | np.ndarray, codebook_sizes: Sequence[int]) -> Tensor:
    """Audio-tokenizer codes ``[frames, len(codebook_sizes)]`` as int64, or a ValueError saying what is wrong."""
    codes = torch.as_tensor(codes)
    books = len(codebook_sizes)
    if codes.ndim != 2 or codes.shape[1] != books or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor [frames, {books}], got {tuple(codes.shape)} {codes.dtype}")
    codes = codes.to(torch.long)
    if codes.numel():
        sizes = torch.tensor(list(codebook_sizes), device=codes.device)
        bad = (codes < 0) | (codes >= sizes)
        if bool(bad.any()):
            frame, book = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"code {int(codes[frame, book])} at frame {frame} is out of range for codebook {book} "
                f"(size {int(sizes[book])}: codes must be >= 0 and below it)"
            )
    return codes
