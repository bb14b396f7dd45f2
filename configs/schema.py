"""Pydantic models of the YAML configuration.

Every field has a default, so a config file only states what it changes; unknown keys and
wrong types are rejected (``extra="forbid"``, strict-ish types) with the key and file named
by :func:`mimo_voice.configs.load_config`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which weights to run, and where."""

    preset: Literal["tiny", "small"] = Field(
        "tiny", description="Embedded random/briefly-trained model used when `path` is empty. It babbles."
    )
    path: str | None = Field(None, description="MiMo-Audio-7B checkpoint folder or Hugging Face repo id.")
    tokenizer_path: str | None = Field(
        None, description="MiMo-Audio-Tokenizer checkpoint folder or Hugging Face repo id."
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0
    cache_dir: str | None = Field(None, description="Where generated tiny checkpoints are cached.")


class SamplerParams(Section):
    do_sample: bool = True
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)


class TaskSampling(Section):
    text: SamplerParams
    audio: SamplerParams


def _preset(text_t: float | None, text_p: float, audio_t: float = 0.9, audio_p: float = 0.95) -> TaskSampling:
    text = SamplerParams(do_sample=False) if text_t is None else SamplerParams(temperature=text_t, top_p=text_p)
    return TaskSampling(text=text, audio=SamplerParams(temperature=audio_t, top_p=audio_p))


def default_sampling() -> dict[str, TaskSampling]:
    """Upstream's per-task presets (reference notes, section 2.7)."""
    return {
        "default": TaskSampling(
            text=SamplerParams(temperature=0.6, top_k=50, top_p=0.95),
            audio=SamplerParams(temperature=0.9, top_k=50, top_p=0.95),
        ),
        "asr": _preset(None, 1.0),
        "tts": _preset(0.6, 1.0),
        "spoken_dialogue": _preset(0.6, 0.95),
        "audio_understanding": _preset(0.3, 0.95),
        "text_chat": _preset(0.4, 0.95),
        "in_context_learning_s2s": _preset(None, 1.0),
    }


class AgentSection(Section):
    mode: Literal["thinking", "non_thinking"] = "non_thinking"
    task: str = Field("spoken_dialogue", description="Sampling preset used for dialogue turns.")
    system_prompt: str = "You are MiMo-Audio, a friendly AI assistant and your response needs to be concise."
    voice_prompt_wav: str | None = None
    thinking_budget_tokens: int = Field(256, ge=0)
    thinking_acknowledgement: bool = True
    max_new_groups: int = Field(1500, ge=1, description="Cap on generated LLM positions per turn.")
    barge_in_min_speech_secs: float = Field(
        0.4, ge=0, description="While the agent speaks, user speech must last this long to interrupt it."
    )
    tool_timeout_secs: float = Field(10.0, gt=0)


class StreamingSection(Section):
    decode_left_context_frames: int = Field(24, ge=0)
    decode_lookahead_frames: int = Field(8, ge=0)
    encode_chunk_secs: float = Field(2.0, gt=0)
    encode_overlap_secs: float = Field(0.5, ge=0)
    max_context_positions: int = Field(8192, ge=64)
    context_headroom_positions: int = Field(512, ge=0)


class EngineSection(Section):
    """The engine's worker process, as the server supervises it."""

    watchdog_secs: float = Field(
        30.0, gt=0, description="A step loop with work pending and no progress for this long is killed and restarted."
    )
    restart_backoff_secs: float = Field(1.0, gt=0, description="First wait before restarting a dead engine; doubles.")
    restart_backoff_max_secs: float = Field(60.0, gt=0, description="Longest wait between restart attempts.")


class VADSection(Section):
    analyzer: Literal["webrtcvad", "silero"] = "webrtcvad"
    aggressiveness: int = Field(2, ge=0, le=3)
    frame_ms: Literal[10, 20, 30] = 20
    confidence: float = Field(0.7, ge=0, le=1)
    start_secs: float = Field(0.2, ge=0)
    stop_secs: float = Field(0.5, ge=0)
    min_volume: float = Field(0.0, ge=0, le=1)
    smart_turn: bool = False


class ServerSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    max_sessions: int = Field(4, ge=1)
    auth_token: str | None = None
    ice_servers: list[str] = Field(default_factory=list)
    disconnect_timeout_secs: float = Field(5.0, gt=0)
    drain_timeout_secs: float = Field(
        30.0, ge=0, description="On SIGTERM or Ctrl-C: how long calls in progress may go on before they are ended."
    )


class ToolsSection(Section):
    enabled: list[str] = Field(default_factory=lambda: ["current_time", "calculator", "end_call"])
    support_db: str | None = Field(None, description="SQLite file for the support demo; created from the seed.")


class LoggingSection(Section):
    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    sampling: dict[str, TaskSampling] = Field(default_factory=default_sampling)
    agent: AgentSection = Field(default_factory=AgentSection)
    streaming: StreamingSection = Field(default_factory=StreamingSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    vad: VADSection = Field(default_factory=VADSection)
    server: ServerSection = Field(default_factory=ServerSection)
    tools: ToolsSection = Field(default_factory=ToolsSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    def sampling_for(self, task: str) -> TaskSampling:
        return self.sampling.get(task) or self.sampling["default"]
