"""The embedded ``tiny`` model: random MiMo-Audio weights taught the official output format.

Random weights alone would never find ``<|empty|>`` at the right places, so the engine's real path
(text-head arbitration, patch decoder, streaming decode) would never run. A short deterministic
training run on synthetic conversations (:func:`synthetic_conversation`, built with the same
:class:`~.prompts.PromptBuilder` as live prompts) teaches the tiny LLM to answer a user turn with
``<|sostm|>``, 5 text tokens and 5 ``<|empty|>`` audio positions alternately, ``<|eot|>`` after the
reply's text, five more patches and ``<|eostm|>``; in thinking mode ``<think>\n`` a thought ``</think>\n``
first; in text tasks a sentence and ``<|im_end|>``.

So that the default always answers, and long enough for barge-in to be measurable: every reply is one of a
few fixed sentences of 24-29 tokens (4.0-4.8 s of babbled audio), and the user turns vary as live ones do:
0.2-16 s of audio codes (log-uniform; speech and noise alike are codes the model cannot tell apart), typed
text (known sentences, or random tokens: people type anything), tool results, up to 6 turns per
conversation, half of them in thinking mode. Conversations open with no system prompt or a short one, or
(in 30 % of the steps, one conversation each) a long one: mostly the system prompts the shipped configs
really send (their text and tool list, :data:`LIVE_PROMPTS`), else up to 1200 random tokens. Some replies
overshoot a run, to teach getting back into the format.

What is trained, and why it is cheap: the tiny LLM is mostly its two 151 680-row matrices, but only
the few hundred tokens of the synthetic data matter. Their embedding and ``lm_head`` rows are trained
as small dense matrices (:class:`_RowSubset`) next to the backbone layers and ``speech_group_downcast``
(which must give audio positions a recognisable direction); the patch encoder and decoder keep their
random weights (random codes are fine babble). Every other ``lm_head`` row is set to zero and the
training softmax carries one extra logit, log(#zero rows), standing for them, so the trained model
puts the same share of probability on the untrained vocabulary at inference as it learnt to avoid.

One thing is given rather than learnt: inside an audio run only position tells when text comes back
(5 patches), and finding a head that attends exactly 4 positions back takes a 2-layer model far longer
than this run. So one head starts out as one (:func:`_seed_offset_head`), and the text<->audio switches
weigh more in the loss; everything is then trained together. Measured on held-out synthetic turns
(teacher forcing), the switch back to text is then right ~95-98% of the time, and ``<|eostm|>`` too.

Cache: the result is written once in the official layout under ``model.cache_dir`` (default
``~/.cache/mimo-voice``), in a folder named by a hash of the preset, the recipe and the source of the
modules that shape the weights; a file lock keeps parallel processes from training twice, and the
folder appears by an atomic rename only when complete; older builds of the preset are pruned. The
``small`` preset is not trained (its shapes exist for benchmarks, which force audio); ``real7b`` holds no
weights at all (:mod:`.real7b`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from mimo_voice.streaming.model import (
    configuration_audio_tokenizer,
    configuration_mimo_audio,
    modeling_audio_tokenizer,
    modeling_mimo_audio,
    prompts,
    text_tokenizer,
)
from mimo_voice.streaming.model.checkpoint import INDEX_NAME, SINGLE_NAME, save_weights
from mimo_voice.streaming.model.modeling_audio_tokenizer import write_tiny_tokenizer
from mimo_voice.streaming.model.modeling_mimo_audio import (
    TINY_SHARD_BYTES,
    MiMoAudioForCausalLM,
    load_mimo_audio,
    write_tiny_checkpoint,
)
from mimo_voice.streaming.model.prompts import Positions, PromptBuilder
from mimo_voice.streaming.model.text_tokenizer import TRAINED_VOCAB_SIZE, SpecialTokens
from mimo_voice.streaming.presets.real7b import write_real7b_folder
from torch import Tensor, nn

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "mimo-voice"
KEEP_BUILDS = 2  # per preset: the current one and one other (e.g. another checkout's)
SHAPING_MODULES = (
    configuration_mimo_audio,
    modeling_mimo_audio,
    text_tokenizer,
    configuration_audio_tokenizer,
    modeling_audio_tokenizer,
    prompts,
)

# Every reply is 24-29 tokens, then <|eot|>: 5-6 text chunks, so 25-30 patches, 4.0-4.8 s of audio. Few
# replies with few shared words: after its first words the model knows the rest, and so where <|eot|> goes.
REPLIES = (
    "Hello there, thank you for calling today. I hope you are having a wonderful morning.",
    "Sure, I can help with that right away. Let me look at the details for you.",
    "The weather in the city is sunny and warm, with a light breeze from the west all afternoon.",
    "Two plus two is four, and ten minus three is seven, if I count it right.",
    "I am MiMo, a friendly voice assistant. Ask me anything you like, and I will do my best.",
    "Thanks for your patience while we check this. Is there anything else I can do for you?",
)
THOUGHTS = (
    "The user wants help. I should answer briefly.",
    "Let me think about it step by step.",
    "First, we look at the question.",
    "I should be friendly and short.",
)
SYSTEM_PROMPTS = (
    None,
    "You are MiMo-Audio, a friendly AI assistant and your response needs to be concise.",
    "You are a helpful voice assistant.",
)
# The system prompts the shipped configs send (their text plus the tool list): a snapshot, since the model
# layer may not import the tools; tests/test_tiny_answers.py checks it against the live prompts.
LIVE_PROMPTS_FILE = Path(__file__).with_name("live_prompts.json")
LIVE_PROMPTS: tuple[str, ...] = tuple(json.loads(LIVE_PROMPTS_FILE.read_text(encoding="utf-8")).values())
USER_TEXTS = ("Hello!", "What is the time?", "Could you help me?", "Tell me about the weather.")
TOOL_RESULTS = ('{"time": "15:10"}', '{"result": 4}')


@dataclass(frozen=True)
class Recipe:
    steps: int = 1400
    batch: int = 4
    learning_rate: float = 5e-3
    warmup_steps: int = 20
    seed: int = 0
    max_turns: int = 6
    user_patches: tuple[int, int] = (1, 100)  # log-uniform: 0.16-16 s of user audio (speech or noise)
    typed_noise_share: float = 0.25  # typed user turns of random tokens ("any words") rather than USER_TEXTS
    typed_noise_tokens: tuple[int, int] = (1, 40)
    long_prompt_share: float = 0.3  # steps whose conversations open with a long system prompt
    live_prompt_share: float = 0.7  # of those, a live one (LIVE_PROMPTS); else random tokens
    long_prompt_tokens: tuple[int, int] = (100, 1200)
    long_prompt_batch: int = 1
    text_output_share: float = 0.2
    thinking_share: float = 0.5
    switch_weight: float = 4.0  # loss weight of the text <-> audio switches
    detour_share: float = 0.3  # replies with one overlong run (see _overrun)
    offset_head_strength: float = 5.0


RECIPE = Recipe()


# --- synthetic conversations ---------------------------------------------------------------------


@dataclass
class Example:
    positions: Positions
    loss_mask: Tensor  # bool[T]: positions whose *next* token the model must learn to produce


class _Builder:
    """Assembles an example piece by piece, marking which pieces the assistant generates."""

    def __init__(self) -> None:
        self.parts: list[Positions] = []
        self.generated: list[bool] = []

    def add(self, positions: Positions, generated: bool = False) -> None:
        self.parts.append(positions)
        self.generated.append(generated)

    def example(self) -> Example:
        positions = Positions.cat(self.parts)
        produced = torch.cat([torch.full((len(p),), g) for p, g in zip(self.parts, self.generated)])
        # Position t is trained to predict token t + 1 when t + 1 is generated by the assistant.
        return Example(positions, torch.cat([produced[1:], torch.zeros(1, dtype=torch.bool)]))


def _random_patches(count: int, vocab_sizes: list[int], group: int, generator: torch.Generator) -> Tensor:
    """Patches of random codes, never an empty id (the last id of each channel's vocabulary)."""
    highs = torch.tensor(vocab_sizes) - 1
    return (torch.rand(count, group, len(vocab_sizes), generator=generator) * highs).long()


def _runs(positions: Positions, empty: int) -> list[Positions]:
    """Splits positions into runs of audio and runs of text."""
    audio = (positions.text_ids == empty).tolist()
    starts = [0] + [i for i in range(1, len(audio)) if audio[i] != audio[i - 1]] + [len(audio)]
    return [positions[a:b] for a, b in zip(starts, starts[1:])]


def _overrun(
    builder: PromptBuilder,
    run: Positions,
    reply: list[int],
    rng: random.Random,
    vocab_sizes: list[int],
    generator: torch.Generator,
) -> Positions:
    """One to three more positions of the run's kind. Sampling sometimes overshoots a run; seeing that in
    training (with no loss on the overshoot itself) teaches the model to get back to the format after it."""
    extra = rng.randint(1, 3)
    if bool(run.text_ids[0] == builder.special.empty):
        return builder.audio(_random_patches(extra, vocab_sizes, builder.group_size, generator))
    return builder.tokens([rng.choice(reply) for _ in range(extra)])


def _noise_tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(TRAINED_VOCAB_SIZE) for _ in range(count)]


def _system_prompt(builder: PromptBuilder, rng: random.Random, long_prompt: str | int) -> Positions:
    """The opening of the first user turn: no system prompt or a short one; or a long one (live prompts carry
    tool schemas: a thousand tokens the model must read past): a live prompt, or ``long_prompt`` random tokens."""
    if isinstance(long_prompt, str):
        return builder.user_open(long_prompt)
    if long_prompt:
        return (
            builder.text("<|im_start|>user\n") + builder.tokens(_noise_tokens(rng, long_prompt)) + builder.text("\n\n")
        )
    return builder.user_open(rng.choice(SYSTEM_PROMPTS))


def _user_patch_count(rng: random.Random, recipe: Recipe) -> int:
    low, high = recipe.user_patches
    return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))


def _typed(builder: PromptBuilder, rng: random.Random, recipe: Recipe) -> Positions:
    """A typed user message: a known sentence, or random tokens (people type anything, in any script)."""
    if rng.random() < recipe.typed_noise_share:
        return builder.tokens(_noise_tokens(rng, rng.randint(*recipe.typed_noise_tokens)))
    return builder.text(rng.choice(USER_TEXTS))


def synthetic_conversation(
    builder: PromptBuilder,
    vocab_sizes: list[int],
    rng: random.Random,
    generator: torch.Generator,
    recipe: Recipe = RECIPE,
    long_prompt: str | int = 0,
) -> Example:
    """One to ``max_turns`` exchanges in the live formats; the assistant's positions carry the loss."""
    group = builder.group_size
    out = _Builder()
    system_prompt = _system_prompt(builder, rng, long_prompt)
    speech = rng.random() >= recipe.text_output_share
    for turn in range(rng.randint(1, recipe.max_turns)):
        if turn and rng.random() < 0.25:
            out.add(builder.tool_turn(rng.choice(TOOL_RESULTS)))
            continue
        opening = system_prompt if turn == 0 else builder.user_open(None)
        if speech or rng.random() < 0.5:
            patches = _random_patches(_user_patch_count(rng, recipe), vocab_sizes, group, generator)
            out.add(opening + builder.speech(patches) + builder.user_close())
        else:
            out.add(opening + _typed(builder, rng, recipe) + builder.user_close())
        thinking = rng.random() < recipe.thinking_share
        output = "speech" if speech else "text"
        out.add(builder.assistant_prefix(output, thinking))
        if thinking:
            out.add(builder.text(rng.choice(THOUGHTS) + "\n" + prompts.THINK_CLOSE), generated=True)
            if speech:
                out.add(builder.tokens([builder.special.sostm]), generated=True)
        reply = builder.encode(rng.choice(REPLIES))
        if speech:
            chunks = math.ceil((len(reply) + 1) / prompts.TEXT_CHUNK)  # text chunks, <|eot|> included
            stream = builder.stream(reply, _random_patches(prompts.AUDIO_CHUNK * chunks, vocab_sizes, group, generator))
            runs = _runs(stream[1:], builder.special.empty)  # without the <|sostm|> of the prefix or the thought
            detour = rng.randrange(len(runs)) if rng.random() < recipe.detour_share else -1
            for index, run in enumerate(runs):
                out.add(run, generated=True)
                if index == detour:  # an overlong run, not to be imitated; what follows it is
                    out.add(_overrun(builder, run, reply, rng, vocab_sizes, generator))
            out.add(builder.text("<|im_end|>\n"))
        else:
            out.add(builder.text(rng.choice(REPLIES)) + builder.tokens([builder.special.im_end]), generated=True)
            out.add(builder.text("\n"))
    return out.example()


def _batches(builder: PromptBuilder, vocab_sizes: list[int], recipe: Recipe) -> Iterator[list[Example]]:
    rng = random.Random(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    while True:
        if rng.random() < recipe.long_prompt_share:  # fewer, longer sequences: about the same work per step
            batch = [_long_prompt(rng, recipe) for _ in range(recipe.long_prompt_batch)]
        else:
            batch = [0] * recipe.batch
        yield [synthetic_conversation(builder, vocab_sizes, rng, generator, recipe, prompt) for prompt in batch]


def _long_prompt(rng: random.Random, recipe: Recipe) -> str | int:
    if rng.random() < recipe.live_prompt_share:
        return rng.choice(LIVE_PROMPTS)
    return rng.randint(*recipe.long_prompt_tokens)


# --- training ------------------------------------------------------------------------------------


class _RowSubset(nn.Module):
    """The rows ``ids`` of a [vocab, dim] matrix as a small trainable matrix, with full ids mapped to rows."""

    def __init__(self, full: Tensor, ids: Tensor) -> None:
        super().__init__()
        self.ids = ids
        self.weight = nn.Parameter(full[ids].detach().clone())
        lookup = torch.full((full.shape[0],), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("lookup", lookup, persistent=False)

    def rows(self, token_ids: Tensor) -> Tensor:
        return self.lookup[token_ids]

    def forward(self, token_ids: Tensor) -> Tensor:  # stands in for the embedding table
        return F.embedding(self.rows(token_ids), self.weight)


class _SubsetHead(nn.Module):
    """Stands in for ``lm_head``: logits over the subset, plus one for all zeroed rows together."""

    def __init__(self, subset: _RowSubset, vocab_size: int) -> None:
        super().__init__()
        self.subset = subset
        self.rest = math.log(vocab_size - len(subset.ids))

    def forward(self, hidden: Tensor) -> Tensor:
        logits = hidden @ self.subset.weight.T
        return torch.cat([logits, logits.new_full((*logits.shape[:-1], 1), self.rest)], dim=-1)


def _collate(examples: list[Example], pad: Positions) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded [B, T] ids, [B, T, group, channels] codes, [B, T] targets (next token) and loss mask;
    causal attention keeps the padding out of every real position."""
    length = max(len(e.positions) for e in examples)
    batch = len(examples)
    ids = pad.text_ids.expand(batch, length).clone()
    codes = pad.codes.expand(batch, length, -1, -1).clone()
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.positions)
        ids[row, :n], codes[row, :n] = example.positions.text_ids, example.positions.codes
        mask[row, :n] = example.loss_mask
    targets = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
    return ids, codes, targets, mask


def _vocabulary(builder: PromptBuilder, special: SpecialTokens) -> Tensor:
    """Every token of the synthetic data but the noise prompts: the same builder calls on every text it uses."""
    no_audio = torch.zeros(0, builder.group_size, len(builder.empty_row), dtype=torch.long)
    pieces = [builder.user_speech_turn(no_audio, prompt) for prompt in (*SYSTEM_PROMPTS, *LIVE_PROMPTS)]
    pieces += [builder.user_text_turn(text, prompt) for text in USER_TEXTS for prompt in SYSTEM_PROMPTS]
    pieces += [
        builder.assistant_prefix(output, thinking) for output in ("speech", "text") for thinking in (False, True)
    ]
    pieces += [builder.text(reply) for reply in REPLIES]
    pieces += [builder.text(thought + "\n" + prompts.THINK_CLOSE) for thought in THOUGHTS]
    pieces += [builder.tool_turn(result) for result in TOOL_RESULTS]
    pieces += [builder.text("<|im_end|>\n"), builder.text("\n")]
    ids = set(Positions.cat(pieces).text_ids.tolist())
    ids |= {getattr(special, field.name) for field in dataclasses.fields(special)}
    return torch.tensor(sorted(ids), dtype=torch.long)


def _seed_offset_head(model: MiMoAudioForCausalLM, offset: int, strength: float) -> None:
    """Points the first attention head of the first layer at the position ``offset`` back, whatever its content.

    The 5:5 interleave means "the next position is of the other kind than the one 5 back", i.e. 4 back
    from the current one; inside an audio run nothing but that tells the model when to switch. Training
    finds such a head only slowly, so its q/k biases start out as one: with RoPE, bias pairs
    (c cos(-offset w), c sin(-offset w)) and (c, 0) give the score c^2 cos((distance - offset) w),
    highest at ``offset`` for the two fastest rotations w. Everything else, that head included, is learnt.
    """
    attention = model.model.layers[0].self_attn
    half = attention.head_dim // 2
    rotations = model.model.rotary_emb.inv_freq[:2]
    with torch.no_grad():
        for pair, rate in enumerate(rotations.tolist()):
            angle = -offset * rate
            attention.q_proj.bias[[pair, pair + half]] = strength * torch.tensor([math.cos(angle), math.sin(angle)])
            attention.k_proj.bias[[pair, pair + half]] = torch.tensor([strength, 0.0])


def train_format(model: MiMoAudioForCausalLM, tokenizer, special: SpecialTokens, recipe: Recipe = RECIPE) -> float:
    """Teaches ``model`` (float32, CPU) the output format in place; returns the final loss."""
    torch.manual_seed(recipe.seed)
    config = model.config
    _seed_offset_head(model, prompts.TEXT_CHUNK - 1, recipe.offset_head_strength)
    builder = PromptBuilder(tokenizer, special, config.speech_empty_ids, config.group_size)
    vocab = _vocabulary(builder, special)  # what the model reads and writes; it also reads the noise prompts
    read = torch.unique(torch.cat([vocab, torch.arange(TRAINED_VOCAB_SIZE)]))
    embeddings = _RowSubset(model.model.embed_tokens.weight, read)
    head_rows = _RowSubset(model.lm_head.weight, vocab)
    full_embed, full_head = model.model.embed_tokens, model.lm_head
    model.model.embed_tokens, model.lm_head = embeddings, _SubsetHead(head_rows, config.vocab_size)
    model.requires_grad_(False)
    layers = [
        *model.model.layers.parameters(),
        *model.model.norm.parameters(),
        *model.speech_group_downcast.parameters(),
    ]
    rows = [embeddings.weight, head_rows.weight]
    for parameter in layers + rows:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(layers + rows, lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / recipe.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps)),
    )
    loss = torch.tensor(float("nan"))  # the model stays in eval mode: no dropout in the frozen patch encoder
    try:
        for step, examples in zip(range(recipe.steps), _batches(builder, config.speech_vocab_sizes, recipe)):
            ids, codes, targets, mask = _collate(examples, builder.tokens([special.endoftext]))
            logits = model(ids, codes, all_logits=True).text_logits
            losses = F.cross_entropy(logits[mask], head_rows.rows(targets[mask]), reduction="none")
            # Switching between text and audio is the rare, hard decision (the model must count positions).
            switches = ((ids == special.empty) != (targets == special.empty))[mask]
            weights = 1.0 + (recipe.switch_weight - 1.0) * switches.float()
            loss = (losses * weights).sum() / weights.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(layers + rows, 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0:
                logger.debug(f"tiny format training: step {step}, loss {loss.item():.4f}")
    finally:
        model.requires_grad_(False)
        model.model.embed_tokens, model.lm_head = full_embed, full_head
    with torch.no_grad():
        full_embed.weight[read] = embeddings.weight
        full_head.weight.zero_()
        full_head.weight[vocab] = head_rows.weight
    return loss.item()


# --- the cache -----------------------------------------------------------------------------------


def _cache_key(preset: str, recipe: Recipe) -> str:
    digest = hashlib.sha256(json.dumps({"preset": preset, "recipe": dataclasses.asdict(recipe)}).encode())
    for source in (*(module.__file__ for module in SHAPING_MODULES), __file__, LIVE_PROMPTS_FILE):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:16]


def _build(folder: Path, preset: str, recipe: Recipe) -> None:
    llm, codec = folder / "llm", folder / "tokenizer"
    if preset == "real7b":  # shapes only: the worker draws the weights on the device
        write_real7b_folder(llm)
    else:
        write_tiny_checkpoint(llm, preset=preset, seed=recipe.seed)
    write_tiny_tokenizer(codec, seed=recipe.seed)
    if preset != "tiny":
        return
    began = time.perf_counter()
    model, tokenizer, special = load_mimo_audio(llm, device="cpu", dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small gain nothing from a second thread, and lose a lot on a busy machine
    try:
        loss = train_format(model, tokenizer, special, recipe)
    finally:
        torch.set_num_threads(threads)
    for stale in [*llm.glob("*.safetensors"), llm / INDEX_NAME, llm / SINGLE_NAME]:
        stale.unlink(missing_ok=True)
    save_weights(model.state_dict(), llm, max_shard_bytes=TINY_SHARD_BYTES)
    logger.info(f"trained the tiny model's output format in {time.perf_counter() - began:.1f} s (loss {loss:.4f})")


def ensure_preset_checkpoints(
    preset: str = "tiny", cache_dir: str | os.PathLike | None = None, recipe: Recipe = RECIPE
) -> tuple[Path, Path]:
    """(LLM folder, audio tokenizer folder) of a preset, built once and cached; safe across processes."""
    root = Path(cache_dir or DEFAULT_CACHE).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{preset}-{_cache_key(preset, recipe)}"
    result = (folder / "llm", folder / "tokenizer")
    if folder.is_dir():
        return result
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if folder.is_dir():  # built by another process while we waited
            return result
        logger.info(f"building the embedded `{preset}` model into {folder} (once)")
        staging = root / f".{folder.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _build(staging, preset, recipe)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _prune(root, preset)
    return result


def _prune(root: Path, preset: str) -> None:
    """Removes all but the newest ``KEEP_BUILDS`` builds of a preset (other code versions or recipes), skipping
    any whose lock is held: a process is building it."""
    builds = sorted((path for path in root.glob(f"{preset}-*") if path.is_dir()), key=lambda p: p.stat().st_mtime)
    for stale in builds[:-KEEP_BUILDS]:
        with open(root / f"{stale.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(stale, ignore_errors=True)
        (root / f"{stale.name}.lock").unlink(missing_ok=True)
