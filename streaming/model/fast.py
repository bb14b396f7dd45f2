"""The MiMo-Audio hot path for serving: the backbone, patch encoder and patch decoder rewritten as
few, large ops over weights fused at build time, a static KV pool with per-row positions, batched
steps over sessions at different lengths, sync-free sampling, and CUDA graphs for the patch decoder.

``MiMoAudioForCausalLM`` (official names, transformers' Qwen2 layers) stays the reference: this
module reads its weights once (q/k/v -> one matrix with one bias, gate/up -> one matrix, stored
transposed so residual adds ride in ``addmm``; the patch decoder's heads and embedding tables
stacked per run of channels with one vocabulary size) and must agree with it (fp32 logits within
1e-4, greedy tokens and codes identical; the lm_head may read fewer bytes, see ``_Head``).
Everything here runs under ``torch.inference_mode`` and reads no tensor value on the host.

How a caller (the engine's step loop) uses it:
- one :class:`KVPool` slot per conversation; ``prefill`` appends a prompt or the user's audio,
  ``step`` advances every active row by one position, ``pool.truncate`` rolls a row back;
- pass text ids as CPU tensors (text vs audio positions are decided from them without a sync) and
  the previous ``decode_patch`` codes as they are, on the device;
- keep active slots packed (``allocate`` hands out the lowest free one) and pass them in ascending
  order: the attention then reads a view of the pool instead of gathering each row's cache;
- read the text tokens of all rows with one ``tolist()`` per step; build a :class:`RowSampling` once
  per set of rows to avoid re-uploading parameters each step;
- one step loop per FastMiMoAudio: the patch decoder's cache and CUDA graphs are shared state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2Model

from .configuration_mimo_audio import ConfigError
from .fast_sampling import RowSampling, best_allowed, race_noises, sample_rows
from .kv_pool import KVPool
from .modeling_mimo_audio import MiMoAudioForCausalLM
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

Compile = Literal["auto", "on", "off"]
HeadPrecision = Literal["auto", "model", "fp16", "bf16", "int8"]  # the lm_head's weights (see _Head)
WeightPrecision = Literal["auto", "model", "fp16"]  # the layers' weights (see _Linear)
PatchSampling = RowSampling | SamplingParams
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# A stack whose layers hold less stays in the CPU's caches (op-bound): there fp16 weights do not pay, and the
# patch decoder's RoPE is folded into its weights; at least this much, weights='auto' reads them in fp16.
FP16_MIN_BYTES = 4 << 20
ROW_INDEX_SETS = 256  # sets of step rows whose index tensors are kept


@dataclass
class StepOutput:
    text_logits: Tensor  # [B, vocab] float32, at each row's last new position
    local_in: Tensor  # [B, local_dim]: the patch decoder's first input for each row


# --- fused weights ---


def fbgemm_fp16_available() -> bool:
    """Whether this torch has fbgemm's fp16-weight GEMM (x86 CPU builds): weights stored in fp16, float32
    arithmetic. A bfloat16 checkpoint's weights convert to fp16 exactly (8 mantissa bits fit in 11) unless
    tinier than fp16's normal range; activations stay float32, so fp16's range is no concern."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class _Linear:
    """One projection y = x W^T + (bias or residual), stored as the CPU reads it fastest: transposed for
    ``addmm`` (the bias or residual rides in it), or packed for fbgemm's fp16 GEMM (half the bytes)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, fp16: bool) -> None:
        weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.t: Tensor | None = None if fp16 else weight.t()
        self.packed: Any = torch.ops.quantized.linear_prepack_fp16(weight.float(), self.bias) if fp16 else None

    def __call__(self, x: Tensor, residual: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        if out is not None:  # only the mm/addmm form writes in place (the op-bound patch decoder's buffers)
            assert self.t is not None and residual is None
            return torch.mm(x, self.t, out=out) if self.bias is None else torch.addmm(self.bias, x, self.t, out=out)
        if self.packed is not None:
            y = torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
            return y if residual is None else y.add_(residual)
        assert self.t is not None and (residual is None or self.bias is None)
        base = self.bias if residual is None else residual
        return torch.mm(x, self.t) if base is None else torch.addmm(base, x, self.t)


@dataclass
class _Layer:
    """One Qwen2 decoder layer with fused projections (q|k|v, gate|up)."""

    qkv: _Linear  # D -> (heads + 2 kv_heads) * head_dim, with the three biases
    o: _Linear
    gate_up: _Linear  # D -> 2 * ffn
    down: _Linear
    input_norm: Tensor
    post_norm: Tensor


@dataclass
class _Stack:
    """A Qwen2 stack's fused layers and the shapes its forward needs."""

    layers: list[_Layer]
    norm: Tensor
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    inv_freq: Tensor  # float32, as transformers' default RoPE computes it

    @classmethod
    def from_qwen2(cls, model: Qwen2Model, fp16: bool = False) -> _Stack:
        """``fp16``: the projections in fbgemm's fp16 GEMM (see :class:`_Linear`)."""
        config = model.config
        if config.hidden_act != "silu":
            raise ConfigError(f"the fast path implements the silu MLP only, got {config.hidden_act!r}")
        layers = []
        for layer in cast(list[Qwen2DecoderLayer], list(model.layers)):
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(
                _Layer(
                    qkv=_Linear(
                        torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                        torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
                        fp16,
                    ),
                    o=_Linear(attn.o_proj.weight, None, fp16),
                    gate_up=_Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None, fp16),
                    down=_Linear(mlp.down_proj.weight, None, fp16),
                    input_norm=layer.input_layernorm.weight.detach(),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                )
            )
        return cls(
            layers=layers,
            norm=model.norm.weight.detach(),
            eps=config.rms_norm_eps,
            heads=config.num_attention_heads,
            kv_heads=int(config.num_key_value_heads or config.num_attention_heads),
            head_dim=config.head_dim,
            inv_freq=model.rotary_emb.inv_freq.float(),  # the model's own, so every device rounds alike
        )

    @property
    def all_heads(self) -> int:
        return self.heads + 2 * self.kv_heads

    def rope_table(self, positions: int, dtype: torch.dtype) -> Tensor:
        """[positions, 2, head_dim]: cos, and sin with rotate_half's sign folded in, at positions 0...;
        computed as transformers does (float32 angles), then cast like its ``position_embeddings``."""
        angles = torch.arange(positions, device=self.inv_freq.device).float()[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        half = self.head_dim // 2
        sin = angles.sin()
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        return torch.stack([angles.cos(), sin], dim=1).to(dtype)

    def rope_per_head(self, table: Tensor) -> tuple[Tensor, Tensor]:
        """[N, 2, hd] -> cos and sin [N, all_heads, hd]: RoPE on the q and k heads, the identity
        (cos 1, sin 0: exact) on the v heads, so that one rotation covers the fused q/k/v output."""
        is_v = torch.arange(self.all_heads, device=table.device) >= self.heads + self.kv_heads
        identity = torch.tensor([1.0, 0.0], device=table.device, dtype=table.dtype)[:, None, None]
        full = torch.where(is_v[:, None], identity, table[:, :, None])  # [N, 2, all_heads, hd]
        return full[:, 0], full[:, 1]


def _on(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device`` (asynchronously), without an op where it is there already."""
    return tensor if tensor.device == device else tensor.to(device, non_blocking=True)


def _weight(module: torch.nn.Module) -> Tensor:
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight.detach()


def _norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen2's RMSNorm: normalise in float32, cast back to the input dtype, then scale."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


# (rotated q|k|v heads [B, all_heads, T, hd]) -> attention output [B, heads, T, hd]; it stores k|v where they belong.
Attend = Callable[[Tensor], Tensor]


def _layer(
    stack: _Stack,
    layer: _Layer,
    x: Tensor,
    batch: int,
    cos: Tensor,
    sin: Tensor,
    attend: Attend,
    rotated_out: Tensor | None = None,
    rotated_qkv: tuple[_Linear, Tensor] | None = None,
    gate_up_out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """One decoder layer on x [B * T, D] (rows of B sequences of T positions). ``cos``/``sin`` broadcast
    to [B, all_heads, 1, hd] when T is 1, else to [B, T, all_heads, hd]. With T = 1, ``rotated_out``
    (a [B, all_heads, 1, hd] view of a cache) receives the rotated q|k|v directly. ``rotated_qkv`` (a q|k|v
    projection with this position's RoPE folded in, and a [B, all_heads * hd] view of the cache) replaces the
    projection and the rotation: ``attend`` then reads the cache. ``gate_up_out`` (a [B, 2 * ffn] buffer and its gate
    and up halves) receives the gate|up projection, which then needs no split."""
    h = _norm(x, layer.input_norm, stack.eps)
    if x.dtype != h.dtype:  # the patch encoder's bfloat16 input: the residual continues in the model dtype
        x = x.to(h.dtype)
    single = x.shape[0] == batch  # one position per row: [B, 1, heads, hd] is [B, heads, 1, hd] in memory
    if rotated_qkv is not None:
        projection, flat_out = rotated_qkv
        rotated = projection(h, out=flat_out)
    else:
        qkv = layer.qkv(h)
        shape = (batch, stack.all_heads, 1, -1) if single else (batch, -1, stack.all_heads, stack.head_dim)
        qkv = qkv.view(shape)
        rolled = qkv.roll(stack.head_dim // 2, -1)
        if rotated_out is None:
            rotated = torch.addcmul(qkv * cos, rolled, sin)  # x cos + rotate_half(x) sin
        else:
            rotated = torch.addcmul(qkv * cos, rolled, sin, out=rotated_out)
    attn = attend(rotated if single else rotated.transpose(1, 2))
    attn = attn.reshape(batch, -1) if single else attn.transpose(1, 2).reshape(x.shape[0], -1)
    x = layer.o(attn, residual=x)
    h = _norm(x, layer.post_norm, stack.eps)
    if gate_up_out is None:
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
    else:
        buffer, gate, up = gate_up_out
        layer.gate_up(h, out=buffer)
    return layer.down(F.silu(gate) * up, residual=x)


@dataclass
class _HeadGroup:
    """Consecutive patch-decoder channels with one vocabulary size, sampled together."""

    heads_t: Tensor  # [n, local_dim, width]
    greedy_bias: Tensor  # [n, 1, width]: -inf on each channel's empty id
    empty_ban: Tensor  # [n, 1, width] bool
    tables: Tensor  # [n, width, input_local_dim]: the channels' speech embeddings
    rows: Tensor  # [n, 1]: 0..n-1, to index ``tables`` by (channel, code)


@dataclass
class _DecoderStep:
    """What one patch-decoder step reads, made once at build: its RoPE and its channels' head groups."""

    cos: Tensor  # [1, all_heads, 1, hd]
    sin: Tensor
    groups: list[_HeadGroup]
    greedy_groups: list[_HeadGroup]  # the same, or one group padded to the widest vocabulary (op-bound stacks)
    rotated_qkv: list[_Linear] | None  # per layer, q|k|v with this step's RoPE folded in (op-bound stacks only)


class _DecoderCache:
    """The patch decoder's rotated q|k|v [layers, steps, B, all_heads, hd]. Each (layer, step)'s write slot
    (as [B, all_heads, 1, hd] and as [B, all_heads * hd]) and read views are made once, and the RoPE op or
    the RoPE-folded projection writes into the slot: a step makes no view, split or copy op for its cache."""

    def __init__(self, buffer: Tensor, heads: int, kv_heads: int) -> None:
        self.buffer = buffer
        layers, steps, batch = buffer.shape[:3]
        self.slots = [[buffer[layer, step].unsqueeze(2) for step in range(steps)] for layer in range(layers)]
        self.flat_slots = [[buffer[layer, step].view(batch, -1) for step in range(steps)] for layer in range(layers)]
        self.views = [
            [
                (
                    buffer[layer, step, :, :heads].unsqueeze(2),
                    buffer[layer, : step + 1, :, heads : heads + kv_heads].permute(1, 2, 0, 3),
                    buffer[layer, : step + 1, :, heads + kv_heads :].permute(1, 2, 0, 3),
                )
                for step in range(steps)
            ]
            for layer in range(layers)
        ]

    def attend(self, layer: int, step: int) -> Attend:
        q, keys, values = self.views[layer][step]
        return lambda _rotated: F.scaled_dot_product_attention(q, keys, values)


def _merged(groups: list[_HeadGroup]) -> _HeadGroup:
    """Head groups of different vocabulary sizes as one, each padded to the widest: padding columns have zero
    weights, a -inf greedy bias and zero embeddings. For greedy decoding of a small (op-bound) patch decoder, where
    one batched head is cheaper than a few more ops."""
    width = max(group.heads_t.shape[2] for group in groups)

    def pad(tensor: Tensor, dim: int, value: float | bool) -> Tensor:
        shape = list(tensor.shape)
        shape[dim] = width - shape[dim]
        return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)

    heads = torch.cat([pad(group.heads_t, 2, 0.0) for group in groups])
    return _HeadGroup(
        heads_t=heads,
        greedy_bias=torch.cat([pad(group.greedy_bias, 2, float("-inf")) for group in groups]),
        empty_ban=torch.cat([pad(group.empty_ban, 2, True) for group in groups]),
        tables=torch.cat([pad(group.tables, 1, 0.0) for group in groups]),
        rows=torch.arange(heads.shape[0], device=heads.device)[:, None],
    )


# --- lm_head ---


class _Head:
    """The 151,680-row text head: x [B, hidden] -> float32 logits, reading as few weight bytes as pays.

    Measured at 1 thread (README "Fast path"): on a CPU with AVX512-BF16/AMX, int8 weight-only
    (``torch._weight_int8pack_mm``, per-row scales) is fastest up to a batch of 4 rows and oneDNN's prepacked
    bf16 GEMM above that; on an AVX2-only x86 CPU (no bf16 in hardware: a bf16 GEMM is 4x slower than fp32
    there) fbgemm's fp16-weight GEMM beats int8 weight-only at every batch size, and is the more exact of the
    two; plain fp32 is slowest everywhere. ``auto`` takes those on a CPU with a float32 model (int8 where
    neither exists), bf16 on CUDA (whatever the model dtype), and the model dtype otherwise."""

    INT8_UP_TO_ROWS = 4

    def __init__(self, weight: Tensor, precision: HeadPrecision):
        if precision not in ("auto", "model", "fp16", "bf16", "int8"):
            raise ValueError(f"head precision must be auto, model, fp16, bf16 or int8, got {precision!r}")
        weight = weight.detach()
        on_cpu = weight.device.type == "cpu"
        if precision == "fp16" and not (on_cpu and fbgemm_fp16_available()):
            raise ConfigError("an fp16 head needs fbgemm's fp16 GEMM: an x86 CPU build of torch")
        self.precision = mode = _auto_head(weight) if precision == "auto" else precision
        self.weight = weight if mode == "model" else None
        self.fp16 = _Linear(weight, None, fp16=True) if mode == "fp16" else None
        self.int8: tuple[Tensor, Tensor] | None = None  # int8 rows and their bf16 scales
        self.bf16: Tensor | None = None
        self.packed: Tensor | None = None
        if "int8" in mode:
            scale = weight.float().abs().amax(dim=1).clamp_min(1e-12) / 127.0
            rows = (weight.float() / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
            self.int8 = (rows, scale.to(torch.bfloat16))
        if "bf16" in mode:
            self.bf16 = weight.to(torch.bfloat16)
            if on_cpu and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.bf16, self.INT8_UP_TO_ROWS * 2)

    def __call__(self, x: Tensor) -> Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight).float()
        if self.fp16 is not None:
            return self.fp16(x if x.dtype == torch.float32 else x.float())
        if self.int8 is not None and (self.bf16 is None or x.shape[0] <= self.INT8_UP_TO_ROWS):
            return torch._weight_int8pack_mm(x.to(torch.bfloat16), *self.int8).float()
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, None, "none", [], "").float()
        assert self.bf16 is not None  # "bf16" and "int8+bf16" keep it
        return F.linear(x.to(torch.bfloat16), self.bf16).float()


def _auto_head(weight: Tensor) -> str:
    if weight.device.type != "cpu":
        return "bf16"
    if weight.dtype != torch.float32:
        return "model"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "int8+bf16"
    return "fp16" if fbgemm_fp16_available() else "int8"


# --- the fast model ---


class FastMiMoAudio:
    """The MiMo-Audio hot path with few, large ops, built from a loaded ``MiMoAudioForCausalLM``
    (the original module keeps the official names and stays usable as the reference)."""

    def __init__(
        self,
        model: MiMoAudioForCausalLM,
        pool: KVPool,
        *,
        compile: Compile = "auto",
        head_precision: HeadPrecision = "auto",
        weights: WeightPrecision = "auto",
    ) -> None:
        config = model.config
        if pool.config.num_hidden_layers != config.num_hidden_layers or pool.capacity < 1:
            raise ValueError("the KV pool was built for another model")
        self.config, self.pool = config, pool
        self.device, self.dtype = model.device, model.hidden_states_downcast.weight.dtype
        if pool.device != self.device or pool.dtype != self.dtype:
            raise ValueError(f"KV pool on {pool.device}/{pool.dtype}, model on {self.device}/{self.dtype}")
        self.empty_id = model.special_tokens.empty
        self.weights = _resolve_weights(weights, self.device, self.dtype)
        with torch.inference_mode():
            self._build(model, head_precision)
        self.compile = _resolve_compile(compile, self.device)
        self._graphs: dict[int, _PatchGraph] = {}
        if self.compile:
            self._capture_patch_graphs(max(1, pool.slots))

    @torch.inference_mode()
    def _build(self, model: MiMoAudioForCausalLM, head_precision: HeadPrecision) -> None:
        config = self.config
        self.backbone = _Stack.from_qwen2(model.model, self._fp16(model.model))
        self.encoder = _Stack.from_qwen2(model.input_local_transformer, self._fp16(model.input_local_transformer))
        decoder_fp16 = self._fp16(model.local_transformer)
        self.decoder = _Stack.from_qwen2(model.local_transformer, decoder_fp16)
        fold_decoder_rope = self.device.type == "cpu" and not decoder_fp16 and _op_bound(model.local_transformer)
        self.embed_tokens = model.model.embed_tokens.weight.detach()
        self.lm_head = _Head(model.lm_head.weight, head_precision)
        self.downcast = model.hidden_states_downcast.weight.detach()
        self.group_downcast = model.speech_group_downcast.weight.detach()
        to_local = model.speech_embeddings_to_local
        self.to_local = None if to_local is None else to_local.weight.detach()
        # cos and sin per head at every position of a slot, [capacity, 2, all_heads, 1, hd]: a step reads its rows'
        # with one index_select instead of building them.
        per_head = self.backbone.rope_per_head(self.backbone.rope_table(self.pool.capacity, self.dtype))
        self.backbone_rope = torch.stack(per_head, dim=1)[:, :, :, None]
        # The patch encoder is fed bfloat16 channel sums, so transformers casts its RoPE table to bfloat16.
        encoder_rope = self.encoder.rope_table(config.group_size, torch.bfloat16).to(self.dtype)
        encoder_cos, encoder_sin = self.encoder.rope_per_head(encoder_rope)
        self.encoder_rope = (encoder_cos[None], encoder_sin[None])
        decoder_rope = self.decoder.rope_per_head(self.decoder.rope_table(config.patch_steps, self.dtype))
        # All channels' speech embeddings in one table; a code's row is offset[channel] + code.
        sizes = config.speech_vocab_sizes
        self.code_offsets = torch.tensor([sum(sizes[:c]) for c in range(len(sizes))], device=self.device)
        speech_table = torch.cat([_weight(table) for table in model.speech_embeddings])
        empty_rows = self.code_offsets + torch.tensor(config.speech_empty_ids, device=self.device)
        self.speech_table_masked = speech_table.index_fill(0, empty_rows, 0.0)  # empty ids add nothing
        # The patch decoder's heads and embedding tables, stacked per run of channels with one vocabulary size
        # (1025 x 2, 129 x 6: no padding, so no byte is read for nothing); greedy bias -inf on the empty ids.
        runs, start = [], 0
        for channel in range(1, len(sizes) + 1):
            if channel == len(sizes) or sizes[channel] != sizes[start]:
                runs.append((start, channel))
                start = channel
        self.decoder_steps = []
        for step, (lo, hi) in enumerate(model._schedule.channel_ranges):
            groups = [
                self._head_group(model, max(lo, first), min(hi, last))
                for first, last in runs
                if max(lo, first) < min(hi, last)
            ]
            cos, sin = (t[step][None, :, None] for t in decoder_rope)
            rotated = self._rotated_qkv(step) if fold_decoder_rope else None
            greedy = [_merged(groups)] if fold_decoder_rope and len(groups) > 1 else groups
            self.decoder_steps.append(
                _DecoderStep(cos=cos, sin=sin, groups=groups, greedy_groups=greedy, rotated_qkv=rotated)
            )
        self.frame_major = torch.tensor(model._schedule.frame_major, device=self.device)
        self.speech_sizes_cpu = torch.tensor(sizes)
        self._decoder_caches: dict[int, _DecoderCache] = {}
        self._row_indices: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
        self._gate_up_buffers: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
        self._arange = torch.arange(self.pool.capacity, device=self.device)

    def _fp16(self, stack: Qwen2Model) -> bool:
        """Whether a stack's projections go to fbgemm's fp16 GEMM: always with weights 'fp16'; with 'auto' when
        its layers hold at least FP16_MIN_BYTES (smaller ones stay in the cache, where fbgemm's per-call cost
        outweighs the bytes it saves: measured, the tiny preset's patch decoder takes 1.8x as long in fp16)."""
        if self.weights != "auto":
            return self.weights == "fp16"
        return not _op_bound(stack)

    def _rotated_qkv(self, step: int) -> list[_Linear]:
        """The patch decoder's q|k|v projections with step ``step``'s RoPE applied to their rows: the decoder's
        positions are the same 11 in every call, so rotating the weights once replaces 4 ops per layer and step
        (view, roll, mul, addcmul). Used on the CPU where the decoder is small (op-bound: its 11 copies of q|k|v
        stay cheap), not where it is weight-bound (fp16) nor on CUDA (one graph replay)."""
        stack = self.decoder
        table = stack.rope_table(self.config.patch_steps, self.dtype)[step]  # [2, hd]
        cos, sin = (t[0] for t in stack.rope_per_head(table[None]))  # [all_heads, hd]

        def rope(rows: Tensor) -> Tensor:
            """x cos + rotate_half(x) sin along dim 1 of rows [all_heads, hd, ...]: each output's weight row."""
            shape = (*cos.shape, *[1] * (rows.dim() - 2))
            return rows * cos.view(shape) + rows.roll(stack.head_dim // 2, 1) * sin.view(shape)

        projections = []
        for layer in stack.layers:
            assert layer.qkv.t is not None and layer.qkv.bias is not None
            weight = layer.qkv.t.t().reshape(stack.all_heads, stack.head_dim, -1)  # [heads, hd, in]
            bias = layer.qkv.bias.view(stack.all_heads, stack.head_dim)
            projections.append(_Linear(rope(weight).flatten(0, 1), rope(bias).flatten(), fp16=False))
        return projections

    def _head_group(self, model: MiMoAudioForCausalLM, lo: int, hi: int) -> _HeadGroup:
        """Channels lo..hi-1 (one vocabulary size) of the patch decoder: stacked heads and embedding tables."""
        heads = torch.stack([_weight(model.local_transformer_lm_heads[c]) for c in range(lo, hi)])
        empty = torch.tensor(self.config.speech_empty_ids[lo:hi], device=self.device)
        ban = torch.arange(heads.shape[1], device=self.device) == empty[:, None, None]  # [n, 1, width]
        return _HeadGroup(
            heads_t=heads.transpose(1, 2),
            greedy_bias=torch.zeros(ban.shape, device=self.device, dtype=self.dtype).masked_fill(ban, float("-inf")),
            empty_ban=ban,
            tables=torch.stack([_weight(model.speech_embeddings[c]) for c in range(lo, hi)]),
            rows=torch.arange(hi - lo, device=self.device)[:, None],
        )

    # --- inputs ---

    def _check_ids(
        self, text_ids: Tensor | list[int], codes: Tensor, batch_shape: tuple[int, ...], check_codes: bool
    ) -> list[int]:
        """Shapes and id ranges, on the CPU; returns the text ids as ints. A step's codes are not read
        (they come from :meth:`decode_patch`, which samples only valid ids), so that nothing syncs."""
        config = self.config
        want = (*batch_shape, config.group_size, config.audio_channels)
        shape = (len(text_ids),) if isinstance(text_ids, list) else tuple(text_ids.shape)
        if shape != batch_shape or tuple(codes.shape) != want:
            raise ValueError(
                f"expected text ids {list(batch_shape)} and codes {list(want)}, "
                f"got {list(shape)} and {list(codes.shape)}"
            )
        ids = text_ids if isinstance(text_ids, list) else text_ids.tolist()  # callers pass CPU ids: no sync
        if min(ids) < 0 or max(ids) >= config.vocab_size:
            raise ValueError(f"text ids must lie in [0, {config.vocab_size})")
        if check_codes:
            audio = [i for i, token in enumerate(ids) if token == self.empty_id]
            picked = codes[audio]
            if len(audio) and (picked.min() < 0 or (picked >= self.speech_sizes_cpu).any()):
                raise ValueError(
                    f"audio codes must lie in [0, vocab size of their channel {config.speech_vocab_sizes})"
                )
        return ids

    def _embed(self, ids: list[int], codes: Tensor) -> Tensor:
        """Text ids (as ints) and codes [N, group, channels] -> [N, hidden] backbone inputs."""
        audio = [i for i, token in enumerate(ids) if token == self.empty_id]
        if len(audio) == len(ids):
            return self.embed_patches(_on(codes, self.device))  # in the model dtype
        text = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        embeds = F.embedding(text, self.embed_tokens)
        if not audio:
            return embeds
        index = torch.tensor(audio, dtype=torch.long).to(self.device, non_blocking=True)
        patches = self.embed_patches(_on(codes, self.device).index_select(0, index))
        return embeds.index_copy(0, index, patches.to(embeds.dtype))

    def embed_patches(self, codes: Tensor) -> Tensor:
        """The patch encoder, batched over N patches: codes [N, group, channels] -> [N, hidden]."""
        n, group = codes.shape[:2]
        rows = F.embedding(codes + self.code_offsets, self.speech_table_masked)  # [N, group, channels, dim]
        # The channel sum is rounded to bfloat16 after every addition, whatever the model dtype, as upstream does.
        first, *others = rows.unbind(2)
        frames = first.to(torch.bfloat16)
        for other in others:
            frames += other
        stack = self.encoder
        causal = not self.config.input_full_attention

        def attend(qkv: Tensor) -> Tensor:
            q, keys, values = qkv.split([stack.heads, stack.kv_heads, stack.kv_heads], dim=1)
            return F.scaled_dot_product_attention(q, keys, values, is_causal=causal)

        x = frames.view(n * group, -1)
        # a step's few patches reuse buffers; a prefill's many (of any count) do not keep one
        gate_up = self._gate_up_out(stack, n * group) if n <= self.pool.slots else None
        for layer in stack.layers:
            x = _layer(stack, layer, x, n, self.encoder_rope[0], self.encoder_rope[1], attend, gate_up_out=gate_up)
        x = _norm(x, stack.norm, stack.eps)
        return F.linear(x.view(n, -1), self.group_downcast)

    # --- backbone ---

    @torch.inference_mode()
    def prefill(self, slot: int, text_ids: Tensor, codes: Tensor) -> StepOutput:
        """Append T positions (text_ids Long[T], codes Long[T, group, channels]) to ``slot``; returns the
        output at the last one (B=1)."""
        if text_ids.dim() != 1 or text_ids.shape[0] == 0:
            raise ValueError(f"expected text ids [T>0], got shape {list(text_ids.shape)}")
        count = text_ids.shape[0]
        ids = self._check_ids(text_ids.cpu(), codes, (count,), check_codes=codes.device.type == "cpu")
        start = self.pool.length(slot)
        end = start + count
        if end > self.pool.capacity:
            raise ValueError(f"slot {slot} holds {start} of {self.pool.capacity} positions: no room for {count} more")
        cos, sin = self.backbone_rope[start:end].unbind(1)  # [T, all_heads, 1, hd]
        if count > 1:  # [1, T, all_heads, hd]: broadcast over the layer's [B, T, all_heads, hd]
            cos, sin = cos[None, :, :, 0], sin[None, :, :, 0]
        mask = None
        if start:  # causal, shifted by the positions already in the slot
            mask = torch.arange(end, device=self.device) <= torch.arange(start, end, device=self.device)[:, None]
        kv_heads = self.backbone.kv_heads

        def attend(index: int) -> Attend:
            def run(qkv: Tensor) -> Tensor:
                q, kv = qkv.split([self.backbone.heads, 2 * kv_heads], dim=1)
                slot_kv = self.pool.layer(index)[slot]
                slot_kv[:, start:end] = kv[0]
                keys, values = slot_kv[None, :, :end].split(kv_heads, dim=1)
                return F.scaled_dot_product_attention(q, keys, values, mask, is_causal=not start, enable_gqa=True)

            return run

        x = self._embed(ids, codes)
        for index, layer in enumerate(self.backbone.layers):
            x = _layer(self.backbone, layer, x, 1, cos, sin, attend(index))
        self.pool._advance([slot], count)
        return self._outputs(x[-1:])

    @torch.inference_mode()
    def step(self, slots: Sequence[int], text_ids: Tensor | list[int], codes: Tensor) -> StepOutput:
        """One new position per row (rows may sit at different lengths): text_ids Long[B] (CPU) or B ints
        (the step loop's, read nowhere), codes Long[B, group, channels]. Row i equals
        ``prefill(slots[i], text_ids[i:i+1], codes[i:i+1])``."""
        slots = list(slots)
        batch = len(slots)
        if batch == 0 or len(set(slots)) != batch:
            raise ValueError(f"step needs distinct slots, got {slots}")
        ids = self._check_ids(text_ids if isinstance(text_ids, list) else text_ids.cpu(), codes, (batch,), False)
        lengths = self.pool.lengths(slots)
        if max(lengths) >= self.pool.capacity:
            raise ValueError(f"a slot is full ({self.pool.capacity} positions)")
        rows, ones = self._row_index(slots)
        positions = self.pool.lengths_device.index_select(0, rows)
        cos, sin = self.backbone_rope.index_select(0, positions).unbind(1)  # [B, all_heads, 1, hd]
        span = max(lengths) + 1
        mask = None  # rows of one length (one row, say) attend to every position of the window
        if min(lengths) < max(lengths):
            mask = torch.le(self._arange[:span], positions.view(batch, 1, 1, 1))  # [B, 1, 1, span]
        first = min(slots)
        packed = slots == list(range(first, first + batch))  # the rows' caches are one view of the pool
        kv_heads = self.backbone.kv_heads

        def attend(index: int) -> Attend:
            def run(qkv: Tensor) -> Tensor:
                q, kv = qkv.split([self.backbone.heads, 2 * kv_heads], dim=1)
                layer_kv = self.pool.layer(index)
                layer_kv[rows, :, positions] = kv[:, :, 0]
                window = layer_kv[first : first + batch, :, :span] if packed else layer_kv[rows, :, :span]
                keys, values = window.split(kv_heads, dim=1)
                # One query position: a kv head's query heads attend as that many positions (heads are grouped
                # as repeat_kv groups them), so K/V are read once per kv head instead of repeated per query head.
                grouped = q.view(batch, kv_heads, -1, q.shape[-1])
                return F.scaled_dot_product_attention(grouped, keys, values, mask)

            return run

        x = self._embed(ids, codes)
        gate_up = self._gate_up_out(self.backbone, batch)
        for index, layer in enumerate(self.backbone.layers):
            x = _layer(self.backbone, layer, x, batch, cos, sin, attend(index), gate_up_out=gate_up)
        for slot in slots:
            self.pool._lengths[slot] += 1
        self.pool.lengths_device.index_add_(0, rows, ones)
        return self._outputs(x)

    def _row_index(self, slots: list[int]) -> tuple[Tensor, Tensor]:
        """The slots as a device tensor, and ones of its length: made once per set of slots (a few hundred sets
        kept: sessions come and go, and the sets of a long-running engine's rows are many)."""
        key = tuple(slots)
        if key not in self._row_indices:
            if len(self._row_indices) >= ROW_INDEX_SETS:
                self._row_indices.clear()
            rows = torch.tensor(slots, dtype=torch.long, device=self.device)
            self._row_indices[key] = (rows, torch.ones_like(rows))
        return self._row_indices[key]

    def _outputs(self, last: Tensor) -> StepOutput:
        """The final norm, lm_head and downcast at each row's last position only."""
        hidden = _norm(last, self.backbone.norm, self.backbone.eps)
        return StepOutput(text_logits=self.lm_head(hidden), local_in=F.linear(hidden, self.downcast))

    # --- sampling ---

    @torch.inference_mode()
    def sample_text(
        self,
        logits: Tensor,
        sampling: PatchSampling,
        banned: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Text tokens Long[B] on the device, sync-free; ``banned`` bool [B, vocab] or [vocab]."""
        rows = (
            sampling if isinstance(sampling, RowSampling) else RowSampling.build(sampling, logits.shape[0], self.device)
        )
        return sample_rows(logits, rows, banned, generator)

    # --- patch decoder ---

    @torch.inference_mode()
    def decode_patch(
        self, local_in: Tensor, sampling: PatchSampling, generator: torch.Generator | None = None
    ) -> Tensor:
        """[B, local_dim] -> undelayed codes Long[B, group, channels] on the device; empty ids never sampled.
        On CUDA with graphs captured (and no explicit generator) this is one graph replay."""
        batch = local_in.shape[0]
        rows = sampling if isinstance(sampling, RowSampling) else RowSampling.build(sampling, batch, self.device)
        if self._graphs and generator is None:
            bucket = next((size for size in sorted(self._graphs) if size >= batch), None)
            if bucket is not None:
                return self._graphs[bucket](local_in, rows)
        return self._decode_patch(local_in, rows, generator)

    def _decode_patch(self, local_in: Tensor, sampling: RowSampling, generator: torch.Generator | None) -> Tensor:
        """The 11-step loop at fixed shapes over a preallocated 11-position cache."""
        config, stack = self.config, self.decoder
        batch = local_in.shape[0]
        cache = self._decoder_cache(batch)
        gate_up = self._gate_up_out(stack, batch)
        greedy = sampling.mode == "greedy"
        x, sampled = local_in, []
        noises = iter(()) if greedy else iter(self._race_noises(batch, generator))
        for step, plan in enumerate(self.decoder_steps):
            groups = plan.greedy_groups if greedy else plan.groups
            for index, layer in enumerate(stack.layers):
                attend, slot = cache.attend(index, step), cache.slots[index][step]
                folded = None if plan.rotated_qkv is None else (plan.rotated_qkv[index], cache.flat_slots[index][step])
                x = _layer(stack, layer, x, batch, plan.cos, plan.sin, attend, slot, folded, gate_up)
            h = _norm(x, stack.norm, stack.eps)
            last = step + 1 == len(self.decoder_steps)
            for index, group in enumerate(groups):
                inputs = h.expand(group.heads_t.shape[0], *h.shape)
                if greedy:
                    tokens = torch.baddbmm(group.greedy_bias, inputs, group.heads_t).argmax(-1)
                else:  # [channels, B, width] logits
                    logits = torch.bmm(inputs, group.heads_t)
                    noise = next(noises).view(*logits.shape)
                    tokens = sample_rows(logits, sampling, group.empty_ban, generator, race_noise=noise)
                sampled.append(tokens)
                if not last:  # the next input: the sum of the new codes' embeddings
                    embeds = group.tables[group.rows, tokens].sum(0)
                    x = embeds if index == 0 else x + embeds
            if not last and self.to_local is not None:
                x = F.linear(x, self.to_local)
        codes = torch.cat(sampled).index_select(0, self.frame_major)
        return codes.T.reshape(batch, config.group_size, config.audio_channels)

    def _race_noises(self, batch: int, generator: torch.Generator | None) -> tuple[Tensor, ...]:
        """The sampling noise of a whole patch, one draw: [channels * batch * width] per (step, head group)."""
        sizes = [
            group.heads_t.shape[0] * batch * group.heads_t.shape[2] for p in self.decoder_steps for group in p.groups
        ]
        return race_noises(sizes, generator, self.device)

    def _decoder_cache(self, batch: int) -> _DecoderCache:
        """The patch decoder's K/V for ``batch`` rows, kept between calls (every call overwrites what it reads)."""
        if batch not in self._decoder_caches:
            stack = self.decoder
            self._decoder_caches[batch] = _DecoderCache(
                torch.zeros(
                    len(stack.layers),
                    self.config.patch_steps,
                    batch,
                    stack.all_heads,
                    stack.head_dim,
                    device=self.device,
                    dtype=self.dtype,
                ),
                stack.heads,
                stack.kv_heads,
            )
        return self._decoder_caches[batch]

    def _gate_up_out(self, stack: _Stack, rows: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """A [rows, 2 * ffn] buffer for a stack's gate|up projections and its gate and up halves, kept per (stack,
        rows) (each layer's output is consumed before the next layer writes); None for fbgemm's fp16 form, which
        has no ``out``."""
        gate_up = stack.layers[0].gate_up
        if gate_up.t is None:
            return None
        key = (id(stack), rows)
        if key not in self._gate_up_buffers:
            buffer = gate_up.t.new_zeros(rows, gate_up.t.shape[1])
            ffn = buffer.shape[1] // 2
            self._gate_up_buffers[key] = (buffer, buffer[:, :ffn], buffer[:, ffn:])
        return self._gate_up_buffers[key]

    # --- CUDA graphs ---

    def _capture_patch_graphs(self, max_batch: int) -> None:
        buckets = [size for size in GRAPH_BUCKETS if size < max_batch] + [
            next((size for size in GRAPH_BUCKETS if size >= max_batch), max_batch)
        ]
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(set(buckets), reverse=True):  # largest first: smaller ones reuse its memory
            self._graphs[size] = _PatchGraph(self, size, pool)
        logger.info("patch decoder captured as CUDA graphs for batch buckets %s", sorted(self._graphs))


class _PatchGraph:
    """The whole patch decoder (11 steps, heads, samplers) as one CUDA graph for a padded batch size.
    Sampling parameters live in static tensors, so one graph serves greedy, sampled and mixed rows."""

    def __init__(self, fast: FastMiMoAudio, batch: int, pool: Any) -> None:  # pool: a CUDA graph pool handle
        self.batch = batch
        self.local_in = torch.zeros(batch, fast.config.local_dim, device=fast.device, dtype=fast.dtype)
        self.sampling = RowSampling.generic(batch, fast.device)
        run: Callable[[], Tensor] = lambda: fast._decode_patch(self.local_in, self.sampling, None)  # noqa: E731
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.codes = run()

    def __call__(self, local_in: Tensor, sampling: RowSampling) -> Tensor:
        rows = local_in.shape[0]
        self.local_in[:rows].copy_(local_in)
        self.local_in[rows:].zero_()
        self.sampling.copy_rows_(sampling)
        self.graph.replay()
        return self.codes[:rows].clone()


def _op_bound(stack: Qwen2Model) -> bool:
    """Whether a stack's layers are small enough (under FP16_MIN_BYTES) to stay in the CPU's caches, so that a
    step's time goes to op overhead rather than to reading weights."""
    return sum(p.numel() * p.element_size() for p in stack.layers.parameters()) < FP16_MIN_BYTES


def _resolve_weights(weights: WeightPrecision, device: torch.device, dtype: torch.dtype) -> str:
    """'fp16' (fbgemm, see :class:`_Linear`) where it is possible: a float32 model on an x86 CPU. 'auto' stays
    'auto' there (each stack decides by its size, see ``_fp16``: a step reads its weights once per position, so
    half the bytes pay once they leave the cache) and is the model's dtype elsewhere."""
    if weights not in ("auto", "model", "fp16"):
        raise ValueError(f"weights must be auto, model or fp16, got {weights!r}")
    possible = device.type == "cpu" and dtype == torch.float32 and fbgemm_fp16_available()
    if weights == "fp16" and not possible:
        raise ConfigError(f"fp16 weights need a float32 model on an x86 CPU, not {dtype} on {device.type}")
    return weights if weights == "fp16" or (weights == "auto" and possible) else "model"


def _resolve_compile(compile: Compile, device: torch.device) -> bool:
    """CUDA graphs on CUDA ('auto'/'on'); on the CPU compilation was measured not to pay (the step is
    op-bound and inductor did not shorten it), so 'auto' stays eager and 'on' warns and stays eager."""
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {compile!r}")
    if compile == "off":
        return False
    if device.type == "cuda":
        return True
    if compile == "on":
        logger.warning("compile=on: CUDA graphs need a CUDA device; running the %s path eagerly", device.type)
    return False


__all__ = ["FastMiMoAudio", "KVPool", "PatchSampling", "RowSampling", "StepOutput", "WeightPrecision", "best_allowed"]
