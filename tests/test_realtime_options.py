"""/v1/realtime semantics beyond a plain turn: barge-in under server VAD, text-only output with per-response
instructions, max output tokens, thinking mode through the ``mimo`` session extension, and beta clients."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import websockets
from fixtures.speech import track
from pipecat.audio.utils import alaw_to_pcm, create_stream_resampler
from realtime_support import realtime, resampled, stream, until
from realtime_support import tiny_engine as tiny_engine_fixture  # noqa: F401 (registers the fixture)
from session_support import Script, speech
from transports_support import agent_app, serving

pytestmark = pytest.mark.timeout(300)

PCM_BYTES_PER_SEC = 24_000 * 2
LONG_ANSWER = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
ASK = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Count for me."}]}


def session_of(app, events):
    return app.state.realtime[events.of("session.created")[0]["session"]["id"]].service.session


async def test_barge_in_under_server_vad_cancels_and_truncates_to_what_was_sent(tiny_engine):
    app = agent_app(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        session_of(app, events).text_hook = Script(
            speech(tiny_engine, LONG_ANSWER, 60), speech(tiny_engine, "Yes?", 3)
        )  # 9.6 s, then a short reply to the barge-in
        await connection.conversation.item.create(item=ASK)
        await connection.response.create()
        first = await events.next("response.created")
        response_id = first["response"]["id"]
        assert await until(lambda: len(events.audio(response_id)) > PCM_BYTES_PER_SEC, timeout=60)
        speech_in = await resampled(track("Wait, stop please.", 1.0, sample_rate=16_000).pcm, 16_000, 24_000)
        await stream(connection, speech_in, PCM_BYTES_PER_SEC)
        await events.next("input_audio_buffer.speech_started")
        done = await events.next("response.done", timeout=60)
        assert done["response"]["id"] == response_id
        assert done["response"]["status"] == "cancelled"
        sent_secs = len(events.audio(response_id)) / PCM_BYTES_PER_SEC
        assert sent_secs < 9.0, "the answer was not cut"
        heard = done["response"]["output"][0]["content"][0]["transcript"]
        assert heard and len(heard) < len(LONG_ANSWER)
        history = session_of(app, events).history
        interrupted = [t for t in history if t.role == "assistant" and t.interrupted]
        assert interrupted and interrupted[0].text == heard
        # The barge-in is a user turn: server VAD answers it.
        assert await until(lambda: len(events.of("response.done")) >= 2, timeout=90)
        assert events.of("response.done")[1]["response"]["status"] == "completed"


async def test_text_only_output_with_per_response_instructions_and_max_tokens(tiny_engine):
    app = agent_app(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        await connection.session.update(
            session={"type": "realtime", "output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}}
        )
        await events.next("session.updated")
        session_of(app, events).text_hook = Script(
            speech(tiny_engine, "Bonjour.", 3), speech(tiny_engine, LONG_ANSWER, 40)
        )
        await connection.conversation.item.create(item=ASK)
        await connection.response.create(response={"instructions": "Answer in French."})
        done = await events.next("response.done", timeout=60)
        assert done["response"]["status"] == "completed" and done["response"]["output_modalities"] == ["text"]
        content = done["response"]["output"][0]["content"][0]
        assert (content["type"], content["text"]) == ("output_text", "Bonjour.")
        assert "".join(e["delta"] for e in events.of("response.output_text.delta")) == "Bonjour."
        assert not events.of("response.output_audio.delta")
        roles = [(t.role, t.text) for t in session_of(app, events).history]
        assert ("system", "Answer in French.") in roles and roles.index(("system", "Answer in French.")) < len(
            roles
        ) - 1
        asked = len(events.seen)
        await connection.response.create(response={"output_modalities": ["audio"], "max_output_tokens": 4})
        cut = await events.next("response.done", after=asked, timeout=60)
        assert cut["response"]["status"] == "incomplete"
        assert cut["response"]["status_details"]["reason"] == "max_output_tokens"
        audio_secs = len(events.audio(cut["response"]["id"])) / PCM_BYTES_PER_SEC
        assert 0.4 < audio_secs < 2.0  # four 160 ms patches, and what was decoding when the cut came


async def test_thinking_mode_is_picked_with_the_mimo_session_extension(tiny_engine):
    app = agent_app(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        assert events.of("session.created")[0]["session"]["mimo"] == {"mode": "non_thinking"}
        await connection.send_raw(json.dumps({"type": "session.update", "session": {"mimo": {"mode": "thinking"}}}))
        updated = await events.next("session.updated")
        assert updated["session"]["mimo"] == {"mode": "thinking"}
        state = app.state.realtime[updated["session"]["id"]]
        assert state.service.mode == "thinking" and state.service.session.mode == "thinking"
        await connection.send_raw(
            json.dumps({"type": "session.update", "event_id": "m", "session": {"mimo": {"mode": "deep"}}})
        )
        error = await events.next("error")
        assert error["error"]["event_id"] == "m" and "mimo.mode" in error["error"]["param"]


async def test_a_beta_client_gets_beta_event_names_and_alaw(tiny_engine):
    app = agent_app(tiny_engine)
    async with serving(app) as base_url:
        url = base_url.replace("http", "ws") + "/v1/realtime?model=mimo-audio"
        async with websockets.connect(url, additional_headers={"OpenAI-Beta": "realtime=v1"}) as websocket:
            created = json.loads(await websocket.recv())
            state = app.state.realtime[created["session"]["id"]]
            beta_session = {"modalities": ["audio", "text"], "output_audio_format": "g711_alaw", "turn_detection": None}
            await websocket.send(json.dumps({"type": "session.update", "session": beta_session}))
            seen: list[dict] = []

            async def until_type(kind: str) -> dict:
                while True:
                    event = json.loads(await asyncio.wait_for(websocket.recv(), 60))
                    seen.append(event)
                    if event["type"] == kind:
                        return event

            await until_type("session.updated")
            state.service.session.text_hook = Script(speech(tiny_engine, "Hi there.", 5))
            await websocket.send(json.dumps({"type": "conversation.item.create", "item": ASK}))
            await websocket.send(json.dumps({"type": "response.create"}))
            await until_type("response.done")
        kinds = {event["type"] for event in seen}
        assert {"conversation.item.created", "response.audio.delta", "response.audio_transcript.done"} <= kinds
        assert not kinds & {"response.output_audio.delta", "conversation.item.added"}
        alaw = b"".join(base64.b64decode(e["delta"]) for e in seen if e["type"] == "response.audio.delta")
        pcm = np.frombuffer(await alaw_to_pcm(alaw, 8000, 8000, create_stream_resampler()), np.int16)
        assert abs(len(pcm) - 5 * 0.16 * 8000) < 0.2 * 8000 and np.abs(pcm).max() > 1000


async def test_idle_timeout_prompts_the_user_after_silence(tiny_engine):
    app = agent_app(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        vad = {"type": "server_vad", "idle_timeout_ms": 1000}
        await connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": vad}}})
        updated = await events.next("session.updated")
        assert updated["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 1000
        session_of(app, events).text_hook = Script(
            speech(tiny_engine, "Hello.", 3), speech(tiny_engine, "Still there?", 3)
        )
        await connection.conversation.item.create(item=ASK)
        await connection.response.create()
        first = await events.next("response.done", timeout=60)
        microphone = asyncio.create_task(stream(connection, bytes(PCM_BYTES_PER_SEC * 6), PCM_BYTES_PER_SEC))
        try:
            triggered = await events.next("input_audio_buffer.timeout_triggered", timeout=30)
            prompt = await events.next("response.done", after=events.seen.index(triggered), timeout=60)
        finally:
            microphone.cancel()
        assert prompt["response"]["id"] != first["response"]["id"]
        assert prompt["response"]["output"][0]["content"][0]["transcript"] == "Still there?"
        assert not events.of("input_audio_buffer.speech_started")


async def test_a_cancelled_text_only_answer_is_kept_as_sent(tiny_engine):
    app = agent_app(tiny_engine)
    async with serving(app) as base_url, realtime(base_url) as (connection, events):
        text_only = {"type": "realtime", "output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}}
        await connection.session.update(session=text_only)
        await events.next("session.updated")
        session_of(app, events).text_hook = Script(speech(tiny_engine, LONG_ANSWER, 40))
        await connection.conversation.item.create(item=ASK)
        await connection.response.create()
        assert await until(lambda: len(events.of("response.output_text.delta")) >= 6, timeout=60)
        await connection.response.cancel()
        done = await events.next("response.done", timeout=60)
        assert done["response"]["status"] == "cancelled"
        sent = "".join(e["delta"] for e in events.of("response.output_text.delta"))
        assert done["response"]["output"][0]["content"][0]["text"] == sent
        last = session_of(app, events).history[-1]
        # Not rolled back to audio nobody played: the model remembers at least what the client read.
        assert last.role == "assistant" and last.interrupted and last.text.startswith(sent) and sent
