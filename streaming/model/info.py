"""``mimo-voice model info [PATH]``: parameter counts per part and the special tokens of a checkpoint.

Nothing is loaded but config.json, the text tokenizer and the safetensors headers: the model is
built on the ``meta`` device, so this is instant even for the 7B checkpoint. Without PATH it
describes ``default_path`` (the CLI passes the configured ``model.path``), else the embedded preset.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open

from .checkpoint import resolve_checkpoint_dir, shard_files
from .configuration_mimo_audio import MiMoAudioConfig
from .modeling_mimo_audio import UNUSED_CHECKPOINT_KEYS, MiMoAudioForCausalLM
from .text_tokenizer import (
    SPECIAL_TOKEN_TEXT,
    SpecialTokens,
    load_text_tokenizer,
    write_tiny_text_tokenizer,
)

# part -> the top-level submodules (official key prefixes) it is made of
PARTS = {
    "backbone (text embeddings + Qwen2 layers)": ("model",),
    "text head": ("lm_head",),
    "speech embeddings (shared by encoder and decoder)": ("speech_embeddings",),
    "patch encoder": ("input_local_transformer", "speech_group_downcast"),
    "patch decoder": (
        "hidden_states_downcast",
        "local_transformer",
        "local_transformer_lm_heads",
        "speech_embeddings_to_local",
    ),
}


def parameter_counts(model: MiMoAudioForCausalLM) -> dict[str, int]:
    """Elements per part (see ``PARTS``); every submodule belongs to exactly one part."""
    part_of = {name: part for part, names in PARTS.items() for name in names}
    counts = dict.fromkeys(PARTS, 0)
    for name, child in model.named_children():
        counts[part_of[name]] += sum(p.numel() for p in child.parameters())
    return counts


def checkpoint_summary(folder: Path, model: MiMoAudioForCausalLM) -> str:
    """Shards, dtypes and whether keys and shapes match the model, from the safetensors headers only."""
    expected = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    found, dtypes = {}, set()
    shards = shard_files(folder)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                header = handle.get_slice(key)
                found[key] = header.get_shape()
                dtypes.add(header.get_dtype())
    problems = {
        "MISSING": sorted(expected.keys() - found.keys()),
        "UNEXPECTED": sorted(
            key
            for key in found.keys() - expected.keys()
            if not any(re.fullmatch(pattern, key) for pattern in UNUSED_CHECKPOINT_KEYS)
        ),
        "WRONG SHAPE": sorted(key for key in expected.keys() & found.keys() if found[key] != expected[key]),
    }
    parts = [f"{len(shards)} shard(s), {len(found)} tensors, dtype {', '.join(sorted(dtypes))}"]
    parts += [f"{what}: {len(keys)} key(s), e.g. {keys[0]}" for what, keys in problems.items() if keys]
    if not any(problems.values()):
        parts.append("every key the model needs is there, with its shape")
    return "; ".join(parts)


def _describe(config: MiMoAudioConfig) -> str:
    return (
        f"backbone {config.hidden_size} x {config.num_hidden_layers} layers "
        f"({config.num_attention_heads} heads, {config.num_key_value_heads} kv, head {config.head_dim}, "
        f"ffn {config.intermediate_size}), "
        f"text vocab {config.vocab_size}; patch encoder {config.input_local_dim} x {config.input_local_layers} "
        f"({'bidirectional' if config.input_full_attention else 'causal'}); patch decoder {config.local_dim} x "
        f"{config.local_layers} ({config.local_attn_heads} heads, ffn {config.local_ffn_dim}), "
        f"{config.patch_steps} steps; "
        f"{config.audio_channels} codebooks of {'-'.join(map(str, config.speech_vocab_sizes))}, delays "
        f"{'-'.join(map(str, config.delays))}"
    )


def _load(path: str | None, preset: str) -> tuple[str, MiMoAudioConfig, SpecialTokens, Path | None]:
    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_text_tokenizer(tmp)
            special_tokens = SpecialTokens.from_tokenizer(load_text_tokenizer(tmp))
        return f"embedded preset {preset!r}", MiMoAudioConfig.preset(preset), special_tokens, None
    folder = resolve_checkpoint_dir(path)
    special_tokens = SpecialTokens.from_tokenizer(load_text_tokenizer(folder))
    return str(folder), MiMoAudioConfig.from_pretrained(folder), special_tokens, folder


def main(argv: list[str], *, default_path: str | None = None, preset: str = "tiny") -> int:
    """Prints the report; a checkpoint that cannot be read raises a MimoVoiceError kind (the CLI reports it)."""
    parser = argparse.ArgumentParser(prog="mimo-voice model info", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="checkpoint folder or hub repo id (default: the configured model)")
    args = parser.parse_args(argv)
    source, model_config, special_tokens, folder = _load(args.path or default_path, preset)
    model = MiMoAudioForCausalLM.on_meta(model_config, special_tokens)
    weights = checkpoint_summary(folder, model) if folder else "random (seeded) weights, built on demand"
    counts = parameter_counts(model)
    width = max(map(len, counts))
    print(f"model: {source}")
    print(f"shape: {_describe(model_config)}")
    print(f"weights: {weights}")
    print("parameters:")
    for part, count in counts.items():
        print(f"  {part:<{width}}  {count:>14,}  ({count / 1e6:,.1f} M)")
    total = sum(counts.values())
    print(f"  {'total':<{width}}  {total:>14,}  ({total / 1e6:,.1f} M)")
    print("special tokens:")
    for name, token_id in asdict(special_tokens).items():
        print(f"  {SPECIAL_TOKEN_TEXT[name]:<15} {token_id}")
    return 0
