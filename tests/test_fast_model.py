"""The fast batched hot path (streaming/model/fast.py) against the reference MiMoAudioForCausalLM."""

import pytest
import torch
from mimo_voice.configs.errors import ConfigError
from mimo_voice.streaming.model import fast as fast_module
from mimo_voice.streaming.model.configuration_mimo_audio import MiMoAudioConfig
from mimo_voice.streaming.model.fast import FastMiMoAudio, StepOutput, _Head, _Linear, fbgemm_fp16_available
from mimo_voice.streaming.model.fast_sampling import RowSampling, filtered, sample_rows
from mimo_voice.streaming.model.kv_pool import KVPool
from mimo_voice.streaming.model.modeling_mimo_audio import MiMoAudioForCausalLM
from mimo_voice.streaming.model.profiling import count_call
from mimo_voice.streaming.model.sampling import Sampler, SamplingParams
from test_mimo_model import SPECIAL, mixed_positions

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("torch_single_thread")]  # many tiny ops

GREEDY = SamplingParams(do_sample=False)
AUDIO = SamplingParams(temperature=0.9, top_k=50, top_p=0.95)
NUCLEUS = SamplingParams(temperature=0.9, top_p=0.95)
TOL = 1e-4


@pytest.fixture(scope="module", params=["tiny", "small"])
def model(request):
    return MiMoAudioForCausalLM.random(MiMoAudioConfig.preset(request.param), SPECIAL, seed=0)


@pytest.fixture(scope="module")
def tiny():
    return MiMoAudioForCausalLM.random(MiMoAudioConfig.preset("tiny"), SPECIAL, seed=0)


def build(model, slots=4, capacity=64, head_precision="model", weights="model", **kwargs):
    """A fast model over its own pool; the lm_head and layers in the model dtype unless asked (fp32 parity)."""
    pool = KVPool(model.config, slots, capacity, model.device, model.hidden_states_downcast.weight.dtype)
    return FastMiMoAudio(model, pool, compile="off", head_precision=head_precision, weights=weights, **kwargs), pool


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return (a.float() - b.float()).abs().max().item() <= tol


# --- backbone ---


def test_prefill_equals_the_reference_forward(model):
    fast, pool = build(model)
    text, codes = mixed_positions(model, "ttaatata", seed=1)
    ref = model(text, codes)
    out = fast.prefill(pool.allocate(), text[0], codes[0])
    assert isinstance(out, StepOutput) and out.text_logits.shape == (1, model.config.vocab_size)
    assert close(out.text_logits, ref.text_logits) and close(out.local_in, ref.local_in)


def test_prefill_in_pieces_continues_positions_like_the_reference_cache(model):
    fast, pool = build(model)
    text, codes = mixed_positions(model, "tataatta", seed=2)
    cache, slot = model.new_cache(), pool.allocate()
    for lo, hi in ((0, 3), (3, 4), (4, 8)):
        ref = model(text[:, lo:hi], codes[:, lo:hi], cache)
        out = fast.prefill(slot, text[0, lo:hi], codes[0, lo:hi])
        assert close(out.text_logits, ref.text_logits) and close(out.local_in, ref.local_in)
    assert pool.length(slot) == cache.length == 8


@pytest.mark.parametrize("slot_order", [[0, 1, 2], [2, 0, 3]], ids=["packed", "scattered"])
def test_batched_step_equals_batch_one_rows_at_different_lengths(model, slot_order):
    batched, pool_b = build(model)
    single, pool_s = build(model)
    for pool in (pool_b, pool_s):
        for _ in range(4):
            pool.allocate()
    history = {slot: mixed_positions(model, "ta" * (slot + 1) + "t", seed=slot) for slot in slot_order}
    for fast in (batched, single):
        for slot, (text, codes) in history.items():
            fast.prefill(slot, text[0], codes[0])
    text, codes = mixed_positions(model, "ata", seed=9)
    out = batched.step(slot_order, text[0], codes[0])
    for row, slot in enumerate(slot_order):
        ref = single.step([slot], text[0, row : row + 1], codes[0, row : row + 1])
        assert close(out.text_logits[row : row + 1], ref.text_logits)
        assert close(out.local_in[row : row + 1], ref.local_in)
        assert out.text_logits[row].argmax() == ref.text_logits[0].argmax()
    assert pool_b.lengths(slot_order) == pool_s.lengths(slot_order)


def test_rows_join_leave_and_roll_back_between_steps_without_disturbing_the_others(tiny):
    batched, pool = build(tiny)
    alone, alone_pool = build(tiny)
    histories = {slot: mixed_positions(tiny, "tat" + "a" * slot, seed=20 + slot) for slot in range(3)}
    solo = {}
    for slot, (text, codes) in histories.items():
        assert pool.allocate() == slot
        batched.prefill(slot, text[0], codes[0])
        solo[slot] = alone_pool.allocate()
        alone.prefill(solo[slot], text[0], codes[0])
    text, codes = mixed_positions(tiny, "aaaaaa", seed=30)

    def check(slots: list[int], column: int) -> None:
        out = batched.step(slots, text[0, : len(slots)], codes[0, : len(slots)])
        for row, slot in enumerate(slots):
            ref = alone.step([solo[slot]], text[0, row : row + 1], codes[0, row : row + 1])
            assert close(out.text_logits[row : row + 1], ref.text_logits), (column, slot)

    check([0, 1, 2], 0)
    pool.free(1)  # a session leaves mid-reply; the others carry on
    alone_pool.free(solo.pop(1))
    check([0, 2], 1)
    assert pool.allocate() == 1  # a new session joins in the freed slot
    joined_text, joined_codes = mixed_positions(tiny, "tta", seed=40)
    batched.prefill(1, joined_text[0], joined_codes[0])
    solo[1] = alone_pool.allocate()
    alone.prefill(solo[1], joined_text[0], joined_codes[0])
    check([0, 1, 2], 2)
    pool.truncate(2, pool.length(2) - 2)  # barge-in: roll one row back
    alone_pool.truncate(solo[2], alone_pool.length(solo[2]) - 2)
    check([0, 1, 2], 3)


def test_step_equals_prefill_of_one_position(tiny):
    fast, pool = build(tiny)
    a, b = pool.allocate(), pool.allocate()
    text, codes = mixed_positions(tiny, "tatta", seed=3)
    for slot in (a, b):
        fast.prefill(slot, text[0, :4], codes[0, :4])
    stepped = fast.step([a], text[0, 4:], codes[0, 4:])
    prefilled = fast.prefill(b, text[0, 4:], codes[0, 4:])
    assert close(stepped.text_logits, prefilled.text_logits)


def test_truncate_then_refeed_equals_a_fresh_slot(tiny):
    fast, pool = build(tiny)
    text, codes = mixed_positions(tiny, "tataatat", seed=4)
    rolled, fresh = pool.allocate(), pool.allocate()
    fast.prefill(rolled, text[0], codes[0])
    pool.truncate(rolled, 5)
    other, other_codes = mixed_positions(tiny, "aat", seed=5)
    again = fast.prefill(rolled, other[0], other_codes[0])
    fast.prefill(fresh, text[0, :5], codes[0, :5])
    new = fast.prefill(fresh, other[0], other_codes[0])
    assert pool.length(rolled) == pool.length(fresh) == 8
    assert close(again.text_logits, new.text_logits)


def test_pool_slots_and_bad_input_give_clear_errors(tiny):
    fast, pool = build(tiny, slots=2, capacity=8)
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (0, 1)
    with pytest.raises(RuntimeError, match="in use"):
        pool.allocate()
    pool.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        pool.length(a)
    assert pool.allocate() == a
    text, codes = mixed_positions(tiny, "tat", seed=6)
    with pytest.raises(ValueError, match="text ids"):
        fast.prefill(a, torch.tensor([-1, 5, 6]), codes[0])
    bad = codes[0].clone()
    bad[1, 0, 2] = 129
    with pytest.raises(ValueError, match="audio codes"):
        fast.prefill(a, text[0], bad)
    with pytest.raises(ValueError, match="expected"):
        fast.prefill(a, text[0], codes[0, :2])
    assert pool.length(a) == 0  # nothing was written by the refused calls
    fast.prefill(a, text[0], codes[0])
    with pytest.raises(ValueError, match="no room"):
        fast.prefill(a, torch.zeros(6, dtype=torch.long), tiny.empty_codes(6)[0])
    with pytest.raises(ValueError, match="truncate"):
        pool.truncate(a, 4)
    with pytest.raises(ValueError, match="distinct"):
        fast.step([a, a], text[0, :2], codes[0, :2])


# --- patch decoder and sampling ---


def test_patch_decoder_greedy_codes_equal_the_reference(model):
    fast, _ = build(model)
    local_in = torch.randn(5, model.config.local_dim, generator=torch.Generator().manual_seed(0))
    expected = model.decode_patch(local_in, Sampler(GREEDY))
    assert torch.equal(fast.decode_patch(local_in, GREEDY), expected)
    rows = RowSampling.build([GREEDY] * 5, 5, "cpu")
    assert torch.equal(fast.decode_patch(local_in, rows), expected)


def test_patch_decoder_samples_valid_codes_and_greedy_rows_stay_greedy(tiny):
    fast, _ = build(tiny)
    config = tiny.config
    local_in = torch.randn(6, config.local_dim, generator=torch.Generator().manual_seed(1)) * 30
    generator = torch.Generator().manual_seed(0)
    for params in (AUDIO, NUCLEUS, [AUDIO, GREEDY, NUCLEUS, GREEDY, AUDIO, AUDIO]):
        codes = fast.decode_patch(local_in, params, generator)
        assert codes.shape == (6, config.group_size, config.audio_channels) and codes.dtype == torch.long
        for channel, (size, empty) in enumerate(zip(config.speech_vocab_sizes, config.speech_empty_ids)):
            ids = codes[..., channel]
            assert bool(((ids >= 0) & (ids < size) & (ids != empty)).all())
    mixed = fast.decode_patch(local_in, [AUDIO, GREEDY, AUDIO, GREEDY, AUDIO, GREEDY], generator)
    greedy = tiny.decode_patch(local_in[1::2], Sampler(GREEDY))
    assert torch.equal(mixed[1::2], greedy)


def _reference_survivors(logits: torch.Tensor, params: SamplingParams, banned: list[int]) -> list[set[int]]:
    sampler = Sampler(params)
    values, ids = sampler.candidates(logits.float() / params.temperature)
    keep = []
    for row in range(logits.shape[0]):
        row_ids = range(logits.shape[1]) if ids is None else ids[row].tolist()
        keep.append({i for i, v in zip(row_ids, values[row].tolist()) if v != float("-inf") and i not in banned})
    return keep


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=20),
        SamplingParams(temperature=0.6, top_p=0.8),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.9),
        SamplingParams(temperature=1.3),
    ],
)
@pytest.mark.parametrize("vocab", [1025, 151680])
def test_sync_free_filters_keep_the_reference_sampler_survivors(params, vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=generator) * 4
    banned = [5, 17]
    ban = torch.zeros(vocab, dtype=torch.bool)
    ban[banned] = True
    rows = RowSampling.build(params, 3, "cpu")
    values, ids = filtered(logits, rows, ban)
    expected = _reference_survivors(logits, params, banned)
    for row in range(3):
        row_ids = range(vocab) if ids is None else ids[row].tolist()
        got = {i for i, v in zip(row_ids, values[row].tolist()) if v != float("-inf")}
        assert got == expected[row]
    draws = torch.stack([sample_rows(logits, rows, ban, generator) for _ in range(20)])
    for row in range(3):
        assert set(draws[:, row].tolist()) <= expected[row]


def test_sync_free_sampler_greedy_and_fully_banned_rows_fall_back_to_the_best_allowed():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    ban = torch.tensor([[False, True, False, False], [True, True, True, False]])
    greedy = RowSampling.build(GREEDY, 2, "cpu")
    assert sample_rows(logits, greedy, ban).tolist() == Sampler(GREEDY).sample_masked(logits, ban).tolist() == [3, 3]
    # top-k 1 keeps only the best token; where it is banned, the best allowed one is drawn instead.
    top1 = RowSampling.build(SamplingParams(top_k=1), 2, "cpu")
    assert sample_rows(logits, top1, ban, torch.Generator().manual_seed(0)).tolist() == [3, 3]


def test_sample_text_is_sync_free_and_respects_bans(tiny):
    fast, pool = build(tiny)
    out = fast.prefill(pool.allocate(), *[t[0] for t in mixed_positions(tiny, "tat", seed=7)])
    banned = torch.zeros(tiny.config.vocab_size, dtype=torch.bool)
    best = int(out.text_logits.argmax())
    banned[best] = True
    tokens, counts = count_call(lambda: fast.sample_text(out.text_logits, GREEDY, banned))
    assert counts.host_reads == 0 and tokens.tolist()[0] != best
    assert tokens.tolist() == Sampler(GREEDY).sample(out.text_logits, [best]).tolist()
    sampled, counts = count_call(lambda: fast.sample_text(out.text_logits, NUCLEUS, banned, torch.Generator()))
    assert counts.host_reads == 0 and sampled.tolist()[0] != best


# --- precision, compile, op counts ---


needs_fbgemm = pytest.mark.skipif(not fbgemm_fp16_available(), reason="fbgemm's fp16 GEMM: x86 CPU builds only")


def bf16_checkpoint(preset: str) -> MiMoAudioForCausalLM:
    """A float32 model whose weights are bfloat16 values, as the official checkpoint's are once loaded."""
    model = MiMoAudioForCausalLM.random(MiMoAudioConfig.preset(preset), SPECIAL, seed=3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.bfloat16().float())
    return model


@needs_fbgemm
def test_fp16_projection_matches_float32_within_fp16_rounding():
    generator = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(96, 64, generator=generator) * 0.05, torch.randn(96, generator=generator)
    x, residual = torch.randn(5, 64, generator=generator), torch.randn(5, 96, generator=generator)
    exact, half = _Linear(weight, bias, fp16=False), _Linear(weight, bias, fp16=True)
    bound = float((x.abs() @ weight.abs().T).max()) * 2**-11  # fp16 rounds each weight by at most 2^-11 relative
    assert 0 < float((half(x) - exact(x)).abs().max()) <= bound
    plain, plain_half = _Linear(weight, None, fp16=False), _Linear(weight, None, fp16=True)
    assert close(plain_half(x, residual), plain(x, residual), tol=bound + 1e-6)
    rounded = weight.bfloat16().float()  # bf16 values convert to fp16 exactly: only the summation order differs
    assert close(_Linear(rounded, bias, fp16=True)(x), _Linear(rounded, bias, fp16=False)(x), tol=1e-5)


@needs_fbgemm
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_fp16_weights_of_a_bf16_checkpoint_give_the_float32_outputs(preset):
    model = bf16_checkpoint(preset)
    exact, pool_e = build(model)
    half, pool_h = build(model, weights="fp16")
    assert all(layer.qkv.packed is not None for layer in half.decoder.layers + half.backbone.layers)
    slots = [0, 1]
    for pool in (pool_e, pool_h):
        assert [pool.allocate(), pool.allocate()] == slots
    for fast in (exact, half):
        for slot in slots:
            fast.prefill(slot, *[t[0] for t in mixed_positions(model, "tataat", seed=slot)])
    text, codes = mixed_positions(model, "at", seed=5)
    ref, out = exact.step(slots, text[0], codes[0]), half.step(slots, text[0], codes[0])
    assert close(out.text_logits, ref.text_logits) and close(out.local_in, ref.local_in)
    assert torch.equal(out.text_logits.argmax(-1), ref.text_logits.argmax(-1))
    local_in = torch.randn(6, model.config.local_dim, generator=torch.Generator().manual_seed(6))
    assert torch.equal(half.decode_patch(local_in, GREEDY), exact.decode_patch(local_in, GREEDY))
    sampled = [fast.decode_patch(local_in, AUDIO, torch.Generator().manual_seed(7)) for fast in (exact, half)]
    assert torch.equal(*sampled)


def test_weights_auto_reads_fp16_only_where_a_stack_is_large(tiny, monkeypatch):
    fast, _ = build(tiny, weights="auto")
    stacks = (fast.backbone, fast.encoder, fast.decoder)
    assert all(layer.qkv.packed is None for stack in stacks for layer in stack.layers)  # the tiny preset: < 4 MiB
    monkeypatch.setattr(fast_module, "FP16_MIN_BYTES", 0)
    fast, _ = build(tiny, weights="auto")
    stacks = (fast.backbone, fast.encoder, fast.decoder)
    uses_fp16 = {layer.qkv.packed is not None for stack in stacks for layer in stack.layers}
    assert uses_fp16 == {fbgemm_fp16_available()}
    bf16 = MiMoAudioForCausalLM.random(tiny.config, SPECIAL, seed=0, dtype=torch.bfloat16)
    assert build(bf16, weights="auto")[0].weights == "model"
    with pytest.raises(ConfigError, match="fp16 weights need a float32 model"):
        build(bf16, weights="fp16")
    with pytest.raises(ValueError, match="weights must be"):
        build(tiny, weights="int4")


@pytest.mark.parametrize("precision", ["bf16", "int8", "auto"] + (["fp16"] if fbgemm_fp16_available() else []))
def test_reduced_precision_lm_head_is_faithful(tiny, precision):
    exact, pool = build(tiny)
    reduced, pool_r = build(tiny, head_precision=precision)
    generator = torch.Generator().manual_seed(8)
    text = torch.randint(0, 151643, (24,), generator=generator)
    codes = tiny.empty_codes(24)[0]
    near_ties = 0
    slot, slot_r = pool.allocate(), pool_r.allocate()
    for position in range(24):
        ref = exact.prefill(slot, text[position : position + 1], codes[:1]).text_logits[0]
        out = reduced.prefill(slot_r, text[position : position + 1], codes[:1]).text_logits[0]
        # Recorded tolerance: bf16 rounds the head's inputs and weights (rel. 2^-8), int8 its weights per row.
        assert close(out, ref, tol=0.02 * float(ref.abs().max()) + 1e-3)
        top2 = ref.topk(2).values
        if int(out.argmax()) != int(ref.argmax()):
            near_ties += 1
            assert float(top2[0] - top2[1]) < 0.02 * float(ref.abs().max()) + 1e-3
    assert near_ties <= 2


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_auto_head_is_faithful_at_every_batch_size(tiny, rows):
    head = _Head(tiny.lm_head.weight, "auto")
    # A float32 model on the CPU: int8 and oneDNN bf16 with AVX512-BF16/AMX, else fbgemm's fp16 on x86.
    bf16_cpu = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert head.precision == ("int8+bf16" if bf16_cpu else "fp16" if fbgemm_fp16_available() else "int8")
    x = torch.randn(rows, tiny.config.hidden_size, generator=torch.Generator().manual_seed(rows))
    ref = torch.nn.functional.linear(x, tiny.lm_head.weight.detach())
    out = head(x)
    tol = 0.02 * float(ref.abs().max())
    assert out.dtype == torch.float32 and close(out, ref, tol=tol)
    for row in range(rows):
        best, runner_up = ref[row].topk(2).values.tolist()
        assert int(out[row].argmax()) == int(ref[row].argmax()) or best - runner_up < tol


def test_bf16_model_matches_fp32_within_tolerance(tiny):
    bf16 = MiMoAudioForCausalLM.random(tiny.config, SPECIAL, seed=0, dtype=torch.bfloat16)
    fast, pool = build(bf16)
    text, codes = mixed_positions(tiny, "tataat", seed=10)
    ref = tiny(text, codes)
    out = fast.prefill(pool.allocate(), text[0], codes[0])
    eager_bf16 = bf16(text, codes)
    scale = float(ref.text_logits.abs().max())
    assert close(out.text_logits, ref.text_logits, tol=0.05 * scale)
    assert close(out.text_logits, eager_bf16.text_logits, tol=0.02 * scale)


def test_compile_off_and_auto_on_cpu_run_eagerly(tiny, caplog):
    fast, _ = build(tiny)
    assert not fast.compile
    pool = KVPool(tiny.config, 1, 8, "cpu", torch.float32)
    assert not FastMiMoAudio(tiny, pool, compile="on").compile
    assert "CUDA graphs need a CUDA device" in caplog.text
    with pytest.raises(ValueError, match="compile"):
        FastMiMoAudio(tiny, pool, compile="always")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_patch_decoder_equals_eager():
    model = MiMoAudioForCausalLM.random(MiMoAudioConfig.preset("small"), SPECIAL, seed=0, device="cuda")
    pool = KVPool(model.config, 4, 64, "cuda", torch.float32)
    graphed = FastMiMoAudio(model, pool, compile="on")
    eager = FastMiMoAudio(model, pool, compile="off")
    assert graphed.compile
    local_in = torch.randn(3, model.config.local_dim, device="cuda")
    assert torch.equal(graphed.decode_patch(local_in, GREEDY), eager.decode_patch(local_in, GREEDY))
    codes = graphed.decode_patch(local_in, [AUDIO, GREEDY, NUCLEUS])
    assert torch.equal(codes[1], eager.decode_patch(local_in[1:2], GREEDY)[0])
    assert bool((codes[..., 0] < 1024).all())


def test_patch_decoder_folds_its_rope_and_merges_its_head_groups_only_where_op_bound(tiny, monkeypatch):
    folded, _ = build(tiny)
    assert all(step.rotated_qkv is not None for step in folded.decoder_steps)  # tiny: a few KB of weights, on the CPU
    monkeypatch.setattr(fast_module, "FP16_MIN_BYTES", 0)  # every stack counts as weight-bound
    plain, _ = build(tiny)
    assert all(step.rotated_qkv is None for step in plain.decoder_steps)
    local_in = torch.randn(3, tiny.config.local_dim, generator=torch.Generator().manual_seed(12))
    for fast in (folded, plain):
        fast.decode_patch(local_in, GREEDY)  # builds the cache's views
    (want, plain_ops), (got, folded_ops) = (
        count_call(lambda f=f: f.decode_patch(local_in, GREEDY)) for f in (plain, folded)
    )
    assert torch.equal(got, want)
    layer_steps = len(tiny.local_transformer.layers) * tiny.config.patch_steps
    # Where a step samples channels of both vocabulary sizes, greedy decoding there runs one padded head group.
    merged = [step for step in folded.decoder_steps if len(step.groups) > 1]
    assert len(merged) == 3 and all(len(step.greedy_groups) == 1 for step in merged)
    assert all(step.greedy_groups == step.groups for step in plain.decoder_steps)
    # view, roll, mul, addcmul per layer and step; expand, baddbmm, argmax, index, sum, add per merged group
    assert plain_ops.ops - folded_ops.ops == 4 * layer_steps + 6 * len(merged)


def test_one_audio_group_has_few_ops_and_no_host_reads(tiny):
    fast, pool = build(tiny)
    slot = pool.allocate()
    fast.prefill(slot, *[t[0] for t in mixed_positions(tiny, "tt", seed=11)])
    empty, codes = torch.tensor([SPECIAL.empty]), tiny.empty_codes(1)[0]
    greedy = RowSampling.build(GREEDY, 1, fast.device)  # once per set of rows, as the engine's scheduler does

    def group():
        out = fast.step([slot], empty, codes)
        fast.sample_text(out.text_logits, greedy)
        return fast.decode_patch(out.local_in, greedy)

    group()  # the first call builds the decoder's cache and buffers
    _, counts = count_call(group)
    cache = tiny.new_cache()
    tiny(*mixed_positions(tiny, "tt", seed=11), cache)

    def eager_group():
        out = tiny(empty[None], codes[None], cache)
        Sampler(GREEDY).sample(out.text_logits)
        return tiny.decode_patch(out.local_in, Sampler(GREEDY))

    _, eager = count_call(eager_group)
    assert counts.host_reads == 0
    # At most a fifth of the eager path's ops (README); on CUDA the patch decoder is one graph replay.
    assert counts.ops <= 0.2 * eager.ops
