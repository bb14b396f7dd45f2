"""The ``real7b`` preset: the real 7B shapes with random weights drawn on the device, nothing on disk but shapes."""

from __future__ import annotations

import json

import torch
from mimo_voice.streaming.model.configuration_mimo_audio import MiMoAudioConfig
from mimo_voice.streaming.model.modeling_mimo_audio import MiMoAudioForCausalLM, official_config_json
from mimo_voice.streaming.presets.real7b import random_on_device, write_real7b_folder
from mimo_voice.streaming.presets.tiny_training import ensure_preset_checkpoints


def test_the_preset_folder_holds_the_official_shapes_and_no_weights(tmp_path):
    llm, codec = ensure_preset_checkpoints("real7b", tmp_path)
    loaded, official = MiMoAudioConfig.from_pretrained(llm).to_dict(), MiMoAudioConfig.official_7b().to_dict()
    assert {key: loaded[key] for key in official} == official
    assert not list(llm.glob("*.safetensors")) and (llm / "tokenizer.json").is_file()
    assert (codec / "config.json").is_file()


def test_random_weights_are_made_on_the_device_in_its_dtype(tmp_path):
    folder = write_real7b_folder(tmp_path / "real7b")
    on_meta, _, _ = random_on_device(folder, torch.device("meta"), torch.bfloat16)
    reference = MiMoAudioForCausalLM.on_meta(MiMoAudioConfig.official_7b(), on_meta.special_tokens)
    assert {k: v.shape for k, v in on_meta.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert all(p.dtype == torch.bfloat16 and p.device.type == "meta" for p in on_meta.parameters())
    # The same path at the tiny shapes, for real, on the CPU: a working bf16 model, RoPE in float32.
    (folder / "config.json").write_text(json.dumps(official_config_json(MiMoAudioConfig.tiny())))
    model, _, special = random_on_device(folder, torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    text_ids = torch.tensor([[special.im_start, special.empty]])
    with torch.inference_mode():
        out = model(text_ids, model.empty_codes(2).clone().fill_(0))
    assert out.text_logits.shape == (1, model.config.vocab_size) and torch.isfinite(out.text_logits.float()).all()
