"""The MiMo-Audio LLM: shapes, key names, patch encoder/decoder behaviour, KV cache, `model info`."""

import json
import shutil
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from mimo_voice.streaming.model.checkpoint import CheckpointError, save_weights
from mimo_voice.streaming.model.configuration_mimo_audio import ConfigError, MiMoAudioConfig
from mimo_voice.streaming.model.modeling_mimo_audio import (
    MiMoAudioForCausalLM,
    MiMoAudioOutput,
    load_mimo_audio,
)
from mimo_voice.streaming.model.sampling import Sampler, SamplingParams
from mimo_voice.streaming.model.text_tokenizer import SpecialTokens
from mimo_voice.transports import cli
from safetensors.torch import load_file
from transformers import DynamicCache

KEYS_7B = Path(__file__).parent / "data" / "keys_llm_7b.txt"  # copy of /work/shared/reference/keys_llm_7b.txt
GREEDY = Sampler(SamplingParams(do_sample=False))
SAMPLED = Sampler(SamplingParams(temperature=0.9, top_p=0.95))
SPECIAL = SpecialTokens(
    sosp=151665,
    eosp=151666,
    empty=151667,
    sostm=151670,
    eostm=151671,
    eot=151672,
    im_start=151644,
    im_end=151645,
    endoftext=151643,
)


pytestmark = pytest.mark.usefixtures("torch_single_thread")  # many tiny ops (conftest.py)


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    model, _, _ = load_mimo_audio(tiny_llm_dir)
    return model


def mixed_positions(model: MiMoAudioForCausalLM, kinds: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense inputs for positions described by ``kinds`` ("t" text, "a" audio patch)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 151643, (1, len(kinds)), generator=generator)
    codes = model.empty_codes(len(kinds))
    for index, kind in enumerate(kinds):
        if kind == "a":
            text[0, index] = model.special_tokens.empty
            for channel, empty in enumerate(model.config.speech_empty_ids):
                codes[0, index, :, channel] = torch.randint(0, empty, (4,), generator=generator)
    return text, codes


# --- config and state-dict contract ---


def test_official_7b_on_meta_has_exactly_the_reference_keys_and_shapes():
    expected = {}
    for line in KEYS_7B.read_text().splitlines():
        if not line.startswith("#"):
            name, shape = line.split("\t")
            expected[name] = json.loads(shape)
    model = MiMoAudioForCausalLM.on_meta(MiMoAudioConfig.official_7b(), SPECIAL)
    assert {name: list(t.shape) for name, t in model.state_dict().items()} == expected
    assert sum(t.numel() for t in model.state_dict().values()) == 8_018_587_648


def test_config_reads_the_official_field_names():
    official = {
        "architectures": ["MiMoAudioModel"],
        "model_type": "qwen2",
        "torch_dtype": "bfloat16",
        "vocab_size": 151680,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 640000,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "group_size": 4,
        "audio_channels": 8,
        "speech_vocab_size": "1025-1025-129-129-129-129-129-129",
        "speech_zeroemb_idx": "1024-1024-128-128-128-128-128-128",
        "delay_pattern": "0-1-2-3-4-5-6-7",
        "local_dim": 1024,
        "local_layers": 16,
        "local_attn_heads": 64,
        "local_ffn_dim": 4096,
        "local_attn_dropout": 0.1,
        "input_local_layers": 6,
        "input_local_dim": 1024,
        "input_full_attention": True,
    }
    config = MiMoAudioConfig.from_dict(official)
    assert config.speech_vocab_sizes == [1025, 1025] + [129] * 6 and config.speech_empty_ids[2] == 128
    assert config.delays == list(range(8)) and config.patch_steps == 11 and config.head_dim == 128
    assert config.extra["torch_dtype"] == "bfloat16"  # unknown Qwen2 fields are kept
    written = config.to_dict()
    assert (
        written["speech_vocab_size"] == official["speech_vocab_size"] and written["delay_pattern"] == "0-1-2-3-4-5-6-7"
    )
    assert MiMoAudioConfig.from_dict(written) == config
    backbone, local, encoder = config.backbone_config(), config.local_config(), config.input_local_config()
    assert backbone.rope_parameters["rope_theta"] == 640000 and backbone._attn_implementation == "sdpa"
    assert (local.hidden_size, local.head_dim, local.num_key_value_heads, local.intermediate_size) == (
        1024,
        16,
        64,
        4096,
    )
    assert (encoder.num_hidden_layers, encoder.intermediate_size, encoder.rope_parameters["rope_theta"]) == (
        6,
        4096,
        640000,
    )
    # Upstream reads a missing input_full_attention as "causal patch encoder".
    assert not MiMoAudioConfig.from_dict(
        {k: v for k, v in official.items() if k != "input_full_attention"}
    ).input_full_attention


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": None}, "lacks hidden_size"),
        ({"speech_vocab_size": "1025-1025-129"}, "has 3 entries"),
        ({"speech_zeroemb_idx": "1025-1024-128-128-128-128-128-128"}, "empty id 1025 is outside"),
        ({"delay_pattern": "0-1-x"}, "not a '-'-separated list"),
        ({"use_sliding_window": True}, "only full attention"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "only the default RoPE"),
    ],
)
def test_bad_config_is_a_clear_error(change, message):
    data = MiMoAudioConfig.tiny().to_dict()
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        MiMoAudioConfig.from_dict(data)


# --- checkpoints ---


def test_tiny_checkpoint_is_in_the_official_layout_and_loads(tiny_llm_dir, tiny):
    index = json.loads((tiny_llm_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tiny_llm_dir / shard).is_file() for shard in shards)
    assert (
        json.loads((tiny_llm_dir / "config.json").read_text())["speech_vocab_size"]
        == "1025-1025-129-129-129-129-129-129"
    )
    assert set(index["weight_map"]) == set(tiny.state_dict())
    assert tiny.special_tokens == SPECIAL and not tiny.training
    assert tiny.lm_head.weight.dtype == torch.float32 and tiny.model.rotary_emb.inv_freq.dtype == torch.float32
    assert sum(p.numel() for p in tiny.parameters()) == 19_746_560  # docs/mimo_audio.md §9: 19.7 M
    # Deterministic seeded weights: the same as building the preset again with seed 0.
    again = MiMoAudioForCausalLM.random(MiMoAudioConfig.tiny(), SPECIAL, seed=0)
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in tiny.state_dict().items())


def _variant(source: Path, target: Path, state: dict) -> Path:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)
    save_weights(state, target, dtype=torch.bfloat16)
    return target


@pytest.mark.parametrize(
    ("edit", "message", "info"),
    [
        ("missing", r"missing key 'local_transformer_lm_heads\.3\.weight'", "MISSING: 1 key(s)"),
        ("unexpected", r"unexpected key 'speech_embeddings\.8\.weight'", "UNEXPECTED: 1 key(s)"),
        ("shape", r"key 'hidden_states_downcast\.weight' has shape \[32, 65\]", "WRONG SHAPE: 1 key(s)"),
    ],
)
def test_a_checkpoint_that_does_not_match_names_the_key(tiny_llm_dir, tmp_path, capsys, edit, message, info):
    state = {}
    for shard in sorted(tiny_llm_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    if edit == "missing":
        del state["local_transformer_lm_heads.3.weight"]
    elif edit == "unexpected":
        state["speech_embeddings.8.weight"] = torch.zeros(129, 32)
    else:
        state["hidden_states_downcast.weight"] = torch.zeros(32, 65)
    with pytest.raises(CheckpointError, match=message):
        load_mimo_audio(_variant(tiny_llm_dir, tmp_path, state))
    assert cli.main(["model", "info", str(tmp_path)]) == 0  # model info reports it without loading
    assert info in capsys.readouterr().out


def test_bfloat16_loading_keeps_rope_in_float32(tiny_llm_dir):
    model, _, _ = load_mimo_audio(tiny_llm_dir, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.local_transformer.rotary_emb.inv_freq.dtype == torch.float32
    text, codes = mixed_positions(model, "tta")
    with torch.inference_mode():
        out = model(text, codes)
    assert out.text_logits.dtype == torch.bfloat16 and out.text_logits.isfinite().all()


def test_an_unreachable_hub_repo_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="could not fetch XiaomiMiMo/no-such-model"):
        load_mimo_audio("XiaomiMiMo/no-such-model")


# --- the backbone and its cache ---


def test_incremental_decoding_equals_a_full_forward(tiny):
    text, codes = mixed_positions(tiny, "ttaataaatat" * 7)  # 77 positions: the cache outgrows its first buffer
    cache = tiny.new_cache()
    with torch.inference_mode():
        full = tiny(text, codes, all_logits=True)
        steps = [tiny(text[:, :4], codes[:, :4], cache)]
        steps += [tiny(text[:, i : i + 1], codes[:, i : i + 1], cache) for i in range(4, text.shape[1])]
    assert cache.length == text.shape[1]
    incremental = torch.stack([step.text_logits for step in steps], dim=1)
    assert torch.allclose(incremental, full.text_logits[:, 3:], atol=1e-5, rtol=0)
    assert torch.allclose(steps[-1].local_in, full.local_in, atol=1e-5, rtol=0)


def test_the_cache_is_passed_under_transformers_current_argument_name(tiny):
    """transformers 5.x renamed Qwen2Model's ``past_key_values`` to ``cache`` (the old name goes in 5.40):
    a cache passed under a name the installed version drops would silently stop growing."""
    text, codes = mixed_positions(tiny, "tatta")
    cache = tiny.new_cache()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error", FutureWarning)
        tiny(text[:, :3], codes[:, :3], cache)
        assert cache.length == 3
        out = tiny(text[:, 3:], codes[:, 3:], cache)
        tiny.decode_patch(out.local_in, GREEDY)
        full = tiny(text, codes)
    assert cache.length == 5
    assert torch.allclose(out.text_logits, full.text_logits, atol=1e-5, rtol=0)


def test_truncating_the_cache_forgets_the_dropped_positions(tiny):
    text, codes = mixed_positions(tiny, "tatataataa" * 10)
    kept, dropped, later = slice(0, 5), slice(5, 80), slice(80, 100)
    rolled_back, clean = tiny.new_cache(), tiny.new_cache()
    with torch.inference_mode():
        tiny(text[:, kept], codes[:, kept], rolled_back)
        tiny(text[:, dropped], codes[:, dropped], rolled_back)
        rolled_back.truncate(5)
        after_rollback = tiny(text[:, later], codes[:, later], rolled_back, all_logits=True)
        tiny(text[:, kept], codes[:, kept], clean)
        never_fed = tiny(text[:, later], codes[:, later], clean, all_logits=True)
    assert rolled_back.length == clean.length == 25
    assert torch.allclose(after_rollback.text_logits, never_fed.text_logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot truncate"):
        rolled_back.truncate(26)


def test_text_logits_only_at_the_last_position_by_default(tiny):
    text, codes = mixed_positions(tiny, "tat")
    with torch.inference_mode():
        out = tiny(text, codes)
    assert out.text_logits.shape == (1, 151680) and out.local_in.shape == (1, 32)
    assert out.hidden_states.shape == (1, 3, 64)


# --- the patch encoder ---


def test_patch_encoder_is_bidirectional_inside_a_patch(tiny):
    frames = torch.randn(1, 4, 32)
    changed = frames.clone()
    changed[0, 3] += 1.0
    with torch.inference_mode():
        before, after = tiny.encode_patch_frames(frames), tiny.encode_patch_frames(changed)
    assert not torch.allclose(before[0, 0], after[0, 0])  # frame 0 sees frame 3
    causal = MiMoAudioForCausalLM.random(
        MiMoAudioConfig(**{**vars(MiMoAudioConfig.tiny()), "input_full_attention": False}), SPECIAL
    )
    with torch.inference_mode():
        before, after = causal.encode_patch_frames(frames), causal.encode_patch_frames(changed)
    assert torch.equal(before[0, :3], after[0, :3])


def test_input_embeddings_follow_the_upstream_rule(tiny_llm_dir):
    model, _, _ = load_mimo_audio(tiny_llm_dir)
    text, codes = mixed_positions(model, "tataat")
    codes[0, 1, 2, 5] = 128  # an empty code inside an audio patch contributes nothing
    with torch.no_grad():  # rows at the empty ids need not be zero: masking is explicit
        for table in model.speech_embeddings:
            table.weight[table.padding_idx] = 1.0
        model.model.embed_tokens.weight[SPECIAL.empty] = 1.0
    is_audio = text == SPECIAL.empty
    # Upstream: channel embeddings summed in bfloat16 with empty ids zeroed, the patch encoder over all
    # positions, re-masked, frames concatenated and projected; text embedding zeroed at audio positions.
    frames = torch.zeros(1, 6, 4, 32, dtype=torch.bfloat16)
    for channel, table in enumerate(model.speech_embeddings):
        ids = codes[..., channel]
        frames += table(ids).masked_fill((ids == table.padding_idx)[..., None], 0.0)
    frames = frames * is_audio[..., None, None]
    encoded = model.encode_patch_frames(frames.view(6, 4, 32)).view(1, 6, 4, 32) * is_audio[..., None, None]
    speech = model.speech_group_downcast(encoded.view(1, 6, 128))
    expected = model.model.embed_tokens(text).masked_fill(is_audio[..., None], 0.0) + speech
    with torch.inference_mode():
        assert torch.allclose(model.embed_positions(text, codes), expected, atol=1e-6, rtol=0)


# --- the patch decoder and the arbitration ---


def upstream_decode_patch(model: MiMoAudioForCausalLM, local_in: torch.Tensor) -> torch.Tensor:
    """Upstream's local loop, greedy: a fresh DynamicCache, one local_transformer call per step,
    channel c sampled for frame t - delay[c] while delay[c] <= t < delay[c] + 4, empty id banned."""
    config = model.config
    codes = torch.zeros(local_in.shape[0], 4, 8, dtype=torch.long)
    cache, x = DynamicCache(), local_in[:, None]
    for step in range(config.group_size + max(config.delays)):
        hidden = model.local_transformer(inputs_embeds=x, cache=cache, use_cache=True).last_hidden_state
        x = torch.zeros_like(x)
        for channel, delay in enumerate(config.delays):
            if delay <= step < delay + config.group_size:
                logits = model.local_transformer_lm_heads[channel](hidden[:, -1])
                logits[:, config.speech_empty_ids[channel]] = float("-inf")
                token = logits.argmax(-1)
                codes[:, step - delay, channel] = token
                x += model.speech_embeddings[channel](token[:, None])
    return codes


def test_patch_decoder_matches_upstreams_delayed_loop(tiny):
    local_in = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.equal(tiny.decode_patch(local_in, GREEDY), upstream_decode_patch(tiny, local_in))


class EmptyFirstHead(torch.nn.Module):
    """Channel head whose likeliest code is the empty id, by far; next comes ``runner_up``."""

    def __init__(self, vocab: int, runner_up: int):
        super().__init__()
        self.vocab, self.runner_up = vocab, runner_up

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.new_zeros(hidden.shape[0], self.vocab)
        logits[:, self.vocab - 1] = 100.0  # the empty id is the last one
        logits[:, self.runner_up] = 1.0
        return logits


def test_patch_decoder_never_returns_an_empty_id(tiny_llm_dir):
    model, _, _ = load_mimo_audio(tiny_llm_dir)
    for channel, size in enumerate(model.config.speech_vocab_sizes):
        model.local_transformer_lm_heads[channel] = EmptyFirstHead(size, runner_up=channel + 10)
    expected = (torch.arange(8) + 10).expand(2, 4, 8)
    with torch.inference_mode():
        for sampler in (GREEDY, SAMPLED):  # sampled: the top-p nucleus holds only the banned empty id
            codes = model.decode_patch(torch.randn(2, 32), sampler, torch.Generator().manual_seed(0))
            assert torch.equal(codes, expected)


def test_sampled_patches_are_in_range(tiny):
    with torch.inference_mode():
        codes = tiny.decode_patch(torch.randn(16, 32), SAMPLED, torch.Generator().manual_seed(0))
    assert codes.shape == (16, 4, 8)
    assert (codes >= 0).all() and (codes < torch.tensor(tiny.config.speech_empty_ids)).all()
    assert len(codes.unique()) > 100  # sampled, not collapsed onto a few codes


def test_text_head_decides_between_a_text_and_an_audio_position(tiny):
    logits = torch.zeros(2, 151680)
    logits[0, SPECIAL.empty] = 50.0  # row 0: the text head says <|empty|> -> an audio patch
    logits[1, 42] = 50.0  # row 1: an ordinary token -> a text position
    out = MiMoAudioOutput(text_logits=logits, local_in=torch.randn(2, 32), hidden_states=torch.zeros(2, 1, 64))
    with torch.inference_mode():
        text, codes = tiny.sample_next(out, GREEDY, SAMPLED, generator=torch.Generator().manual_seed(0))
        assert text.tolist() == [SPECIAL.empty, 42]
        assert torch.equal(codes[1], tiny.empty_codes(1)[0, 0])
        assert (codes[0] < torch.tensor(tiny.config.speech_empty_ids)).all()
        # Banning <|empty|> turns row 0 into text as well.
        text, codes = tiny.sample_next(out, GREEDY, SAMPLED, banned_text=(SPECIAL.empty,))
        assert text[0] != SPECIAL.empty and torch.equal(codes, tiny.empty_codes(2)[0])


def test_bad_inputs_are_clear_errors(tiny):
    text, codes = mixed_positions(tiny, "ta")
    with pytest.raises(ValueError, match="expected text_ids"):
        tiny(text, codes[:, :, :3])
    with pytest.raises(ValueError, match="expected text_ids"):
        tiny(text[:, :0], codes[:, :0])
    bad = codes.clone()
    bad[0, 1, 0, 4] = 129  # channel 4 has 129 ids
    with pytest.raises(ValueError, match="audio codes"):
        tiny(text, bad)
    with pytest.raises(ValueError, match="text ids"):
        tiny(text + 151680, codes)


# --- mimo-voice model info ---


def test_model_info_prints_parts_and_special_tokens(tiny_llm_dir, capsys):
    assert cli.main(["model", "info", str(tiny_llm_dir)]) == 0
    out = capsys.readouterr().out
    assert "every key the model needs is there, with its shape" in out
    assert "total" in out and "19,746,560" in out
    assert "<|empty|>       151667" in out and "<|im_start|>    151644" in out
    for part in ("backbone", "text head", "patch encoder", "patch decoder", "speech embeddings"):
        assert part in out


def test_model_info_defaults_to_the_configured_preset(capsys):
    assert cli.main(["model", "info", "--set", "model.preset=small"]) == 0
    out = capsys.readouterr().out
    assert "embedded preset 'small'" in out and "<|eostm|>       151671" in out
    total = int(out.split("total")[1].split()[0].replace(",", ""))
    assert 180e6 < total < 190e6  # docs/mimo_audio.md §9: 186 M


def test_model_info_reports_a_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["model", "info", str(tmp_path)]) == 2  # a MimoVoiceError: one line, exit 2
    err = capsys.readouterr().err
    assert err.startswith("mimo-voice: ") and str(tmp_path) in err and err.count("\n") == 1


def test_a_config_without_input_full_attention_is_causal_and_says_so(tiny_llm_dir):
    from loguru import logger

    data = json.loads((tiny_llm_dir / "config.json").read_text())
    del data["input_full_attention"]
    warnings: list[str] = []
    sink = logger.add(warnings.append, level="WARNING")
    try:
        config = MiMoAudioConfig.from_dict(data)
    finally:
        logger.remove(sink)
    assert config.input_full_attention is False
    assert any("no input_full_attention" in line for line in warnings)
