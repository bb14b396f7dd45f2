"""``mimo-voice bench engine``: generation speed and response latency of the streaming engine.

Each run is one conversation of ``--turns`` turns through the real :class:`Session` path: the user's
speech (a synthetic speech-like signal) is fed in 20 ms pieces at 16 kHz, resampled, encoded and
prefilled while it "arrives"; ``respond()`` then marks the end of the turn, and the reply is generated
with audio forced at every position (as the official figures were measured) and decoded to PCM
while it is generated. Forcing goes through a text hook, so the benchmark runs a testing engine
(:mod:`mimo_voice.streaming.engine.testing`): the same worker and step loop as production, plus the hook. Reported, with p50/p90 over runs (and turns where it applies):

- per audio group: LLM step + 11-step patch decoder + patch encoder, and the same plus streaming decode;
  RTF = that time / 160 ms of audio;
- end of turn -> the rest of the user's turn encoded and fed (the part not done while they talked), -> first
  audio patch and -> first PCM chunk, at turn 1 and at the last turn. History is never re-prefilled, so the
  last turn must stay within 1.2x of the first (the command fails otherwise).

The official implementation's figures on a 2-core CPU (presets.md) are printed alongside; they vary up to
1.5x between runs on the same idle machine, so compare ratios measured side by side, not absolute values.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
from mimo_voice.configs import Config
from mimo_voice.streaming.engine.events import AudioChunk, AudioPatch, TurnEnd
from mimo_voice.streaming.engine.testing import TestingEngine as Engine
from mimo_voice.streaming.engine.testing import TestingSession as Session

from .report import ProgressBar, Table, add_json_argument, print_tables, summarize, write_json

INPUT_RATE = 16_000
PIECE = INPUT_RATE // 50  # 20 ms, as WebRTC delivers it
MAX_TURN_RATIO = 1.2
# presets.md: the official implementation, 2-core CPU, fp32, greedy, audio forced (medians of 5 runs).
OFFICIAL = {
    "tiny": {
        "group_ms": 13.5,
        "rtf": 0.086,
        "first_patch_turn1_ms": 23,
        "first_patch_turn20_ms": 37,
        "first_pcm_s": 0.29,
    },
    "small": {
        "group_ms": 89,
        "rtf": 0.56,
        "first_patch_turn1_ms": 113,
        "first_patch_turn20_ms": 680,
        "first_pcm_s": 1.58,
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo-voice bench engine", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=("tiny", "small"),
        help="embedded preset (default: model.preset); ignored when model.path is set",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: model.device)")
    parser.add_argument("--runs", type=int, default=3, help="conversations (default: 3)")
    parser.add_argument("--turns", type=int, default=20, help="turns per conversation (default: 20)")
    parser.add_argument("--patches", type=int, default=20, help="audio patches per reply (default: 20 = 3.2 s)")
    parser.add_argument("--user-secs", type=float, default=1.5, help="user speech per turn (default: 1.5 s)")
    add_json_argument(parser)
    return parser


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """int16 at 16 kHz: a few harmonics under a 4 Hz syllable envelope, plus a little noise."""
    t = np.arange(int(seconds * INPUT_RATE)) / INPUT_RATE
    rng = np.random.default_rng(seed)
    pitch = 120 + 40 * rng.random()
    wave = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 5)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return ((0.2 * wave + 0.01 * rng.standard_normal(len(t))) * 8000).astype(np.int16)


class ForcedAudio:
    """``text_hook``: every position is an audio patch, then ``<|eostm|>``."""

    def __init__(self, engine: Engine, patches: int) -> None:
        self.script = [engine.special.empty] * patches + [engine.special.eostm]

    def __call__(self, tokens: list[int]) -> int:
        return self.script[min(len(tokens), len(self.script) - 1)]


async def _turn(session: Session, audio: np.ndarray) -> dict[str, float]:
    for start in range(0, len(audio), PIECE):
        await session.feed_audio(audio[start : start + PIECE], INPUT_RATE)
    # Live audio arrives in real time and the worker keeps up; wait for it as the live path would have.
    await session.caught_up()
    started = time.perf_counter()
    first_patch = first_pcm = None
    end = None
    async for event in session.respond():
        if isinstance(event, AudioPatch) and first_patch is None:
            first_patch = event.time - started
        elif isinstance(event, AudioChunk) and first_pcm is None:
            first_pcm = event.time - started
        elif isinstance(event, TurnEnd):
            end = event
    if end is None or end.reason != "stop":
        raise RuntimeError(f"a benchmark turn ended with {end.reason if end else 'nothing'}: {end and end.error}")
    steps = end.timings["ms_per_audio_step"]
    return {
        "prefill_s": end.timings["prefill_s"],
        "first_patch_s": first_patch,
        "first_pcm_s": first_pcm,
        "step_ms": steps,
        "group_ms": steps - end.timings["ms_pcm_per_patch"],
    }


async def _conversation(engine: Engine, args: argparse.Namespace, run: int, progress: ProgressBar) -> list[dict]:
    session = engine.new_session()
    session.text_hook = ForcedAudio(engine, args.patches)
    try:
        turns = []
        for turn in range(args.turns):
            turns.append(await _turn(session, speech_like(args.user_secs, seed=run * 1000 + turn)))
            progress.advance(note=f"run {run + 1}, turn {turn + 1}")
        return turns
    finally:
        await session.close()


async def _measure(engine: Engine, args: argparse.Namespace) -> list[list[dict]]:
    try:
        with ProgressBar(args.runs * args.turns, "bench engine") as progress:
            return [await _conversation(engine, args, run, progress) for run in range(args.runs)]
    finally:
        await engine.aclose()


def _tables(runs: list[list[dict]], preset: str | None, describe: str) -> tuple[list[Table], dict]:
    every = [turn for run in runs for turn in run]
    first = [run[0] for run in runs]
    last = [run[-1] for run in runs]
    ratio = [b["first_pcm_s"] / a["first_pcm_s"] for a, b in zip(first, last)]
    official = OFFICIAL.get(preset or "", {})
    metrics = {
        "group_ms": summarize(t["group_ms"] for t in every),
        "group_with_decode_ms": summarize(t["step_ms"] for t in every),
        "rtf": summarize(t["step_ms"] / 160 for t in every),
        "prefill_turn1_ms": summarize(1000 * t["prefill_s"] for t in first),
        "prefill_last_turn_ms": summarize(1000 * t["prefill_s"] for t in last),
        "first_patch_turn1_ms": summarize(1000 * t["first_patch_s"] for t in first),
        "first_patch_last_turn_ms": summarize(1000 * t["first_patch_s"] for t in last),
        "first_pcm_turn1_s": summarize(t["first_pcm_s"] for t in first),
        "first_pcm_last_turn_s": summarize(t["first_pcm_s"] for t in last),
        "last_turn_over_turn1": summarize(ratio),
    }
    turns = len(runs[0])
    rows = [
        ("per audio group: LLM step + patch decoder + patch encoder (ms)", "group_ms", official.get("group_ms")),
        ("per audio group, with streaming decode (ms)", "group_with_decode_ms", None),
        ("RTF (per audio group with decode / 160 ms)", "rtf", official.get("rtf")),
        ("end of turn -> rest of the turn encoded and fed, turn 1 (ms)", "prefill_turn1_ms", None),
        (f"end of turn -> rest of the turn encoded and fed, turn {turns} (ms)", "prefill_last_turn_ms", None),
        ("end of turn -> first patch, turn 1 (ms)", "first_patch_turn1_ms", official.get("first_patch_turn1_ms")),
        (
            f"end of turn -> first patch, turn {turns} (ms)",
            "first_patch_last_turn_ms",
            official.get("first_patch_turn20_ms") if turns == 20 else None,
        ),
        ("end of turn -> first PCM, turn 1 (s)", "first_pcm_turn1_s", official.get("first_pcm_s")),
        (f"end of turn -> first PCM, turn {turns} (s)", "first_pcm_last_turn_s", None),
        (f"first PCM, turn {turns} / turn 1 (must be <= {MAX_TURN_RATIO})", "last_turn_over_turn1", None),
    ]
    table = Table(f"bench engine: {describe}", ["metric", "p50", "p90", "official"])
    for label, key, reference in rows:
        table.add_row(label, metrics[key]["p50"], metrics[key]["p90"], reference)
    return [table], {"metrics": metrics, "official": official, "turns": runs}


def main(config: Config, argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if min(args.runs, args.turns, args.patches) < 1 or args.user_secs <= 0:
        print("mimo-voice bench engine: --runs, --turns, --patches and --user-secs must be positive")
        return 2
    if args.preset:
        config.model.preset = args.preset
    if args.device:
        config.model.device = args.device
    engine = Engine.load(config)
    preset = None if config.model.path else config.model.preset
    describe = (
        f"{preset or config.model.path}, device {config.model.device}, dtype {config.model.dtype}, "
        f"{args.runs} runs x {args.turns} turns x {args.patches} patches"
    )
    runs = asyncio.run(_measure(engine, args))
    tables, payload = _tables(runs, preset, describe)
    print_tables(tables)
    if args.json:
        write_json(args.json, payload, command="bench engine", tables=tables)
    ratio = payload["metrics"]["last_turn_over_turn1"]["p50"]
    if ratio > MAX_TURN_RATIO:
        print(f"first PCM at the last turn is {ratio:.2f}x turn 1's: more than {MAX_TURN_RATIO}x")
        return 1
    return 0
