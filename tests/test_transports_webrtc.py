"""In-process WebRTC: aiortc callers through the real HTTP signalling of a uvicorn server on 127.0.0.1."""

import asyncio
import sys
from pathlib import Path

import httpx
import pytest
from fixtures.speech import track, write_wav
from transports_support import agent_app, metric, serving, tiny_engine, wait_until  # noqa: F401 (a fixture)
from webrtc_client import Caller, RecordedMicrophone

pytestmark = pytest.mark.timeout(300)  # the first engine load may build the tiny model
HOST_CANDIDATE = "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host"


def speech_turn():
    return track(0.5, "Hello, how are you today?", 1.0, sample_rate=16000)


async def test_a_spoken_turn_gets_agent_audio_back(tiny_engine):
    app = agent_app(tiny_engine)
    async with serving(app) as base_url:
        call = Caller(base_url, RecordedMicrophone(speech_turn().pcm))
        await call.connect()
        try:
            assert await wait_until(lambda: call.audible_secs > 0, timeout=60), "no agent audio came back"
            assert await metric(base_url, 'mimo_voice_user_turns_total{transport="webrtc"}') == 1
            assert await metric(base_url, 'mimo_voice_sessions_active{transport="webrtc"}') == 1
        finally:
            await call.close()
        assert await wait_until(lambda: not app.state.hub.sessions, timeout=10), "session not freed after hang-up"
        assert await metric(base_url, 'mimo_voice_response_latency_seconds_count{transport="webrtc"}') == 1


async def test_second_caller_is_refused_when_the_limit_is_one(tiny_engine):
    app = agent_app(tiny_engine, "server.max_sessions=1")
    async with serving(app) as base_url:
        first = Caller(base_url, RecordedMicrophone())
        await first.connect()
        second = Caller(base_url, RecordedMicrophone())
        try:
            refused = await second.offer()
            assert refused.status_code == 503
            assert "busy" in refused.json()["detail"] and "1 session slot" in refused.json()["detail"]
            assert await metric(base_url, 'mimo_voice_sessions_refused_total{reason="capacity"}') == 1
            # A trickled candidate for a live connection is accepted (and takes no slot).
            candidate = {"candidate": HOST_CANDIDATE, "sdp_mid": "0", "sdp_mline_index": 0}
            async with httpx.AsyncClient(base_url=base_url) as http:
                body = {"pc_id": first.pc_id, "session_secret": first.session_secret, "candidates": [candidate]}
                patched = await http.patch("/api/offer", json=body)
                stranger = await http.patch("/api/offer", json={**body, "session_secret": "guess"})
            assert (patched.status_code, patched.json()) == (200, {"status": "ok"})
            assert stranger.status_code == 404
            # So does a renegotiation of the live connection.
            renegotiated = await first.renegotiate()
            assert renegotiated.status_code == 200 and renegotiated.json()["pc_id"] == first.pc_id
            assert len(app.state.hub.sessions) == 1
        finally:
            await second.close()
            await first.close()
        # Once the first caller has gone, the slot is free again.
        assert await wait_until(lambda: not app.state.hub.sessions, timeout=10)
        third = Caller(base_url, RecordedMicrophone())
        await third.connect()
        await third.close()


async def test_a_caller_that_vanishes_mid_answer_frees_its_session(tiny_engine, tmp_path):
    turn = speech_turn()
    wav = write_wav(tmp_path / "turn.wav", turn.pcm, turn.sample_rate)
    app = agent_app(tiny_engine, "server.disconnect_timeout_secs=1.0")
    async with serving(app) as base_url:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).parent / "webrtc_client.py"),
            base_url,
            str(wav),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert (await asyncio.wait_for(client.stdout.readline(), 20)).strip() == b"connected"
            # Killed while the agent is answering: no goodbye, like a crashed browser.
            while (await asyncio.wait_for(client.stdout.readline(), 60)).strip() != b"rtvi bot-llm-started":
                pass
            assert len(app.state.hub.sessions) == 1
        finally:
            client.kill()
            await client.wait()
        assert await wait_until(lambda: not app.state.hub.sessions, timeout=6), "the vanished caller's slot is held"
