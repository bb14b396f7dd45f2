"""One Realtime connection: client events into service frames, service frames into the Realtime event sequence.

The pipeline is the agent's own (agent/pipeline.py) with two processors added around ``MiMoAudioService``:
``RealtimeInput`` after the transport input (client events: session config, audio, manual turns, items, response
control) and ``RealtimeOutput`` after the service (responses: ``response.created`` ... ``response.done``, server-VAD
events, function-call items). Both share one :class:`RealtimeState`. Events tied to a response's audio go out in
order with it (through the output transport's queue); acknowledgements and errors go out at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger
from mimo_voice.agent.frames import (
    AddTextFrame,
    CancelResponseFrame,
    ClearUserAudioFrame,
    EndUserTurnFrame,
    RespondFrame,
    StartUserTurnFrame,
)
from mimo_voice.agent.pipeline import PIPELINE_IN_RATE
from mimo_voice.agent.service import TOOL_CALL_METADATA, MiMoAudioService
from mimo_voice.streaming.engine.events import SAMPLE_RATE, SAMPLES_PER_PATCH
from pipecat.audio.utils import create_stream_resampler
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    FunctionCallInProgressFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import LLMUsageMetricsData
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import FunctionCallParams, FunctionCallResultProperties

from .protocol import (
    AppendEvent,
    ClientEvent,
    ItemCreateEvent,
    ItemIdEvent,
    ProtocolError,
    ResponseCreateEvent,
    ServerVAD,
    SessionConfig,
    SessionUpdateEvent,
    TruncateEvent,
    function_call_item,
    function_output_item,
    message_item,
    new_id,
    parse_session_update,
    server_event,
)
from .serializer import AudioFormats, ClientErrorFrame, ClientEventFrame, decode_audio

if TYPE_CHECKING:
    from mimo_voice.configs import Config

SAMPLES_PER_MS = SAMPLE_RATE // 1000


class SwitchableVAD(VADAnalyzer):
    """The project's VAD, silenced while the client drives turns itself (``turn_detection: null``)."""

    def __init__(self, inner: VADAnalyzer) -> None:
        super().__init__(params=inner.params)
        self._inner = inner
        self.enabled = True

    @property
    def sample_rate(self) -> int:
        return self._inner.sample_rate

    @property
    def params(self) -> VADParams:
        return self._inner.params

    def num_frames_required(self) -> int:
        return self._inner.num_frames_required()

    def voice_confidence(self, buffer: bytes) -> float:
        return self._inner.voice_confidence(buffer)

    def set_sample_rate(self, sample_rate: int) -> None:
        self._inner.set_sample_rate(sample_rate)

    def set_params(self, params: VADParams) -> None:
        self._inner.set_params(params)

    async def analyze_audio(self, buffer: bytes) -> VADState:
        return await self._inner.analyze_audio(buffer) if self.enabled else VADState.QUIET

    async def cleanup(self) -> None:
        await self._inner.cleanup()
        await super().cleanup()


@dataclass
class ResponseOptions:
    """What one ``response.create`` asked for (server-VAD responses take the session's settings)."""

    text_only: bool = False
    max_samples: int | None = None


@dataclass
class _Response:
    id: str
    item_id: str
    options: ResponseOptions
    samples: int = 0  # 24 kHz samples of audio generated
    transcript: list[str] = field(default_factory=list)
    status: str = "completed"
    awaiting_call: str | None = None  # the tool call that ended it, until its item is out
    outputs: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False


@dataclass
class RealtimeState:
    """What the two processors share: the session config, the conversation's items, the response in flight."""

    config: SessionConfig
    formats: AudioFormats
    vad: SwitchableVAD
    vad_params: VADParams
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id, in conversation order
    next_response: ResponseOptions | None = None
    response: _Response | None = None
    pending_calls: dict[str, Any] = field(default_factory=dict)  # call_id -> pipecat result callback
    usage: LLMUsageMetricsData | None = None
    latest_answer: str | None = None  # item id of the newest assistant message: the only one that can be cut
    answer_ms: dict[str, float] = field(default_factory=dict)  # audio generated per assistant item
    done_sent: set[str] = field(default_factory=set)  # responses whose response.done went out (the serializer adds)
    service: MiMoAudioService = field(init=False)  # set once the pipeline that creates it is built

    def last_item_id(self) -> str | None:
        return next(reversed(self.items), None)

    def add_item(self, item: dict[str, Any]) -> dict[str, Any]:
        event = server_event("conversation.item.added", previous_item_id=self.last_item_id(), item=item)
        self.items[item["id"]] = item
        return event

    def commit_user_audio(self, item_id: str | None = None) -> list[dict[str, Any]]:
        """The events of a committed user audio turn (its item has no transcript: nothing transcribes it)."""
        item = message_item(item_id or new_id("item"), "user", [{"type": "input_audio", "transcript": None}])
        committed = server_event(
            "input_audio_buffer.committed", previous_item_id=self.last_item_id(), item_id=item["id"]
        )
        return [committed, self.add_item(item), server_event("conversation.item.done", item=item)]

    def session_options(self) -> ResponseOptions:
        return ResponseOptions(
            text_only=self.config.output_modalities == ["text"], max_samples=_max_samples(self.config.max_output_tokens)
        )


def _max_samples(max_tokens: int | str) -> int | None:
    """Output tokens, counted as MiMo's audio positions (one 4-frame patch each): the audio they can make."""
    return None if max_tokens == "inf" else int(max_tokens) * SAMPLES_PER_PATCH


def initial_config(config: Config, model: str | None) -> SessionConfig:
    """The session before any update: this server's VAD settings, instructions and mode."""
    vad = ServerVAD(threshold=config.vad.confidence, silence_duration_ms=round(config.vad.stop_secs * 1000))
    return SessionConfig(
        model=model or "mimo-audio", instructions=config.agent.system_prompt, mode=config.agent.mode, turn_detection=vad
    )


class RealtimeInput(FrameProcessor):
    """Client events (from RealtimeSerializer) into audio and service frames; answers what needs answering."""

    def __init__(self, state: RealtimeState) -> None:
        super().__init__()
        self.state = state
        self._turn_open = False  # a client-driven user turn has audio in the session
        self._buffered_ms = 0.0  # audio appended since the last commit or clear

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, ClientErrorFrame):
            await self._send(frame.error.event())
        elif isinstance(frame, ClientEventFrame):
            try:
                await self._handle(frame)
            except ProtocolError as exc:
                await self._send(exc.event())
            except Exception as exc:  # a bug must not end the conversation: the client hears what failed
                logger.exception(f"realtime: {frame.event.type} failed")
                await self._send(
                    ProtocolError("server_error", f"{type(exc).__name__}: {exc}", frame.event.event_id).event()
                )
        else:
            await self.push_frame(frame, direction)
            if isinstance(frame, StartFrame):
                await self._apply_session(self.state.config)
                await self._send(server_event("session.created", session=self.state.config.describe()))
            elif isinstance(frame, ErrorFrame) and direction == FrameDirection.UPSTREAM:
                # The agent failed (e.g. the engine): say so rather than go quiet.
                error = {"type": "server_error", "code": "server_error", "message": frame.error, "event_id": None}
                await self._send(server_event("error", error=error))

    async def _send(self, event: dict[str, Any]) -> None:
        await self.push_frame(OutputTransportMessageUrgentFrame(message=event))

    async def _handle(self, frame: ClientEventFrame) -> None:
        event = frame.event
        handlers: dict[str, Callable[[Any], Awaitable[None]]] = {
            "session.update": self._session_update,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "output_audio_buffer.clear": self._clear_output,
            "conversation.item.create": self._item_create,
            "conversation.item.truncate": self._truncate,
            "conversation.item.delete": self._item_delete,
            "conversation.item.retrieve": self._item_retrieve,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
        }
        if isinstance(event, AppendEvent):
            await self._append(frame.audio or b"", frame.sample_rate)
        else:
            await handlers[event.type](event)

    # --- session ---

    async def _session_update(self, event: SessionUpdateEvent) -> None:
        config = parse_session_update(event, self.state.config)
        await self._apply_session(config, previous=self.state.config)
        self.state.config = config
        await self._send(server_event("session.updated", session=config.describe()))

    async def _apply_session(self, config: SessionConfig, previous: SessionConfig | None = None) -> None:
        state, service = self.state, self.state.service
        state.formats.input, state.formats.output = config.input_format, config.output_format
        vad = config.turn_detection
        state.vad.enabled = vad is not None
        service.auto_respond = vad is not None and vad.create_response
        service.text_only = config.output_modalities == ["text"]
        if vad is not None:
            state.vad.set_params(
                VADParams(
                    confidence=vad.threshold,
                    start_secs=state.vad_params.start_secs,
                    stop_secs=vad.silence_duration_ms / 1000,
                    min_volume=state.vad_params.min_volume,
                )
            )
        if config.mode != service.mode:
            service.set_mode(config.mode)
        if previous is None or (config.instructions, config.tools, config.tool_choice) != (
            previous.instructions,
            previous.tools,
            previous.tool_choice,
        ):
            for gone in (
                {tool.name for tool in previous.tools} - {tool.name for tool in config.tools} if previous else ()
            ):
                service.unregister_function(gone)
            for tool in config.tools:
                service.register_function(tool.name, self._client_tool, cancel_on_interruption=False)
            await service.set_instructions(_instructions(config), [t.schema_for_prompt() for t in _offered(config)])

    async def _client_tool(self, params: FunctionCallParams) -> None:
        """A client-side function: its call goes out as a function_call item; the client's output settles it."""
        self.state.pending_calls[params.tool_call_id] = params.result_callback

    # --- input audio ---

    async def _append(self, pcm: bytes, sample_rate: int) -> None:
        if not pcm:
            return
        if self.state.config.turn_detection is None and not self._turn_open:
            self._turn_open = True
            await self.push_frame(StartUserTurnFrame())
        self._buffered_ms += len(pcm) / 2 / sample_rate * 1000
        await self.push_frame(InputAudioRawFrame(audio=pcm, sample_rate=sample_rate, num_channels=1))

    async def _commit(self, event: ClientEvent) -> None:
        if self._buffered_ms < 100:
            raise ProtocolError(
                "input_audio_buffer_commit_empty",
                f"the input audio buffer holds {self._buffered_ms:.0f} ms; at least 100 ms are needed to commit",
                event.event_id,
            )
        if self.state.config.turn_detection is not None and not self._turn_open:
            await self.push_frame(StartUserTurnFrame())  # with server VAD the turn may not have started yet
        respond = self.state.config.turn_detection is not None and self.state.config.turn_detection.create_response
        await self.push_frame(EndUserTurnFrame(respond=respond))
        self._turn_open, self._buffered_ms = False, 0.0
        for committed in self.state.commit_user_audio():
            await self._send(committed)

    async def _clear(self, event: ClientEvent) -> None:
        await self.push_frame(ClearUserAudioFrame())
        self._turn_open, self._buffered_ms = False, 0.0
        await self._send(server_event("input_audio_buffer.cleared"))

    async def _clear_output(self, event: ClientEvent) -> None:
        """Stop the audio now: like a barge-in, the response is cut to what was sent."""
        if self.state.response is not None:
            await self.push_frame(InterruptionFrame())
        await self._send(server_event("output_audio_buffer.cleared", response_id=_id(self.state.response)))

    # --- items ---

    async def _item_create(self, event: ItemCreateEvent) -> None:
        item = event.item
        item_id = item.id or new_id("item")
        if item.type == "function_call_output":
            if not item.call_id or item.output is None:
                raise ProtocolError("invalid_value", "function_call_output needs call_id and output", event.event_id)
            result = self.state.pending_calls.pop(item.call_id, None)
            if result is not None:
                await result(item.output, properties=FunctionCallResultProperties(run_llm=False))
            else:  # a result for a call this session did not make: still the model's to read
                await self.push_frame(AddTextFrame("tool", item.output))
            created = function_output_item(item_id, item.call_id, item.output)
        elif item.type == "message" and item.role in ("user", "system"):
            created = await self._message(item_id, item, event.event_id)
        else:
            raise ProtocolError(
                "unsupported_item",
                "only user or system messages and function_call_output items can be added: the model writes the "
                "assistant's turns and function calls itself",
                event.event_id,
                "item",
            )
        await self._send(self.state.add_item(created))
        await self._send(server_event("conversation.item.done", item=created))

    async def _message(self, item_id: str, item: Any, event_id: str | None) -> dict[str, Any]:
        """A user or system message into the conversation; every part is checked before any goes in."""
        parts: list[str | bytes] = []  # text, or decoded user audio
        content: list[dict[str, Any]] = []
        for part in item.content:
            if part.type in ("input_text", "text") and part.text:
                parts.append(part.text)
                content.append({"type": "input_text", "text": part.text})
            elif part.type == "input_audio" and part.audio and item.role == "user":
                resampler = create_stream_resampler()
                parts.append(
                    await decode_audio(part.audio, self.state.formats.input, PIPELINE_IN_RATE, resampler, event_id)
                )
                content.append({"type": "input_audio", "transcript": part.transcript})
            else:
                raise ProtocolError(
                    "invalid_value", f"unsupported content part {part.type!r}", event_id, "item.content"
                )
        if not content:
            raise ProtocolError("invalid_value", "the message has no content", event_id, "item.content")
        for text_or_pcm in parts:
            if isinstance(text_or_pcm, str):
                await self.push_frame(AddTextFrame(item.role, text_or_pcm))
            else:
                await self.push_frame(StartUserTurnFrame())
                frame = InputAudioRawFrame(audio=text_or_pcm, sample_rate=PIPELINE_IN_RATE, num_channels=1)
                await self.push_frame(frame)
                await self.push_frame(EndUserTurnFrame(respond=False))
        return message_item(item_id, item.role, content)

    async def _truncate(self, event: TruncateEvent) -> None:
        item = self.state.items.get(event.item_id)
        if item is None or item.get("role") != "assistant":
            raise ProtocolError("item_not_found", f"no assistant item {event.item_id!r}", event.event_id, "item_id")
        sent_ms = self.state.answer_ms.get(event.item_id, 0.0)
        if event.audio_end_ms > sent_ms + 1:
            raise ProtocolError(
                "invalid_value",
                f"audio_end_ms {event.audio_end_ms} is past the item's {sent_ms:.0f} ms of audio",
                event.event_id,
                "audio_end_ms",
            )
        if event.item_id == self.state.latest_answer:  # an older answer is followed by turns that cannot be undone
            await self.push_frame(CancelResponseFrame(played_samples=event.audio_end_ms * SAMPLES_PER_MS))
        if self.state.response is not None and self.state.response.item_id == event.item_id:
            self.state.response.status = "cancelled"
            await self.push_frame(InterruptionFrame())  # stop sending what was cut
        await self._send(
            server_event(
                "conversation.item.truncated",
                item_id=event.item_id,
                content_index=event.content_index,
                audio_end_ms=event.audio_end_ms,
            )
        )

    async def _item_delete(self, event: ItemIdEvent) -> None:
        if self.state.items.pop(event.item_id, None) is None:
            raise ProtocolError("item_not_found", f"no item {event.item_id!r}", event.event_id, "item_id")
        await self._send(server_event("conversation.item.deleted", item_id=event.item_id))

    async def _item_retrieve(self, event: ItemIdEvent) -> None:
        item = self.state.items.get(event.item_id)
        if item is None:
            raise ProtocolError("item_not_found", f"no item {event.item_id!r}", event.event_id, "item_id")
        await self._send(server_event("conversation.item.retrieved", item=item))

    # --- responses ---

    async def _response_create(self, event: ResponseCreateEvent) -> None:
        if self.state.response is not None or self.state.next_response is not None:
            raise ProtocolError(
                "conversation_already_has_active_response",
                "a response is in progress; cancel it or wait for response.done",
                event.event_id,
            )
        params, options = event.response, self.state.session_options()
        modalities = params.output_modalities or params.modalities
        if modalities:
            options.text_only = modalities == ["text"]
        max_tokens = params.max_output_tokens or params.max_response_output_tokens
        if max_tokens is not None:
            options.max_samples = _max_samples(max_tokens)
        self.state.next_response = options
        self._turn_open, self._buffered_ms = False, 0.0
        respond = RespondFrame(params.instructions, max_samples=options.max_samples, text_only=options.text_only)
        await self.push_frame(respond)

    async def _response_cancel(self, event: Any) -> None:
        response = self.state.response
        if response is None or (event.response_id and event.response_id != response.id):
            raise ProtocolError("response_cancel_not_active", "there is no active response to cancel", event.event_id)
        response.status = "cancelled"
        await self.push_frame(InterruptionFrame())  # the service stops and rolls back to what was sent


class RealtimeOutput(FrameProcessor):
    """The service's output as Realtime server events; drops the audio of text-only responses."""

    def __init__(self, state: RealtimeState) -> None:
        super().__init__()
        self.state = state
        self._speech_item: str | None = None  # the user item server VAD is filling
        self._audio_start_ms = 0.0
        self._input_ms = 0.0
        self._last: _Response | None = None  # the latest response, closed or not (a barge-in may cut it)
        self._idle: asyncio.Task | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        state = self.state
        response = state.response
        if direction == FrameDirection.UPSTREAM:
            if isinstance(frame, BotStoppedSpeakingFrame):
                await self._arm_idle_timeout()
            await self.push_frame(frame, direction)
            return
        if isinstance(frame, (UserStartedSpeakingFrame, LLMFullResponseStartFrame, EndFrame, CancelFrame)):
            await self._disarm_idle_timeout()
        if isinstance(frame, InputAudioRawFrame):
            self._input_ms += frame.num_frames / frame.sample_rate * 1000
        elif isinstance(frame, UserStartedSpeakingFrame) and state.config.turn_detection is not None:
            await self._speech_started()
        elif isinstance(frame, UserStoppedSpeakingFrame) and self._speech_item is not None:
            await self._speech_stopped()
        elif isinstance(frame, MetricsFrame):
            state.usage = next((d for d in frame.data if isinstance(d, LLMUsageMetricsData)), state.usage)
        elif isinstance(frame, LLMFullResponseStartFrame):
            await self._open_response()
        elif isinstance(frame, TTSAudioRawFrame) and response is not None:
            response.samples += frame.num_frames * SAMPLE_RATE // frame.sample_rate
            state.answer_ms[response.item_id] = response.samples / SAMPLES_PER_MS
            if response.options.text_only:
                return  # the model always speaks; a text-only client gets the words alone
        elif isinstance(frame, TTSTextFrame) and response is not None and not response.options.text_only:
            response.transcript.append(frame.text)
            await self._queue(self._delta(response, "response.output_audio_transcript.delta", frame.text))
        elif isinstance(frame, LLMTextFrame) and response is not None and response.options.text_only:
            response.transcript.append(frame.text)
            await self._queue(self._delta(response, "response.output_text.delta", frame.text))
        elif isinstance(frame, LLMFullResponseEndFrame) and response is not None:
            response.awaiting_call = frame.metadata.get(TOOL_CALL_METADATA)
            if response.awaiting_call is None:
                await self._close_response(response, urgent=False)
        elif isinstance(frame, FunctionCallInProgressFrame) and response is not None:
            await self._function_call(response, frame)
        elif isinstance(frame, InterruptionFrame) and (cut := self._cut_by_interruption()) is not None:
            await self.push_frame(frame, direction)
            cut.status = "cancelled"
            await self._close_response(cut, urgent=True)  # the output dropped what was queued; sent copies are skipped
            return
        elif isinstance(frame, (EndFrame, CancelFrame)):
            state.pending_calls.clear()
        await self.push_frame(frame, direction)

    def _cut_by_interruption(self) -> _Response | None:
        """The response an interruption cuts: the one in flight, or the last one if it has not fully gone out."""
        if self.state.response is not None:
            return self.state.response
        last = self._last
        return last if last is not None and last.id not in self.state.done_sent else None

    async def _queue(self, event: dict[str, Any]) -> None:
        """In order with the response's audio."""
        await self.push_frame(OutputTransportMessageFrame(message=event))

    async def _send(self, event: dict[str, Any]) -> None:
        await self.push_frame(OutputTransportMessageUrgentFrame(message=event))

    # --- server VAD ---

    async def _speech_started(self) -> None:
        self._speech_item = new_id("item")
        vad = self.state.config.turn_detection
        padding = vad.prefix_padding_ms if vad else 0
        self._audio_start_ms = max(self._input_ms - padding, 0.0)
        await self._send(
            server_event(
                "input_audio_buffer.speech_started",
                audio_start_ms=round(self._audio_start_ms),
                item_id=self._speech_item,
            )
        )

    async def _speech_stopped(self) -> None:
        item_id, self._speech_item = self._speech_item, None
        await self._send(
            server_event("input_audio_buffer.speech_stopped", audio_end_ms=round(self._input_ms), item_id=item_id)
        )
        for committed in self.state.commit_user_audio(item_id):
            await self._send(committed)

    async def _arm_idle_timeout(self) -> None:
        """server_vad ``idle_timeout_ms``: when the user says nothing that long after the agent stopped speaking,
        the agent speaks again (to prompt them)."""
        await self._disarm_idle_timeout()
        vad = self.state.config.turn_detection
        if vad is not None and vad.idle_timeout_ms:
            self._idle = self.create_task(self._idle_timeout(vad.idle_timeout_ms / 1000), name="realtime-idle")

    async def _disarm_idle_timeout(self) -> None:
        task, self._idle = self._idle, None
        if task is not None and task is not asyncio.current_task():
            await self.cancel_task(task)

    async def _idle_timeout(self, secs: float) -> None:
        start_ms = self._input_ms
        await asyncio.sleep(secs)
        self._idle = None
        event = server_event(
            "input_audio_buffer.timeout_triggered",
            audio_start_ms=round(start_ms),
            audio_end_ms=round(self._input_ms),
            item_id=new_id("item"),
        )
        await self._send(event)
        await self.push_frame(RespondFrame(), FrameDirection.UPSTREAM)  # to the service, which is upstream

    # --- responses ---

    async def _open_response(self) -> None:
        state = self.state
        if state.response is not None and not state.response.closed:
            state.response.status = "cancelled"
            await self._close_response(state.response, urgent=False)
        options, state.next_response = state.next_response or state.session_options(), None
        response = _Response(id=new_id("resp"), item_id=new_id("item"), options=options)
        state.response, state.usage, self._last = response, None, response
        state.latest_answer = response.item_id
        part_type = "text" if options.text_only else "audio"
        item = message_item(response.item_id, "assistant", [], status="in_progress")
        await self._queue(server_event("response.created", response=self._describe(response, "in_progress")))
        await self._queue(
            server_event("response.output_item.added", response_id=response.id, output_index=0, item=item)
        )
        await self._queue(state.add_item(item))
        await self._queue(
            server_event(
                "response.content_part.added",
                response_id=response.id,
                item_id=response.item_id,
                output_index=0,
                content_index=0,
                part={"type": part_type, **({"text": ""} if options.text_only else {"transcript": ""})},
            )
        )

    def _delta(self, response: _Response, kind: str, text: str) -> dict[str, Any]:
        return server_event(
            kind, response_id=response.id, item_id=response.item_id, output_index=0, content_index=0, delta=text
        )

    async def _function_call(self, response: _Response, frame: FunctionCallInProgressFrame) -> None:
        arguments = json.dumps(frame.arguments, ensure_ascii=False)
        index = 1 + len(response.outputs)
        item_id = new_id("item")
        item = function_call_item(item_id, frame.tool_call_id, frame.function_name, "", "in_progress")
        ids = {"response_id": response.id, "item_id": item_id, "output_index": index}
        done = function_call_item(item_id, frame.tool_call_id, frame.function_name, arguments, "completed")
        await self._queue(
            server_event("response.output_item.added", response_id=response.id, output_index=index, item=item)
        )
        await self._queue(self.state.add_item(item))
        await self._queue(
            server_event("response.function_call_arguments.delta", **ids, call_id=frame.tool_call_id, delta=arguments)
        )
        await self._queue(
            server_event(
                "response.function_call_arguments.done",
                **ids,
                call_id=frame.tool_call_id,
                name=frame.function_name,
                arguments=arguments,
            )
        )
        await self._queue(
            server_event("response.output_item.done", response_id=response.id, output_index=index, item=done)
        )
        await self._queue(server_event("conversation.item.done", item=done))
        self.state.items[item_id] = done
        response.outputs.append(done)
        if frame.tool_call_id == response.awaiting_call:
            await self._close_response(response, urgent=False)

    async def _close_response(self, response: _Response, *, urgent: bool) -> None:
        send = self._send if urgent else self._queue
        if response.closed and not urgent:
            return
        response.closed = True
        if self.state.response is response:
            self.state.response = None
        text = self._final_text(response)
        ids = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
        if response.options.text_only:
            part, content = {"type": "text", "text": text}, {"type": "output_text", "text": text}
            await send(server_event("response.output_text.done", **ids, text=text))
        else:
            part, content = {"type": "audio", "transcript": text}, {"type": "output_audio", "transcript": text}
            await send(server_event("response.output_audio.done", **ids))
            await send(server_event("response.output_audio_transcript.done", **ids, transcript=text))
        await send(server_event("response.content_part.done", **ids, part=part))
        status = "incomplete" if response.status == "completed" and self._hit_limit(response) else response.status
        item = message_item(
            response.item_id, "assistant", [content], status="completed" if status == "completed" else "incomplete"
        )
        self.state.items[response.item_id] = item
        await send(server_event("response.output_item.done", response_id=response.id, output_index=0, item=item))
        await send(server_event("conversation.item.done", item=item))
        response.outputs = [item, *(o for o in response.outputs if o.get("id") != response.item_id)]
        await send(server_event("response.done", response=self._describe(response, status)))

    def _final_text(self, response: _Response) -> str:
        """What was said; for a cut response, what the user heard (the session's rolled-back transcript)."""
        text = "".join(response.transcript)
        if response.status != "cancelled" or response.options.text_only or self.state.service.session is None:
            return text  # text goes out whole
        history = self.state.service.session.history
        last = history[-1] if history else None
        return last.text if last is not None and last.role == "assistant" and last.interrupted else text

    def _hit_limit(self, response: _Response) -> bool:
        limit = response.options.max_samples
        return limit is not None and response.samples >= limit

    def _describe(self, response: _Response, status: str) -> dict[str, Any]:
        described: dict[str, Any] = {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": _status_details(status, response),
            "output": response.outputs if status != "in_progress" else [],
            "output_modalities": ["text"] if response.options.text_only else ["audio"],
            "conversation_id": self.state.config.id,
        }
        usage = self.state.usage
        if status != "in_progress" and usage is not None:
            tokens = usage.value
            described["usage"] = {
                "total_tokens": tokens.total_tokens,
                "input_tokens": tokens.prompt_tokens,
                "output_tokens": tokens.completion_tokens,
            }
        return described


def _status_details(status: str, response: _Response) -> dict[str, Any] | None:
    if status == "cancelled":
        return {"type": "cancelled", "reason": "client_cancelled"}
    if status == "incomplete":
        return {"type": "incomplete", "reason": "max_output_tokens"}
    return None


def _id(response: _Response | None) -> str | None:
    return response.id if response is not None else None


def _instructions(config: SessionConfig) -> str:
    if config.tool_choice == "required":
        return f"{config.instructions}\n\nAnswer every request by calling one of the tools."
    if not isinstance(config.tool_choice, str):
        return f"{config.instructions}\n\nAnswer by calling the tool {config.tool_choice.name}."
    return config.instructions


def _offered(config: SessionConfig) -> list[Any]:
    if config.tool_choice == "none":
        return []
    if not isinstance(config.tool_choice, str):
        return [tool for tool in config.tools if tool.name == config.tool_choice.name]
    return config.tools
