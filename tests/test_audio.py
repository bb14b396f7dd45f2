"""Audio helpers: PCM conversions, resampling to 24 kHz and the log-mel front end."""

import numpy as np
import pytest
import torch
from mimo_voice.streaming.model.audio import (
    Resampler,
    float_to_pcm16,
    log_mel,
    mel_filterbank,
    pcm16_to_float,
    resample,
)
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_pcm16_round_trip_bytes_and_arrays():
    pcm = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    as_float = pcm16_to_float(pcm.tobytes())
    assert as_float.dtype == np.float32 and as_float[0] == -1.0 and as_float[2] == 0.0
    assert np.array_equal(float_to_pcm16(as_float), pcm)
    assert np.array_equal(float_to_pcm16(np.array([2.0, -2.0])), [32767, -32768])  # clipped


def test_pcm16_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(TypeError, match="int16"):
        pcm16_to_float(np.zeros(4, dtype=np.float32))


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_resample_keeps_a_tone_and_the_duration(rate):
    out = resample(_tone(440.0, rate, 1.0), rate, 24000)
    assert out.dtype == np.float32 and abs(out.size - 24000) <= 1
    spectrum = np.abs(np.fft.rfft(out[2400:-2400]))
    peak_hz = np.argmax(spectrum) * 24000 / (out.size - 4800)
    assert abs(peak_hz - 440.0) < 3.0


def test_resample_rejects_bad_rates_and_stereo():
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(10, np.float32), 0, 24000)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 10), np.float32), 16000, 24000)


def test_stream_resampler_matches_one_shot_resampling():
    tone = _tone(300.0, 16000, 1.0)
    stream = Resampler(16000)
    chunks = [stream(tone[i : i + 320]) for i in range(0, tone.size, 320)] + [
        stream(np.zeros(0, np.float32), last=True)
    ]
    streamed = np.concatenate(chunks)
    whole = resample(tone, 16000, 24000)
    assert abs(streamed.size - whole.size) <= 1
    n = min(streamed.size, whole.size)
    assert np.max(np.abs(streamed[:n] - whole[:n])) < 1e-3


def test_mel_filterbank_matches_an_independent_htk_implementation():
    reference = mel_filter_bank(481, 128, 0.0, 12000.0, 24000, norm=None, mel_scale="htk")
    ours = mel_filterbank().numpy()
    assert ours.shape == (481, 128)
    np.testing.assert_allclose(ours, reference, atol=5e-5)


@pytest.mark.parametrize("num_samples", [481, 960, 24000, 24123])
def test_log_mel_shape_and_values_match_transformers_spectrogram(num_samples):
    wav = (np.random.default_rng(num_samples).standard_normal(num_samples) * 0.1).astype(np.float32)
    ours = log_mel(torch.from_numpy(wav))
    assert ours.shape == (128, num_samples // 240 + 1) and ours.dtype == torch.float32
    filters = mel_filter_bank(481, 128, 0.0, 12000.0, 24000, norm=None, mel_scale="htk")
    reference = spectrogram(
        wav,
        window_function(960, "hann"),
        960,
        240,
        power=1.0,
        center=True,
        pad_mode="reflect",
        mel_filters=filters,
        mel_floor=1e-7,
        log_mel="log",
        dtype=np.float64,
    )
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-4)


def test_log_mel_floor_and_tone_peak():
    silence = log_mel(torch.zeros(4800))
    assert torch.allclose(silence, torch.full_like(silence, float(np.log(1e-7))))
    mel = log_mel(torch.from_numpy(_tone(1000.0, 24000, 0.5)))
    peak_band = int(mel[:, 10].argmax())
    centers = 700 * (10 ** (np.linspace(0, 2595 * np.log10(1 + 12000 / 700), 130)[1:-1] / 2595) - 1)
    assert abs(centers[peak_band] - 1000.0) < 60.0


def test_log_mel_rejects_bad_audio():
    with pytest.raises(ValueError, match="too short"):
        log_mel(torch.zeros(480))
    with pytest.raises(ValueError, match="1-D float"):
        log_mel(torch.zeros(2, 1000))
    with pytest.raises(ValueError, match="1-D float"):
        log_mel(torch.zeros(1000, dtype=torch.int16))
