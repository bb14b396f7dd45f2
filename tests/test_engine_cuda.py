"""The engine on CUDA in bfloat16 (marked ``cuda``: skipped without a CUDA device; ``scripts/gpu-check`` runs them).

bf16 rounds differently from the fp32 CPU reference and from itself at other batch sizes, so these tests assert
agreement rates and relative errors rather than equality: greedy choices may flip at near-ties, nothing more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mimo_voice.configs.schema import SamplerParams
from mimo_voice.streaming.model.modeling_mimo_audio import load_mimo_audio
from mimo_voice.streaming.model.sampling import Sampler
from worker_support import greedy_worker, replies_alone, replies_together

pytestmark = pytest.mark.cuda

MIN_GREEDY_AGREEMENT = 0.9  # fraction of greedy tokens/codes equal between two bf16 paths
MAX_RELATIVE_LOGIT_ERROR = 0.05  # bf16 vs fp32: max |difference| / max |logit|


def _agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    pairs = list(zip(a, b))
    return sum(float(np.mean(x == y)) for x, y in pairs) / max(len(pairs), 1)


def test_bf16_forward_and_patch_decoder_agree_with_fp32_on_cpu(tiny_llm_dir):
    reference, _, special = load_mimo_audio(tiny_llm_dir, device="cpu", dtype=torch.float32)
    model, _, _ = load_mimo_audio(tiny_llm_dir, device="cuda", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor(reference.config.speech_vocab_sizes)
    codes = (torch.rand(1, 12, reference.config.group_size, len(sizes), generator=generator) * (sizes - 1)).long()
    text_ids = torch.full((1, 12), special.empty)
    text_ids[0, ::3] = special.im_start  # text positions among the audio ones
    codes[text_ids == special.im_start] = torch.tensor(reference.config.speech_empty_ids)
    with torch.inference_mode():
        want = reference(text_ids, codes, cache=reference.new_cache())
        got = model(text_ids.cuda(), codes.cuda(), cache=model.new_cache())
        error = (got.text_logits.float().cpu() - want.text_logits).abs().max() / want.text_logits.abs().max()
        assert error < MAX_RELATIVE_LOGIT_ERROR
        assert got.text_logits.argmax(-1).item() == want.text_logits.argmax(-1).item()
        greedy = Sampler(SamplerParams(do_sample=False))
        patch_want = reference.decode_patch(want.local_in, greedy)
        patch_got = model.decode_patch(got.local_in, greedy).cpu()
    assert float((patch_got == patch_want).float().mean()) >= MIN_GREEDY_AGREEMENT


def test_batched_step_on_cuda_agrees_with_batch_one():
    worker = greedy_worker("model.device=cuda", "model.dtype=bfloat16")
    alone = replies_alone(worker, range(1, 6))
    together = replies_together(worker, range(1, 6), cancel=2)
    assert together[2][2] == "cancelled" and all(together[i][2] == "stop" for i in (1, 3, 4, 5))
    tokens = [float(np.mean(np.equal(*_common(together[i][0], alone[i][0])))) for i in (1, 3, 4, 5)]
    assert np.mean(tokens) >= MIN_GREEDY_AGREEMENT
    patches = [_agreement(together[i][1], alone[i][1]) for i in (1, 3, 4, 5) if alone[i][1]]
    assert not patches or np.mean(patches) >= MIN_GREEDY_AGREEMENT


def _common(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    n = min(len(a), len(b))
    return a[:n], b[:n]
