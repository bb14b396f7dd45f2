"""MiMoAudioService frame logic against a scripted session (the contract of streaming/session.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from agent_harness import Agent, FakeEngine, ScriptedSession, input_frames, pcm_for, spoken, tone, wait_until
from mimo_voice.agent.service import MiMoAudioService
from mimo_voice.configs import load_config
from mimo_voice.streaming.engine.events import SAMPLES_PER_PATCH, AudioChunk, TextToken, TurnEnd
from pipecat.frames.frames import (
    ErrorFrame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMServiceMetadataFrame,
    LLMTextFrame,
    LLMThoughtTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import LLMUsageMetricsData, ProcessingMetricsData, TTFBMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection
from pipecat.processors.frameworks.rtvi.frames import RTVIClientMessageFrame, RTVIServerResponseFrame
from pipecat.tests.utils import SleepFrame, run_test


def _metrics(frames, kind):
    return [d for f in frames if isinstance(f, MetricsFrame) for d in f.data if isinstance(d, kind)]


async def test_turn_streams_user_audio_then_answers_with_bracketed_audio_and_metrics():
    words = ["Hello", " there", ","]
    async with Agent([spoken(words)]) as agent:
        speech_end = await agent.user_says()
        await agent.responses_done()
        await agent.played_out()

    session = agent.session
    # The user audio went in while they spoke (before respond), at the pipeline's 16 kHz.
    feeds = session.called("feed_audio")
    assert feeds and all(rate == 16000 for _, _, rate in feeds)
    assert session.calls.index(feeds[-1]) < session.calls.index(session.called("respond")[0])
    assert session.called("respond")[0][1] == sum(n for _, n, _ in feeds)

    frames = agent.pushed(
        (LLMFullResponseStartFrame, TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame, LLMFullResponseEndFrame)
    )
    kinds = [type(f) for f in frames]
    assert kinds == [
        LLMFullResponseStartFrame,
        TTSStartedFrame,
        *[TTSAudioRawFrame] * 3,
        TTSStoppedFrame,
        LLMFullResponseEndFrame,
    ]
    audio = [f for f in frames if isinstance(f, TTSAudioRawFrame)]
    assert all(f.sample_rate == 24000 and f.num_channels == 1 for f in audio)
    assert b"".join(f.audio for f in audio) == b"".join(pcm_for(i).tobytes() for i in range(3))
    assert {f.context_id for f in audio} == {frames[1].context_id}

    # The output transport played all of it, and the context holds the spoken words.
    played = np.frombuffer(bytes(agent.output.written), np.int16)
    assert np.array_equal(played[: 3 * SAMPLES_PER_PATCH], np.concatenate([pcm_for(i) for i in range(3)]))
    assert agent.context.messages[-1] == {"role": "assistant", "content": "Hello there,"}
    assert [m.content for m in agent.stopped_turns] == ["Hello there,"]
    assert not agent.stopped_turns[0].interrupted

    metrics = agent.pushed(MetricsFrame)
    (ttfb,) = _metrics(metrics, TTFBMetricsData)
    assert ttfb.value >= 0.5  # back-dated to the end of speech, before VAD's 0.5 s stop window
    assert ttfb.value <= time.time() - speech_end
    assert len(_metrics(metrics, ProcessingMetricsData)) == 1
    (usage,) = _metrics(metrics, LLMUsageMetricsData)
    assert usage.value.prompt_tokens == 40 and usage.value.completion_tokens == 6 and usage.value.total_tokens == 46
    assert usage.value.output_audio_tokens == 3


async def test_spoken_text_follows_the_audio_that_carries_it():
    async with Agent([spoken(["one", " two"])]) as agent:
        await agent.user_says()
        await agent.responses_done()
    frames = agent.pushed((TTSAudioRawFrame, TTSTextFrame, LLMTextFrame))
    order = [(type(f).__name__, getattr(f, "text", None)) for f in frames if not isinstance(f, TTSTextFrame) or True]
    # LLMTextFrame (display, not for the context) as soon as generated; TTSTextFrame after its audio chunk.
    assert order == [
        ("LLMTextFrame", "one"),
        ("TTSAudioRawFrame", None),
        ("TTSTextFrame", "one"),
        ("LLMTextFrame", " two"),
        ("TTSAudioRawFrame", None),
        ("TTSTextFrame", " two"),
    ]
    assert all(not f.append_to_context for f in frames if type(f) is LLMTextFrame)


async def test_noise_that_never_became_a_turn_is_discarded():
    async with Agent([]) as agent:
        await agent.harness.send(VADUserStartedSpeakingFrame(start_secs=0.2), *input_frames(tone(0.2)))
        await wait_until(lambda: agent.session.fed_samples > 0, what="noise fed")
        await agent.harness.send(VADUserStoppedSpeakingFrame(stop_secs=0.5))
        await wait_until(lambda: agent.session.called("discard_user_audio"), what="discard")
        # Audio after the discard (silence between turns) only fills the pre-roll.
        fed = len(agent.session.called("feed_audio"))
        await agent.harness.send(*input_frames(tone(0.1)))
    assert len(agent.session.called("feed_audio")) == fed
    assert not agent.session.called("respond")


async def test_preroll_replays_the_onset_before_the_vad_fired():
    async with Agent([spoken(["ok"])]) as agent:
        await agent.harness.send(*input_frames(tone(2.0)))  # 2 s before the VAD fires: only ~0.5 s is kept
        await wait_until(lambda: len(agent.harness.sink.frames) >= 100, what="audio through the pipeline")
        assert not agent.session.called("feed_audio")
        await agent.user_says(secs=0.2)
        await agent.responses_done()
    fed = agent.session.called("respond")[0][1]
    assert 0.2 * 16000 + 0.4 * 16000 <= fed <= 0.2 * 16000 + 0.6 * 16000


async def test_thinking_is_neither_spoken_nor_shown_as_speech():
    thoughts = ["The", " user", " wants", " a", " joke"]
    async with Agent([spoken(["Sure", "!"], thinking=thoughts)], overrides=["agent.mode=thinking"]) as agent:
        await agent.user_says()
        await agent.responses_done()
        await agent.played_out()
    assert agent.engine.opened[0]["mode"] == "thinking"
    assert "".join(f.text for f in agent.pushed(TTSTextFrame)) == "Sure!"
    assert "".join(f.text for f in agent.pushed(LLMTextFrame) if type(f) is LLMTextFrame) == "Sure!"
    assert "".join(f.text for f in agent.pushed(LLMThoughtTextFrame)) == "The user wants a joke"
    assert agent.context.messages[-1]["content"] == "Sure!"


async def test_mode_switches_by_method_rtvi_message_and_app_message():
    async with Agent([spoken(["a"])], overrides=["agent.thinking_acknowledgement=false"]) as agent:
        agent.service.set_mode("thinking")
        assert agent.session.mode == "thinking"
        message = RTVIClientMessageFrame(msg_id="1", type="set-mode", data={"mode": "non_thinking"})
        await agent.harness.send(message)
        await wait_until(lambda: agent.session.mode == "non_thinking", what="RTVI mode switch")
        await agent.harness.send(InputTransportMessageFrame(message='{"type": "set-mode", "mode": "thinking"}'))
        await wait_until(lambda: agent.session.mode == "thinking", what="app-message mode switch")
        bad = RTVIClientMessageFrame(msg_id="2", type="set-mode", data={"mode": "dreaming"})
        await agent.harness.send(bad)
        await wait_until(
            lambda: len(agent.pushed(RTVIServerResponseFrame, FrameDirection.UPSTREAM)) == 2, what="RTVI replies"
        )
        await agent.user_says()
        await agent.responses_done()
    ok, error = agent.pushed(RTVIServerResponseFrame, FrameDirection.UPSTREAM)
    assert ok.client_msg is message and ok.data == {"mode": "non_thinking"} and ok.error is None
    assert error.client_msg is bad and "dreaming" in error.error
    assert agent.session.mode == "thinking" and agent.session.called("respond")[0][2] == "thinking"
    with pytest.raises(ValueError):
        agent.service.set_mode("dreaming")


async def test_barge_in_stops_generation_and_rolls_back_to_what_was_played():
    words = [f" w{i}" for i in range(20)]  # 20 chunks: 3.2 s of audio, played at 4x: 0.8 s
    async with Agent([spoken(words)], speed=4.0, step_secs=0.02) as agent:
        await agent.user_says()
        await wait_until(lambda: len(agent.output.written) >= 5 * SAMPLES_PER_PATCH * 2, what="some playback")
        await agent.harness.send(UserStartedSpeakingFrame(), InterruptionFrame())
        await wait_until(lambda: agent.session.called("cancel"), what="cancel")
        pushed_audio = len(agent.pushed(TTSAudioRawFrame))
        await wait_until(lambda: agent.stopped_turns, what="the assistant turn to close")
        written = len(agent.output.written) // 2
    ((_, played),) = agent.session.called("cancel")
    total = 20 * SAMPLES_PER_PATCH
    assert 5 * SAMPLES_PER_PATCH <= played <= written < total
    assert written - played <= 2 * 960  # at most a chunk or two was in flight at the interruption
    # Generation stopped: nothing pushed after the interruption, the bracket was closed once.
    assert len(agent.pushed(TTSAudioRawFrame)) == pushed_audio < 20
    assert len(agent.pushed(TTSStoppedFrame)) == len(agent.pushed(LLMFullResponseEndFrame)) == 1
    # The context holds only the words whose audio was played, marked interrupted.
    (turn,) = agent.stopped_turns
    assert turn.interrupted
    heard = played // SAMPLES_PER_PATCH  # word i is pushed after chunk i
    assert turn.content.split() == [w.strip() for w in words[: len(turn.content.split())]]
    assert heard - 1 <= len(turn.content.split()) <= heard + 1


async def test_barge_in_after_generation_finished_still_rolls_back_the_unplayed_tail():
    words = [f" w{i}" for i in range(10)]
    async with Agent([spoken(words)], speed=2.0) as agent:
        await agent.user_says()
        await agent.responses_done()  # generated at once, still playing
        await wait_until(lambda: len(agent.output.written) >= 2 * SAMPLES_PER_PATCH * 2, what="some playback")
        await agent.harness.send(UserStartedSpeakingFrame(), InterruptionFrame())
        await wait_until(lambda: agent.session.called("cancel"), what="cancel")
    ((_, played),) = agent.session.called("cancel")
    assert 2 * SAMPLES_PER_PATCH <= played < 10 * SAMPLES_PER_PATCH


async def test_interruption_after_the_answer_was_heard_rolls_nothing_back():
    async with Agent([spoken(["hi"])]) as agent:
        await agent.user_says()
        await agent.played_out()
        await agent.harness.send(UserStartedSpeakingFrame(), InterruptionFrame())
        await wait_until(lambda: agent.harness.sink.of(InterruptionFrame), what="interruption through")
    assert not agent.session.called("cancel")


async def test_run_frame_with_appended_messages_injects_them_and_answers():
    async with Agent([spoken(["Welcome"])]) as agent:
        await agent.harness.send(
            LLMMessagesAppendFrame(
                [{"role": "system", "content": "Greet the caller."}, {"role": "user", "content": "Hi!"}], run_llm=True
            )
        )
        await agent.responses_done()
    assert agent.session.called("add_text") == [
        ("add_text", "system", "Greet the caller."),
        ("add_text", "user", "Hi!"),
    ]
    assert agent.session.calls.index(("add_text", "user", "Hi!")) < agent.session.calls.index(
        agent.session.called("respond")[0]
    )


async def test_engine_failure_is_reported_and_the_conversation_goes_on():
    class Failing(ScriptedSession):
        async def respond(self):
            self.calls.append(("respond", self.fed_samples, self.mode))
            yield TextToken("Hel", 1)
            yield AudioChunk(pcm_for(0), 0)
            raise RuntimeError("CUDA out of memory")

    agent = Agent([])
    agent.session.__class__ = Failing
    async with agent:
        await agent.user_says()
        await agent.responses_done()
    errors = [f for f in agent.harness.log.pushes if isinstance(f[1], ErrorFrame)]
    assert errors and "CUDA out of memory" in errors[0][1].error and not errors[0][1].fatal
    kinds = [type(f) for f in agent.pushed((TTSStartedFrame, TTSStoppedFrame, LLMFullResponseEndFrame))]
    assert kinds == [TTSStartedFrame, TTSStoppedFrame, LLMFullResponseEndFrame]


async def test_session_error_turn_end_is_reported():
    async with Agent([[TurnEnd("error", error="context full")]]) as agent:
        await agent.user_says()
        await agent.responses_done()
    errors = [f for s, f, d in agent.harness.log.pushes if isinstance(f, ErrorFrame)]
    assert errors and "context full" in errors[0].error


async def test_session_is_opened_with_config_and_closed_at_the_end():
    async with Agent([], overrides=["agent.system_prompt=Be brief.", "agent.task=spoken_dialogue"]) as agent:
        pass
    assert agent.engine.opened == [{"mode": "non_thinking", "system_prompt": "Be brief.", "task": "spoken_dialogue"}]
    assert agent.session.closed


async def test_thinking_mode_acknowledges_first_then_thinks_and_answers():
    ack = spoken(["Let", " me", " think", "."])
    answer = spoken(["Forty", "-two"], thinking=["Six", " times", " seven"])
    async with Agent([ack, answer], overrides=["agent.mode=thinking"]) as agent:
        await agent.user_says()
        await agent.responses_done(2)
        await agent.played_out()
    session = agent.session
    assert [c[2] for c in session.called("respond")] == ["non_thinking", "thinking"]
    notes = session.called("add_text")
    assert [role for _, role, _ in notes] == ["system", "system"]
    assert "acknowledgement" in notes[0][2] and "think" in notes[1][2]
    calls = session.calls
    assert (
        calls.index(notes[0])
        < calls.index(session.called("respond")[0])
        < calls.index(notes[1])
        < calls.index(session.called("respond")[1])
    )
    assert "".join(f.text for f in agent.pushed(TTSTextFrame)) == "Let me think.Forty-two"
    assert "".join(f.text for f in agent.pushed(LLMThoughtTextFrame)) == "Six times seven"
    assert session.mode == "thinking"
    first_ttfb = _metrics(agent.pushed(MetricsFrame), TTFBMetricsData)[0]
    assert first_ttfb.value >= 0.5  # what the user waited for: the acknowledgement, from the end of speech


async def test_a_long_acknowledgement_is_cut():
    ack = spoken([f" w{i}" for i in range(40)])  # 6.4 s
    async with Agent([ack, spoken(["ok"])], overrides=["agent.mode=thinking"]) as agent:
        await agent.user_says()
        await agent.responses_done(2)
    assert session_cancels(agent) == [None]
    first_response = agent.pushed(TTSAudioRawFrame)[:-1]
    assert 3.0 * 24000 <= sum(f.num_frames for f in first_response) < 3.0 * 24000 + 2 * SAMPLES_PER_PATCH


async def test_acknowledgement_can_be_turned_off():
    async with Agent(
        [spoken(["ok"], thinking=["hmm"])], overrides=["agent.mode=thinking", "agent.thinking_acknowledgement=false"]
    ) as agent:
        await agent.user_says()
        await agent.responses_done()
    assert [c[2] for c in agent.session.called("respond")] == ["thinking"]
    assert not agent.session.called("add_text")


def session_cancels(agent: Agent) -> list:
    return [played for _, played in agent.session.called("cancel")]


async def test_unusable_user_audio_is_reported_once():
    class Picky(ScriptedSession):
        async def feed_audio(self, pcm, sample_rate):
            raise ValueError(f"unsupported sample rate {sample_rate} Hz")

    agent = Agent([spoken(["ok"])])
    agent.session.__class__ = Picky
    async with agent:
        await agent.user_says()
        await agent.responses_done()
    errors = [f for s, f, d in agent.harness.log.pushes if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "unsupported sample rate" in errors[0].error


async def test_frame_sequence_of_a_turn_with_pipecat_run_test():
    config = load_config(None)
    session = ScriptedSession([spoken(["Hi", "!"])])
    service = MiMoAudioService(engine=FakeEngine(session), config=config)
    audio = input_frames(tone(0.1))
    _down, up = await run_test(
        service,
        frames_to_send=[UserStartedSpeakingFrame(), *audio, UserStoppedSpeakingFrame(), SleepFrame(0.5)],
        expected_down_frames=[
            LLMServiceMetadataFrame,
            MetricsFrame,  # realtime-service announcement, the worker's empty metrics
            UserStartedSpeakingFrame,
            *[InputAudioRawFrame] * len(audio),
            UserStoppedSpeakingFrame,
            LLMFullResponseStartFrame,
            TTSStartedFrame,
            LLMTextFrame,
            MetricsFrame,
            TTSAudioRawFrame,
            TTSTextFrame,  # TTFB on the first audio
            LLMTextFrame,
            TTSAudioRawFrame,
            TTSTextFrame,
            MetricsFrame,  # processing
            TTSStoppedFrame,
            MetricsFrame,  # usage, before the end so that front-ends can report it with the response
            LLMFullResponseEndFrame,
        ],
        pipeline_params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
    )
    assert [type(f) for f in up] == [LLMServiceMetadataFrame]
    assert [c[0] for c in session.calls] == ["feed_audio"] * len(audio) + ["respond"]
