"""Codec streaming: the incremental encoder and the streaming decoder against whole-clip results."""

import numpy as np
import pytest
import torch
from mimo_voice.streaming.engine.codec_stream import IncrementalEncoder, StreamingDecoder, push_together
from mimo_voice.streaming.model.modeling_audio_tokenizer import code_frames, load_audio_tokenizer

SPF = 960

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_audio_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def speech():
    generator = torch.Generator().manual_seed(0)
    n = 24000 * 5
    envelope = 0.5 + 0.5 * torch.sin(torch.arange(n) / 24000 * 2 * torch.pi * 4)
    return 0.1 * envelope * torch.randn(n, generator=generator)


@pytest.fixture(scope="module")
def codes(tokenizer, speech):
    return tokenizer.encode(speech)[:48]


def _stream(decoder, codes, step=4):
    pieces = [decoder.push(codes[i : i + step]) for i in range(0, codes.shape[0], step)]
    return pieces, decoder.flush()


# -- streaming decode -------------------------------------------------------------------------------------
def test_full_lookahead_equals_offline_decode(tokenizer, codes):
    decoder = StreamingDecoder(tokenizer, left_context_frames=24, lookahead_frames=codes.shape[0])
    pieces, rest = _stream(decoder, codes)
    assert all(p.numel() == 0 for p in pieces)
    offline = tokenizer.decode(codes)
    assert rest.shape == offline.shape and (rest - offline.cpu()).abs().max() < 1e-4


def test_each_chunk_is_the_offline_decode_of_what_was_pushed(tokenizer, codes):
    """With all of the past as context, a chunk is exactly the matching slice of decoding every frame so far."""
    lookahead, codes = 6, codes[:32]
    decoder = StreamingDecoder(tokenizer, left_context_frames=codes.shape[0], lookahead_frames=lookahead)
    played = 0
    for end in range(4, codes.shape[0] + 1, 4):
        pcm = decoder.push(codes[end - 4 : end])
        ready = max(played, end - lookahead)
        assert pcm.numel() == (ready - played) * SPF
        if pcm.numel():
            offline = tokenizer.decode(codes[:end]).cpu()
            torch.testing.assert_close(pcm, offline[played * SPF : ready * SPF], atol=1e-5, rtol=1e-5)
        played = ready


@pytest.mark.parametrize(
    "left, lookahead, step, frames", [(0, 0, 4, 48), (24, 8, 4, 48), (8, 2, 3, 47), (4, 40, 1, 20)]
)
def test_every_frame_is_emitted_once_in_order(tokenizer, codes, left, lookahead, step, frames):
    codes = codes[:frames]
    decoder = StreamingDecoder(tokenizer, left, lookahead)
    pieces, rest = _stream(decoder, codes, step)
    first = next(i for i, p in enumerate(pieces + [rest]) if p.numel())
    assert first == min(lookahead // step, len(pieces))  # audio as soon as `lookahead` later frames exist
    total = sum(p.numel() for p in pieces) + rest.numel()
    assert total == decoder.emitted_samples == codes.shape[0] * SPF
    audio = torch.cat(pieces + [rest])
    assert audio.dtype == torch.float32 and audio.device.type == "cpu"
    assert torch.isfinite(audio).all() and audio.abs().max() < 1.0


def test_pushes_together_equal_pushes_alone_at_equal_and_different_window_lengths(tokenizer, speech):
    """Three replies at different points: two in steady state (windows of one length: one batch), one starting."""
    codes, starts = tokenizer.encode(speech)[:72], [40, 48, 0]
    alone = [StreamingDecoder(tokenizer, 24, 8) for _ in starts]
    together = [StreamingDecoder(tokenizer, 24, 8) for _ in starts]
    want: list[list[torch.Tensor]] = [[] for _ in starts]
    got: list[list[torch.Tensor]] = [[] for _ in starts]
    for decoders, out in ((alone, want), (together, got)):
        for decoder, start, pieces in zip(decoders, starts, out):
            pieces.extend(decoder.push(codes[i : i + 4]) for i in range(0, start, 4))
    batches: list[int] = []
    hook = tokenizer.decoder.register_forward_pre_hook(lambda _module, args: batches.append(args[0].shape[0]))
    try:
        for step in range(0, 16, 4):
            pushes = [(decoder, codes[start + step : start + step + 4]) for decoder, start in zip(together, starts)]
            for pieces, pcm in zip(got, push_together(pushes)):
                pieces.append(pcm)
    finally:
        hook.remove()
    # Per call: the two steady windows as one batch; the starting one alone, once its first frames are past the
    # 8-frame look-ahead (from its third push).
    assert batches == [2, 2, 2, 1, 2, 1]
    for step in range(0, 16, 4):
        for decoder, start, pieces in zip(alone, starts, want):
            pieces.append(decoder.push(codes[start + step : start + step + 4]))
    for index, (decoder_a, decoder_b) in enumerate(zip(alone, together)):
        want[index].append(decoder_a.flush())
        got[index].append(decoder_b.flush())
        expected, actual = torch.cat(want[index]), torch.cat(got[index])
        assert actual.shape == expected.shape and actual.numel() > 0
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_more_lookahead_gets_closer_to_offline(tokenizer, codes):
    offline = tokenizer.decode(codes).cpu()

    def error(lookahead):
        pieces, rest = _stream(StreamingDecoder(tokenizer, 24, lookahead), codes)
        return (torch.cat(pieces + [rest]) - offline).pow(2).mean()

    assert error(0) > 2 * error(8) > 0


def test_windows_stay_bounded_on_long_responses(tokenizer, codes, monkeypatch):
    sizes = []
    original = tokenizer.decode_hidden
    monkeypatch.setattr(tokenizer, "decode_hidden", lambda hidden: sizes.append(hidden.shape[0]) or original(hidden))
    decoder = StreamingDecoder(tokenizer, left_context_frames=8, lookahead_frames=4)
    _stream(decoder, codes)
    assert max(sizes) <= 8 + 4 + 4


def test_flush_ends_a_response_and_the_next_push_starts_another(tokenizer, codes):
    decoder = StreamingDecoder(tokenizer, 24, 8)
    pieces, rest = _stream(decoder, codes[:20])
    first = torch.cat(pieces + [rest])
    assert decoder.emitted_samples == 20 * SPF and first.numel() == 20 * SPF
    pieces, rest = _stream(decoder, codes[:20])
    assert torch.equal(torch.cat(pieces + [rest]), first) and decoder.emitted_samples == 20 * SPF
    decoder.push(codes[:4])
    decoder.reset()
    assert decoder.emitted_samples == 0 and decoder.flush().numel() == 0


@pytest.mark.parametrize("left, lookahead, frames", [(24, 8, 36), (8, 6, 32), (4, 8, 12)])
def test_flushed_tail_is_the_last_windows_decode(tokenizer, codes, left, lookahead, frames, monkeypatch):
    """The held-back look-ahead comes from the last window (its usual left context, ending at the last frame),
    as upstream's last chunk, without another decode."""
    codes = codes[:frames]
    decoder = StreamingDecoder(tokenizer, left, lookahead)
    for end in range(4, frames - 4 + 1, 4):
        decoder.push(codes[end - 4 : end])
    played = max(0, frames - 4 - lookahead)  # returned before the last push
    decoder.push(codes[frames - 4 :])
    calls = []
    original = tokenizer.decode_hidden
    monkeypatch.setattr(tokenizer, "decode_hidden", lambda hidden: calls.append(1) or original(hidden))
    tail = decoder.flush()
    assert not calls and tail.numel() == lookahead * SPF and decoder.emitted_samples == frames * SPF
    start = max(0, played - left)
    window = original(tokenizer.quantizer.decode(codes[start:frames])).cpu()
    torch.testing.assert_close(tail, window[(frames - lookahead - start) * SPF :], atol=1e-6, rtol=1e-6)


def test_decoder_accepts_numpy_patches_and_rejects_bad_codes(tokenizer, codes):
    decoder = StreamingDecoder(tokenizer, 24, 0)
    assert decoder.push(codes[:4].numpy()).numel() == 4 * SPF
    with pytest.raises(ValueError, match="codebook 0"):
        decoder.push(np.full((4, 8), 1024))  # the LLM's "empty" id is not a code
    with pytest.raises(ValueError, match="integer tensor"):
        decoder.push(np.zeros(8, dtype=np.int64))
    with pytest.raises(ValueError, match=">= 0"):
        StreamingDecoder(tokenizer, -1, 8)


# -- incremental encode -----------------------------------------------------------------------------------
def _encode_in_pieces(encoder, wav, piece=480):
    arrivals = []  # (samples pushed so far, codes returned)
    for start in range(0, wav.numel(), piece):
        codes = encoder.push(wav[start : start + piece].numpy())
        if codes.shape[0]:
            arrivals.append((min(start + piece, wav.numel()), codes))
    return arrivals, encoder.finish()


@pytest.mark.parametrize("chunk, overlap, seconds", [(1.0, 0.5, 5.0), (0.4, 0.0, 3.03), (2.0, 1.0, 4.51)])
def test_incremental_codes_arrive_when_final_and_add_up(tokenizer, speech, chunk, overlap, seconds):
    wav = speech[: int(24000 * seconds)]
    encoder = IncrementalEncoder(tokenizer, chunk, overlap)
    arrivals, rest = _encode_in_pieces(encoder, wav)
    chunk_frames, overlap_frames = round(chunk * 25), round(overlap * 25)
    final = 0
    for pushed, codes in arrivals:
        assert codes.shape == (chunk_frames, 8)
        final += chunk_frames
        needed = (final + overlap_frames) * SPF
        assert needed <= pushed < needed + 480
    total = final + rest.shape[0]
    assert total == code_frames(wav.numel()) == tokenizer.encode(wav).shape[0]


def test_incremental_codes_match_the_whole_utterance_mostly(tokenizer, speech):
    whole = tokenizer.encode(speech)
    arrivals, rest = _encode_in_pieces(IncrementalEncoder(tokenizer, 1.0, 1.0), speech)
    incremental = torch.cat([codes for _, codes in arrivals] + [rest])
    assert incremental.shape == whole.shape
    assert (incremental[:, 0] != whole[:, 0]).float().mean() < 0.25  # a misaligned window would miss ~all


def test_utterance_within_one_window_equals_the_whole_encode(tokenizer, speech):
    wav = speech[:24000]
    arrivals, rest = _encode_in_pieces(IncrementalEncoder(tokenizer, 2.0, 0.5), wav)
    assert arrivals == [] and torch.equal(rest, tokenizer.encode(wav))


def test_encoder_windows_stay_bounded_and_finish_resets(tokenizer, speech, monkeypatch):
    sizes = []
    original = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda wav, n_q=8: sizes.append(wav.numel()) or original(wav, n_q))
    encoder = IncrementalEncoder(tokenizer, 0.4, 0.2)
    first = _encode_in_pieces(encoder, speech[: 24000 * 3])
    assert len(first[0]) == 7 and max(sizes) <= (10 + 2 * 5 + 1) * SPF
    second = _encode_in_pieces(encoder, speech[: 24000 * 3])
    assert torch.equal(first[1], second[1]) and len(first[0]) == len(second[0])


def test_encoder_short_and_bad_input(tokenizer):
    encoder = IncrementalEncoder(tokenizer, 2.0, 0.5)
    encoder.push(np.zeros(300, dtype=np.float32))
    assert encoder.finish().shape == (0, 8)  # under 20 ms: no codes
    assert encoder.finish().shape == (0, 8)
    with pytest.raises(ValueError, match="mono float"):
        encoder.push(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="mono float"):
        encoder.push(np.zeros(100, dtype=np.int16))
    with pytest.raises(ValueError, match="chunk_secs"):
        IncrementalEncoder(tokenizer, 0.0, 0.5)


# -- the benchmark ----------------------------------------------------------------------------------------
def test_codec_bench_prints_tables_and_writes_json(tiny_tokenizer_dir, tmp_path, capsys):
    import json

    from mimo_voice.configs import load_config
    from mimo_voice.streaming.bench.codec import main

    argv = [
        "--",
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--synthetic",
        "--seconds",
        "2",
        "--lookaheads",
        "0,4",
        "--left-contexts",
        "8",
        "--encode",
        "1:0.5",
        "--threads",
        str(torch.get_num_threads()),
        "--json",
        str(tmp_path / "codec.json"),
    ]
    assert main(load_config(None), argv) == 0
    out = capsys.readouterr().out
    assert "Streaming decode vs offline decode" in out and "Incremental encode" in out
    result = json.loads((tmp_path / "codec.json").read_text())
    decode = {row["label"]: row for row in result["decode"]}
    assert set(decode) == {"0", "4", "full"}
    assert decode["full"]["max_abs_error"] < 1e-4 and decode["0"]["max_abs_error"] > decode["full"]["max_abs_error"]
    assert decode["4"]["frames_before_first_pcm"] == 8 and result["encode"][0]["frames"] == code_frames(48000)


def test_codec_bench_bad_arguments_are_clear_errors(tiny_tokenizer_dir, capsys):
    from mimo_voice.configs import load_config
    from mimo_voice.streaming.bench.codec import main

    assert main(load_config(None), ["--tokenizer", str(tiny_tokenizer_dir), "--lookaheads", "-1"]) == 2
    assert main(load_config(None), ["--tokenizer", "/nonexistent/folder", "--synthetic"]) == 2
    assert main(load_config(None), ["--tokenizer", str(tiny_tokenizer_dir), "--wav", "/nonexistent.wav"]) == 2
    err = capsys.readouterr().err
    assert "must be >= 0" in err and "checkpoint not found" in err and "nonexistent.wav" in err
