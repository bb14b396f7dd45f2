"""Conversations over /v1/realtime with the official ``openai`` SDK on the tiny model: a server-VAD turn from
streamed speech, a client-driven turn, cancel, truncate, a client-side function call, G.711 in and out.

The tiny model babbles; where a test needs particular words (a long answer, a tool call) it forces the model's text
through the session's ``text_hook`` (``app.state.realtime[session id].service.session``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.speech import track
from pipecat.audio.utils import create_stream_resampler, pcm_to_ulaw, ulaw_to_pcm
from realtime_support import b64, realtime, resampled, stream, until
from realtime_support import tiny_engine as tiny_engine_fixture  # noqa: F401 (registers the fixture)
from session_support import Script, speech
from transports_support import agent_app, serving

pytestmark = pytest.mark.timeout(300)

PCM_BYTES_PER_SEC = 24_000 * 2
AUDIBLE_RMS = 100.0
RESPONSE_EVENTS = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio.delta",
    "response.output_audio_transcript.delta",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]
LONG_ANSWER = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
MANUAL_TURNS = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}


def app_for(engine, *overrides: str):
    return agent_app(engine, *overrides)


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0


def response_events(events, response_id: str) -> list[str]:
    """The types of one response's events in the order each first appears (the assistant item's included)."""
    kinds: list[str] = []
    for event in events.seen:
        ids = (event.get("response_id"), (event.get("response") or {}).get("id"))
        item = event.get("item") or {}
        assistant_item = event["type"].startswith("conversation.item") and item.get("role") == "assistant"
        if (response_id in ids or assistant_item) and event["type"] not in kinds:
            kinds.append(event["type"])
    return kinds


def last_index(events, kind: str) -> int:
    return max(i for i, event in enumerate(events.seen) if event["type"] == kind)


def session_of(app, events):
    return app.state.realtime[events.of("session.created")[0]["session"]["id"]].service.session


async def user_speech(rate: int = 24_000) -> bytes:
    turn = track(0.3, "Hello, how are you today?", 0.2, sample_rate=16_000)
    return await resampled(turn.pcm, 16_000, rate)


async def test_a_server_vad_turn_from_streamed_speech_gets_audio_and_response_done(tiny_engine):
    app = app_for(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        # The words are forced so that the answer surely speaks (babble may end before any audio).
        session_of(app, events).text_hook = Script(speech(tiny_engine, "Hi there, nice to meet you.", 8))
        await stream(connection, await user_speech(), PCM_BYTES_PER_SEC)
        silence = stream(connection, bytes(PCM_BYTES_PER_SEC * 2), PCM_BYTES_PER_SEC)  # as a microphone goes on
        await silence
        done = await events.next("response.done", timeout=90)
        response = done["response"]
        assert response["status"] == "completed"
        started, stopped = (
            events.of("input_audio_buffer.speech_started"),
            events.of("input_audio_buffer.speech_stopped"),
        )
        assert len(started) == len(stopped) == 1 and started[0]["item_id"] == stopped[0]["item_id"]
        order = events.types()
        assert order.index("input_audio_buffer.committed") < order.index("response.created")
        assert response_events(events, response["id"]) == RESPONSE_EVENTS
        assert last_index(events, "response.output_audio.delta") < last_index(events, "response.output_audio.done")
        audio = np.frombuffer(events.audio(response["id"]), np.int16)
        assert len(audio) > 0.2 * 24_000 and rms(audio) > AUDIBLE_RMS
        said = "".join(e["delta"] for e in events.of("response.output_audio_transcript.delta"))
        item = response["output"][0]
        assert item["role"] == "assistant" and item["content"][0]["transcript"] == said == "Hi there, nice to meet you."
        assert response["usage"]["output_tokens"] > 0


async def test_a_client_driven_turn_waits_for_response_create(tiny_engine):
    app = app_for(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        await connection.session.update(session=MANUAL_TURNS)
        assert (await events.next("session.updated"))["session"]["audio"]["input"]["turn_detection"] is None
        await stream(connection, await user_speech(), PCM_BYTES_PER_SEC, realtime=False)
        await connection.input_audio_buffer.commit()
        committed = await events.next("input_audio_buffer.committed")
        user_item = await events.next("conversation.item.done", after=events.seen.index(committed))
        assert user_item["item"]["id"] == committed["item_id"] and user_item["item"]["role"] == "user"
        session_of(app, events).text_hook = Script(speech(tiny_engine, "Hi there.", 5))
        asked = len(events.seen)
        assert not events.of("response.created"), "a client-driven turn must not answer by itself"
        assert not events.of("input_audio_buffer.speech_started")
        await connection.response.create()
        done = await events.next("response.done", after=asked, timeout=90)
        assert done["response"]["status"] == "completed"
        assert done["response"]["output"][0]["content"][0]["transcript"] == "Hi there."
        assert len(events.audio(done["response"]["id"])) >= 5 * 3840 * 2 * 0.9  # five 160 ms patches
        history = session_of(app, events).history
        assert [(t.role, t.text) for t in history] == [("user", ""), ("assistant", "Hi there.")]


@pytest.mark.parametrize("stop", ["response.cancel", "output_audio_buffer.clear"])
async def test_cancel_stops_and_rolls_back_to_what_was_sent(tiny_engine, stop):
    app = app_for(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        await connection.session.update(session=MANUAL_TURNS)
        await events.next("session.updated")
        session_of(app, events).text_hook = Script(speech(tiny_engine, LONG_ANSWER, 40))  # 6.4 s of audio
        await connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Count for me."}]}
        )
        await connection.response.create()
        created = await events.next("response.created")
        await events.next("response.output_audio.delta")
        await connection.send_raw(json.dumps({"type": stop}))
        done = await events.next("response.done", timeout=60)
        assert done["response"]["id"] == created["response"]["id"]
        assert done["response"]["status"] == "cancelled"
        heard = done["response"]["output"][0]["content"][0]["transcript"]
        assert len(heard) < len(LONG_ANSWER)
        sent_secs = len(events.audio(done["response"]["id"])) / PCM_BYTES_PER_SEC
        assert sent_secs < 4.0, "audio went on after the cancel"
        last = session_of(app, events).history[-1]
        assert last.role == "assistant" and last.interrupted and last.text == heard
        # The conversation goes on: a second response.create is accepted.
        session_of(app, events).text_hook = Script(speech(tiny_engine, "Sorry.", 3))
        await connection.response.create()
        again = await events.next("response.done", after=events.seen.index(done) + 1, timeout=60)
        assert again["response"]["status"] == "completed"


async def test_truncate_rolls_the_session_back_to_audio_end_ms(tiny_engine):
    app = app_for(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        await connection.session.update(session=MANUAL_TURNS)
        await events.next("session.updated")
        session_of(app, events).text_hook = Script(speech(tiny_engine, LONG_ANSWER, 40))
        await connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Count for me."}]}
        )
        await connection.response.create()
        added = await events.next("response.output_item.added")
        assert await until(lambda: len(events.of("response.output_audio.delta")) >= 10, timeout=60)
        item_id = added["item"]["id"]
        await connection.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=480)
        truncated = await events.next("conversation.item.truncated")
        assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 480)
        done = await events.next("response.done", timeout=60)
        assert done["response"]["status"] == "cancelled"
        last = session_of(app, events).history[-1]
        # 480 ms = three 160 ms patches heard: the words spoken over them, no more.
        assert last.role == "assistant" and last.interrupted
        assert last.text == done["response"]["output"][0]["content"][0]["transcript"]
        assert 0 < len(last.text.split()) <= 4
        # Truncating past what was sent is refused, and the socket stays open.
        await connection.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=600_000)
        error = await events.next("error")
        assert error["error"]["param"] == "audio_end_ms"


async def test_a_function_call_goes_to_the_client_and_its_output_continues_the_turn(tiny_engine):
    app = app_for(tiny_engine)
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        await connection.session.update(session={**MANUAL_TURNS, "tools": [tool], "tool_choice": "auto"})
        await events.next("session.updated")
        call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Zanzibar"}}</tool_call>'
        first = speech(tiny_engine, "Let me check.", 5, end=False) + speech(tiny_engine, call, 10, end=False)
        session_of(app, events).text_hook = Script(first, speech(tiny_engine, "It is sunny there.", 5))
        await connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}
        )
        await connection.response.create()
        done = await events.next("response.done", timeout=90)
        output = done["response"]["output"]
        assert [item["type"] for item in output] == ["message", "function_call"]
        assert output[0]["content"][0]["transcript"] == "Let me check."
        function_call = output[1]
        assert function_call["name"] == "get_weather" and json.loads(function_call["arguments"]) == {"city": "Zanzibar"}
        arguments = await events.next("response.function_call_arguments.done")
        assert arguments["call_id"] == function_call["call_id"]
        transcript = "".join(e["delta"] for e in events.of("response.output_audio_transcript.delta"))
        assert "tool_call" not in transcript and "Zanzibar" not in transcript
        asked = len(events.seen)
        await connection.conversation.item.create(
            item={"type": "function_call_output", "call_id": function_call["call_id"], "output": '"Sunny, 31 C"'}
        )
        await connection.response.create()
        second = await events.next("response.done", after=asked, timeout=90)
        assert second["response"]["output"][0]["content"][0]["transcript"] == "It is sunny there."
        history = [(t.role, t.text) for t in session_of(app, events).history]
        assert history == [
            ("user", "Weather?"),
            ("assistant", "Let me check."),
            ("tool", '"Sunny, 31 C"'),
            ("assistant", "It is sunny there."),
        ]


async def test_g711_mulaw_in_and_alaw_out(tiny_engine):
    app = app_for(tiny_engine)
    g711 = {
        "type": "realtime",
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
            "output": {"format": {"type": "audio/pcmu"}},
        },
    }
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        await connection.session.update(session=g711)
        session = (await events.next("session.updated"))["session"]
        assert session["audio"]["output"]["format"] == {"type": "audio/pcmu", "rate": 8000}
        turn = track(0.3, "Hello, how are you today?", 0.2, sample_rate=8000)
        ulaw = await pcm_to_ulaw(turn.pcm.tobytes(), 8000, 8000, create_stream_resampler())
        await stream(connection, ulaw, 8000, realtime=False)
        await connection.input_audio_buffer.commit()
        await events.next("input_audio_buffer.committed")
        session_of(app, events).text_hook = Script(speech(tiny_engine, "Hi there.", 5))
        await connection.response.create()
        done = await events.next("response.done", timeout=90)
        ulaw_out = events.audio(done["response"]["id"])
        assert abs(len(ulaw_out) - 5 * 0.16 * 8000) < 0.2 * 8000  # 8 kHz, one byte a sample
        pcm = np.frombuffer(await ulaw_to_pcm(ulaw_out, 8000, 8000, create_stream_resampler()), np.int16)
        assert rms(pcm) > AUDIBLE_RMS
        user_turn = session_of(app, events).history[0]
        assert user_turn.role == "user" and abs(user_turn.audio_seconds - turn.duration) < 0.3


async def test_a_user_audio_item_is_a_turn_without_the_buffer(tiny_engine):
    app = app_for(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        await connection.session.update(session=MANUAL_TURNS)
        await events.next("session.updated")
        audio = await user_speech()
        item = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": b64(audio)}]}
        await connection.conversation.item.create(item=item)
        added = await events.next("conversation.item.added")
        assert added["item"]["role"] == "user" and added["item"]["content"][0]["type"] == "input_audio"
        session_of(app, events).text_hook = Script(speech(tiny_engine, "Hi there.", 5))
        await connection.response.create()
        done = await events.next("response.done", timeout=90)
        assert done["response"]["status"] == "completed"
        user_turn = session_of(app, events).history[0]
        assert user_turn.role == "user" and abs(user_turn.audio_seconds - len(audio) / PCM_BYTES_PER_SEC) < 0.3
