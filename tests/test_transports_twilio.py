"""The phone path: a websocket client that speaks Twilio Media Streams (connected/start/media/stop)."""

import asyncio
import base64
import itertools
import json

import numpy as np
import pytest
import websockets
from fixtures.speech import track
from mimo_voice.transports import sessions
from pipecat.audio.utils import create_stream_resampler, pcm_to_ulaw, ulaw_to_pcm
from transports_support import agent_app, metric, serving, tiny_engine, wait_until  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(300)  # the first engine load may build the tiny model

STREAM_SID, CALL_SID = "MZ0123456789abcdef0123456789abcdef", "CA0123456789abcdef0123456789abcdef"
CHUNK_BYTES = 160  # 20 ms of 8 kHz mu-law, as Twilio sends it
AUDIBLE_RMS = 100.0  # int16; mu-law silence decodes to a few units


def start_event(media_format: dict | None = None, **custom: str) -> dict:
    start = {
        "streamSid": STREAM_SID,
        "accountSid": "AC0123456789abcdef0123456789abcdef",
        "callSid": CALL_SID,
        "tracks": ["inbound"],
        "mediaFormat": media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": custom,
    }
    return {"event": "start", "sequenceNumber": "1", "start": start, "streamSid": STREAM_SID}


class TwilioCall:
    """Twilio's side of a Media Stream: sends the caller's audio in real time, collects the agent's."""

    def __init__(self, websocket) -> None:
        self.websocket = websocket
        self.agent_pcm: list[np.ndarray] = []
        self.events: list[str] = []
        self._sequence = 1

    async def open(self, **custom: str) -> None:
        await self.websocket.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await self.websocket.send(json.dumps(start_event(**custom)))

    async def say(self, pcm: np.ndarray, sample_rate: int, then_silence: bool = False) -> None:
        """Stream ``pcm`` in real time; with ``then_silence``, go on with silence as a phone line does."""
        ulaw = await pcm_to_ulaw(pcm.tobytes(), sample_rate, 8000, create_stream_resampler())
        silence = await pcm_to_ulaw(bytes(2 * 160), 8000, 8000, create_stream_resampler())
        chunks = (ulaw[offset : offset + CHUNK_BYTES] for offset in range(0, len(ulaw), CHUNK_BYTES))
        for chunk_index, chunk in enumerate(itertools.chain(chunks, itertools.repeat(silence) if then_silence else ())):
            self._sequence += 1
            media = {
                "track": "inbound",
                "chunk": str(chunk_index + 1),
                "timestamp": str(chunk_index * 20),
                "payload": base64.b64encode(chunk).decode(),
            }
            message = {"event": "media", "sequenceNumber": str(self._sequence), "media": media, "streamSid": STREAM_SID}
            await self.websocket.send(json.dumps(message))
            await asyncio.sleep(0.02)

    async def listen(self) -> None:
        resampler = create_stream_resampler()
        async for raw in self.websocket:
            message = json.loads(raw)
            self.events.append(message["event"])
            assert message["streamSid"] == STREAM_SID
            if message["event"] == "media":
                pcm = await ulaw_to_pcm(base64.b64decode(message["media"]["payload"]), 8000, 8000, resampler)
                self.agent_pcm.append(np.frombuffer(pcm, np.int16))

    @property
    def audible_secs(self) -> float:
        chunks = [c for c in self.agent_pcm if len(c) and np.sqrt(np.mean(c.astype(np.float64) ** 2)) > AUDIBLE_RMS]
        return sum(len(c) for c in chunks) / 8000

    async def hang_up(self) -> None:
        await self.websocket.send(json.dumps({"event": "stop", "sequenceNumber": "999", "streamSid": STREAM_SID}))
        await self.websocket.close()


def phone_app(engine, *overrides: str):
    # phone.yaml reads its token from MIMO_VOICE_TOKEN; these tests set their own (or none).
    return agent_app(engine, "server.host=127.0.0.1", "server.auth_token_env=null", *overrides, config_name="phone")


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/ws/twilio"


async def test_a_recorded_mulaw_turn_round_trips(tiny_engine):
    turn = track(0.4, "Hello, how are you today?", 0.2, sample_rate=8000)
    app = phone_app(tiny_engine)
    async with serving(app) as base_url:
        async with websockets.connect(ws_url(base_url)) as websocket:
            call = TwilioCall(websocket)
            listener = asyncio.create_task(call.listen())
            await call.open()
            line = asyncio.create_task(call.say(turn.pcm, turn.sample_rate, then_silence=True))
            assert await wait_until(lambda: call.audible_secs > 0, timeout=60), "no agent audio on the phone"
            assert await metric(base_url, 'mimo_voice_sessions_active{transport="twilio"}') == 1
            assert await metric(base_url, 'mimo_voice_user_turns_total{transport="twilio"}') == 1
            line.cancel()
            await call.hang_up()
            await asyncio.wait_for(listener, 10)
        assert await wait_until(lambda: not app.state.hub.sessions, timeout=10), "the call's session was not freed"
        assert STREAM_SID not in app.state.hub.sessions


@pytest.mark.parametrize(
    ("first_messages", "reason"),
    [
        (["not json"], "Twilio Media Streams JSON"),
        ([b"\x00\x01"], "JSON text, not binary"),
        ([json.dumps({"event": "media"})], "expected a 'start' event first"),
        ([json.dumps({"event": "start", "start": {"callSid": CALL_SID}})], "start.streamSid: Field required"),
        ([json.dumps(start_event({"encoding": "audio/l16", "sampleRate": 16000}))], "need 8 kHz mono mu-law"),
    ],
)
async def test_a_malformed_stream_is_closed_with_a_reason(tiny_engine, first_messages, reason):
    app = phone_app(tiny_engine)
    async with serving(app) as base_url:
        async with websockets.connect(ws_url(base_url)) as websocket:
            for message in first_messages:
                await websocket.send(message)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(websocket.recv(), 5)
        assert closed.value.rcvd.code == 1008
        assert reason in closed.value.rcvd.reason
        assert not app.state.hub.sessions


async def test_token_and_capacity_are_enforced(tiny_engine):
    app = phone_app(tiny_engine, "server.auth_token=s3cret", "server.max_sessions=1")
    async with serving(app) as base_url:
        async with websockets.connect(ws_url(base_url)) as websocket:
            await TwilioCall(websocket).open(token="wrong")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(websocket.recv(), 5)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "missing or wrong 'token' custom parameter")
        async with websockets.connect(ws_url(base_url)) as first:
            caller = TwilioCall(first)
            await caller.open(token="s3cret")
            talking = asyncio.create_task(caller.say(np.zeros(0, np.int16), 8000, then_silence=True))
            assert await wait_until(lambda: len(app.state.hub.sessions) == 1, timeout=5)
            async with websockets.connect(ws_url(base_url)) as second:
                await TwilioCall(second).open(token="s3cret")
                with pytest.raises(websockets.ConnectionClosed) as busy:
                    await asyncio.wait_for(second.recv(), 5)
            assert busy.value.rcvd.code == 1013 and "busy" in busy.value.rcvd.reason
            talking.cancel()
        refused = 'mimo_voice_sessions_refused_total{reason="%s"}'
        assert await metric(base_url, refused % "unauthorized", token="s3cret") == 1
        assert await metric(base_url, refused % "capacity", token="s3cret") == 1


async def test_a_stream_that_goes_quiet_is_hung_up(tiny_engine):
    app = phone_app(tiny_engine, "server.disconnect_timeout_secs=1.0")
    async with serving(app) as base_url:
        async with websockets.connect(ws_url(base_url)) as websocket:
            call = TwilioCall(websocket)
            await call.open()
            await call.say(np.zeros(8000 // 2, np.int16), 8000)
            assert len(app.state.hub.sessions) == 1
            # The media stops but the socket stays open, as when a network path dies.
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(websocket.recv(), 10)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "call ended")
        assert await wait_until(lambda: not app.state.hub.sessions, timeout=5)


async def test_a_silent_caller_is_hung_up_at_the_idle_timeout(tiny_engine):
    idle = 2.0
    app = phone_app(tiny_engine, f"server.idle_timeout_secs={idle}", "agent.max_new_groups=40")
    async with serving(app) as base_url:
        async with websockets.connect(ws_url(base_url)) as websocket:
            call = TwilioCall(websocket)
            await call.open()
            opened = asyncio.get_running_loop().time()
            line = asyncio.create_task(call.say(np.zeros(0, np.int16), 8000, then_silence=True))  # frames, no speech
            try:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(websocket.recv(), 40)
            finally:
                line.cancel()
            lasted = asyncio.get_running_loop().time() - opened
        assert closed.value.rcvd.code == 1000  # the agent's goodbye ended the worker, which closed the stream
        assert idle <= lasted < idle + sessions.GOODBYE_GRACE_SECS + 5, f"hung up after {lasted:.1f} s"
        assert await wait_until(lambda: not app.state.hub.sessions, timeout=5)
