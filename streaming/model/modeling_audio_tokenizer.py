"""MiMo-Audio-Tokenizer in PyTorch: 24 kHz speech -> 25 Hz frames of RVQ codes -> 24 kHz speech.

Module and buffer names are the official checkpoint's key names (``encoder.*``, ``decoder.*``,
``decoder.vocoder.*``), so ``XiaomiMiMo/MiMo-Audio-Tokenizer`` loads unchanged. Written from the facts in
docs/mimo_audio.md §1-§3 and §10; what decides numerical parity with upstream:

* Encoder: log-mel (audio.py) -> conv stem (stride 2, 50 Hz) -> bidirectional RoPE transformer whose 3rd layer
  output is added to the last one -> LayerNorm -> k2/s2 conv down-sampling to 25 Hz -> LayerNorm -> residual VQ,
  always in float32 (upstream ``.float()``s the quantizer, so a bfloat16 model quantises with bf16-rounded
  codebooks in float32 math; loading in bfloat16 reproduces that).
* Audio longer than 60 s is cut into 6000-mel-frame segments encoded as ONE padded batch, like upstream: the
  shorter last segment then sees its padding through the conv stem, and its down-sampling input is padded with
  its last frame (docs/mimo_audio.md §10.5). A single segment has none of these effects.
* Decoder: RVQ sum -> ConvTranspose x2 -> GroupNorm(1, C) over the WHOLE decoded chunk -> 32 causal layers ->
  ConvTranspose x2 to a 100 Hz "mel" -> GroupNorm (statistics include the frame that is then trimmed) -> Vocos
  transformer with a [40 left, 10 right] sliding window -> ISTFT head with "same" padding: 960 samples per frame.
  Because of the GroupNorms, decoded audio depends on how codes are chunked: :meth:`MiMoAudioTokenizer.decode`
  uses upstream's non-overlapping 1500-frame (60 s) chunks; streaming is in codec_stream.py.
* Attention: torch SDPA with explicit boolean masks (causal, sliding window, padded rows = packed sequences).
  With flash-attn installed and half-precision CUDA tensors, ``flash_attn_varlen_func`` is used instead, as
  upstream does; both compute the same function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .audio import SAMPLE_RATE, SAMPLES_PER_FRAME, check_codes, log_mel
from .checkpoint import load_weights, pick_device, pick_dtype, resolve_checkpoint_dir, save_weights
from .configuration_audio_tokenizer import AudioTokenizerConfig

try:  # optional, CUDA only
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the installation
    flash_attn_func = flash_attn_varlen_func = None

# EMA training state of the codebooks: present in the official checkpoint, unused at inference.
EMA_BUFFERS = r"encoder\.quantizer\.vq\.layers\.\d+\._codebook\.(embed_avg|cluster_size|inited)"


# -- attention --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionMask:
    """Who attends to whom in a batch of ``length`` positions: per-row valid ``lengths`` (rows are packed
    sequences padded to a common length; None = all full), causal or not, and a ``(left, right)`` sliding window
    where -1 means unbounded (flash-attn's convention)."""

    length: int
    device: torch.device
    lengths: Tensor | None = None
    causal: bool = False
    window: tuple[int, int] = (-1, -1)

    @property
    def needs_dense(self) -> bool:
        return self.lengths is not None or self.window != (-1, -1)

    @cached_property
    def dense(self) -> Tensor:
        """Boolean ``[B or 1, 1, T, T]``, True = may attend. A padded query attends to itself only, so it stays
        finite (an all-masked row would be NaN, and NaN values leak through zero attention weights)."""
        allowed = _position_mask(self.length, self.causal, self.window, self.device)
        if self.lengths is None:
            return allowed
        pos = torch.arange(self.length, device=self.device)
        valid_key = pos[None, None, :] < self.lengths.to(self.device)[:, None, None]
        itself = torch.eye(self.length, dtype=torch.bool, device=self.device)
        return ((allowed[0] & valid_key) | itself).unsqueeze(1)


@lru_cache(maxsize=32)
@torch.inference_mode(False)
def _position_mask(length: int, causal: bool, window: tuple[int, int], device: torch.device) -> Tensor:
    """``[1, 1, T, T]`` mask from relative positions alone (cached: streaming decodes repeat the same lengths)."""
    pos = torch.arange(length, device=device)
    offset = pos[None, :] - pos[:, None]  # key - query
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    left, right = window
    if causal:
        allowed &= offset <= 0
    if left >= 0:
        allowed &= offset >= -left
    if right >= 0:
        allowed &= offset <= right
    return allowed[None, None]


def _use_flash(q: Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Scaled dot-product attention on ``[B, T, H, D]`` tensors; returns ``[B, T, H, D]``."""
    if _use_flash(q):
        return _flash_attend(q, k, v, mask)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if mask.needs_dense:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal)
    return out.transpose(1, 2)


def _flash_attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    window = tuple(mask.window)
    if mask.lengths is None:
        return flash_attn_func(q, k, v, causal=mask.causal, window_size=window)
    length = q.shape[1]
    valid = torch.arange(length, device=q.device)[None, :] < mask.lengths.to(q.device)[:, None]
    cu_seqlens = F.pad(mask.lengths.to(q.device).cumsum(0), (1, 0)).to(torch.int32)
    longest = int(mask.lengths.max())
    packed = flash_attn_varlen_func(
        q[valid], k[valid], v[valid], cu_seqlens, cu_seqlens, longest, longest, causal=mask.causal, window_size=window
    )
    out = torch.zeros_like(q)
    out[valid] = packed
    return out


@lru_cache(maxsize=32)
@torch.inference_mode(False)
def rope_cos_sin(
    length: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """RoPE tables for positions ``0..length-1`` (``[1, T, head_dim]``), computed in float32 then cast like
    upstream; positions restart at 0 for every sequence (relative attention makes offsets irrelevant). Cached;
    built outside inference mode so that the cached tensors also serve autograd-enabled calls.

    Upstream keeps the inverse frequencies in a buffer, which ``model.bfloat16()`` rounds: they are rounded to
    ``dtype`` here too (a no-op in float32), or bfloat16 results would differ from the official ones."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    inv_freq = inv_freq.to(dtype).float()
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)[None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    """Whisper-style projections (``k_proj`` has no bias) with RoPE on queries and keys."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttentionMask) -> Tensor:
        batch, length, dim = x.shape
        shape = (batch, length, self.heads, self.head_dim)
        q, k = apply_rotary_pos_emb(self.q_proj(x).view(shape), self.k_proj(x).view(shape), *rope, unsqueeze_dim=2)
        out = attend(q, k, self.v_proj(x).view(shape), mask)
        return self.out_proj(out.reshape(batch, length, dim))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, activation: str) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = ACT2FN[activation]

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttentionMask) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), rope, mask)
        x = x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
        if x.dtype in (torch.float16, torch.bfloat16):
            # Upstream clamps +-inf to finfo.max - 1000 when they appear; clamping always has the same effect
            # without a device sync per layer.
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


def _layers(config: AudioTokenizerConfig, count: int, dim: int, heads: int, ffn_dim: int) -> nn.ModuleList:
    return nn.ModuleList(TransformerLayer(dim, heads, ffn_dim, config.activation_function) for _ in range(count))


# -- residual vector quantizer ----------------------------------------------------------------------------
class Codebook(nn.Module):
    embed: Tensor  # a buffer

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.zeros(size, dim))

    def nearest(self, x: Tensor) -> Tensor:
        """Index of the closest code by Euclidean distance, expanded as upstream computes it
        (``|x|^2 - 2 x.E + |E|^2``, same rounding)."""
        distance = x.pow(2).sum(1, keepdim=True) - 2 * x @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return (-distance).max(dim=-1).indices


class VectorQuantization(nn.Module):
    """Upstream's per-stage wrapper; only its codebook has inference state (no projection: codebook_dim = dim)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self._codebook = Codebook(size, dim)


class ResidualVectorQuantization(nn.Module):
    def __init__(self, sizes: list[int], dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VectorQuantization(size, dim) for size in sizes)


class ResidualVectorQuantizer(nn.Module):
    """Greedy residual VQ over ``num_quantizers`` codebooks. Run in float32 (see the module docstring)."""

    def __init__(self, sizes: list[int], dim: int) -> None:
        super().__init__()
        self.vq = ResidualVectorQuantization(sizes, dim)

    def stages(self) -> list[Codebook]:
        return [stage._codebook for stage in self.vq.layers]  # type: ignore[misc]  # ModuleList is untyped

    def codebook(self, index: int) -> Tensor:
        return cast(Codebook, self.vq.layers[index]._codebook).embed

    def encode(self, x: Tensor, n_q: int) -> Tensor:
        """``[N, dim]`` -> codes ``[N, n_q]``."""
        residual = x.float()
        codes = []
        for stage in self.stages()[:n_q]:
            index = stage.nearest(residual)
            residual = residual - stage.embed[index]
            codes.append(index)
        return torch.stack(codes, dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[N, n_q]`` -> the sum of their code vectors ``[N, dim]`` (float32), codebooks in order."""
        out = torch.zeros((), device=codes.device)
        for index in range(codes.shape[1]):
            out = out + F.embedding(codes[:, index], self.codebook(index))
        return out


# -- encoder ----------------------------------------------------------------------------------------------
Frames = TypeVar("Frames", int, Tensor)  # a frame count, or a tensor of them


def _window(window: list[int]) -> tuple[int, int]:
    left, right = window
    return left, right


def stem_frames(mel_frames: Frames, config: AudioTokenizerConfig) -> Frames:
    """Frames after the conv stem (50 Hz): conv1 then the strided conv2, both with padding 1 as upstream."""
    after_conv1 = mel_frames + 3 - config.kernel_size
    return (after_conv1 + 2 - config.kernel_size) // config.stride_size + 1


class AudioEncoder(nn.Module):
    def __init__(self, config: AudioTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.d_model
        self.conv1 = nn.Conv1d(config.n_mels, dim, config.kernel_size, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, config.kernel_size, stride=config.stride_size, padding=1)
        self.layers = _layers(
            config, config.encoder_layers, dim, config.encoder_attention_heads, config.encoder_ffn_dim
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.down_sample_layer = nn.Sequential(
            nn.Conv1d(dim, dim, config.avg_pooler, config.avg_pooler, bias=False), nn.GELU()
        )
        self.down_sample_norm = nn.LayerNorm(dim)
        self.quantizer = ResidualVectorQuantizer(config.codebook_sizes, dim)

    def forward(self, mels: Tensor, mel_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Padded log-mels ``[B, n_mels, T]`` -> continuous 25 Hz features ``[B, T25, C]`` and their lengths."""
        config = self.config
        x = F.gelu(self.conv1(mels.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        length = x.shape[1]
        lengths = stem_frames(mel_lengths, config)
        mask = AttentionMask(
            length,
            x.device,
            lengths if bool((lengths < length).any()) else None,
            config.encoder_causal,
            _window(config.encoder_attn_window_size),
        )
        rope = rope_cos_sin(
            length, config.d_model // config.encoder_attention_heads, config.rope_theta, x.device, x.dtype
        )
        skip = None
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, mask)
            if config.encoder_skip_layer_id is not None and index == config.encoder_skip_layer_id - 1:
                skip = x
        x = self.layer_norm(x if skip is None else x + skip)
        if mask.lengths is not None:
            # Upstream's unpacking fills each row's padding with its last valid frame (not zeros).
            last = torch.minimum(torch.arange(length, device=x.device)[None, :], (lengths - 1)[:, None].to(x.device))
            x = torch.gather(x, 1, last[..., None].expand_as(x))
        x = F.pad(x, (0, 0, 0, -length % config.avg_pooler))
        x = self.down_sample_layer(x.transpose(1, 2)).transpose(1, 2)
        return self.down_sample_norm(x), -(-lengths // config.avg_pooler)


# -- decoder ----------------------------------------------------------------------------------------------
class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d -> GroupNorm(1, C) over all channels and ALL time steps -> trim ``k - s`` frames right."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        self.norm = nn.GroupNorm(1, out_channels)
        self.trim = max(0, kernel_size - stride)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, C_in]`` -> ``[B, T * stride, C_out]``; each row is one whole sequence."""
        x = self.norm(self.conv(x.transpose(1, 2)))
        return x[..., : x.shape[-1] - self.trim].transpose(1, 2)


class ISTFT(nn.Module):
    """Inverse STFT with "same" padding: overlap-add of windowed frames, trimmed by ``(n_fft - hop) / 2`` on each
    side and divided by the summed squared window, giving exactly ``hop`` samples per frame."""

    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.window: Tensor
        self.register_buffer("window", torch.hann_window(n_fft))
        self._envelopes: dict[int, Tensor] = {}  # frame count -> the divisor (one per window length decoded)

    def _overlap_add(self, frames: Tensor) -> Tensor:
        """``[B, T, n_fft]`` -> ``[B, T * hop]`` after the "same" trim. With ``n_fft = k * hop``, output slot
        ``t`` sums block ``j`` of frame ``t - j``: k shifted adds, several times faster than ``F.fold`` and
        accumulated in the same order."""
        batch, count, _ = frames.shape
        blocks = frames.view(batch, count, -1, self.hop_length)  # [B, T, k, hop]
        out = frames.new_zeros(batch, count + blocks.shape[2] - 1, self.hop_length)
        for shift in range(blocks.shape[2]):
            out[:, shift : shift + count] += blocks[:, :, shift]
        pad = (self.n_fft - self.hop_length) // 2
        return out.flatten(1)[:, pad:-pad]

    def _envelope(self, count: int) -> Tensor:
        """The summed squared window of ``count`` frames, computed in the window's dtype as upstream does; kept
        per frame count (a streaming decode's windows have a few lengths)."""
        envelope = self._envelopes.get(count)
        if envelope is None or (envelope.device, envelope.dtype) != (self.window.device, self.window.dtype):
            squared = self.window.square()[None, None, :].expand(1, count, -1)
            envelope = self._envelopes[count] = self._overlap_add(squared.contiguous())
        return envelope

    def forward(self, spec: Tensor) -> Tensor:
        """``[B, T, n_fft / 2 + 1]`` complex -> audio ``[B, T * hop]``."""
        frames = torch.fft.irfft(spec, self.n_fft, dim=-1, norm="backward") * self.window
        return self._overlap_add(frames) / self._envelope(spec.shape[1])


class ISTFTHead(nn.Module):
    def __init__(self, dim: int, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = ISTFT(n_fft, hop_length)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, dim]`` -> audio ``[B, T * hop]`` in ``x``'s dtype."""
        log_magnitude, phase = self.out(x).chunk(2, dim=-1)  # each [B, T, n_fft / 2 + 1]
        magnitude = torch.exp(log_magnitude).clip(max=1e2).float()  # upstream's guard against huge magnitudes
        # magnitude * (cos + i sin) without promoting the magnitude to complex: the same values, two passes fewer
        spec = torch.complex(magnitude * torch.cos(phase).float(), magnitude * torch.sin(phase).float())
        return self.istft(spec).to(x.dtype)


class TransformerVocos(nn.Module):
    def __init__(self, config: AudioTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.vocoder_dim
        self.embeddings = nn.Linear(config.n_mels, dim, bias=False)
        self.layers = _layers(
            config, config.vocoder_num_layers, dim, config.vocoder_attention_heads, config.vocoder_intermediate_dim
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.head = ISTFTHead(dim, config.nfft, config.hop_length)

    def forward(self, mel: Tensor) -> Tensor:
        """``[B, T100, n_mels]`` -> audio ``[B, T100 * hop]``."""
        config = self.config
        x = self.embeddings(mel)
        mask = AttentionMask(x.shape[1], x.device, window=_window(config.vocoder_attn_window_size))
        rope = rope_cos_sin(
            x.shape[1], config.vocoder_dim // config.vocoder_attention_heads, config.rope_theta, x.device, x.dtype
        )
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.head(self.layer_norm(x))


class AudioDecoder(nn.Module):
    def __init__(self, config: AudioTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.d_model
        self.dconv1 = CausalConvTranspose1d(dim, dim, config.avg_pooler, config.avg_pooler)
        self.layers = _layers(
            config, config.decoder_layers, dim, config.decoder_attention_heads, config.decoder_ffn_dim
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.dconv2 = CausalConvTranspose1d(dim, config.n_mels, config.decoder_kernel_size, config.decoder_stride_size)
        self.vocoder = TransformerVocos(config)

    def forward(self, hidden: Tensor) -> Tensor:
        """Quantised features ``[B, T, C]`` (each row one whole chunk) -> audio ``[B, T * 960]`` (float32)."""
        config = self.config
        x = self.dconv1(hidden.to(self.layer_norm.weight.dtype))
        mask = AttentionMask(
            x.shape[1], x.device, causal=config.decoder_causal, window=_window(config.decoder_attn_window_size)
        )
        rope = rope_cos_sin(
            x.shape[1], config.d_model // config.decoder_attention_heads, config.rope_theta, x.device, x.dtype
        )
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.vocoder(self.dconv2(self.layer_norm(x))).float()


# -- the tokenizer ----------------------------------------------------------------------------------------
def code_frames(num_samples: int, config: AudioTokenizerConfig | None = None) -> int:
    """Code frames for ``num_samples`` of 24 kHz audio: ``M = N // 240 + 1`` mel frames, ``(M - 1) // 2 + 1`` at
    50 Hz, ``ceil(. / 2)`` at 25 Hz, i.e. ``N // 960 + 1`` with the official shapes (60 s segments, being an even
    number of mel frames, add up to the same count)."""
    config = config or AudioTokenizerConfig()
    return -(-stem_frames(num_samples // config.hop_length + 1, config) // config.avg_pooler)


class MiMoAudioTokenizer(nn.Module):
    sample_rate = SAMPLE_RATE
    samples_per_frame = SAMPLES_PER_FRAME
    encode_segment_mel_frames = 6000  # 60 s, upstream's segment length for long inputs
    decode_chunk_frames = 1500  # 60 s, upstream's non-overlapping decode chunks

    def __init__(self, config: AudioTokenizerConfig) -> None:
        super().__init__()
        if (config.sampling_rate, config.samples_per_frame) != (self.sample_rate, self.samples_per_frame):
            raise ValueError("this implementation expects 24 kHz audio and 960 samples per code frame")
        self.config = config
        self.encoder = AudioEncoder(config)
        self.decoder = AudioDecoder(config)

    @property
    def quantizer(self) -> ResidualVectorQuantizer:
        return self.encoder.quantizer

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    @torch.inference_mode()
    def encode(self, wav: Tensor, n_q: int = 8) -> Tensor:
        """24 kHz mono float audio ``[N]`` -> codes ``[T, n_q]`` (int64, on the model's device)."""
        self._check_n_q(n_q)
        c = self.config
        mel = log_mel(
            torch.as_tensor(wav).to(self.device), c.n_mels, c.nfft, c.hop_length, c.sampling_rate, c.fmin, c.fmax
        )
        segments = mel.split(self.encode_segment_mel_frames, dim=1)
        lengths = torch.tensor([s.shape[1] for s in segments], device=self.device)
        batch = torch.stack([F.pad(s, (0, segments[0].shape[1] - s.shape[1])) for s in segments])
        hidden, frame_lengths = self.encoder(batch, lengths)
        hidden = torch.cat([row[:n] for row, n in zip(hidden, frame_lengths.tolist())])
        return self.quantizer.encode(hidden, n_q)

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes ``[T, n_q]`` -> 24 kHz audio ``[T * 960]`` (float32), in non-overlapping 1500-frame chunks."""
        codes = self.check_codes(codes)
        if codes.shape[0] == 0:
            return torch.zeros(0, device=self.device)
        chunks = codes.split(self.decode_chunk_frames)
        return torch.cat([self.decode_hidden(self.quantizer.decode(chunk)) for chunk in chunks])

    @torch.inference_mode()
    def decode_hidden(self, hidden: Tensor) -> Tensor:
        """One chunk of summed code vectors ``[T, C]`` -> audio ``[T * 960]``; the chunk is normalised as a whole."""
        return self.decoder(hidden[None])[0]

    def check_codes(self, codes: Tensor | np.ndarray) -> Tensor:
        """Codes as an int64 tensor on the model's device, or a ValueError saying what is wrong with them."""
        codes = torch.as_tensor(codes)
        if codes.ndim != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(
                f"codes must be an integer tensor [frames, codebooks], got {tuple(codes.shape)} {codes.dtype}"
            )
        self._check_n_q(codes.shape[1])
        return check_codes(codes.to(self.device), self.config.codebook_sizes[: codes.shape[1]])

    def _check_n_q(self, n_q: int) -> None:
        if not 1 <= n_q <= self.config.num_quantizers:
            raise ValueError(f"n_q must be between 1 and {self.config.num_quantizers}, got {n_q}")


# -- loading and the tiny preset --------------------------------------------------------------------------
def load_audio_tokenizer(
    path_or_repo: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> MiMoAudioTokenizer:
    """The official checkpoint layout (``config.json`` + safetensors) -> an eval-mode tokenizer.

    ``dtype`` None: bfloat16 on CUDA, float32 elsewhere. The codebooks are cast to float32 after loading.
    """
    folder = resolve_checkpoint_dir(path_or_repo)
    config = AudioTokenizerConfig.from_pretrained(folder)
    device = pick_device(str(device))
    dtype = dtype or pick_dtype("auto", device)
    with torch.device("meta"):
        model = MiMoAudioTokenizer(config)
    load_weights(model, folder, device=device, dtype=dtype, ignore_unexpected=[EMA_BUFFERS])
    model.quantizer.float()
    return model.requires_grad_(False).eval()


def _tiny_codebooks(config: AudioTokenizerConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """Random codebooks whose scale shrinks stage by stage, as residuals do, with the EMA buffers of the
    official layout."""
    state = {}
    for index, size in enumerate(config.codebook_sizes):
        prefix = f"encoder.quantizer.vq.layers.{index}._codebook."
        embed = torch.randn(size, config.d_model, generator=generator) * 0.7**index
        state.update(
            {
                prefix + "embed": embed,
                prefix + "embed_avg": embed.clone(),
                prefix + "cluster_size": torch.ones(size),
                prefix + "inited": torch.ones(1),
            }
        )
    return state


def write_tiny_tokenizer(folder: str | Path, seed: int = 0) -> Path:
    """Write the random-weight ``tiny`` preset in the official layout (config.json + model.safetensors with
    every official key, EMA buffers included). Deterministic for a seed; its decoder babbles."""
    folder = Path(folder)
    config = AudioTokenizerConfig.tiny()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MiMoAudioTokenizer(config)
    state = {**model.state_dict(), **_tiny_codebooks(config, generator)}
    save_weights(state, folder)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return folder
