"""The service driving the REAL tiny engine and session (streaming/engine.py, streaming/session.py).

The tiny model babbles; where a test needs particular words (a tool call, a long answer, a thought) it forces the
model's text through the session's ``text_hook``: ``<|empty|>`` makes an audio patch, as in the model's own output.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from agent_harness import Agent, FakeTransport, Harness, input_frames, tone, wait_until
from fixtures.speech import spoken as say
from langchain_core.tools import tool
from mimo_voice.agent.pipeline import create_worker
from mimo_voice.agent.vad import create_vad_analyzer
from mimo_voice.configs import load_config
from mimo_voice.streaming.engine.testing import TestingEngine
from mimo_voice.streaming.engine.events import SAMPLES_PER_PATCH
from mimo_voice.tools import ToolRegistry
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    LLMThoughtTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import LLMUsageMetricsData, TTFBMetricsData
from pipecat.processors.frame_processor import FrameDirection
from session_support import Script, speech


@pytest.fixture(scope="module")
def engine():
    engine = TestingEngine.load(load_config(None))
    yield engine
    asyncio.run(engine.aclose())


def token_count_of(text: str, tokens: list[str]) -> int:
    """How many of ``tokens`` (in order) make up ``text``."""
    joined = ""
    for count, token in enumerate(tokens):
        if joined == text:
            return count
        joined += token
    assert joined == text, f"{text!r} is not made of the spoken tokens {tokens!r}"
    return len(tokens)


async def test_a_turn_through_the_real_session(engine):
    async with Agent(engine=engine, speed=4.0) as agent:
        agent.session.text_hook = Script(speech(engine, "Hello there, nice to meet you.", 8))
        await agent.user_says(secs=0.6)
        await agent.responses_done()
        await agent.played_out()
        history = list(agent.session.history)

    frames = agent.pushed(
        (LLMFullResponseStartFrame, TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame, LLMFullResponseEndFrame)
    )
    kinds = [type(f) for f in frames]
    assert kinds[:2] == [LLMFullResponseStartFrame, TTSStartedFrame]
    assert kinds[-2:] == [TTSStoppedFrame, LLMFullResponseEndFrame]
    audio = [f for f in frames if isinstance(f, TTSAudioRawFrame)]
    assert set(kinds[2:-2]) == {TTSAudioRawFrame} and all(f.sample_rate == 24000 for f in audio)
    pcm = b"".join(f.audio for f in audio)
    assert len(pcm) // 2 == 8 * SAMPLES_PER_PATCH  # every generated patch was decoded and pushed
    assert bytes(agent.output.written[: len(pcm)]) == pcm  # ... and played, in order

    spoken = "".join(f.text for f in agent.pushed(TTSTextFrame))
    assert spoken == "Hello there, nice to meet you."
    assert [(t.role, t.text, t.interrupted) for t in history] == [("user", "", False), ("assistant", spoken, False)]
    assert history[0].audio_seconds >= 0.55  # the user audio streamed in while they spoke
    assert agent.context.messages[-1] == {"role": "assistant", "content": spoken}

    metrics = agent.pushed(MetricsFrame)
    assert next(d for f in metrics for d in f.data if isinstance(d, TTFBMetricsData)).value >= 0.5
    (usage,) = [d for f in metrics for d in f.data if isinstance(d, LLMUsageMetricsData)]
    assert usage.value.output_audio_tokens == 8 and usage.value.prompt_tokens > 0


weather_calls: list[str] = []


@tool
def weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: The city.
    """
    weather_calls.append(city)
    return f"Sunny in {city}"


async def test_a_tool_call_written_by_the_model_runs_and_speech_resumes(engine):
    weather_calls.clear()
    tools = ToolRegistry(timeout_secs=10.0)
    tools.add(weather)
    call = '<tool_call>{"name": "weather", "arguments": {"city": "Zanzibar"}}</tool_call>'
    # Audio patches while the call is written: the session must withhold them.
    first = speech(engine, "Let me check.", 5, end=False) + speech(engine, call, 10, end=False)
    second = speech(engine, "It is sunny there.", 5)
    async with Agent(engine=engine, tools=tools, speed=4.0) as agent:
        agent.session.text_hook = Script(first, second)
        await agent.user_says()
        await agent.responses_done(2)
        await agent.played_out(2)
        history = list(agent.session.history)

    assert weather_calls == ["Zanzibar"]
    said = "".join(f.text for f in agent.pushed(TTSTextFrame))
    shown = "".join(f.text for f in agent.pushed(LLMTextFrame) if type(f) is LLMTextFrame)
    assert said == shown == "Let me check.It is sunny there."
    usage = [d.value for f in agent.pushed(MetricsFrame) for d in f.data if isinstance(d, LLMUsageMetricsData)]
    assert [u.output_audio_tokens for u in usage] == [5, 5]  # none of the 10 patches written with the call
    assert [(t.role, t.text) for t in history] == [
        ("user", ""),
        ("assistant", "Let me check."),
        ("tool", "Sunny in Zanzibar"),
        ("assistant", "It is sunny there."),
    ]


async def test_barge_in_rolls_the_real_session_back_to_what_was_played(engine):
    words = " ".join(f"word{i}" for i in range(30))
    async with Agent(engine=engine, speed=4.0) as agent:
        agent.session.text_hook = Script(speech(engine, words, 40))  # 6.4 s of audio
        await agent.user_says()
        await wait_until(lambda: len(agent.output.written) >= 2 * 8 * SAMPLES_PER_PATCH, what="some playback")
        await agent.harness.send(UserStartedSpeakingFrame(), InterruptionFrame())
        await wait_until(lambda: agent.stopped_turns, what="the interrupted turn to close")
        assistant = next(t for t in reversed(agent.session.history) if t.role == "assistant")
        # The conversation goes on from there.
        agent.session.text_hook = Script(speech(engine, "Sorry, go on.", 5))
        await agent.user_says()
        await agent.responses_done(2)
        history = list(agent.session.history)

    spoken_tokens = [f.text for f in agent.pushed(TTSTextFrame)]
    assert assistant.interrupted
    assert words.startswith(assistant.text) and 0 < len(assistant.text) < len(words)
    heard_in_context = agent.stopped_turns[0].content
    assert agent.stopped_turns[0].interrupted
    # The pipecat context and the session agree on what was heard, to a token.
    assert abs(token_count_of(heard_in_context, spoken_tokens) - token_count_of(assistant.text, spoken_tokens)) <= 1
    assert history[-1].role == "assistant" and history[-1].text == "Sorry, go on."
    generated = len(agent.pushed(TTSAudioRawFrame))
    assert generated < 40  # generation stopped


async def test_thinking_is_logged_and_shown_but_never_spoken(engine):
    thought = engine.builder.encode("The secret word is zebra.\n</think>")
    async with Agent(engine=engine, overrides=["agent.mode=thinking"], speed=4.0) as agent:
        agent.session.text_hook = Script(speech(engine, "Let me think.", 5), thought + speech(engine, "Here it is.", 5))
        await agent.user_says()
        await agent.responses_done(2)
        await agent.played_out(2)

    thoughts = "".join(f.text for f in agent.pushed(LLMThoughtTextFrame))
    assert "zebra" in thoughts
    said = "".join(f.text for f in agent.pushed(TTSTextFrame))
    shown = "".join(f.text for f in agent.pushed(LLMTextFrame) if type(f) is LLMTextFrame)
    assert said == shown == "Let me think.Here it is."
    assert "zebra" not in said and "think>" not in said
    # The answer's audio comes only after the thought (thinking positions are text, never patches).
    pushes = [f for s, f, d in agent.harness.log.pushes if s is agent.service]
    last_thought = max(i for i, f in enumerate(pushes) if isinstance(f, LLMThoughtTextFrame))
    second_start = [i for i, f in enumerate(pushes) if isinstance(f, LLMFullResponseStartFrame)][1]
    assert not any(isinstance(f, TTSAudioRawFrame) for f in pushes[second_start:last_thought])


async def test_noise_that_never_became_a_turn_leaves_no_trace(engine):
    async with Agent(engine=engine, speed=4.0) as agent:
        agent.session.text_hook = Script(speech(engine, "Yes?", 5))
        await agent.harness.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        await agent.send_audio(tone(1.5))
        await agent.harness.send(VADUserStoppedSpeakingFrame(stop_secs=0.5))
        await agent.send_audio(np.zeros(1600, np.int16))
        await agent.user_says(secs=0.5)
        await agent.responses_done()
        history = list(agent.session.history)
    (user, assistant) = history
    assert 0.5 <= user.audio_seconds < 0.5 + 0.6  # the turn and its pre-roll, not the 1.5 s of noise
    assert assistant.text == "Yes?"


async def test_create_worker_with_the_real_engine_answers_and_takes_barge_in(engine):
    config = load_config(None)
    transport = FakeTransport()
    worker, service = create_worker(transport, config, engine, vad_analyzer=create_vad_analyzer(config.vad))
    harness = Harness(worker=worker)

    async def caller(*pieces):
        audio = [say(p, 16000) if isinstance(p, str) else np.zeros(int(p * 16000), np.int16) for p in pieces]
        for frame in input_frames(np.concatenate(audio)):
            await transport.input().push_audio_frame(frame)
            await asyncio.sleep(0.005)

    def answers() -> int:
        return len(harness.log.frames(service, LLMFullResponseEndFrame))

    def played_answers() -> int:
        return len(harness.log.frames(transport.output(), BotStoppedSpeakingFrame, FrameDirection.UPSTREAM))

    async with harness:
        service.session.text_hook = Script(
            speech(engine, "Hi.", 4), speech(engine, "one two three four", 30), speech(engine, "Okay.", 4)
        )
        await caller(0.3, "Hello", 0.8)
        await wait_until(lambda: played_answers() == 1, what="the first answer")
        await caller(0.3, "Tell me a story", 0.8)
        await wait_until(lambda: len(transport.output().written) > 2 * (4 + 8) * SAMPLES_PER_PATCH, what="playback")
        await caller("No, wait a moment please", 0.8)
        await wait_until(lambda: answers() == 3, what="the answer to the barge-in")
        history = list(service.session.history)
    assert [(t.role, t.interrupted) for t in history] == [
        ("user", False),
        ("assistant", False),
        ("user", False),
        ("assistant", True),
        ("user", False),
        ("assistant", False),
    ]
    assert history[1].text == "Hi." and history[5].text == "Okay."
    assert "one two three four".startswith(history[3].text)
