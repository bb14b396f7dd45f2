"""Scripted conversations for ``mimo-voice bench live``: the YAML scenario format and its audio fixtures.

A scenario is a list of steps, each one user action (a turn, a paused utterance, a backchannel, a noise
burst, a barge-in) played ``delay_secs`` after a trigger: the agent started replying, or is already
speaking (``agent_start``); the agent answered if asked and then stayed quiet for ``quiet_secs``
(``agent_end``); the caller's previous sound ended (``user_end``).
Speech comes from espeak-ng or from WAV files next to the scenario; every fixture is level-normalised and
its audible extent measured with the same detector that scores the agent, so its timing is known truth.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import soxr
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .metrics import DetectorParams, EventKind, Segment, audible_extent

SCENARIO_PACKAGE = "mimo_voice.transports.bench"
SCENARIO_FOLDER = "scenarios"
Trigger = Literal["agent_start", "agent_end", "user_end"]
DEFAULT_TRIGGER: dict[str, Trigger] = {
    "turn": "agent_end",
    "pause": "agent_end",
    "noise": "agent_start",
    "backchannel": "agent_start",
    "barge_in": "agent_start",
}


class ScenarioError(ValueError):
    """A scenario that cannot be played; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step(_Model):
    kind: EventKind
    say: str | list[str] | None = Field(None, description="text spoken with espeak-ng; a list of parts for a pause")
    wav: str | list[str] | None = Field(None, description="WAV file(s), relative to the scenario file")
    noise_secs: float | None = Field(None, gt=0, le=10, description="a white-noise burst of this length")
    level_dbfs: float = Field(-20.0, le=0, description="RMS level of the audible part")
    pause_secs: float = Field(1.2, gt=0, le=10, description="silence between the parts of a pause")
    after: Trigger | None = Field(None, description="default: agent_end for turns and pauses, else agent_start")
    delay_secs: float = Field(0.5, ge=0, le=60)
    label: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Step:
        sources = [name for name in ("say", "wav", "noise_secs") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(f"give exactly one of say, wav, noise_secs (got {', '.join(sources) or 'none'})")
        parts = self.parts
        if self.kind == "pause" and len(parts) < 2:
            raise ValueError("a pause needs at least two parts (say: [first, second])")
        if self.kind != "pause" and len(parts) > 1:
            raise ValueError("only a pause takes several parts")
        if any(isinstance(p, str) and not p.strip() for p in parts):
            raise ValueError("empty text or path")
        return self

    @property
    def parts(self) -> list[str | float]:
        value = self.say if self.say is not None else self.wav if self.wav is not None else self.noise_secs
        if value is None:  # no source: the validator reports it
            return []
        return list(value) if isinstance(value, list) else [value]

    @property
    def trigger(self) -> Trigger:
        return self.after or DEFAULT_TRIGGER[self.kind]

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.noise_secs is not None:
            return f"noise {self.noise_secs:g} s"
        return " / ".join(str(p) for p in self.parts)


class Detector(_Model):
    """Overrides of :class:`DetectorParams` (bench_metrics documents each threshold)."""

    speech_dbfs: float = Field(DetectorParams.speech_dbfs, le=0)
    silence_dbfs: float = Field(DetectorParams.silence_dbfs, le=0)
    merge_gap_secs: float = Field(DetectorParams.merge_gap_secs, ge=0)
    takeover_min_secs: float = Field(DetectorParams.takeover_min_secs, ge=0)
    response_timeout_secs: float = Field(DetectorParams.response_timeout_secs, gt=0)
    max_stop_secs: float = Field(DetectorParams.max_stop_secs, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Detector:
        self.params()  # DetectorParams checks the thresholds against each other
        return self

    def params(self) -> DetectorParams:
        return DetectorParams(**self.model_dump())


class Scenario(_Model):
    name: str
    description: str = ""
    voice: str = Field("en-us", description="espeak-ng voice")
    words_per_minute: int = Field(165, ge=80, le=450)
    lead_in_secs: float = Field(1.0, ge=0, description="silence before the first step")
    quiet_secs: float = Field(0.8, gt=0, description="agent silence after which its reply counts as finished")
    reply_timeout_secs: float = Field(20.0, gt=0, description="longest wait for a reply to finish")
    repeat: int = Field(1, ge=1, le=100, description="play the steps this many times in each call")
    detector: Detector = Field(default_factory=Detector)
    steps: list[Step] = Field(min_length=1)
    source: Path | None = Field(None, exclude=True)

    @property
    def script(self) -> list[Step]:
        return self.steps * self.repeat


def packaged_scenarios() -> list[str]:
    folder = resources.files(SCENARIO_PACKAGE) / SCENARIO_FOLDER
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_scenario(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = Path(str(resources.files(SCENARIO_PACKAGE) / SCENARIO_FOLDER / f"{path.stem}.yaml"))
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise ScenarioError(
        f"scenario not found: {name_or_path} (a YAML file, or one of: {', '.join(packaged_scenarios())})"
    )


def load_scenario(name_or_path: str) -> Scenario:
    path = resolve_scenario(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: the top level must be a mapping (name, steps, ...)")
    try:
        return Scenario.model_validate({**data, "source": path})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ScenarioError(f"{path}: {problems}") from exc


@dataclass(frozen=True)
class Fixture:
    """What the caller plays for one step, and when (relative to its first sample) it is audible."""

    pcm: np.ndarray  # int16 mono
    sample_rate: int
    speech: tuple[Segment, ...]

    @property
    def duration(self) -> float:
        return len(self.pcm) / self.sample_rate


class FixtureFactory:
    """Builds (and caches) the fixture of each step at the caller's sample rate."""

    def __init__(self, scenario: Scenario, sample_rate: int = 48_000, seed: int = 0) -> None:
        self.scenario = scenario
        self.sample_rate = sample_rate
        self.params = scenario.detector.params()
        self._rng = np.random.default_rng(seed)
        self._cache: dict[str, Fixture] = {}

    @cached_property
    def _base_dir(self) -> Path:
        return self.scenario.source.parent if self.scenario.source else Path.cwd()

    def build_all(self) -> list[Fixture]:
        return [self.build(step) for step in self.scenario.script]

    def build(self, step: Step) -> Fixture:
        key = step.model_dump_json()
        if key not in self._cache:
            self._cache[key] = self._build(step)
        return self._cache[key]

    def _build(self, step: Step) -> Fixture:
        gap = np.zeros(round(step.pause_secs * self.sample_rate), np.float32)
        pieces, speech, cursor = [], [], 0
        for i, part in enumerate(step.parts):
            audio = self._normalised(self._source(step, part), step.level_dbfs)
            extent = audible_extent(audio, self.sample_rate, self.params)
            if extent is None:
                raise ScenarioError(f"step {step.name!r}: part {part!r} is silent")
            # Trimmed to what is audible, so that pause_secs is the true silence between the parts.
            audio = audio[round(extent.start * self.sample_rate) : round(extent.end * self.sample_rate)]
            speech.append(Segment(cursor / self.sample_rate, (cursor + len(audio)) / self.sample_rate))
            pieces.append(audio)
            cursor += len(audio)
            if i + 1 < len(step.parts):
                pieces.append(gap)
                cursor += len(gap)
        pcm = np.clip(np.concatenate(pieces) * 32767.0, -32768, 32767).astype(np.int16)
        return Fixture(pcm, self.sample_rate, tuple(speech))

    def _source(self, step: Step, part: str | float) -> np.ndarray:
        if step.noise_secs is not None:
            return noise_burst(float(part), self.sample_rate, self._rng)
        if step.wav is not None:
            return read_wav(self._base_dir / str(part), self.sample_rate)
        return speak(str(part), self.sample_rate, voice=self.scenario.voice, wpm=self.scenario.words_per_minute)

    def _normalised(self, audio: np.ndarray, level_dbfs: float) -> np.ndarray:
        """Scale so that the RMS of the audible frames is ``level_dbfs`` (silence does not dilute the level)."""
        frame = round(self.params.frame_secs * self.sample_rate)
        usable = audio[: len(audio) // frame * frame].reshape(-1, frame)
        power = np.mean(usable.astype(np.float64) ** 2, axis=1)
        loud = power[power > power.max() * 1e-3] if power.size and power.max() > 0 else power
        rms = float(np.sqrt(loud.mean())) if loud.size else 0.0
        return (audio * (10 ** (level_dbfs / 20) / rms)).astype(np.float32) if rms > 0 else audio


def noise_burst(secs: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white noise with 5 ms fades (no click at the edges)."""
    samples = rng.standard_normal(round(secs * sample_rate)).astype(np.float32)
    fade = min(len(samples) // 2, int(0.005 * sample_rate))
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    samples[:fade] *= ramp
    samples[len(samples) - fade :] *= ramp[::-1]
    return samples


def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """A 16-bit PCM WAV as float32 mono at ``sample_rate``."""
    try:
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise ScenarioError(f"{path}: only 16-bit PCM WAV files are supported")
            channels, rate = wav.getnchannels(), wav.getframerate()
            data = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    except (OSError, EOFError, wave.Error) as exc:
        raise ScenarioError(f"{path}: cannot read WAV: {exc}") from exc
    mono = data.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0
    return soxr.resample(mono, rate, sample_rate).astype(np.float32) if rate != sample_rate else mono


def speak(text: str, sample_rate: int, *, voice: str = "en-us", wpm: int = 165) -> np.ndarray:
    """Synthesise ``text`` with espeak-ng (installed system-wide; no network)."""
    executable = shutil.which("espeak-ng")
    if executable is None:
        raise ScenarioError("espeak-ng is not installed (apt-get install espeak-ng), or use wav: fixtures")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "speech.wav"
        done = subprocess.run(
            [executable, "-v", voice, "-s", str(wpm), "-w", str(out), "--", text],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0 or not out.is_file():
            raise ScenarioError(f"espeak-ng failed on {text!r}: {done.stderr.strip() or done.returncode}")
        return read_wav(out, sample_rate)
