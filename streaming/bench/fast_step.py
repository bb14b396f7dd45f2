"""Micro-benchmark of one audio group (LLM step with its patch encoder + text sampling + 11-step patch
decoder), the reference ``MiMoAudioForCausalLM`` path and the fast path side by side in one run,
with ATen op counts and host reads per group. Audio is forced at every position and sampling is
greedy, as the official loop's figures are measured.

    python -m mimo_voice.streaming.bench.fast_step --presets tiny,small --threads 1 --groups 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from mimo_voice.streaming.model.configuration_mimo_audio import MiMoAudioConfig
from mimo_voice.streaming.model.fast import FastMiMoAudio, HeadPrecision
from mimo_voice.streaming.model.fast_sampling import RowSampling
from mimo_voice.streaming.model.kv_pool import KVPool
from mimo_voice.streaming.model.modeling_mimo_audio import MiMoAudioForCausalLM
from mimo_voice.streaming.model.profiling import OpCounts, count_call
from mimo_voice.streaming.model.sampling import Sampler, SamplingParams
from mimo_voice.streaming.model.text_tokenizer import SpecialTokens

GREEDY = SamplingParams(do_sample=False)
CONTEXT = 64  # positions already in the cache before the timed groups
GROUP_MS = 160.0
SPECIAL = SpecialTokens(
    sosp=151665,
    eosp=151666,
    empty=151667,
    sostm=151670,
    eostm=151671,
    eot=151672,
    im_start=151644,
    im_end=151645,
    endoftext=151643,
)


@dataclass
class GroupFigures:
    path: str
    ms_p50: float
    ms_min: float
    cpu_ms_p50: float  # this thread's CPU time: less distorted than wall time when other jobs share the cores
    counts: OpCounts

    def row(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "per_group_ms_p50": round(self.ms_p50, 2),
            "per_group_ms_min": round(self.ms_min, 2),
            "per_group_cpu_ms_p50": round(self.cpu_ms_p50, 2),
            "rtf_p50": round(self.ms_p50 / GROUP_MS, 4),
            "aten_ops_per_group": self.counts.ops,
            "host_reads_per_group": self.counts.host_reads,
        }


def _eager_group(model: MiMoAudioForCausalLM) -> Callable[[], None]:
    cache = model.new_cache()
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, 151643, (1, CONTEXT), generator=generator)
    model(text, model.empty_codes(CONTEXT), cache)
    sampler = Sampler(GREEDY)
    state = {"codes": model.empty_codes(1)}
    empty = torch.tensor([[model.special_tokens.empty]])

    def group() -> None:
        if cache.length >= CONTEXT + 4096:
            cache.truncate(CONTEXT)
        out = model(empty, state["codes"], cache)
        sampler.sample(out.text_logits)
        state["codes"] = model.decode_patch(out.local_in, sampler)[:, None]

    return group


def _fast_group(model: MiMoAudioForCausalLM, head_precision: HeadPrecision, batch: int = 1) -> Callable[[], None]:
    """One step of ``batch`` sessions (rows at different lengths) stepped together."""
    pool = KVPool(model.config, batch, CONTEXT + batch + 4096 + 1, model.device, torch.float32)
    fast = FastMiMoAudio(model, pool, compile="off", head_precision=head_precision)
    slots = [pool.allocate() for _ in range(batch)]
    generator = torch.Generator().manual_seed(0)
    for slot in slots:
        count = CONTEXT + slot
        fast.prefill(slot, torch.randint(0, 151643, (count,), generator=generator), model.empty_codes(count)[0])
    state = {"codes": model.empty_codes(batch)[0]}
    empty = torch.full((batch,), model.special_tokens.empty)
    greedy = RowSampling.build(GREEDY, batch, fast.device)  # once per set of rows, as the engine's scheduler does

    def group() -> None:
        if pool.length(slots[-1]) >= CONTEXT + 4096:
            for slot in slots:
                pool.truncate(slot, CONTEXT + slot)
        out = fast.step(slots, empty, state["codes"])
        fast.sample_text(out.text_logits, greedy).tolist()  # the caller's one host read per group
        state["codes"] = fast.decode_patch(out.local_in, greedy)

    return group


def _time(path: str, group: Callable[[], None], groups: int, reps: int) -> GroupFigures:
    for _ in range(3):
        group()
    _, counts = count_call(group)
    times, cpu_times = [], []
    for _ in range(reps):
        for _ in range(groups):
            start, cpu_start = time.perf_counter(), time.thread_time()
            group()
            times.append((time.perf_counter() - start) * 1e3)
            cpu_times.append((time.thread_time() - cpu_start) * 1e3)
    return GroupFigures(path, statistics.median(times), min(times), statistics.median(cpu_times), counts)


def measure(preset: str, groups: int = 40, reps: int = 3, head_precision: HeadPrecision = "auto") -> list[GroupFigures]:
    """Per-group figures for the eager path and the fast path of one preset (random weights)."""
    model = MiMoAudioForCausalLM.random(MiMoAudioConfig.preset(preset), SPECIAL, seed=0)
    with torch.inference_mode():
        eager, fast = _eager_group(model), _fast_group(model, head_precision)
        # Interleave the two paths' repetitions so that load on a shared machine hits both alike.
        figures: dict[str, list[GroupFigures]] = {"eager": [], "fast": []}
        for _ in range(reps):
            figures["eager"].append(_time("eager", eager, groups, 1))
            figures["fast"].append(_time(f"fast ({head_precision} head)", fast, groups, 1))
    return [min(runs, key=lambda f: f.ms_p50) for runs in figures.values()]


def measure_batches(
    preset: str, batches: list[int], groups: int = 20, head_precision: HeadPrecision = "auto"
) -> list[dict[str, Any]]:
    """Fast path only: one step of B sessions together; aggregate audio groups/s against batch 1."""
    model = MiMoAudioForCausalLM.random(MiMoAudioConfig.preset(preset), SPECIAL, seed=0)
    rows = []
    with torch.inference_mode():
        for batch in batches:
            figures = _time(f"fast x{batch}", _fast_group(model, head_precision, batch), groups, 1)
            rows.append(
                {
                    "sessions": batch,
                    "step_ms_p50": round(figures.ms_p50, 2),
                    "step_cpu_ms_p50": round(figures.cpu_ms_p50, 2),
                    "aggregate_groups_per_s": round(batch * 1e3 / figures.ms_p50, 1),
                    "rtf_p50": round(figures.ms_p50 / GROUP_MS, 4),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--groups", type=int, default=40, help="timed groups per repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--head", default="auto", choices=("auto", "model", "bf16", "int8"), help="lm_head precision")
    parser.add_argument("--batches", help="also time B sessions stepped together, e.g. 1,2,4,8 (fast path)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, Any]]] = {}
    print(
        f"per audio group, {args.threads} thread(s), greedy, audio forced; best repetition's p50 of {args.reps} "
        "(wall ms; CPU ms = this thread's CPU time)"
    )
    print(
        f"{'preset':6} {'path':22} {'p50 ms':>8} {'min ms':>8} {'CPU ms':>8} {'RTF':>7} "
        f"{'ATen ops':>9} {'host reads':>10}"
    )
    for preset in args.presets.split(","):
        rows = [f.row() for f in measure(preset, args.groups, args.reps, args.head)]
        results[preset] = rows
        for row in rows:
            print(
                f"{preset:6} {row['path']:22} {row['per_group_ms_p50']:8.2f} {row['per_group_ms_min']:8.2f} "
                f"{row['per_group_cpu_ms_p50']:8.2f} {row['rtf_p50']:7.3f} {row['aten_ops_per_group']:9d} "
                f"{row['host_reads_per_group']:10d}"
            )
        eager, fast = rows
        print(
            f"{preset:6} {'speed-up':22} {eager['per_group_ms_p50'] / fast['per_group_ms_p50']:8.2f}x "
            f"ops ratio {fast['aten_ops_per_group'] / eager['aten_ops_per_group']:.3f}"
        )
        if args.batches:
            batch_rows = measure_batches(preset, [int(b) for b in args.batches.split(",")], args.groups, args.head)
            results[f"{preset}_by_sessions"] = batch_rows
            for row in batch_rows:
                print(
                    f"{preset:6} {'fast x' + str(row['sessions']):22} {row['step_ms_p50']:8.2f} per step "
                    f"({row['step_cpu_ms_p50']:.2f} CPU ms), {row['aggregate_groups_per_s']:7.1f} groups/s, "
                    f"RTF {row['rtf_p50']:.3f}"
                )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
