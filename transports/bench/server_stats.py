"""Server-side figures for ``mimo-voice bench live``, read from the server's ``GET /metrics``.

The bench reads the Prometheus text before and after the calls and uses the differences, so a server
that has served other calls before still gives the figures of this run alone. Stages the server does
not expose are reported as missing, never guessed.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (metric name, sorted label pairs)

# Families read from /metrics (transports/metrics.py writes them; without the stage histogram, no stage rows).
STAGES_FAMILY = "mimo_voice_stage_seconds"  # histogram, label stage; in the order they happen in a turn
STAGES = ("vad_hangover", "encode", "prefill", "first_patch", "decode", "output")
RESPONSE_FAMILY = "mimo_voice_response_latency_seconds"  # end of user speech -> first agent audio leaves
TTFB_FAMILY = "mimo_voice_ttfb_seconds"  # end of user speech -> first audio out of the MiMo service
MILESTONE_ROWS = (  # (key of server_figures(), row label): mean times since the end of user speech
    ("model_first_audio", "end of speech -> model's first audio (TTFB)"),
    ("audio_out", "end of speech -> first audio leaves the server"),
)
GENERATION_SECONDS = "mimo_voice_generation_seconds_total"
GENERATED_AUDIO_SECONDS = "mimo_voice_generated_audio_seconds_total"

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[Sample, float]:
    """Samples of a Prometheus text exposition; comments and malformed lines are skipped."""
    samples: dict[Sample, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        pairs = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(labels or "")))
        samples[(name, pairs)] = number
    return samples


def _unescape(value: str) -> str:
    return value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    """What changed during the run (a series that appeared counts from zero)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _sum_count(samples: dict[Sample, float], family: str, **labels: str) -> tuple[float, float]:
    """Summed ``_sum`` and ``_count`` of a histogram over the series matching ``labels``."""
    wanted = set(labels.items())
    total = count = 0.0
    for (name, pairs), value in samples.items():
        if wanted <= set(pairs):
            if name == f"{family}_sum":
                total += value
            elif name == f"{family}_count":
                count += value
    return total, count


def _figure(samples: dict[Sample, float], family: str, **labels: str) -> dict[str, Any]:
    total, count = _sum_count(samples, family, **labels)
    return {"mean_secs": total / count if count else None, "n": int(count)}


def server_figures(before: dict[Sample, float] | None, after: dict[Sample, float] | None) -> dict[str, Any]:
    """What the server measured during the run: the mean of each stage it exposes (they add up), the mean time
    from the end of user speech to the model's first audio and to the first audio leaving the server, and RTF."""
    if before is None or after is None:
        empty = {"mean_secs": None, "n": 0}
        return {"available": False, "stages": {}, "model_first_audio": empty, "audio_out": empty, "rtf": None}
    run = delta(before, after)
    stages = {stage: _figure(run, STAGES_FAMILY, stage=stage) for stage in STAGES}
    generated = run.get((GENERATED_AUDIO_SECONDS, ()), 0.0)
    return {
        "available": True,
        "stages": {stage: figure for stage, figure in stages.items() if figure["n"]},
        "model_first_audio": _figure(run, TTFB_FAMILY),
        "audio_out": _figure(run, RESPONSE_FAMILY),
        "rtf": run.get((GENERATION_SECONDS, ()), 0.0) / generated if generated > 0 else None,
    }


class ServerStats:
    """Snapshots of a server's ``/metrics``; None when the server has none (or is unreachable)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/") + "/metrics"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def snapshot(self) -> dict[Sample, float] | None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                async with http.get(self.url, headers=self.headers) as response:
                    if response.status != 200:
                        return None
                    return parse_prometheus(await response.text())
        except (aiohttp.ClientError, TimeoutError):
            return None
