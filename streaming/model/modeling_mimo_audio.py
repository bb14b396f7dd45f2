"""The MiMo-Audio LLM: a Qwen2 backbone over positions that are either a text token or a 160 ms
audio patch (4 codec frames x 8 RVQ codebooks), with a patch encoder in front and a patch decoder
behind it. Submodule names are the official state-dict keys.

One position:
- input: the text token's embedding, or, when the token is ``<|empty|>``, the patch's 4x8 codes:
  per frame the sum of 8 ``speech_embeddings`` (empty ids contribute nothing) -> the 6-layer
  ``input_local_transformer``, bidirectional inside the patch -> frames concatenated ->
  ``speech_group_downcast`` to the backbone width;
- output: ``lm_head`` gives the text logits; sampling ``<|empty|>`` there means "an audio patch
  comes here", which the ``local_transformer`` then writes in group_size + max(delay) = 11 steps
  (channel c's frame f at step f + delay[c], one head per channel), seeded by
  ``hidden_states_downcast`` of the backbone's output.

Behaviours that decide parity with the official implementation (reference notes, section 8) are
kept: the 8 channel embeddings are summed in bfloat16 whatever the model's dtype, the patch encoder
runs under SDPA with ``is_causal=False``, empty ids are masked explicitly, and text logits are only
computed at the last position unless asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast, Qwen2Config
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2RMSNorm, Qwen2RotaryEmbedding

from .checkpoint import CheckpointError, load_weights, pick_dtype, resolve_checkpoint_dir, save_weights
from .configuration_mimo_audio import ConfigError, MiMoAudioConfig
from .sampling import Sampler
from .text_tokenizer import SpecialTokens, load_text_tokenizer, write_tiny_text_tokenizer

# MiMo-7B's multi-token-prediction layers, which MiMo-Audio never runs, if a checkpoint carries them.
UNUSED_CHECKPOINT_KEYS = (r"model\.mtp_layers\..*",)
INIT_STD = 0.02  # Qwen2's initializer_range
TINY_SHARD_BYTES = 32 * 1024**2


@dataclass
class MiMoAudioOutput:
    text_logits: Tensor  # [B, V] at the last position; [B, T, V] with all_logits
    local_in: Tensor  # [B, local_dim]: the patch decoder's first input, from the last position
    hidden_states: Tensor  # [B, T, hidden]: the backbone's output (after its final norm)


class AppendLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views into buffers with spare room, so appending a
    position copies only that position (``DynamicLayer`` concatenates, copying the whole layer
    cache at every step: tens of ms per step on CPU for the small preset at 8k positions)."""

    key_buffer: Tensor | None = None
    value_buffer: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if (
            self.key_buffer is None
            or end > self.key_buffer.shape[-2]
            or self.keys.data_ptr() != self.key_buffer.data_ptr()
        ):
            self._grow(key_states, end)
        self.key_buffer.narrow(-2, start, end - start).copy_(key_states)
        self.value_buffer.narrow(-2, start, end - start).copy_(value_states)
        self.keys, self.values = self.key_buffer.narrow(-2, 0, end), self.value_buffer.narrow(-2, 0, end)
        return self.keys, self.values

    def _grow(self, like: Tensor, needed: int) -> None:
        """New buffers of at least twice the old room, holding the current keys/values."""
        capacity = max(needed, 2 * (0 if self.key_buffer is None else self.key_buffer.shape[-2]), 64)
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        length = self.get_seq_length()
        self.key_buffer, self.value_buffer = like.new_empty(shape), like.new_empty(shape)
        if length:
            self.key_buffer.narrow(-2, 0, length).copy_(self.keys)
            self.value_buffer.narrow(-2, 0, length).copy_(self.values)


class KVCache:
    """The backbone's KV cache: a transformers ``Cache`` of append-friendly dynamic layers that grows
    by appended positions and can be cut back to an earlier length (barge-in roll-back)."""

    def __init__(self, config: Qwen2Config):
        self.dynamic = Cache(layers=[AppendLayer() for _ in range(config.num_hidden_layers)])

    @property
    def length(self) -> int:
        return self.dynamic.get_seq_length()

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.dynamic.crop(length - self.length)  # crop takes minus the number of positions to drop


def _headless_qwen2(config: Qwen2Config) -> Qwen2Model:
    """A Qwen2 stack fed with embeddings only (as upstream: no ``embed_tokens`` in the checkpoint)."""
    model = Qwen2Model(config)
    model.embed_tokens = None
    return model


class MiMoAudioForCausalLM(nn.Module):
    """Built in inference mode (``eval()``); call ``train()`` to fine-tune."""

    def __init__(self, config: MiMoAudioConfig, special_tokens: SpecialTokens):
        super().__init__()
        if config.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings: MiMo-Audio's lm_head is a separate matrix")
        self.config = config
        self.special_tokens = special_tokens
        local_config, input_local_config = config.local_config(), config.input_local_config()
        self.model = Qwen2Model(config.backbone_config())
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.local_transformer = _headless_qwen2(local_config)
        self.input_local_transformer = _headless_qwen2(input_local_config)
        self.local_transformer_lm_heads = nn.ModuleList(
            nn.Linear(config.local_dim, size, bias=False) for size in config.speech_vocab_sizes
        )
        self.speech_embeddings = nn.ModuleList(
            nn.Embedding(size, config.input_local_dim, padding_idx=empty)
            for size, empty in zip(config.speech_vocab_sizes, config.speech_empty_ids)
        )
        self.speech_embeddings_to_local = (
            nn.Linear(config.input_local_dim, config.local_dim, bias=False)
            if config.input_local_dim != config.local_dim
            else None
        )
        self.speech_group_downcast = nn.Linear(
            config.input_local_dim * config.group_size, config.hidden_size, bias=False
        )
        self.hidden_states_downcast = nn.Linear(config.hidden_size, config.local_dim, bias=False)
        # A dict mask bypasses Qwen2Model's causal-mask construction; SDPA then follows is_causal.
        full = config.input_full_attention
        self._patch_encoder_kwargs = {"attention_mask": {"full_attention": None}, "is_causal": False} if full else {}
        self._schedule = _patch_schedule(config)
        self.eval()

    # --- inputs ---

    @property
    def device(self) -> torch.device:
        return self.hidden_states_downcast.weight.device

    def new_cache(self) -> KVCache:
        return KVCache(self.model.config)

    def empty_codes(self, T: int) -> Tensor:
        """[1, T, group_size, channels] of every channel's empty id: the codes a text position carries."""
        empty = torch.tensor(self.config.speech_empty_ids, dtype=torch.long, device=self.device)
        return empty.expand(1, T, self.config.group_size, self.config.audio_channels).contiguous()

    def _check_inputs(self, text_ids: Tensor, codes: Tensor) -> None:
        config = self.config
        want = (*text_ids.shape, config.group_size, config.audio_channels)
        if text_ids.dim() != 2 or text_ids.shape[1] == 0 or tuple(codes.shape) != want:
            raise ValueError(
                f"expected text_ids [B, T>0] and codes [B, T, {config.group_size}, {config.audio_channels}], "
                f"got {list(text_ids.shape)} and {list(codes.shape)}"
            )
        if text_ids.min() < 0 or text_ids.max() >= config.vocab_size:
            raise ValueError(f"text ids must lie in [0, {config.vocab_size})")
        sizes = torch.tensor(config.speech_vocab_sizes, device=codes.device)
        if codes.min() < 0 or (codes >= sizes).any():
            raise ValueError(f"audio codes must lie in [0, vocab size of their channel {config.speech_vocab_sizes})")

    def encode_patch_frames(self, frames: Tensor) -> Tensor:
        """The patch encoder: [N, group_size, input_local_dim] -> same shape, each patch on its own
        (bidirectional inside the patch when the config says input_full_attention)."""
        return self.input_local_transformer(inputs_embeds=frames, **self._patch_encoder_kwargs).last_hidden_state

    def embed_patches(self, codes: Tensor) -> Tensor:
        """[N, group_size, channels] codes -> [N, hidden]: the backbone input of N audio positions."""
        n, group, _ = codes.shape
        # Upstream sums the channel embeddings in a bfloat16 buffer whatever the model dtype (parity note 8.1).
        frames = torch.zeros(n, group, self.config.input_local_dim, dtype=torch.bfloat16, device=codes.device)
        for channel, (table, empty) in enumerate(zip(self.speech_embeddings, self.config.speech_empty_ids)):
            ids = codes[..., channel]
            frames += table(ids).masked_fill((ids == empty)[..., None], 0.0)
        return self.speech_group_downcast(self.encode_patch_frames(frames).reshape(n, -1))

    def embed_positions(self, text_ids: Tensor, codes: Tensor) -> Tensor:
        """[B, T] text ids + [B, T, group_size, channels] codes -> [B, T, hidden] backbone inputs."""
        embeds = self.model.embed_tokens(text_ids)
        is_audio = text_ids == self.special_tokens.empty
        if bool(is_audio.any()):
            # The patch encoder only runs on audio positions (a text position's speech input is masked to zero).
            embeds = embeds.index_put((is_audio,), self.embed_patches(codes[is_audio]).to(embeds.dtype))
        return embeds

    # --- backbone ---

    def forward(
        self, text_ids: Tensor, codes: Tensor, cache: KVCache | None = None, all_logits: bool = False
    ) -> MiMoAudioOutput:
        """Run T new positions; with a cache they are appended to it, positions continuing from ``cache.length``."""
        self._check_inputs(text_ids, codes)
        past = cache.dynamic if cache is not None else None
        hidden = self.model(
            inputs_embeds=self.embed_positions(text_ids, codes), cache=past, use_cache=past is not None
        ).last_hidden_state
        last = hidden[:, -1]
        return MiMoAudioOutput(
            text_logits=self.lm_head(hidden if all_logits else last),
            local_in=self.hidden_states_downcast(last),
            hidden_states=hidden,
        )

    # --- patch decoder ---

    @torch.no_grad()
    def decode_patch(self, local_in: Tensor, sampler: Sampler, generator: torch.Generator | None = None) -> Tensor:
        """[B, local_dim] -> undelayed codes [B, group_size, channels]; a channel's empty id is never sampled."""
        config, decoder = self.config, self.local_transformer
        batch, device = local_in.shape[0], local_in.device
        cos, sin = decoder.rotary_emb(local_in, torch.arange(config.patch_steps, device=device)[None])
        rope = list(zip(cos.split(1, dim=1), sin.split(1, dim=1)))
        kv = KVCache(decoder.config).dynamic  # appends into one buffer: no per-step concatenation
        # Per-channel logits padded with -inf to one width, so that one sampler call serves a whole step.
        width = max(config.speech_vocab_sizes)
        logits = local_in.new_full((config.audio_channels, batch, width), float("-inf"))
        head_out = [logits[channel, :, :size] for channel, size in enumerate(config.speech_vocab_sizes)]
        empty = torch.tensor(config.speech_empty_ids, device=device)
        ban = (torch.arange(width, device=device) == empty[:, None]).repeat_interleave(batch, 0)
        sampled = []
        x = local_in[:, None]
        for step, (lo, hi) in enumerate(self._schedule.channel_ranges):
            for layer in decoder.layers:
                x = layer(x, attention_mask=None, position_embeddings=rope[step], cache=kv)
            h = decoder.norm(x[:, 0])
            for channel in range(lo, hi):
                head_out[channel].copy_(self.local_transformer_lm_heads[channel](h))
            tokens = sampler.sample_masked(logits[lo:hi].view(-1, width), ban[lo * batch : hi * batch], generator)
            sampled.append(tokens.view(hi - lo, batch))
            if step + 1 < config.patch_steps:
                x = self._embed_step(sampled[-1], lo)[:, None]
        order = torch.tensor(self._schedule.frame_major, device=device)
        return torch.cat(sampled).index_select(0, order).T.reshape(batch, config.group_size, config.audio_channels)

    def _embed_step(self, tokens: Tensor, first_channel: int) -> Tensor:
        """The next patch-decoder input: the sum of the embeddings of the tokens just sampled
        (``tokens`` [n, B] for channels first_channel...), from the tables the patch encoder uses too."""
        rows = tokens.unbind(0)
        x = self.speech_embeddings[first_channel](rows[0])
        for offset, row in enumerate(rows[1:], start=1):
            x = x + self.speech_embeddings[first_channel + offset](row)
        return x if self.speech_embeddings_to_local is None else self.speech_embeddings_to_local(x)

    @torch.no_grad()
    def sample_next(
        self,
        out: MiMoAudioOutput,
        text_sampler: Sampler,
        audio_sampler: Sampler,
        banned_text: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The next position as upstream decides it: the text head samples a token; ``<|empty|>`` means an
        audio patch, which the patch decoder writes; any other token is a text position (empty codes).
        Returns text ids [B] and codes [B, group_size, channels]."""
        text = text_sampler.sample(out.text_logits, banned_text, generator)
        codes = self.empty_codes(text.shape[0])[0]  # [B, group_size, channels]: a text position per row
        is_audio = text == self.special_tokens.empty
        if bool(is_audio.any()):
            codes[is_audio] = self.decode_patch(out.local_in[is_audio], audio_sampler, generator)
        return text, codes

    # --- weights ---

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Deterministic random weights as a fresh upstream model has them: normal(0, 0.02) matrices,
        zero biases and empty-id rows, unit norms. Drawn on the CPU, so every device gets the same."""
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, Qwen2RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                weight = torch.randn(module.weight.shape, generator=generator) * INIT_STD
                module.weight.copy_(weight)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if getattr(module, "padding_idx", None) is not None:
                    module.weight[module.padding_idx].zero_()

    def init_rotary(self, device: torch.device | str) -> None:
        """(Re)build the non-persistent RoPE buffers in float32 on ``device`` (they are not in checkpoints)."""
        for stack in (self.model, self.local_transformer, self.input_local_transformer):
            with torch.device(device):
                stack.rotary_emb = Qwen2RotaryEmbedding(stack.config)

    @classmethod
    def on_meta(cls, config: MiMoAudioConfig, special_tokens: SpecialTokens) -> MiMoAudioForCausalLM:
        """The model with no storage: for shapes, parameter counts, or to load weights into."""
        with torch.device("meta"):
            return cls(config, special_tokens)

    @classmethod
    def random(
        cls,
        config: MiMoAudioConfig,
        special_tokens: SpecialTokens,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> MiMoAudioForCausalLM:
        model = cls.on_meta(config, special_tokens).to_empty(device=device)
        model.reset_parameters(seed)
        model.to(dtype)
        model.init_rotary(device)
        return model


@dataclass(frozen=True)
class _PatchSchedule:
    channel_ranges: list[tuple[int, int]]  # step -> the channels [lo, hi) sampled at that step
    frame_major: list[int]  # sampling-order index of (frame 0, channel 0), (frame 0, channel 1), ...


def _patch_schedule(config: MiMoAudioConfig) -> _PatchSchedule:
    """Channel c's frame f is sampled at step f + delay[c] (upstream's window delay[c] <= t < delay[c] + group)."""
    if config.delays != sorted(config.delays):
        raise ConfigError(f"delay_pattern {config.delays} must not decrease from one channel to the next")
    ranges, order = [], {}
    for step in range(config.patch_steps):
        # Ascending delays make the channels active at a step consecutive.
        active = [c for c, delay in enumerate(config.delays) if delay <= step < delay + config.group_size]
        ranges.append((active[0], active[-1] + 1))
        for c in active:
            order[(step - config.delays[c], c)] = len(order)
    frame_major = [order[(frame, c)] for frame in range(config.group_size) for c in range(config.audio_channels)]
    return _PatchSchedule(ranges, frame_major)


# --- checkpoints ---


def load_mimo_audio(
    path_or_repo: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[MiMoAudioForCausalLM, PreTrainedTokenizerFast, SpecialTokens]:
    """Model, text tokenizer and special-token ids from a folder in the official layout (or a hub repo id).

    Weights are read memory-mapped straight into their final place; dtype defaults to bfloat16 on
    CUDA and float32 on CPU.
    """
    folder = resolve_checkpoint_dir(path_or_repo)
    config = MiMoAudioConfig.from_pretrained(folder)
    tokenizer = load_text_tokenizer(folder)
    special_tokens = SpecialTokens.from_tokenizer(tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens, the model only {config.vocab_size}"
        )
    device = torch.device(device)
    model = MiMoAudioForCausalLM.on_meta(config, special_tokens)
    load_weights(
        model,
        folder,
        device=device,
        dtype=dtype or pick_dtype("auto", device),
        ignore_unexpected=UNUSED_CHECKPOINT_KEYS,
    )
    model.init_rotary(device)
    return model, tokenizer, special_tokens


def official_config_json(config: MiMoAudioConfig) -> dict:
    return {"architectures": ["MiMoAudioModel"], "model_type": "qwen2", **config.to_dict()}


def write_tiny_checkpoint(folder: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A randomly initialised preset model (tiny or small) in the official layout: config.json,
    sharded safetensors with their index, and the stand-in text tokenizer."""
    if preset not in ("tiny", "small"):
        raise ConfigError(f"preset must be 'tiny' or 'small', got {preset!r}")
    folder = Path(folder)
    write_tiny_text_tokenizer(folder)
    special_tokens = SpecialTokens.from_tokenizer(load_text_tokenizer(folder))
    config = MiMoAudioConfig.preset(preset)
    model = MiMoAudioForCausalLM.random(config, special_tokens, seed=seed)
    (folder / "config.json").write_text(json.dumps(official_config_json(config), indent=2), encoding="utf-8")
    save_weights(model.state_dict(), folder, max_shard_bytes=TINY_SHARD_BYTES)
    return folder
