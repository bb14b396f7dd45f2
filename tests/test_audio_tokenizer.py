import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mimo_voice.streaming.model.checkpoint import CheckpointError
from mimo_voice.streaming.model.configuration_audio_tokenizer import AudioTokenizerConfig
from mimo_voice.streaming.model.modeling_audio_tokenizer import (
    EMA_BUFFERS,
    AttentionMask,
    MiMoAudioTokenizer,
    ResidualVectorQuantizer,
    attend,
    code_frames,
    load_audio_tokenizer,
    write_tiny_tokenizer,
)
from safetensors.torch import load_file, save_file

OFFICIAL_KEYS = Path(__file__).parent / "data" / "keys_tokenizer.txt"

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_audio_tokenizer(tiny_tokenizer_dir)


def _speechlike(seconds: float, seed: int = 0) -> torch.Tensor:
    """Noise shaped by a 4 Hz syllable envelope: enough structure for the codec, no fixtures needed."""
    generator = torch.Generator().manual_seed(seed)
    n = int(24000 * seconds)
    envelope = 0.5 + 0.5 * torch.sin(torch.arange(n) / 24000 * 2 * torch.pi * 4)
    return 0.1 * envelope * torch.randn(n, generator=generator)


def _official_key_shapes() -> dict[str, list[int]]:
    lines = OFFICIAL_KEYS.read_text().splitlines()
    return {name: json.loads(shape) for name, shape in (line.split("\t") for line in lines if not line.startswith("#"))}


# -- configuration ----------------------------------------------------------------------------------------
def test_official_config_values_and_round_trip():
    config = AudioTokenizerConfig.official()
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.vocoder_num_layers) == (
        1280,
        32,
        32,
        16,
    )
    assert config.codebook_sizes == [1024, 1024] + [128] * 18 and config.samples_per_frame == 960
    assert config.vocoder_attn_window_size == [40, 10]
    assert AudioTokenizerConfig.from_dict(config.to_dict()) == config
    tiny = AudioTokenizerConfig.tiny()
    assert (tiny.d_model, tiny.encoder_layers, tiny.encoder_skip_layer_id, tiny.vocoder_dim) == (64, 3, 2, 32)
    assert (tiny.nfft, tiny.n_mels, tiny.num_quantizers) == (960, 128, 20)


def test_config_from_pretrained_ignores_hf_bookkeeping(tmp_path):
    values = {**AudioTokenizerConfig.tiny().to_dict(), "torch_dtype": "bfloat16", "transformers_version": "4.49.0"}
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert AudioTokenizerConfig.from_pretrained(tmp_path) == AudioTokenizerConfig.tiny()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "qwen2"}, "model_type"),
        ({"ln_type": "RMSNorm"}, "LayerNorm"),
        ({"d_model": 130}, "divisible"),
        ({"codebook_size": [1024] * 21}, "more codebook sizes"),
        ({"encoder_skip_layer_id": 40}, "encoder_skip_layer_id"),
    ],
)
def test_unsupported_config_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        AudioTokenizerConfig.from_dict({**AudioTokenizerConfig.official().to_dict(), **change})


# -- official layout --------------------------------------------------------------------------------------
def test_module_names_and_shapes_are_the_official_checkpoint_keys():
    with torch.device("meta"):
        model = MiMoAudioTokenizer(AudioTokenizerConfig.official())
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    official = _official_key_shapes()
    ema = {key for key in official if re.fullmatch(EMA_BUFFERS, key)}
    assert len(official) == 1305 and len(ema) == 60
    assert ours == {key: shape for key, shape in official.items() if key not in ema}


def test_tiny_checkpoint_has_every_official_key(tiny_tokenizer_dir):
    def layerless(keys):  # the tiny preset has fewer layers; every other name is the official one
        return {re.sub(r"layers\.\d+\.", "layers.*.", key) for key in keys}

    written = load_file(str(tiny_tokenizer_dir / "model.safetensors"))
    assert layerless(written) == layerless(_official_key_shapes())
    assert json.loads((tiny_tokenizer_dir / "config.json").read_text())["model_type"] == "mimo_audio_tokenizer"


def test_tiny_checkpoint_is_deterministic_per_seed(tmp_path, tiny_tokenizer_dir):
    again = load_file(str(write_tiny_tokenizer(tmp_path / "again", seed=0) / "model.safetensors"))
    other = load_file(str(write_tiny_tokenizer(tmp_path / "other", seed=1) / "model.safetensors"))
    first = load_file(str(tiny_tokenizer_dir / "model.safetensors"))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["decoder.vocoder.head.out.weight"], other["decoder.vocoder.head.out.weight"])


def _broken_copy(source: Path, target: Path, edit) -> Path:
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    state = load_file(str(source / "model.safetensors"))
    edit(state)
    save_file(state, str(target / "model.safetensors"))
    return target


def test_loading_errors_name_the_key(tiny_tokenizer_dir, tmp_path):
    key = "decoder.layers.1.self_attn.k_proj.weight"
    missing = _broken_copy(tiny_tokenizer_dir, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=f"missing key '{key}'"):
        load_audio_tokenizer(missing)
    shaped = _broken_copy(tiny_tokenizer_dir, tmp_path / "shape", lambda s: s.update({key: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \[3, 3\]"):
        load_audio_tokenizer(shaped)
    extra = _broken_copy(tiny_tokenizer_dir, tmp_path / "extra", lambda s: s.update({"decoder.extra": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected key 'decoder\.extra'"):
        load_audio_tokenizer(extra)


def test_bfloat16_loading_keeps_float32_codebooks(tiny_tokenizer_dir):
    model = load_audio_tokenizer(tiny_tokenizer_dir, dtype=torch.bfloat16)
    assert model.encoder.conv1.weight.dtype == torch.bfloat16
    assert model.quantizer.codebook(0).dtype == torch.float32
    codes = model.encode(_speechlike(1.0))
    audio = model.decode(codes)
    assert codes.shape == (code_frames(24000), 8) and audio.dtype == torch.float32 and torch.isfinite(audio).all()


# -- shapes and lengths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [481, 959, 960, 961, 4 * 960 - 1, 24000, 24000 + 480])
def test_encode_lengths_follow_the_documented_formula(tokenizer, num_samples):
    codes = tokenizer.encode(_speechlike(num_samples / 24000))
    mel_frames = num_samples // 240 + 1
    expected = -(-((mel_frames - 1) // 2 + 1) // 2)
    assert codes.shape == (expected, 8) and codes.dtype == torch.long
    assert expected == code_frames(num_samples) == num_samples // 960 + 1


def test_decode_gives_960_samples_per_frame_of_bounded_babble(tokenizer):
    generator = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, size, (37,), generator=generator) for size in [1024, 1024] + [128] * 6], 1)
    audio = tokenizer.decode(codes)
    assert audio.shape == (37 * 960,) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all() and audio.abs().max() < 1.0 and audio.std() > 1e-3
    assert tokenizer.decode(codes[:0]).shape == (0,)


def test_fewer_codebooks_encode_a_prefix_of_the_codes(tokenizer):
    wav = _speechlike(0.5)
    assert torch.equal(tokenizer.encode(wav, n_q=3), tokenizer.encode(wav, n_q=20)[:, :3])


def test_long_audio_policy_is_upstreams():
    assert MiMoAudioTokenizer.encode_segment_mel_frames == 6000  # 60 s segments
    assert MiMoAudioTokenizer.decode_chunk_frames == 1500  # 60 s decode chunks


def test_long_audio_is_encoded_in_independent_segments(tokenizer, monkeypatch):
    monkeypatch.setattr(MiMoAudioTokenizer, "encode_segment_mel_frames", 400)  # 4 s instead of 60 s, same code
    wav = _speechlike(6.0)
    codes = tokenizer.encode(wav)
    assert codes.shape == (code_frames(wav.numel()), 8)
    changed = wav.clone()
    changed[:24000] = _speechlike(1.0, seed=5)
    other = tokenizer.encode(changed)
    assert torch.equal(other[100:], codes[100:])  # the second segment does not see the first
    assert not torch.equal(other[:100], codes[:100])


def test_long_code_sequences_are_decoded_in_separate_chunks(tokenizer, monkeypatch):
    monkeypatch.setattr(MiMoAudioTokenizer, "decode_chunk_frames", 40)
    codes = tokenizer.encode(_speechlike(4.0))
    audio = tokenizer.decode(codes)
    assert torch.equal(audio, torch.cat([tokenizer.decode(codes[i : i + 40]) for i in range(0, codes.shape[0], 40)]))
    monkeypatch.setattr(MiMoAudioTokenizer, "decode_chunk_frames", 1500)
    assert not torch.equal(audio, tokenizer.decode(codes))  # the GroupNorms see the whole chunk


def test_batched_segments_do_not_see_each_other(tokenizer):
    generator = torch.Generator().manual_seed(1)
    mels = torch.randn(2, 128, 60, generator=generator)
    lengths = torch.tensor([60, 37])
    hidden, frames = tokenizer.encoder(mels, lengths)
    assert frames.tolist() == [15, 10]
    alone, _ = tokenizer.encoder(mels[:1], lengths[:1])
    torch.testing.assert_close(hidden[0], alone[0], atol=1e-5, rtol=1e-5)
    changed = mels.clone()
    changed[0] = torch.randn(128, 60, generator=generator)
    other, _ = tokenizer.encoder(changed, lengths)
    torch.testing.assert_close(other[1, :10], hidden[1, :10], atol=1e-5, rtol=1e-5)


# -- residual VQ ------------------------------------------------------------------------------------------
def test_rvq_search_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    quantizer = ResidualVectorQuantizer([256, 256, 64, 64], dim=32)
    for index in range(4):
        quantizer.codebook(index).copy_(torch.randn(quantizer.codebook(index).shape, generator=generator) * 0.6**index)
    x = torch.randn(500, 32, generator=generator)
    codes = quantizer.encode(x, n_q=4)
    residual = x.double()
    for index in range(4):
        book = quantizer.codebook(index).double()
        best = torch.cdist(residual, book).argmin(dim=1)
        assert torch.equal(codes[:, index], best)
        residual = residual - book[best]
    torch.testing.assert_close(quantizer.decode(codes).double(), x.double() - residual, atol=1e-6, rtol=1e-6)


# -- attention masks --------------------------------------------------------------------------------------
def _reference_attention(q, k, v, allowed):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 1)), (True, (2, -1))])
def test_attention_masks_follow_their_definition(causal, window):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 2, 8, generator=generator) for _ in range(3))
    lengths = torch.tensor([9, 6])
    mask = AttentionMask(9, q.device, lengths, causal, window)
    out = attend(q, k, v, mask)
    for row, length in enumerate(lengths.tolist()):
        i = torch.arange(length)[:, None]
        j = torch.arange(length)[None, :]
        allowed = torch.ones(length, length, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if window[0] >= 0:
            allowed &= j >= i - window[0]
        if window[1] >= 0:
            allowed &= j <= i + window[1]
        expected = _reference_attention(
            q[row : row + 1, :length], k[row : row + 1, :length], v[row : row + 1, :length], allowed[None]
        )
        torch.testing.assert_close(out[row : row + 1, :length], expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()  # padded queries too


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="flash-attn and CUDA are optional",
)
def test_flash_attention_path_matches_sdpa():
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 50, 4, 64, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(3))
    for mask in (
        AttentionMask(50, q.device, torch.tensor([50, 31], device="cuda")),
        AttentionMask(50, q.device, None, True),
        AttentionMask(50, q.device, None, False, (40, 10)),
    ):
        flash = attend(q, k, v, mask)
        sdpa = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)),
            attn_mask=mask.dense if mask.needs_dense else None,
            is_causal=mask.causal and not mask.needs_dense,
        ).transpose(1, 2)
        valid = slice(None) if mask.lengths is None else slice(0, 31)
        torch.testing.assert_close(flash[1, valid], sdpa[1, valid], atol=2e-2, rtol=2e-2)


# -- bad input --------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="1-D float"):
        tokenizer.encode(torch.zeros(2, 24000))
    with pytest.raises(ValueError, match="too short"):
        tokenizer.encode(torch.zeros(100))
    with pytest.raises(ValueError, match="n_q"):
        tokenizer.encode(torch.zeros(24000), n_q=21)
    with pytest.raises(ValueError, match="codebook 2"):
        tokenizer.decode(torch.tensor([[0, 0, 128]]))
    with pytest.raises(ValueError, match="integer tensor"):
        tokenizer.decode(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="integer tensor"):
        tokenizer.decode(torch.zeros(8, dtype=torch.long))
