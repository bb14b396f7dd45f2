"""The embedded default always answers: every user turn gets >= 3 s of audible babble, and the turn ends in ~6 s.

Real engine, real system prompt (the configured one plus the tool list, as the agent builds it), public Session
API only. Utterances: espeak-ng speech of 0.5-15 s, noise bursts that a VAD could have taken for a turn, and
typed text; in both modes, several turns per call.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.speech import require_tool, track
from mimo_voice.configs import load_config
from mimo_voice.streaming.engine.events import AudioChunk, TurnEnd
from mimo_voice.streaming.presets import tiny_training
from mimo_voice.tools import tools_prompt
from mimo_voice.tools.registry import build_registry

RATE = 16_000
MIN_AUDIBLE_SECS = 3.0
MAX_REPLY_SECS = 6.5  # "ends its turn within about 6 s"
LEVEL = 0.01 * 32768  # a 20 ms window counts as audible above -40 dBFS RMS
TURNS_PER_CALL = 5
SHIPPED_CONFIGS = (None, "support")  # phone.yaml sends the default prompt

SPOKEN = (
    ("Hi.",),
    ("Yes.",),
    ("What time is it?",),
    ("Could you tell me what the weather will be like in Paris tomorrow?",),
    ("Hello there.", 0.4, "I would like to ask you something."),
    ("Please add seventeen and twenty five, then multiply the result by three.",),
    ("My order number is four two seven nine.", 0.6, "It has not arrived yet.", 0.3, "Can you check it?"),
    ("Tell me a story about a dragon who lived in a small village by the sea and loved to bake bread.",),
    ("Um.", 1.0, "Never mind.", 0.5, "Actually, what is the capital of France, and how many people live there?"),
    (
        "I have been thinking about travelling to Japan next spring.",
        0.5,
        "I want to see the cherry blossoms in Kyoto and eat real ramen in Tokyo.",
        0.5,
        "What should I pack, and how many days would you plan for each city?",
        0.5,
        "Also, do I need a visa?",
    ),
)
TYPED = (
    "hello",
    "asdf qwerty zxcv",
    "What is 17 * 23?",
    "你好，今天天气怎么样？",
    "Please summarise the plot of a long novel you like in three sentences, with names and places.",
)
NOISE_SECS = (0.5, 1.0, 2.0, 4.0, 0.7)


def _noise(seconds: float, seed: int) -> np.ndarray:
    """A burst of coloured noise with a random loudness, as a door slam or a cough that became a turn."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(int(seconds * RATE))
    coloured = np.convolve(white, np.ones(seed % 7 + 1) / (seed % 7 + 1), mode="same")
    return (coloured * rng.uniform(1000, 8000)).clip(-32768, 32767).astype(np.int16)


def utterances() -> list[tuple[str, str | np.ndarray]]:
    """(kind, audio or text): 10 spoken, 5 noise, 5 typed, interleaved so that every call mixes them."""
    spoken = [("speech", track(0.25, *parts, 0.25, sample_rate=RATE).pcm) for parts in SPOKEN]  # as a VAD cuts it
    noise = [("noise", _noise(seconds, seed)) for seed, seconds in enumerate(NOISE_SECS)]
    typed = [("text", text) for text in TYPED]
    mixed = []
    for index in range(len(spoken)):
        mixed.append(spoken[index])
        if index % 2:
            mixed.append(noise[index // 2])
            mixed.append(typed[index // 2])
    return mixed


def audible_seconds(pcm: np.ndarray, rate: int) -> float:
    window = rate // 50
    frames = pcm[: len(pcm) // window * window].astype(np.float32).reshape(-1, window)
    return float((np.sqrt((frames**2).mean(axis=1)) > LEVEL).sum() / 50)


def live_system_prompt(config_name: str | None = None) -> str:
    """The system prompt the agent sends with a shipped config (as agent/service.py builds it)."""
    config = load_config(config_name)
    registry = build_registry(config.tools, timeout_secs=config.agent.tool_timeout_secs)
    return f"{config.agent.system_prompt}\n\n{tools_prompt(registry.schemas())}"


def live_prompts() -> dict[str, str]:
    return {name or "default": live_system_prompt(name) for name in SHIPPED_CONFIGS}


def test_the_tiny_training_prompts_are_the_live_ones():
    """The tiny model trains on a snapshot of the live system prompts; a changed tool list or prompt text must
    renew it (``(cd tests && python test_tiny_answers.py)``), which retrains the model on first use."""
    assert json.loads(tiny_training.LIVE_PROMPTS_FILE.read_text(encoding="utf-8")) == live_prompts()


async def _answer(session, kind: str, item) -> tuple[float, float, str]:
    if kind == "text":
        await session.add_text("user", item)
    else:
        await session.feed_audio(item, RATE)
    chunks, end = [], None
    async for event in session.respond():
        if isinstance(event, AudioChunk):
            chunks.append(event.pcm)
        elif isinstance(event, TurnEnd):
            end = event
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    assert end is not None
    return audible_seconds(pcm, 24_000), len(pcm) / 24_000, end.reason


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["non_thinking", "thinking"])
async def test_the_tiny_model_answers_every_turn(tiny_engine, mode):
    require_tool("espeak-ng")
    items = utterances()
    assert len(items) >= 20
    prompt = live_system_prompt()
    failures, report = [], []
    for start in range(0, len(items), TURNS_PER_CALL):
        session = tiny_engine.new_session(mode=mode, system_prompt=prompt)
        try:
            for turn, (kind, item) in enumerate(items[start : start + TURNS_PER_CALL]):
                audible, total, reason = await _answer(session, kind, item)
                length = f"{len(item) / RATE:.1f} s" if kind != "text" else f"{len(item)} chars"
                line = f"call {start // TURNS_PER_CALL} turn {turn} {kind} ({length}): "
                line += f"{audible:.2f} s audible of {total:.2f} s, {reason}"
                report.append(line)
                if audible < MIN_AUDIBLE_SECS or total > MAX_REPLY_SECS or reason != "stop":
                    failures.append(line)
        finally:
            await session.close()
    print("\n".join(report))
    assert not failures, "\n".join(failures)


if __name__ == "__main__":  # renews the snapshot
    text = json.dumps(live_prompts(), ensure_ascii=False, indent=1) + "\n"
    tiny_training.LIVE_PROMPTS_FILE.write_text(text, encoding="utf-8")
