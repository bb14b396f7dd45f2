"""``mimo-voice bench engine``: generation speed and response latency of the streaming engine.

Each run is one conversation of ``--turns`` turns through the real :class:`Session` path: the user's
speech (a synthetic speech-like signal) is fed in 20 ms pieces at 16 kHz, resampled, encoded and
prefilled while it "arrives"; ``respond()`` then marks the end of the turn, and the reply is generated
with audio forced at every position (as the official figures were measured) and decoded to PCM
while it is generated. Forcing goes through a text hook, so the benchmark runs a testing engine
(:mod:`mimo_voice.streaming.engine.testing`): the same worker and step loop as production, plus the hook.
Reported, with p50/p90 over runs (and turns where it applies):

- per audio group: LLM step + 11-step patch decoder + patch encoder, and the same plus streaming decode;
  RTF = that time / 160 ms of audio;
- end of turn -> the rest of the user's turn encoded and fed (the part not done while they talked), -> first
  audio patch and -> first PCM chunk, at turn 1 and at the last turn. As in the live path, the speech is followed
  by the pause after which the VAD ends the turn (``--pause-secs``, default ``vad.stop_secs``), fed as quiet
  noise; with ``streaming.prepare_reply_after_secs`` below it, the reply's start is computed in that pause.
  History is never re-prefilled, so the last turn must stay within 1.2x of the first (the command fails otherwise);
- worker -> session: from an audio patch's making in the engine to its arrival in the session's event loop
  (``perf_counter`` is one clock for every process of a machine). ``--backend ray`` runs the same conversations
  on the local pipe and then on an engine actor (``engine.ray_address``; ``local`` starts a private cluster),
  and prints what the Ray hop adds per audio group.

The official implementation's figures on a 2-core CPU (docs/mimo_audio.md §11) are printed alongside; they vary up to
1.5x between runs on the same idle machine, so compare ratios measured side by side, not absolute values.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
from mimo_voice.configs import Config
from mimo_voice.streaming.engine.events import AudioChunk, AudioPatch, TurnEnd
from mimo_voice.streaming.engine.generation import PATCH_SECONDS
from mimo_voice.streaming.engine.testing import TestingEngine as Engine
from mimo_voice.streaming.engine.testing import TestingSession as Session
from mimo_voice.streaming.model.text_tokenizer import SpecialTokens, load_text_tokenizer

from .report import ProgressBar, Table, add_json_argument, print_tables, summarize, write_json

INPUT_RATE = 16_000
PIECE = INPUT_RATE // 50  # 20 ms, as WebRTC delivers it
MAX_TURN_RATIO = 1.2
# The end of the turn by stage, as the worker times them (TurnEnd timings): what lies between respond() and the
# first audio patch, then that patch's PCM.
STAGES = (
    ("last_encode_ms", "last encode (the rest of the user's audio) (ms)"),
    ("last_prefill_ms", "last prefill (last user patches + closing tokens + assistant prefix, one forward) (ms)"),
    ("first_step_ms", "first step (text head + patch decoder) (ms)"),
    ("first_decode_ms", "first decode (the first patch to PCM) (ms)"),
    ("prepared_in_pause", "replies whose start was computed in the user's pause (fraction)"),
)
PAUSE_DBFS = -70.0  # the level of the quiet noise fed as the pause
HOP_COLUMNS = ["local pipe", "ray", "added"]
BENCH_ENGINE = "mimo-bench-engine"
# docs/mimo_audio.md §11: the official implementation, 2-core CPU, fp32, greedy, audio forced (medians of 5 runs).
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
        choices=("tiny", "small", "real7b"),
        help="embedded preset (default: model.preset); ignored when model.path is set",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: model.device)")
    parser.add_argument("--runs", type=int, default=3, help="conversations (default: 3)")
    parser.add_argument("--turns", type=int, default=20, help="turns per conversation (default: 20)")
    parser.add_argument("--patches", type=int, default=20, help="audio patches per reply (default: 20 = 3.2 s)")
    parser.add_argument("--user-secs", type=float, default=1.5, help="user speech per turn (default: 1.5 s)")
    parser.add_argument(
        "--pause-secs",
        type=float,
        help="quiet audio after the speech, before the turn ends (default: vad.stop_secs, the VAD's wait)",
    )
    parser.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="ray: also on an engine actor, with the Ray hop's cost next to the local pipe's (default: local)",
    )
    parser.add_argument("--threads", type=int, help="torch threads of the engine process (default: engine.threads)")
    parser.add_argument(
        "--sessions",
        type=_session_counts,
        default=[],
        metavar="LIST",
        help="also measure N conversations replying at once (stepped together), for each N of a list like 1,2,4,8",
    )
    parser.add_argument(
        "--profile-ops", action="store_true", help="count ATen ops and host reads per audio group, by part"
    )
    add_json_argument(parser)
    return parser


def _session_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected a list of positive session counts like 1,2,4,8, got {text!r}")
    return counts


def speech_like(seconds: float, seed: int, pause_secs: float = 0.0) -> np.ndarray:
    """int16 at 16 kHz: a few harmonics under a 4 Hz syllable envelope, plus a little noise; then ``pause_secs``
    of quiet noise (PAUSE_DBFS)."""
    t = np.arange(int(seconds * INPUT_RATE)) / INPUT_RATE
    rng = np.random.default_rng(seed)
    pitch = 120 + 40 * rng.random()
    wave = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 5)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    speech = (0.2 * wave + 0.01 * rng.standard_normal(len(t))) * 8000
    pause = rng.standard_normal(int(pause_secs * INPUT_RATE)) * 32768 * 10 ** (PAUSE_DBFS / 20)
    return np.concatenate([speech, pause]).astype(np.int16)


class ForcedAudio:
    """``text_hook``: every position is an audio patch, then ``<|eostm|>``."""

    def __init__(self, special: SpecialTokens, patches: int) -> None:
        self.script = [special.empty] * patches + [special.eostm]

    def __call__(self, tokens: list[int]) -> int:
        return self.script[min(len(tokens), len(self.script) - 1)]


async def _turn(session: Session, audio: np.ndarray) -> dict[str, Any]:
    for start in range(0, len(audio), PIECE):
        await session.feed_audio(audio[start : start + PIECE], INPUT_RATE)
    # Live audio arrives in real time and the worker keeps up; wait for it as the live path would have.
    await session.caught_up()
    started = time.perf_counter()
    first_patch = first_pcm = None
    end = None
    deliveries = []
    async for event in session.respond():
        if isinstance(event, AudioPatch):
            deliveries.append(1000 * (time.perf_counter() - event.time))
        if isinstance(event, AudioPatch) and first_patch is None:
            first_patch = event.time - started
        elif isinstance(event, AudioChunk) and first_pcm is None:
            first_pcm = event.time - started
        elif isinstance(event, TurnEnd):
            end = event
    if end is None or end.reason != "stop" or first_patch is None or first_pcm is None:
        reason = end.reason if end else "nothing"
        raise RuntimeError(
            f"a benchmark turn ended with {reason} (audio: {first_pcm is not None}): {end and end.error}"
        )
    steps = end.timings["ms_per_audio_step"]
    return {
        "prefill_s": end.timings["prefill_s"],
        "first_patch_s": first_patch,
        "first_pcm_s": first_pcm,
        "step_ms": steps,
        "group_ms": steps - end.timings["ms_pcm_per_patch"],
        "delivery_ms": deliveries,
        **{stage: end.timings.get(stage) for stage, _ in STAGES},
    }


async def _conversation(engine: Engine, args: argparse.Namespace, run: int, progress: ProgressBar) -> list[dict]:
    session = engine.new_session()
    session.text_hook = ForcedAudio(engine.special, args.patches)
    try:
        turns = []
        for turn in range(args.turns):
            audio = speech_like(args.user_secs, seed=run * 1000 + turn, pause_secs=args.pause_secs)
            turns.append(await _turn(session, audio))
            progress.advance(note=f"run {run + 1}, turn {turn + 1}")
        return turns
    finally:
        await session.close()


async def _together(engine: Engine, args: argparse.Namespace, count: int, run: int) -> list[dict]:
    """``count`` conversations whose replies are generated at the same time: each one's TurnEnd timings."""
    sessions = [engine.new_session() for _ in range(count)]
    try:
        for index, session in enumerate(sessions):
            session.text_hook = ForcedAudio(engine.special, args.patches)
            audio = speech_like(args.user_secs, seed=run * 1000 + index, pause_secs=args.pause_secs)
            for start in range(0, len(audio), PIECE):
                await session.feed_audio(audio[start : start + PIECE], INPUT_RATE)
        await asyncio.gather(*(session.caught_up() for session in sessions))
        began = time.perf_counter()
        ends = await asyncio.gather(*(_reply_end(session) for session in sessions))
        wall = max(end.time for end in ends) - began
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    for end in ends:
        if end.reason != "stop":
            raise RuntimeError(f"a benchmark reply ended with {end.reason}: {end.error}")
    return [dict(end.timings, wall_s=wall) for end in ends]


async def _reply_end(session: Session) -> TurnEnd:
    end = None
    async for event in session.respond():
        if isinstance(event, TurnEnd):
            end = event
    assert end is not None
    return end


async def _measure_on_ray(config: Config, args: argparse.Namespace) -> list[list[dict]]:
    """The same conversations on one engine actor of the Ray pool."""
    from mimo_voice.streaming.cluster.pool import EnginePool

    # Its own engine actor, made to take text hooks, next to (not in) the deployment's pool; removed after.
    pool = await asyncio.to_thread(EnginePool.connect, config, names=[BENCH_ENGINE], testing=True)
    lease = pool.lease()
    if lease is None:
        raise RuntimeError(pool.busy_message())
    try:
        runs, _ = await _measure(lease.engine, args)  # type: ignore[arg-type]  # a TestingRemoteEngine
        return runs
    finally:
        lease.release()
        await pool.aclose()
        pool.kill()


def _hop_table(local: dict, ray: dict) -> Table:
    """What the Ray hop adds to the local pipe, per audio group (p50 and p90)."""
    table = Table("bench engine: the Ray hop (target: <= 2 ms added per audio group, p50)", ["metric", *HOP_COLUMNS])
    for label, key in (
        ("worker -> session, per audio patch (ms)", "delivery_ms"),
        ("per audio group, with streaming decode (ms)", "group_with_decode_ms"),
    ):
        for q in ("p50", "p90"):
            pipe, hop = local["metrics"][key][q], ray["metrics"][key][q]
            table.add_row(f"{label}, {q}", pipe, hop, hop - pipe)
    return table


async def _measure(engine: Engine, args: argparse.Namespace) -> tuple[list[list[dict]], dict[int, list[list[dict]]]]:
    steps = args.runs * (args.turns + len(args.sessions))
    try:
        with ProgressBar(steps, "bench engine") as progress:
            runs = [await _conversation(engine, args, run, progress) for run in range(args.runs)]
            together: dict[int, list[list[dict]]] = {}
            # Session counts take turns run by run, so that a machine's drift hits every count alike (their
            # ratios are the figures that matter).
            for run in range(args.runs):
                for count in args.sessions:
                    together.setdefault(count, []).append(await _together(engine, args, count, run))
                    progress.advance(note=f"{count} sessions, run {run + 1}")
            return runs, together
    finally:
        await engine.aclose()


def _by_sessions(together: dict[int, list[list[dict]]], patches: int) -> list[dict]:
    """Per session count: audio groups per second over all sessions, and each session's ms per group and RTF."""
    entries = []
    for count, runs in together.items():
        replies = [reply for run in runs for reply in run]
        rates = [count * patches / run[0]["wall_s"] for run in runs]
        # The same without the codec: the official loop's "audio group" (LLM step, patch decoder, patch encoder).
        decode_s = [sum(r["ms_pcm_per_patch"] / 1000 * r["audio_s"] / PATCH_SECONDS for r in run) for run in runs]
        model_rates = [count * patches / (run[0]["wall_s"] - spent) for run, spent in zip(runs, decode_s)]
        entries.append(
            {
                "sessions": count,
                "aggregate_groups_per_s": summarize(rates)["p50"],
                "aggregate_groups_per_s_without_decode": summarize(model_rates)["p50"],
                "per_group_ms_p50": summarize(1000 * r["generation_s"] / r["steps"] for r in replies)["p50"],
                "rtf_p50": summarize(r["rtf"] for r in replies)["p50"],
                "rtf_max": summarize(r["rtf"] for r in replies)["max"],
            }
        )
    return entries


WITHOUT_DECODE = "aggregate_groups_per_s_without_decode"


def _sessions_table(entries: list[dict]) -> Table:
    table = Table(
        "sessions replying at once (stepped together)",
        [
            "sessions",
            "aggregate groups/s",
            "x one session",
            "without decode: groups/s",
            "x one session",
            "per group ms p50",
            "RTF p50",
            "RTF max",
        ],
    )
    one = entries[0] if entries and entries[0]["sessions"] == 1 else None
    for entry in entries:
        speedups = [entry[key] / one[key] if one else None for key in ("aggregate_groups_per_s", WITHOUT_DECODE)]
        table.add_row(
            entry["sessions"],
            entry["aggregate_groups_per_s"],
            speedups[0],
            entry[WITHOUT_DECODE],
            speedups[1],
            entry["per_group_ms_p50"],
            entry["rtf_p50"],
            entry["rtf_max"],
        )
    return table


def _ops_table(profile: dict) -> Table:
    table = Table("ATen ops per audio group (dispatch mode)", ["part", "ops", "host reads"])
    for part, ops in profile["ops_per_group"].items():
        table.add_row(part, ops, profile["host_reads_per_group"][part])
    table.add_row("total", profile["ops_per_group_total"], profile["host_reads_per_group_total"])
    return table


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
        **{stage: summarize(t[stage] for t in every) for stage, _ in STAGES},
        "delivery_ms": summarize(ms for t in every for ms in t["delivery_ms"]),
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
        *((f"end of turn, stage: {label}", stage, None) for stage, label in STAGES),
        ("worker -> session, per audio patch (ms)", "delivery_ms", None),
    ]
    table = Table(f"bench engine: {describe}", ["metric", "p50", "p90", "official"])
    for label, key, reference in rows:
        table.add_row(label, metrics[key]["p50"], metrics[key]["p90"], reference)
    return [table], {"metrics": metrics, "official": official, "turns": runs}


def main(config: Config, argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if (
        min(args.runs, args.turns, args.patches) < 1
        or args.user_secs <= 0
        or (args.threads is not None and args.threads < 1)
        or (args.pause_secs is not None and args.pause_secs < 0)
    ):
        print(
            "mimo-voice bench engine: --runs, --turns, --patches, --threads and --user-secs must be positive, "
            "--pause-secs not negative"
        )
        return 2
    if args.pause_secs is None:
        args.pause_secs = config.vad.stop_secs
    if args.preset:
        config.model.preset = args.preset
    if args.device:
        config.model.device = args.device
    if args.threads:
        config.engine.threads = args.threads
    preset = None if config.model.path else config.model.preset
    describe = (
        f"{preset or config.model.path}, device {config.model.device}, dtype {config.model.dtype}, "
        f"{config.engine.threads or 'default'} threads, "
        f"{args.runs} runs x {args.turns} turns x {args.patches} patches, "
        f"{args.user_secs:g} s speech + {args.pause_secs:g} s pause (reply prepared after "
        f"{config.streaming.prepare_reply_after_secs:g} s of it)"
    )
    profile = _profile(config, args) if args.profile_ops else None
    engine = Engine.load(config)
    runs, together = asyncio.run(_measure(engine, args))
    tables, payload = _tables(runs, preset, describe)
    if args.backend == "ray":
        ray_tables, ray_payload = _tables(asyncio.run(_measure_on_ray(config, args)), preset, f"{describe}, on Ray")
        tables += [*ray_tables, _hop_table(payload, ray_payload)]
        payload = {**payload, "ray": ray_payload}
    payload["by_sessions"] = _by_sessions(together, args.patches)
    if together:
        tables.append(_sessions_table(payload["by_sessions"]))
    if profile is not None:
        payload["ops"] = profile
        tables.append(_ops_table(profile))
    print_tables(tables)
    if args.json:
        write_json(args.json, payload, command="bench engine", tables=tables)
    ratio = payload["metrics"]["last_turn_over_turn1"]["p50"]
    if ratio > MAX_TURN_RATIO:
        print(f"first PCM at the last turn is {ratio:.2f}x turn 1's: more than {MAX_TURN_RATIO}x")
        return 1
    return 0


def _profile(config: Config, args: argparse.Namespace) -> dict:
    """Op counts in this process, at the engine's thread count (its worker process is not started yet)."""
    import torch
    from mimo_voice.streaming.engine.worker import engine_threads
    from mimo_voice.streaming.model.checkpoint import pick_device

    from .ops import checkpoint_paths, profile_ops

    threads = torch.get_num_threads()
    torch.set_num_threads(engine_threads(config, pick_device(config.model.device)))
    try:
        script = ForcedAudio(
            SpecialTokens.from_tokenizer(load_text_tokenizer(checkpoint_paths(config)[0])), args.patches
        )
        return profile_ops(config, speech_like(args.user_secs, seed=0, pause_secs=args.pause_secs), INPUT_RATE, script)
    finally:
        torch.set_num_threads(threads)
