"""The ``real7b`` preset: MiMo-Audio-7B's real shapes with random weights, drawn directly on the device.

It exists so that the first run on a GPU with the real files is not the first test of the engine at the real
shapes (memory, kernel shapes, the step's speed), with nothing to download. Its folder holds only
``config.json`` (the official 7B shapes) and the stand-in text tokenizer of the tiny preset (its special ids;
the model keeps the real 151,680-row vocabulary); the weights are created by the engine's worker on the device,
in the configured dtype (bf16 on CUDA), without materialising them on the CPU first. The audio tokenizer is the
tiny preset's (real rates and codebooks, small transformers): decode costs are not the real ones.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from mimo_voice.streaming.model.configuration_mimo_audio import MiMoAudioConfig
from mimo_voice.streaming.model.modeling_mimo_audio import MiMoAudioForCausalLM, official_config_json
from mimo_voice.streaming.model.text_tokenizer import (
    SpecialTokens,
    load_text_tokenizer,
    write_tiny_text_tokenizer,
)
from transformers import PreTrainedTokenizerBase


def write_real7b_folder(folder: str | Path) -> Path:
    """``config.json`` with the official 7B shapes and the stand-in text tokenizer; no weights."""
    folder = Path(folder)
    write_tiny_text_tokenizer(folder)
    config = official_config_json(MiMoAudioConfig.official_7b())
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def random_on_device(
    folder: str | Path, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[MiMoAudioForCausalLM, PreTrainedTokenizerBase, SpecialTokens]:
    """The model of ``folder``'s config with random weights allocated and initialised on ``device`` in ``dtype``
    (each module's own initialisation, run on the device), plus the folder's text tokenizer."""
    folder = Path(folder)
    config = MiMoAudioConfig.from_pretrained(folder)
    tokenizer = load_text_tokenizer(folder)
    special = SpecialTokens.from_tokenizer(tokenizer)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device), _default_dtype(dtype):
        torch.manual_seed(seed)
        model = MiMoAudioForCausalLM(config, special)
    model.init_rotary(device)  # RoPE tables in float32, as for a loaded checkpoint
    return model, tokenizer, special


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
