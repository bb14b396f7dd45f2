import pytest
import torch
from mimo_voice.streaming.model.sampling import Sampler, SamplingParams


def upstream_filter(scores: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """Upstream MiMoSampler.process, re-derived from the reference notes: the oracle for the kept set."""
    scores = scores / temperature
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    sorted_scores, order = torch.sort(scores)
    drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def draw(sampler: Sampler, logits: torch.Tensor, rows: int, banned=(), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return sampler.sample(logits.expand(rows, -1), banned, generator)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


def test_greedy_takes_the_best_token_that_is_not_banned():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 1.0, 4.0]])
    greedy = Sampler(SamplingParams(do_sample=False, temperature=0.5, top_p=0.5))
    assert greedy.sample(logits).tolist() == [1, 0]
    assert greedy.sample(logits, banned=[1, 0]).tolist() == [2, 3]


def test_unfiltered_sampling_follows_softmax_of_logits_over_temperature():
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0]])
    sampler = Sampler(SamplingParams(temperature=0.7))
    got = frequencies(draw(sampler, logits, 20000), 4)
    assert torch.allclose(got, (logits[0] / 0.7).softmax(-1), atol=0.015)


def test_top_k_keeps_the_k_best_and_every_token_tied_with_the_kth():
    logits = torch.tensor([[4.0, 1.0, 3.0, 3.0, 0.0, -2.0]])
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=2))
    got = frequencies(draw(sampler, logits, 20000), 6)
    expected = upstream_filter(logits, 1.0, 2, 1.0).softmax(-1)[0]  # tokens 0, 2 and 3 (3 ties with the 2nd)
    assert (got > 0).tolist() == (expected > 0).tolist() == [True, False, True, True, False, False]
    assert torch.allclose(got, expected, atol=0.015)


def test_top_p_keeps_the_smallest_head_reaching_p_and_always_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.75))
    got = frequencies(draw(sampler, probs.log(), 20000), 4)
    assert torch.allclose(got, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]), atol=0.015)
    only_best = Sampler(SamplingParams(temperature=1.0, top_p=0.01))
    assert set(draw(only_best, probs.log(), 500).tolist()) == {0}


def test_top_k_then_top_p_on_the_renormalised_head():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0]])
    sampler = Sampler(SamplingParams(temperature=0.8, top_k=4, top_p=0.8))
    got = frequencies(draw(sampler, logits, 20000), 6)
    expected = upstream_filter(logits, 0.8, 4, 0.8).softmax(-1)[0]
    assert torch.allclose(got, expected, atol=0.015)


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])  # flat (nucleus ~ whole vocab) to peaked (a few tokens)
def test_top_p_over_the_text_vocabulary_keeps_what_a_full_sort_keeps(spread):
    logits = torch.randn(2, 151680, generator=torch.Generator().manual_seed(1)) * spread
    sampler = Sampler(SamplingParams(temperature=0.6, top_p=0.95))
    values, ids = sampler.candidates(logits / 0.6)
    allowed = upstream_filter(logits, 0.6, None, 0.95).isfinite()
    for row in range(2):
        kept = ids[row][values[row].isfinite()]
        assert sorted(kept.tolist()) == allowed[row].nonzero().flatten().tolist()
    assert allowed[0, draw(sampler, logits[:1], 16)].all()


def test_top_p_over_a_partly_masked_vocabulary():
    generator = torch.Generator().manual_seed(2)
    logits = torch.full((1, 151680), float("-inf"))
    logits[0, torch.randperm(151680, generator=generator)[:3000]] = torch.randn(3000, generator=generator)
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.9))
    values, ids = sampler.candidates(logits)
    allowed = upstream_filter(logits, 1.0, None, 0.9).isfinite()
    assert sorted(ids[0][values[0].isfinite()].tolist()) == allowed[0].nonzero().flatten().tolist()


def test_banned_ids_are_removed_after_filtering():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5))  # the nucleus is {0, 1}
    got = frequencies(draw(sampler, logits, 20000, banned=[0]), 4)
    assert got.tolist() == [0.0, 1.0, 0.0, 0.0]  # token 1 takes all the mass, tokens 2 and 3 stay filtered


def test_when_only_banned_tokens_survive_the_best_allowed_one_is_taken():
    # Upstream would draw from all -inf (NaN probabilities) here.
    logits = torch.tensor([[10.0, 0.0, 1.0, -1.0]])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.9))  # the nucleus is {0}
    assert draw(sampler, logits, 50, banned=[0]).tolist() == [2] * 50


def test_a_seeded_generator_reproduces_the_draws():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))
    sampler = Sampler(SamplingParams(temperature=0.9, top_p=0.95))
    assert torch.equal(draw(sampler, logits, 64, seed=7), draw(sampler, logits, 64, seed=7))
    assert not torch.equal(draw(sampler, logits, 64, seed=7), draw(sampler, logits, 64, seed=8))


def test_masked_variant_bans_per_row():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    ban = torch.tensor([[True, False, False], [False, True, False]])
    tokens = Sampler(SamplingParams(do_sample=False)).sample_masked(logits, ban)
    assert tokens.tolist() == [1, 0]


def test_bad_input_is_a_clear_error():
    sampler = Sampler(SamplingParams())
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sampler.sample(torch.zeros(5))
    with pytest.raises(ValueError, match="banned ids"):
        sampler.sample(torch.zeros(1, 5), banned=[5])
