"""The per-session observer: what one conversation adds to /metrics and what it tells the page."""

from mimo_voice.transports.metrics import ServerMetrics, TurnMetricsObserver
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    InterruptionFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import ProcessingMetricsData, TTFBMetricsData
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_conversation_is_counted_and_reported():
    metrics, clock, sent = ServerMetrics(), Clock(), []

    async def notify(message):
        sent.append(message)

    observer = TurnMetricsObserver(metrics, "webrtc", notify, time_source=clock)
    service, output = FrameProcessor(name="mimo"), BaseOutputTransport(TransportParams())

    async def push(frame, source=service, direction=FrameDirection.DOWNSTREAM):
        await observer.on_push_frame(FramePushed(source, output, frame, direction, 0))

    # The user stops speaking at t=1000 (the VAD says so 0.4 s later); the agent speaks at t=1000.65.
    await push(VADUserStoppedSpeakingFrame(stop_secs=0.4, timestamp=1000.4))
    await push(UserStoppedSpeakingFrame())
    await push(UserStoppedSpeakingFrame(), direction=FrameDirection.UPSTREAM)  # broadcast copy: not a second turn
    await push(MetricsFrame(data=[TTFBMetricsData(processor="mimo", value=0.25)]))
    await push(TTSAudioRawFrame(b"\0\0" * 24000, 24000, 1))  # one second generated
    await push(TTSAudioRawFrame(b"\0\0" * 960, 24000, 1), source=output)  # the output's re-chunking: not new audio
    clock.now = 1000.65
    await push(BotStartedSpeakingFrame())
    call = {"function_name": "calculator", "tool_call_id": "c1", "arguments": {"expression": "2+2"}}
    await push(FunctionCallInProgressFrame(**call))
    await push(FunctionCallResultFrame(**call, result={"value": 4}))
    await push(InterruptionFrame())
    await push(BotStoppedSpeakingFrame())
    await push(InterruptionFrame())  # the agent was silent: a new turn, not a barge-in
    await push(MetricsFrame(data=[ProcessingMetricsData(processor="mimo", value=0.5)]))
    await observer.cleanup()  # waits for its event handlers (pipecat runs them in tasks): the latency report

    assert metrics.user_turns.value("webrtc") == 1
    assert metrics.bot_responses.value("webrtc") == 1
    assert metrics.interruptions.value("webrtc") == 1
    assert metrics.ttfb.count("mimo") == 1
    assert metrics.response_latency.count("webrtc") == 1
    assert abs(metrics.response_latency.sums[("webrtc",)] - 0.65) < 1e-9
    assert metrics.generated_audio.value() == 1.0
    assert metrics.generation_time.value() == 0.5
    assert metrics.tool_calls.value("calculator") == 1 and metrics.tool_latency.count("calculator") == 1
    by_type = {message["type"]: message for message in sent}
    assert len(sent) == len(by_type) == 3
    assert by_type["turn-latency"] == {"type": "turn-latency", "turn": 1, "latency_ms": 650}
    assert by_type["tool-call"] == {
        "type": "tool-call",
        "id": "c1",
        "name": "calculator",
        "arguments": {"expression": "2+2"},
    }
    reported = by_type["tool-result"]
    assert (reported["id"], reported["name"], reported["result"]) == ("c1", "calculator", {"value": 4})
    assert reported["duration_ms"] >= 0


async def test_tool_results_the_page_cannot_show_become_text():
    sent = []

    async def notify(message):
        sent.append(message)

    observer = TurnMetricsObserver(ServerMetrics(), "twilio", notify)
    source, destination = FrameProcessor(), FrameProcessor()
    frame = FunctionCallResultFrame(function_name="f", tool_call_id="x", arguments={}, result={"when": object})
    await observer.on_push_frame(FramePushed(source, destination, frame, FrameDirection.DOWNSTREAM, 0))
    assert sent[0]["result"] == {"when": str(object)} and sent[0]["duration_ms"] is None
