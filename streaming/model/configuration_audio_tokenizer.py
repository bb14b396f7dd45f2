"""Configuration of the MiMo-Audio-Tokenizer (24 kHz speech <-> 25 Hz x 20 RVQ codes).

Field names are those of the official ``config.json`` (``XiaomiMiMo/MiMo-Audio-Tokenizer``), and the defaults
are the official values, so ``AudioTokenizerConfig()`` describes the real 1.2B model. Upstream's class
defaults differ from its released config (768-d, 8 layers, 80 mels, ...): they are never used here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from .checkpoint import read_config_json

MODEL_TYPE = "mimo_audio_tokenizer"
# Keys that Hugging Face writes into every config.json; they carry no model shape.
HF_BOOKKEEPING = frozenset(
    {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map", "_name_or_path"}
)


def _official_codebook_sizes() -> list[int]:
    return [1024, 1024] + [128] * 18


@dataclass
class AudioTokenizerConfig:
    max_audio_seconds: int = 1800
    stride_size: int = 2
    avg_pooler: int = 2
    d_model: int = 1280
    scale_embedding: bool = False
    kernel_size: int = 3
    activation_function: str = "gelu"
    encoder_layers: int = 32
    encoder_skip_layer_id: int | None = 3
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    encoder_causal: bool = False
    encoder_attn_window_size: list[int] = field(default_factory=lambda: [-1, -1])
    decoder_layers: int = 32
    decoder_attention_heads: int = 20
    decoder_ffn_dim: int = 5120
    decoder_kernel_size: int = 3
    decoder_stride_size: int = 2
    decoder_causal: bool = True
    decoder_attn_window_size: list[int] = field(default_factory=lambda: [-1, -1])
    nfft: int = 960
    vocoder_dim: int = 256
    vocoder_intermediate_dim: int = 1024
    vocoder_num_layers: int = 16
    n_mels: int = 128
    sampling_rate: int = 24000
    hop_length: int = 240
    window_size: int = 960
    vocoder_padding: str = "same"
    fmin: int = 0
    fmax: int | None = None
    num_quantizers: int = 20
    codebook_size: list[int] = field(default_factory=_official_codebook_sizes)
    threshold_ema_dead_code: int = 2
    position_embedding_type: str = "rope"
    rope_theta: float = 10000
    rope_type: str = "default"
    ln_type: str = "LayerNorm"
    vocoder_attention_heads: int = 16
    vocoder_attn_window_size: list[int] = field(default_factory=lambda: [40, 10])

    def __post_init__(self) -> None:
        self.validate()

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def official(cls) -> AudioTokenizerConfig:
        return cls()

    @classmethod
    def tiny(cls) -> AudioTokenizerConfig:
        """The test/CPU preset of docs/mimo_audio.md §11: real rates, codebooks and windows; small transformers."""
        return cls(
            d_model=64,
            encoder_layers=3,
            encoder_skip_layer_id=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=128,
            vocoder_dim=32,
            vocoder_num_layers=2,
            vocoder_attention_heads=2,
            vocoder_intermediate_dim=64,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AudioTokenizerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if values.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config model_type is {values['model_type']!r}, expected {MODEL_TYPE!r}")
        unknown = sorted(set(values) - names - HF_BOOKKEEPING)
        if unknown:
            logger.warning("audio tokenizer config: ignoring unknown keys {}", unknown)
        return cls(**{key: value for key, value in values.items() if key in names})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> AudioTokenizerConfig:
        return cls.from_dict(read_config_json(Path(folder)))

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, "architectures": ["MiMoAudioTokenizer"], **dataclasses.asdict(self)}

    # -- derived sizes ------------------------------------------------------------------------------------
    @property
    def samples_per_frame(self) -> int:
        """Audio samples per code frame: hop x conv stride x pooler (960 = 40 ms at 24 kHz)."""
        return self.hop_length * self.stride_size * self.avg_pooler

    @property
    def codebook_sizes(self) -> list[int]:
        """One size per quantizer; upstream repeats the last listed size for the remaining ones."""
        sizes = list(self.codebook_size)
        return sizes + [sizes[-1]] * (self.num_quantizers - len(sizes))

    def validate(self) -> None:
        """Reject configurations this implementation does not reproduce (rather than compute something else)."""
        checks = [
            (self.d_model % self.encoder_attention_heads == 0, "d_model must be divisible by encoder_attention_heads"),
            (self.d_model % self.decoder_attention_heads == 0, "d_model must be divisible by decoder_attention_heads"),
            (
                self.vocoder_dim % self.vocoder_attention_heads == 0,
                "vocoder_dim must be divisible by vocoder_attention_heads",
            ),
            (
                self.position_embedding_type == "rope" and self.rope_type == "default",
                "only position_embedding_type 'rope' with rope_type 'default' is supported",
            ),
            (self.ln_type == "LayerNorm", "only ln_type 'LayerNorm' is supported"),
            (self.vocoder_padding == "same", "only vocoder_padding 'same' is supported"),
            (
                self.nfft == self.window_size and self.nfft % self.hop_length == 0,
                "nfft must equal window_size and be a multiple of hop_length (the ISTFT head assumes it)",
            ),
            (self.avg_pooler > 1, "avg_pooler 1 (no down-sampling layer) is not supported"),
            (
                self.encoder_skip_layer_id is None or 1 <= self.encoder_skip_layer_id <= self.encoder_layers,
                "encoder_skip_layer_id must name one of the encoder layers (1-based)",
            ),
            (
                len(self.codebook_size) >= 1 and self.num_quantizers >= 1,
                "need at least one quantizer and codebook size",
            ),
            (len(self.codebook_size) <= self.num_quantizers, "more codebook sizes than quantizers"),
        ]
        for window in (self.encoder_attn_window_size, self.decoder_attn_window_size, self.vocoder_attn_window_size):
            checks.append((len(window) == 2, "attention window sizes are [left, right] pairs"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"audio tokenizer config: {message}")
