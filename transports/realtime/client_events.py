"""RealtimeInput: client events into audio and service frames (agent/frames.py), and the answers they need."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
from pipecat.audio.utils import create_stream_resampler
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import FunctionCallParams, FunctionCallResultProperties

from .protocol import (
    AppendEvent,
    ClientEvent,
    ItemCreateEvent,
    ItemIdEvent,
    ProtocolError,
    ResponseCreateEvent,
    SessionConfig,
    SessionUpdateEvent,
    TruncateEvent,
    function_output_item,
    message_item,
    new_id,
    parse_session_update,
    server_event,
)
from .serializer import ClientErrorFrame, ClientEventFrame, decode_audio

if TYPE_CHECKING:
    pass

from .session import SAMPLES_PER_MS, RealtimeState, Response, max_samples


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
            options.max_samples = max_samples(max_tokens)
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


def _id(response: Response | None) -> str | None:
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
