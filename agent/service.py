"""MiMoAudioService: MiMo-Audio as a pipecat 1.14 realtime (speech-to-speech) LLM service.

Turns come from local VAD on the user aggregator. While the user speaks, their audio streams into the session (so
encoding and prefill overlap the speech); the end of the user turn starts ``Session.respond()``, whose events become
frames: 24 kHz ``TTSAudioRawFrame``s between ``TTSStartedFrame``/``TTSStoppedFrame`` and
``LLMFullResponseStart/EndFrame``, the spoken words as ``TTSTextFrame``s (pushed after the audio that carries them,
so the assistant aggregator records only words whose audio the output transport played), reasoning as
``LLMThought*Frame``s (never spoken, logged).

A tool call written in the text stream ends the assistant turn (the session withholds its text and audio); it runs
through pipecat's ``run_function_calls``, and its result goes back into the session as a tool turn. As in pipecat's
OpenAI Realtime service, speech resumes when the assistant aggregator pushes the updated context upstream (it defers
that while the bot is still speaking). A call that cannot be made is answered with the error at once.

On an ``InterruptionFrame`` generation stops and the session rolls back to the audio the user heard, as counted by
:class:`~mimo_voice.agent.playback.PlaybackTracker` on the output transport.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger
from mimo_voice.streaming.engine.events import (
    SAMPLE_RATE,
    SAMPLES_PER_PATCH,
    AudioChunk,
    AudioPatch,
    TextToken,
    ToolCallText,
    TurnEnd,
)
from mimo_voice.streaming.model.prompts import check_mode
from mimo_voice.tools import END_CALL_TOOL, ToolCall, ToolCallError, parse_tool_call, tools_prompt
from mimo_voice.tools.calls import error_text, is_error_result, result_text
from pipecat.audio.vad.vad_analyzer import VAD_START_SECS
from pipecat.frames.frames import (
    EndWorkerFrame,
    Frame,
    FunctionCallCancelFrame,
    FunctionCallFromLLM,
    FunctionCallResultFrame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMServiceMetadataFrame,
    LLMTextFrame,
    LLMThoughtEndFrame,
    LLMThoughtStartFrame,
    LLMThoughtTextFrame,
    SpeechControlParamsFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import LLMTokenUsage
from pipecat.processors.aggregators.llm_context import LLMContext, standard_message_text
from pipecat.processors.frame_processor import FrameDirection
from pipecat.processors.frameworks.rtvi.frames import RTVIClientMessageFrame, RTVIServerResponseFrame
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings
from pipecat.utils.text.base_text_aggregator import TextType

from .playback import PlaybackTracker

if TYPE_CHECKING:
    from mimo_voice.configs import Config
    from mimo_voice.streaming.engine.engine import Engine
    from mimo_voice.streaming.engine.session import Session
    from mimo_voice.tools import ToolRegistry

SET_MODE_MESSAGE = "set-mode"  # app message {"type": "set-mode", "mode": ...}; RTVI client message of that type
MAX_TOOL_ROUNDS = 3  # tool calls answered per user turn; a model that keeps calling is stopped there
PREROLL_MARGIN_SECS = 0.3  # speech onset before the VAD's start_secs window, replayed when a segment starts
INJECTED_ROLES = {"user": "user", "system": "system", "developer": "system"}
ACKNOWLEDGEMENT_MAX_SECS = 3.0
ACKNOWLEDGE_NOTE = (
    "Reply to the user's next message with a short acknowledgement of a few words only, such as "
    '"Let me think about that.", without answering it yet.'
)
ANSWER_NOTE = "Now think the user's request through, then answer it."


@dataclass
class _Response:
    context_id: str
    speech: _SpeechText
    generated_samples: int = 0  # 24 kHz samples pushed so far


def _runs_llm(frame: FunctionCallResultFrame) -> bool:
    """Whether the model should answer this result (pipecat's precedence: properties, then the frame)."""
    for choice in (frame.properties.run_llm if frame.properties else None, frame.run_llm):
        if choice is not None:
            return choice
    return True


class MiMoAudioService(LLMService):
    """The voice agent for one conversation: pipeline frames in, MiMo-Audio session calls, frames out.

    ``engine`` is loaded once per process and shared; each pipeline gets its own session, opened at ``StartFrame``.
    ``tools`` (optional) are advertised in the system prompt and registered as this service's functions.
    """

    def __init__(self, *, engine: Engine, config: Config, tools: ToolRegistry | None = None, **kwargs) -> None:
        super().__init__(settings=_settings(config), **kwargs)
        self._engine = engine
        self._agent_config = config.agent
        self._mode = config.agent.mode
        self._tools = tools
        if tools is not None:
            tools.register_with(self)
        self.playback = PlaybackTracker()
        self._session: Session | None = None
        self._context = LLMContext()
        self._context_seen = 0  # messages of self._context already taken in

        self._preroll: deque[InputAudioRawFrame] = deque()
        self._preroll_secs = VAD_START_SECS + PREROLL_MARGIN_SECS  # until the VAD announces its params
        self._streaming_user_audio = False  # feeding the session (from VAD start to the end of the user turn)
        self._user_turn = False
        self._speech_end: float | None = None  # wall clock of the end of the user's speech, for TTFB
        self._bad_audio_reported = False

        self._generation: asyncio.Task | None = None  # the current answer
        self._response: _Response | None = None  # the last response, until it has been played or interrupted
        self._pending_calls: set[str] = set()
        self._results_awaiting_response = False
        self._tool_rounds = 0
        self._end_after_reply = False

    # --- public API ---

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch between "thinking" and "non_thinking"; takes effect at the next turn."""
        self._mode = check_mode(mode)
        if self._session is not None:
            self._session.set_mode(mode)
        logger.info(f"{self}: mode set to {mode}")

    @property
    def session(self) -> Session | None:
        return self._session

    def can_generate_metrics(self) -> bool:
        return True

    def service_metadata_frame(self) -> LLMServiceMetadataFrame:
        # Realtime: the user aggregator commits turns on LLMFullResponseStartFrame; turns come from local VAD.
        return LLMServiceMetadataFrame(service_name=self.name, is_realtime_service=True)

    # --- lifecycle ---

    async def start(self, frame) -> None:
        await super().start(frame)
        self._session = self._engine.new_session(
            mode=self._mode, system_prompt=self._system_prompt(), task=self._agent_config.task
        )

    async def stop(self, frame) -> None:
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame) -> None:
        await super().cancel(frame)
        await self._close()

    async def _close(self) -> None:
        if self._generation is not None:
            await self.cancel_task(self._generation)
            self._generation = None
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _system_prompt(self) -> str:
        prompt = self._agent_config.system_prompt
        tools = tools_prompt(self._tools.schemas()) if self._tools is not None else ""
        return f"{prompt}\n\n{tools}" if tools else prompt

    # --- frames ---

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)

        if self._session is None:
            pass  # not started (or closed): pass frames through
        elif isinstance(frame, InputAudioRawFrame):
            await self._handle_user_audio(frame)
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            await self._start_user_audio()
        elif isinstance(frame, UserStartedSpeakingFrame):
            self._user_turn = True
            await self._start_user_audio()
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speech_end = frame.timestamp - frame.stop_secs
            if not self._user_turn:  # speech that never became a turn (noise, a backchannel while the bot spoke)
                await self._discard_user_audio()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            await self._end_user_turn()
        elif isinstance(frame, InterruptionFrame):
            await self._stop_response()
        elif isinstance(frame, LLMContextFrame):
            await self._handle_context(frame.context, direction)
        elif isinstance(frame, SpeechControlParamsFrame) and frame.vad_params is not None:
            self._preroll_secs = frame.vad_params.start_secs + PREROLL_MARGIN_SECS
        elif isinstance(frame, RTVIClientMessageFrame) and frame.type == SET_MODE_MESSAGE:
            await self._handle_rtvi_set_mode(frame)
        elif isinstance(frame, InputTransportMessageFrame):
            self._handle_app_message(frame.message)

        await self.push_frame(frame, direction)

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> None:
        # The base service broadcasts a call's outcome both ways; the downstream copy goes into the session.
        settles_call = isinstance(frame, (FunctionCallResultFrame, FunctionCallCancelFrame))
        if settles_call and direction == FrameDirection.DOWNSTREAM:
            await self._settle_tool_call(frame)
        await super().push_frame(frame, direction)

    # --- user audio ---

    async def _handle_user_audio(self, frame: InputAudioRawFrame) -> None:
        if self._streaming_user_audio:
            await self._feed(frame)
            return
        # Keep the last moments of audio: the VAD fires start_secs after speech began.
        self._preroll.append(frame)
        while sum(f.num_frames / f.sample_rate for f in self._preroll) > self._preroll_secs:
            self._preroll.popleft()

    async def _start_user_audio(self) -> None:
        if self._streaming_user_audio:
            return
        self._streaming_user_audio = True
        while self._preroll:
            await self._feed(self._preroll.popleft())

    async def _feed(self, frame: InputAudioRawFrame) -> None:
        try:
            await self._session.feed_audio(frame.audio, frame.sample_rate)
        except ValueError as exc:  # e.g. a transport delivering an unsupported rate: say it once, not 50 times a second
            if not self._bad_audio_reported:
                self._bad_audio_reported = True
                logger.error(f"{self}: cannot use the user's audio: {exc}")
                await self.push_error(f"cannot use the user's audio: {exc}")

    async def _discard_user_audio(self) -> None:
        self._streaming_user_audio = False
        await self._session.discard_user_audio()

    async def _end_user_turn(self) -> None:
        self._user_turn = False
        self._streaming_user_audio = False
        self._tool_rounds = 0
        ttfb_start, self._speech_end = self._speech_end, None
        acknowledge = self._mode == "thinking" and self._agent_config.thinking_acknowledgement
        await self._start_generation(ttfb_start, acknowledge=acknowledge)

    # --- context, modes ---

    async def _handle_context(self, context: LLMContext, direction: FrameDirection) -> None:
        if context is not self._context:
            self._context, self._context_seen = context, 0
        new_messages = context.messages[self._context_seen :]
        self._context_seen = len(context.messages)
        if direction == FrameDirection.UPSTREAM:
            # From the assistant aggregator: tool results are in, answer with them.
            if self._results_awaiting_response:
                await self._start_generation(None)
            return
        # Downstream it comes from the user aggregator: an LLMRunFrame or appended messages that ask to run.
        for message in new_messages:
            role = INJECTED_ROLES.get(message.get("role")) if isinstance(message, dict) else None
            text = standard_message_text(message)
            if role and text:
                await self._session.add_text(role, text)
        await self._start_generation(None)

    async def _handle_rtvi_set_mode(self, frame: RTVIClientMessageFrame) -> None:
        """RTVI client message ``set-mode`` with data ``{"mode": ...}``; answered with the mode or an error."""
        try:
            self.set_mode(frame.data.get("mode") if isinstance(frame.data, dict) else frame.data)
            reply = RTVIServerResponseFrame(client_msg=frame, data={"mode": self._mode})
        except ValueError as exc:
            reply = RTVIServerResponseFrame(client_msg=frame, error=str(exc))
        await self.push_frame(reply, FrameDirection.UPSTREAM)

    def _handle_app_message(self, message: Any) -> None:
        """A transport app message ``{"type": "set-mode", "mode": ...}`` (a dict or its JSON text)."""
        if isinstance(message, str):
            try:
                message = json.loads(message)
            except json.JSONDecodeError:
                return
        if not isinstance(message, dict) or message.get("type") != SET_MODE_MESSAGE:
            return
        try:
            self.set_mode(message.get("mode"))
        except ValueError as exc:
            logger.warning(f"{self}: ignored app message {message}: {exc}")

    # --- generation ---

    async def _start_generation(self, ttfb_start: float | None, *, acknowledge: bool = False) -> None:
        await self._stop_response()  # one answer at a time per session
        self._results_awaiting_response = False
        self._generation = self.create_task(self._converse(ttfb_start, acknowledge), name=f"{self}::converse")

    async def _stop_response(self) -> None:
        """Stop generating and roll the session back to what the user heard of the last response."""
        task, self._generation = self._generation, None
        generating = task is not None and not task.done()
        if generating:
            await self.cancel_task(task)
        response, self._response = self._response, None
        if response is None:
            return
        if generating or self._still_playing(response):
            played = self._played_samples(response)
            logger.debug(f"{self}: interrupted after {played}/{response.generated_samples} samples were played")
            await self._session.cancel(played_samples=played)
        if generating:
            await response.speech.end_thought()
            await self.cancel_ttfb_metrics()
            await self.stop_processing_metrics()
            await self.push_frame(TTSStoppedFrame(context_id=response.context_id))
            await self.push_frame(LLMFullResponseEndFrame())

    def _still_playing(self, response: _Response) -> bool:
        return self.playback.attached and not self.playback.played_out(response.context_id)

    def _played_samples(self, response: _Response) -> int | None:
        if not self.playback.attached:
            return None  # no output transport to ask: stop without rolling back
        return min(self.playback.played_samples(response.context_id), response.generated_samples)

    async def _converse(self, ttfb_start: float | None, acknowledge: bool) -> None:
        """Answer, after a short spoken acknowledgement if asked. An answer that ends in a tool call hands over to
        pipecat's function calling, unless the call cannot be made: then the model hears why and speaks again."""
        while True:
            if acknowledge:
                raw_call = await self._acknowledge(ttfb_start)
            else:
                raw_call = await self._respond(ttfb_start)
            ttfb_start = None
            if raw_call is None and acknowledge:
                await self._session.add_text("system", ANSWER_NOTE)
            elif raw_call is None:
                if self._end_after_reply:
                    await self.push_frame(EndWorkerFrame(reason=END_CALL_TOOL))
                return
            elif not await self._handle_tool_call(raw_call):
                return
            acknowledge = False

    async def _acknowledge(self, ttfb_start: float | None) -> str | None:
        """Thinking takes a while: first a few words without thinking, so that the user hears at once that they
        were understood (the model is asked for it in a note; the reply is cut after ACKNOWLEDGEMENT_MAX_SECS)."""
        await self._session.add_text("system", ACKNOWLEDGE_NOTE)
        self._session.set_mode("non_thinking")
        try:
            return await self._respond(ttfb_start, max_samples=int(ACKNOWLEDGEMENT_MAX_SECS * SAMPLE_RATE))
        finally:
            self._session.set_mode(self._mode)

    async def _respond(self, ttfb_start: float | None, max_samples: int | None = None) -> str | None:
        """Stream one assistant turn into frames; return the raw tool call that ended it, if any. With
        ``max_samples`` the turn is cut (not rolled back) once that much audio was generated."""
        speech = _SpeechText(self)
        response = _Response(context_id=str(uuid.uuid4()), speech=speech)
        self._response = response
        await self.start_processing_metrics()
        await self.start_ttfb_metrics(start_time=ttfb_start)
        await self.push_frame(LLMFullResponseStartFrame())
        await self.push_frame(TTSStartedFrame(context_id=response.context_id))
        tool_call: str | None = None
        end: TurnEnd | None = None
        try:
            async for event in self._session.respond():
                if isinstance(event, TextToken) and event.thinking:
                    await speech.think(event.text)
                elif isinstance(event, TextToken):
                    await speech.say(event.text)
                elif isinstance(event, AudioChunk):
                    await self._push_audio(response, event)
                    await speech.audio_pushed(response.generated_samples)
                    if max_samples is not None and response.generated_samples >= max_samples:
                        max_samples = None
                        await self._session.cancel()
                elif isinstance(event, AudioPatch):
                    speech.patch()
                elif isinstance(event, ToolCallText):
                    tool_call = event.text
                elif isinstance(event, TurnEnd):
                    end = event
        except Exception as exc:  # the engine failed: the conversation goes on, the user hears nothing more
            logger.exception(f"{self}: generation failed")
            await self.push_error(f"MiMo-Audio generation failed: {exc}", exception=exc)
        await speech.close()
        await self.stop_processing_metrics()
        await self.push_frame(TTSStoppedFrame(context_id=response.context_id))
        await self.push_frame(LLMFullResponseEndFrame())
        if end is not None:
            await self._report_turn_end(end, speech.patches)
        return tool_call

    async def _push_audio(self, response: _Response, chunk: AudioChunk) -> None:
        if response.generated_samples == 0:
            await self.stop_ttfb_metrics()
        frame = TTSAudioRawFrame(
            audio=chunk.pcm.tobytes(), sample_rate=chunk.sample_rate, num_channels=1, context_id=response.context_id
        )
        response.generated_samples = chunk.first_sample + len(chunk.pcm)
        await self.push_frame(frame)

    async def _report_turn_end(self, end: TurnEnd, patches: int) -> None:
        if end.reason == "error":
            logger.error(f"{self}: the session ended the turn with an error: {end.error}")
            await self.push_error(f"MiMo-Audio generation failed: {end.error}")
        await self.start_llm_usage_metrics(
            LLMTokenUsage(
                prompt_tokens=end.prompt_positions,
                completion_tokens=end.generated_positions,
                total_tokens=end.prompt_positions + end.generated_positions,
                output_audio_tokens=patches,
            )
        )

    # --- tools ---

    async def _handle_tool_call(self, raw_call: str) -> bool:
        """Run the call the model wrote; True when the model must speak again at once (the call could not be made)."""
        self._tool_rounds += 1
        if self._tool_rounds > MAX_TOOL_ROUNDS:
            logger.warning(f"{self}: over {MAX_TOOL_ROUNDS} tool calls in one turn; not answering {raw_call!r}")
            return False
        try:
            call = parse_tool_call(raw_call, [name for name in self._functions if name])
        except ToolCallError as exc:
            logger.warning(f"{self}: bad tool call {raw_call!r}: {exc}")
            await self._session.add_text("tool", error_text(str(exc)))
            return True
        await self._run_tool_call(call)
        return False

    async def _run_tool_call(self, call: ToolCall) -> None:
        logger.info(f"{self}: tool call {call.name}({call.arguments})")
        self._pending_calls.add(call.call_id)
        await self.run_function_calls(
            [
                FunctionCallFromLLM(
                    function_name=call.name, tool_call_id=call.call_id, arguments=call.arguments, context=self._context
                )
            ]
        )

    async def _settle_tool_call(self, frame: FunctionCallResultFrame | FunctionCallCancelFrame) -> None:
        if frame.tool_call_id not in self._pending_calls:
            return
        if isinstance(frame, FunctionCallResultFrame):
            if frame.properties is not None and not frame.properties.is_final:
                return
            text = result_text(frame.result)
            run_llm = _runs_llm(frame)
            if frame.function_name == END_CALL_TOOL and not is_error_result(frame.result):
                self._end_after_reply = True
        else:
            text = error_text(f"The call to {frame.function_name} was cancelled before it finished.")
            run_llm = frame.run_llm
        self._pending_calls.discard(frame.tool_call_id)
        logger.info(f"{self}: tool result for {frame.function_name}: {text}")
        if self._session is not None:
            await self._session.add_text("tool", text)
        self._results_awaiting_response |= run_llm


class _SpeechText:
    """The text side of one response. Reasoning goes to thought frames and the log, never to speech.

    A spoken token becomes a ``TTSTextFrame`` only once the audio that carries it has been pushed, so it reaches the
    assistant aggregator (through the output transport's queue) when that audio has played: in the 5 text : 5 patch
    interleave, token ``i`` of a text run that starts after patch ``p0`` is spoken over patch ``p0 + i``; the
    session's own estimate of what was heard (``text_stream.heard_text``) counts the same way.
    """

    def __init__(self, service: MiMoAudioService) -> None:
        self._service = service
        self._pending: deque[tuple[int, str]] = deque()  # (first sample of the patch that speaks it, text)
        self.patches = 0  # audio patches of this response so far
        self._run_start = -1  # patches before the current text run
        self._run_length = 0
        self._thought: list[str] | None = None

    def patch(self) -> None:
        self.patches += 1

    async def say(self, text: str) -> None:
        await self.end_thought()
        frame = LLMTextFrame(text)  # shown live by RTVI clients; the context gets the TTSTextFrame
        frame.append_to_context = False
        await self._service.push_frame(frame)
        if self.patches != self._run_start:
            self._run_start, self._run_length = self.patches, 0
        self._pending.append(((self._run_start + self._run_length) * SAMPLES_PER_PATCH, text))
        self._run_length += 1

    async def think(self, text: str) -> None:
        if self._thought is None:
            self._thought = []
            await self._service.push_frame(LLMThoughtStartFrame())
        self._thought.append(text)
        await self._service.push_frame(LLMThoughtTextFrame(text))

    async def audio_pushed(self, samples: int) -> None:
        """Audio up to ``samples`` is out: release the words it speaks."""
        while self._pending and self._pending[0][0] < samples:
            await self._push_spoken(self._pending.popleft()[1])

    async def close(self) -> None:
        await self.end_thought()
        while self._pending:
            await self._push_spoken(self._pending.popleft()[1])

    async def end_thought(self) -> None:
        if self._thought is None:
            return
        logger.info(f"{self._service}: thinking: {''.join(self._thought)!r}")
        self._thought = None
        await self._service.push_frame(LLMThoughtEndFrame())

    async def _push_spoken(self, text: str) -> None:
        frame = TTSTextFrame(text, text_type=TextType.TOKEN)
        frame.includes_inter_frame_spaces = True
        await self._service.push_frame(frame)


def _settings(config: Config) -> LLMSettings:
    # LLMService insists on every field being given; MiMo's sampling lives in config.sampling, not here.
    return LLMSettings(
        model=config.model.path or f"mimo-audio-{config.model.preset}",
        system_instruction=None,
        temperature=None,
        max_tokens=None,
        top_p=None,
        top_k=None,
        frequency_penalty=None,
        presence_penalty=None,
        seed=None,
        filter_incomplete_user_turns=False,
        user_turn_completion_config=None,
    )
