"""Configuration of the MiMo-Audio LLM: a Qwen2 backbone plus the MiMo patch encoder/decoder fields.

Field names are those of the official ``config.json``; the per-channel strings
(``speech_vocab_size: "1025-1025-129-..."``, ``speech_zeroemb_idx``, ``delay_pattern``) are parsed
into ``speech_vocab_sizes``, ``speech_empty_ids`` and ``delays`` and written back as strings.
Qwen2 fields this class does not name are kept in ``extra`` and passed through to the three
``transformers.Qwen2Config``s the model is built from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimo_voice.configs.errors import ConfigError
from transformers import Qwen2Config

from .checkpoint import read_config_json

# official config.json name -> (attribute holding the parsed per-channel list, upstream's default)
CHANNEL_LISTS = {
    "speech_vocab_size": ("speech_vocab_sizes", "1025-1025-129-129-129-129-129-129"),
    "speech_zeroemb_idx": ("speech_empty_ids", "1024-1024-128-128-128-128-128-128"),
    "delay_pattern": ("delays", "0-1-2-3-4-5-6-7"),
}
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# Recomputed for each Qwen2Config we derive, never passed through.
DERIVED_QWEN2_FIELDS = {"layer_types", "rope_parameters", "rope_scaling"}


def parse_channel_list(value: str | int | list[int], channels: int, name: str) -> list[int]:
    """``"1025-1025-129"`` -> [1025, 1025, 129]; a single number is repeated for every channel (as upstream)."""
    try:
        if isinstance(value, list):
            items = [int(v) for v in value]
        elif isinstance(value, str) and "-" in value:
            items = [int(part) for part in value.split("-")]
        else:
            items = [int(value)] * channels
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a '-'-separated list of integers") from None
    if len(items) != channels:
        raise ConfigError(f"{name}: {value!r} has {len(items)} entries, audio_channels is {channels}")
    return items


def _upstream_default(official: str) -> list[int]:
    return [int(part) for part in CHANNEL_LISTS[official][1].split("-")]


@dataclass
class MiMoAudioConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128  # upstream's default, whatever the hidden size
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    group_size: int = 4
    audio_channels: int = 8
    speech_vocab_sizes: list[int] = field(default_factory=lambda: _upstream_default("speech_vocab_size"))
    speech_empty_ids: list[int] = field(default_factory=lambda: _upstream_default("speech_zeroemb_idx"))
    delays: list[int] = field(default_factory=lambda: _upstream_default("delay_pattern"))
    local_dim: int = 1024
    local_layers: int = 16
    local_attn_heads: int = 64
    local_ffn_dim: int = 4096
    local_attn_dropout: float = 0.1
    input_local_layers: int = 6
    input_local_dim: int | None = None  # None: local_dim
    # Upstream passes is_causal=not input_full_attention, so a config without the field is causal.
    input_full_attention: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_local_dim = self.input_local_dim or self.local_dim
        if self.audio_channels < 1 or self.group_size < 1:
            raise ConfigError(
                f"audio_channels ({self.audio_channels}) and group_size ({self.group_size}) must be positive"
            )
        for name in ("speech_vocab_sizes", "speech_empty_ids", "delays"):
            if len(getattr(self, name)) != self.audio_channels:
                raise ConfigError(
                    f"{name} has {len(getattr(self, name))} entries, audio_channels is {self.audio_channels}"
                )
        for channel, (size, empty) in enumerate(zip(self.speech_vocab_sizes, self.speech_empty_ids)):
            if not 0 <= empty < size:
                raise ConfigError(f"channel {channel}: empty id {empty} is outside its vocabulary of {size}")
        if self.extra.get("use_sliding_window"):
            raise ConfigError("use_sliding_window: only full attention is supported (as in MiMo-Audio)")
        if min(self.delays) < 0:
            raise ConfigError(f"delay_pattern {self.delays} has a negative delay")
        for dim, heads, what in (
            (self.local_dim, self.local_attn_heads, "local_dim"),
            (self.input_local_dim, self.local_attn_heads, "input_local_dim"),
        ):
            if dim % heads:
                raise ConfigError(f"{what} {dim} is not a multiple of local_attn_heads {heads}")

    # --- official config.json <-> this class ---

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiMoAudioConfig:
        data = dict(data)
        missing = [name for name in REQUIRED if name not in data]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        rope = data.get("rope_parameters") or {}
        if "rope_theta" not in data and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        scaling = data.get("rope_scaling") or rope
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError("only the default RoPE is supported (MiMo-Audio uses no rope scaling)")
        channels = int(data.get("audio_channels", 8))
        for official, (attribute, default) in CHANNEL_LISTS.items():
            data[attribute] = parse_channel_list(data.pop(official, default), channels, official)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {name: data.pop(name) for name in list(data) if name in names}
        extra = {name: value for name, value in data.items() if name not in DERIVED_QWEN2_FIELDS}
        if known.get("input_full_attention") is None:
            known.pop("input_full_attention", None)
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MiMoAudioConfig:
        return cls.from_dict(read_config_json(Path(folder)))

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                data[f.name] = getattr(self, f.name)
        for official, (attribute, _) in CHANNEL_LISTS.items():
            data[official] = "-".join(str(v) for v in data.pop(attribute))
        return data

    # --- the three Qwen2 configs the model is built from ---

    def backbone_config(self) -> Qwen2Config:
        config = Qwen2Config(
            **self.extra,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        # SDPA honours the patch encoder's is_causal=False (eager and flash-attention do not, see the reference notes).
        config._attn_implementation = "sdpa"
        return config

    def _local(self, dim: int, layers: int, ffn: int) -> Qwen2Config:
        config = self.backbone_config()
        config.hidden_size = dim
        config.num_hidden_layers = layers
        config.num_attention_heads = config.num_key_value_heads = self.local_attn_heads
        config.head_dim = dim // self.local_attn_heads
        config.intermediate_size = ffn
        config.attention_dropout = self.local_attn_dropout
        config.layer_types = ["full_attention"] * layers
        return config

    def local_config(self) -> Qwen2Config:
        """The patch decoder (``local_transformer``)."""
        return self._local(self.local_dim, self.local_layers, self.local_ffn_dim)

    def input_local_config(self) -> Qwen2Config:
        """The patch encoder (``input_local_transformer``); upstream fixes its FFN at 4x its width."""
        return self._local(self.input_local_dim, self.input_local_layers, 4 * self.input_local_dim)

    @property
    def patch_steps(self) -> int:
        """Sequential patch-decoder steps per patch: group_size + max(delay) (11 for MiMo-Audio)."""
        return self.group_size + max(self.delays)

    # --- presets (reference notes, presets.md) ---

    @classmethod
    def official_7b(cls) -> MiMoAudioConfig:
        return cls(
            vocab_size=151680,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=640000.0,
            max_position_embeddings=8192,
            input_full_attention=True,
        )

    @classmethod
    def tiny(cls) -> MiMoAudioConfig:
        return cls(
            vocab_size=151680,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=640000.0,
            max_position_embeddings=8192,
            local_dim=32,
            local_layers=2,
            local_attn_heads=2,
            local_ffn_dim=128,
            input_local_layers=2,
            input_full_attention=True,
        )

    @classmethod
    def small(cls) -> MiMoAudioConfig:
        return cls(
            vocab_size=151680,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            rope_theta=640000.0,
            max_position_embeddings=8192,
            local_dim=256,
            local_layers=4,
            local_attn_heads=8,
            local_ffn_dim=1024,
            input_local_layers=2,
            input_full_attention=True,
        )

    @classmethod
    def preset(cls, name: str) -> MiMoAudioConfig:
        presets = {"tiny": cls.tiny, "small": cls.small, "official_7b": cls.official_7b}
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        return presets[name]()
