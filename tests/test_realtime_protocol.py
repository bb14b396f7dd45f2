"""/v1/realtime admission and bad input, with the official ``openai`` SDK: session.created, error events that keep
the socket open, the bearer token (header or browser subprotocol) and the session limit."""

from __future__ import annotations

import json

import pytest
import websockets
from openai import AsyncOpenAI
from realtime_support import b64, realtime, until
from realtime_support import tiny_engine as tiny_engine_fixture  # noqa: F401 (registers the fixture)
from transports_support import agent_app, metric, serving

pytestmark = pytest.mark.timeout(300)  # the first engine load may build the tiny model


CODES = {
    "e_unknown": "invalid_event_type",
    "e_b64": "invalid_base64",
    "e_session": "invalid_value",
    "e_fmt": "invalid_value",
    "e_empty": "input_audio_buffer_commit_empty",
}


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/v1/realtime?model=mimo-audio"


async def test_session_created_describes_the_session(tiny_engine):
    async with serving(agent_app(tiny_engine)) as base_url, realtime(base_url) as (_connection, events):
        session = events.of("session.created")[0]["session"]
        assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        assert session["output_modalities"] == ["audio"]


async def test_bad_input_gets_error_events_and_the_socket_lives(tiny_engine):
    async with serving(agent_app(tiny_engine)) as base_url, realtime(base_url) as (connection, events):
        await connection.send_raw("{not json")
        await connection.send_raw(json.dumps({"type": "input_audio_buffer.shout", "event_id": "e_unknown"}))
        await connection.send_raw(
            json.dumps({"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "e_b64"})
        )
        bad_session = {"type": "session.update", "event_id": "e_session", "session": {"output_modalities": ["video"]}}
        await connection.send_raw(json.dumps(bad_session))
        bad_format = {"type": "session.update", "event_id": "e_fmt", "session": {"input_audio_format": "mp3"}}
        await connection.send_raw(json.dumps(bad_format))
        await connection.send_raw(json.dumps({"type": "input_audio_buffer.commit", "event_id": "e_empty"}))
        codes = {event_id: (await _error_for(events, event_id))["code"] for event_id in CODES}
        assert codes == CODES
        assert events.of("error")[0]["error"]["code"] == "invalid_json"
        assert "output_modalities" in events.of("error")[3]["error"]["param"]
        # Still alive and still applying good updates.
        await connection.session.update(session={"type": "realtime", "instructions": "Be brief."})
        updated = await events.next("session.updated")
        assert updated["session"]["instructions"] == "Be brief."
        assert updated["session"]["output_modalities"] == ["audio"]
        await connection.input_audio_buffer.append(audio=b64(bytes(4800)))
        await connection.input_audio_buffer.clear()
        await events.next("input_audio_buffer.cleared")


async def _error_for(events, event_id: str) -> dict:
    def errors() -> list[dict]:
        return [e["error"] for e in events.of("error") if e["error"]["event_id"] == event_id]

    assert await until(lambda: bool(errors()), timeout=30), f"no error for {event_id}; saw {events.of('error')}"
    return errors()[0]


async def test_the_key_comes_as_bearer_or_browser_subprotocol_and_slots_are_shared(tiny_engine):
    app = agent_app(tiny_engine, "server.auth_token=s3cret", "server.max_sessions=1")
    async with serving(app) as base_url:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url(base_url), additional_headers={"Authorization": "Bearer nope"}):
                pass
        assert refused.value.response.status_code == 401
        protocols = ["realtime", "openai-insecure-api-key.s3cret"]
        async with websockets.connect(ws_url(base_url), subprotocols=protocols) as browser:
            assert browser.subprotocol == "realtime"
            assert json.loads(await browser.recv())["type"] == "session.created"
            assert len(app.state.hub.sessions) == 1
            client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="s3cret")
            with pytest.raises(Exception) as busy:
                async with client.realtime.connect(model="mimo-audio"):
                    pass
            assert "503" in str(busy.value)
        assert await metric(base_url, 'mimo_voice_sessions_refused_total{reason="capacity"}', token="s3cret") == 1
        assert await until(lambda: not app.state.hub.sessions, timeout=10), "the browser's slot was not freed"
        async with realtime(base_url, api_key="s3cret") as (_connection, events):
            assert events.of("session.created")


async def test_items_can_be_added_retrieved_and_deleted(tiny_engine):
    note = {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Speak slowly."}]}
    async with serving(agent_app(tiny_engine)) as base_url, realtime(base_url) as (connection, events):
        await connection.conversation.item.create(item={**note, "id": "item_note"})
        added = await events.next("conversation.item.added")
        assert added["item"]["id"] == "item_note" and added["item"]["content"][0]["text"] == "Speak slowly."
        await connection.conversation.item.retrieve(item_id="item_note")
        assert (await events.next("conversation.item.retrieved"))["item"]["role"] == "system"
        await connection.conversation.item.delete(item_id="item_note")
        assert (await events.next("conversation.item.deleted"))["item_id"] == "item_note"
        await connection.send_raw(
            json.dumps({"type": "conversation.item.retrieve", "event_id": "r", "item_id": "item_note"})
        )
        assert (await _error_for(events, "r"))["code"] == "item_not_found"
        assistant = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]}
        await connection.send_raw(json.dumps({"type": "conversation.item.create", "event_id": "a", "item": assistant}))
        assert (await _error_for(events, "a"))["code"] == "unsupported_item"
        await connection.send_raw(json.dumps({"type": "response.cancel", "event_id": "c"}))
        assert (await _error_for(events, "c"))["code"] == "response_cancel_not_active"
