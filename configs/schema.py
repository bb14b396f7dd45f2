"""Pydantic models of the YAML configuration.

Every field has a default, so a config file only states what it changes; unknown keys and
wrong types are rejected (``extra="forbid"``, strict-ish types) with the key and file named
by :func:`mimo_voice.configs.load_config`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which weights to run, and where."""

    preset: Literal["tiny", "small", "real7b"] = Field(
        "tiny",
        description="Embedded random/briefly-trained model used when `path` is empty. It babbles. real7b: the real "
        "7B shapes with random weights drawn on the device (for GPU checks; no download).",
    )
    path: str | None = Field(None, description="MiMo-Audio-7B checkpoint folder or Hugging Face repo id.")
    tokenizer_path: str | None = Field(
        None, description="MiMo-Audio-Tokenizer checkpoint folder or Hugging Face repo id."
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    seed: int = 0
    cache_dir: str | None = Field(None, description="Where generated tiny checkpoints are cached.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _refuse_float16(cls, value: object) -> object:
        if value == "float16":
            # The weights are bf16; fp16's narrower range overflows in the activations, and nothing guards it.
            raise ValueError("float16 is not supported: MiMo-Audio is a bfloat16 model; use bfloat16 or float32")
        return value


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
    """Upstream's per-task presets (docs/mimo_audio.md §7)."""
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
    prepare_reply_after_secs: float = Field(
        0.2,
        ge=0,
        description="After this much silence in the user's audio, the reply's start is computed before the turn "
        "ends (undone if they speak again; the silence after this point is not fed). Keep it below vad.stop_secs; "
        "0 turns it off.",
    )
    silence_dbfs: float = Field(-50.0, le=0, description="RMS level under which user audio counts as silence.")
    max_context_positions: int = Field(8192, ge=64)
    context_headroom_positions: int = Field(512, ge=0)


class EngineSection(Section):
    """The engine: where it runs (a worker process of this server, ``local``, or a pool of Ray actors that any
    number of front-ends share, ``ray``, which needs the ``ray`` extra), its CPU threads, its KV slots, the fast step's
    compilation, and how the server supervises it (watchdog, restarts)."""

    threads: int = Field(
        0, ge=0, description="torch threads of the worker; 0: all cores but one on CPU, 2 on CUDA (it only launches)."
    )
    kv_slots: int = Field(
        16, ge=1, description="Conversations the engine holds at once: one preallocated KV cache slot each."
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="Compile the fast step (CUDA graphs): auto = on CUDA only; done at load, never mid-call."
    )
    weights: Literal["auto", "model", "fp16"] = Field(
        "auto",
        description="How the fast step stores its layers' weights on an x86 CPU with a float32 model: fp16 = "
        "fbgemm's fp16 GEMM (half the bytes, float32 arithmetic; a bf16 checkpoint converts exactly); model = "
        "float32; auto = fp16 for stacks of 4 MiB and more. Elsewhere auto is the model's dtype and fp16 is refused.",
    )
    keep_freed_memory: bool = Field(
        True,
        description="Linux/glibc: the engine's C heap keeps freed blocks for the next step instead of returning them "
        "(a batched step's few-MB tensors then cost no page faults); its peak is its busiest step's.",
    )

    backend: Literal["local", "ray"] = "local"
    ray_address: str = Field(
        "auto", description="auto (the running cluster), local (a private one-machine cluster), or host:port."
    )
    ray_namespace: str = Field("mimo-voice", description="Ray namespace of the engine actors; one per deployment.")
    ray_engines: int = Field(1, ge=1, description="Engine actors in the pool (created if missing).")
    ray_num_gpus: float | None = Field(
        None, ge=0, description="GPUs per engine actor; empty: 1 if the cluster has any."
    )
    ray_num_cpus: float = Field(1.0, ge=0, description="CPUs per engine actor (its torch threads on CPU).")
    sessions_per_engine: int = Field(4, ge=1, description="Calls one engine takes before placement skips it.")
    ray_health_timeout_secs: float = Field(
        3.0, gt=0, description="An engine silent this long (it reports every second) is killed and restarted."
    )

    watchdog_secs: float = Field(
        30.0, gt=0, description="A step loop with work pending and no progress for this long is killed and restarted."
    )
    restart_backoff_secs: float = Field(1.0, gt=0, description="First wait before restarting a dead engine; doubles.")
    restart_backoff_max_secs: float = Field(60.0, gt=0, description="Longest wait between restart attempts.")

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


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
    auth_token: str | None = Field(None, description="Bearer token; prefer auth_token_env or auth_token_file.")
    auth_token_env: str | None = Field(None, description="Name of the environment variable holding the token.")
    auth_token_file: str | None = Field(None, description="File holding the token (surrounding spaces ignored).")
    allow_public_without_auth: bool = Field(False, description="Allow a non-loopback host without a token.")
    docs: bool = Field(False, description="Serve /docs, /redoc and /openapi.json.")
    public_url: str | None = Field(
        None, description="The server's URL as clients see it (https://host), for Twilio signatures behind a proxy."
    )
    ice_servers: list[str] = Field(default_factory=list)
    disconnect_timeout_secs: float = Field(5.0, gt=0, description="Hang up a client that sends no audio this long.")
    idle_timeout_secs: float = Field(120.0, gt=0, description="Say goodbye after this long without speech.")
    drain_timeout_secs: float = Field(
        30.0, ge=0, description="On SIGTERM or Ctrl-C: how long calls in progress may go on before they are ended."
    )
    max_call_secs: float = Field(1800.0, gt=0, description="Say goodbye when a call has lasted this long.")
    max_sessions_per_client: int = Field(2, ge=1, description="Concurrent calls per client address (not Twilio).")
    max_offers_per_minute: int = Field(20, ge=1, description="WebRTC offers per client address per minute.")
    max_pending_handshakes: int = Field(16, ge=1, description="Websockets opened but not yet in a call.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body or websocket message.")
    header_timeout_secs: float = Field(10.0, gt=0, description="Time a client has to send its request headers.")
    body_timeout_secs: float = Field(10.0, gt=0, description="Time a client has to send its request body.")

    @field_validator("auth_token")
    @classmethod
    def _token_not_empty(cls, token: str | None) -> str | None:
        if token is not None and not token.strip():
            raise ValueError("the token is empty (an unset variable?); give one, or remove the key to run without")
        return token

    @model_validator(mode="after")
    def _one_token_source(self) -> ServerSection:
        sources = [self.auth_token, self.auth_token_env, self.auth_token_file]
        if sum(source is not None for source in sources) > 1:
            raise ValueError("set at most one of auth_token, auth_token_env and auth_token_file")
        return self


class ToolsSection(Section):
    enabled: list[str] = Field(default_factory=lambda: ["current_time", "calculator", "end_call"])
    support_db: str | None = Field(None, description="SQLite file for the support demo; created from the seed.")
    support_max_tickets_per_hour: int = Field(30, ge=1, description="Support demo: tickets created per hour, in all.")
    workers: int = Field(2, ge=1, description="Tool worker processes; one killed and replaced per timed-out call.")
    worker_memory_mb: int = Field(512, ge=64, description="Address space a tool worker may add after start-up.")


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
