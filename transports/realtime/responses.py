"""RealtimeOutput: the service's frames as the Realtime server-event sequence of each response."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from mimo_voice.agent.frames import (
    RespondFrame,
)
from mimo_voice.agent.service import TOOL_CALL_METADATA
from mimo_voice.streaming.engine.events import SAMPLE_RATE
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
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
    TTSAudioRawFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import LLMUsageMetricsData
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from .protocol import (
    function_call_item,
    message_item,
    new_id,
    server_event,
)

if TYPE_CHECKING:
    pass

from .session import SAMPLES_PER_MS, RealtimeState, Response


class RealtimeOutput(FrameProcessor):
    """The service's output as Realtime server events; drops the audio of text-only responses."""

    def __init__(self, state: RealtimeState) -> None:
        super().__init__()
        self.state = state
        self._speech_item: str | None = None  # the user item server VAD is filling
        self._audio_start_ms = 0.0
        self._input_ms = 0.0
        self._last: Response | None = None  # the latest response, closed or not (a barge-in may cut it)
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

    def _cut_by_interruption(self) -> Response | None:
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
        response = Response(id=new_id("resp"), item_id=new_id("item"), options=options)
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

    def _delta(self, response: Response, kind: str, text: str) -> dict[str, Any]:
        return server_event(
            kind, response_id=response.id, item_id=response.item_id, output_index=0, content_index=0, delta=text
        )

    async def _function_call(self, response: Response, frame: FunctionCallInProgressFrame) -> None:
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

    async def _close_response(self, response: Response, *, urgent: bool) -> None:
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

    def _final_text(self, response: Response) -> str:
        """What was said; for a cut response, what the user heard (the session's rolled-back transcript)."""
        text = "".join(response.transcript)
        if response.status != "cancelled" or response.options.text_only or self.state.service.session is None:
            return text  # text goes out whole
        history = self.state.service.session.history
        last = history[-1] if history else None
        return last.text if last is not None and last.role == "assistant" and last.interrupted else text

    def _hit_limit(self, response: Response) -> bool:
        limit = response.options.max_samples
        return limit is not None and response.samples >= limit

    def _describe(self, response: Response, status: str) -> dict[str, Any]:
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


def _status_details(status: str, response: Response) -> dict[str, Any] | None:
    if status == "cancelled":
        return {"type": "cancelled", "reason": "client_cancelled"}
    if status == "incomplete":
        return {"type": "incomplete", "reason": "max_output_tokens"}
    return None
