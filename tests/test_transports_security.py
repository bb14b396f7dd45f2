"""Hostile callers and hurried operators (issue 14): slots, limits, tokens and signatures on the real server."""

import asyncio
import json
import os
import socket

import httpx
import pytest
import uvicorn
import websockets
from fastapi import WebSocket
from mimo_voice.configs import ConfigError, load_config
from mimo_voice.transports import phone, server, sessions
from mimo_voice.transports.metrics import ServerMetrics
from mimo_voice.transports.phone import StreamStart, twilio_serializer
from mimo_voice.transports.security import (
    check_exposure,
    require_auth,
    resolve_auth_token,
    twilio_signature,
    uvicorn_config,
)
from mimo_voice.transports.server import create_app
from mimo_voice.transports.sessions import Refused, SessionHub
from transports_support import metric, wait_until
from webrtc_client import Caller, RecordedMicrophone

pytestmark = pytest.mark.timeout(120)
STREAM_SID = "MZ0123456789abcdef0123456789abcdef"


async def until_hung_up(transport, ctx) -> None:
    """A bot that does nothing: its session ends only when the server hangs up (client gone, idle, over time)."""
    await asyncio.Event().wait()


def app_with(*overrides: str, run_bot=until_hung_up):
    return create_app(load_config(None, list(overrides)), run_bot=run_bot)


class Served:
    """The app under uvicorn with the server's own limits, on a free 127.0.0.1 port."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = app.state.hub.config.server
        self.server = uvicorn.Server(uvicorn_config(app, config, log_level="warning", lifespan="on"))

    async def __aenter__(self) -> "Served":
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        assert await wait_until(lambda: self.server.started or self.task.done(), timeout=10)
        return self

    async def __aexit__(self, *_exc) -> None:
        self.server.should_exit = True
        await self.task
        self.sock.close()

    async def health(self) -> dict:
        async with httpx.AsyncClient(base_url=self.url) as http:
            return (await http.get("/health")).json()


@pytest.fixture
def quick_hang_up(monkeypatch):
    """A client that sends no audio is treated as gone after a second, not after the connect grace."""
    monkeypatch.setattr(sessions, "CONNECT_GRACE_SECS", 1.0)


# --- slots -----------------------------------------------------------------------------------------------------


async def test_renegotiations_and_restarts_keep_one_slot_and_free_it(quick_hang_up):
    app = app_with("server.max_sessions=2", "server.disconnect_timeout_secs=0.5")
    async with Served(app) as served:
        caller = Caller(served.url, RecordedMicrophone())
        stranger = Caller(served.url, RecordedMicrophone())
        try:
            await caller.connect()
            first_pc = caller.pc_id
            for restart in (True, False, True):  # restart_pc, then re-offers under the id a restart returned
                answered = await caller.renegotiate(restart=restart)
                assert answered.status_code == 200, answered.text
                assert answered.json()["session_id"] == next(iter(app.state.hub.sessions))
            hijack = await caller.renegotiate(restart=True, secret="guessed")
            assert hijack.status_code == 404
            stranger.pc_id = first_pc  # knows a pc_id (it was logged), not the secret
            stranger.pc.addTransceiver(stranger.microphone, direction="sendrecv")
            taken = await stranger.renegotiate(restart=True, secret="")
            assert taken.status_code == 404
            assert (await served.health())["sessions"] == 1
        finally:
            await caller.close()
            await stranger.close()
        assert await wait_until(lambda: not app.state.hub.sessions, timeout=10)
        assert (await served.health())["sessions"] == 0
        assert await metric(served.url, 'mimo_voice_sessions_active{transport="webrtc"}') == 0


async def test_failed_offers_hold_no_slot():
    app = app_with("server.max_sessions=1")
    async with Served(app) as served:
        caller = Caller(served.url, RecordedMicrophone())
        caller.pc.addTransceiver(caller.microphone, direction="sendrecv")
        await caller.pc.setLocalDescription(await caller.pc.createOffer())
        sdp = caller.pc.localDescription.sdp.replace("a=ice-ufrag:", "a=x-removed:")
        async with httpx.AsyncClient(base_url=served.url) as http:
            for _ in range(3):
                assert (await http.post("/api/offer", json={"sdp": sdp, "type": "offer"})).status_code == 400
            unknown = {"sdp": caller.pc.localDescription.sdp, "type": "offer", "pc_id": "made-up", "restart_pc": True}
            assert (await http.post("/api/offer", json=unknown)).status_code == 404
        await caller.close()
        assert (await served.health())["sessions"] == 0


def twilio_start(**custom: str) -> str:
    start = {
        "streamSid": STREAM_SID,
        "callSid": "CA0123456789abcdef0123456789abcdef",
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": custom,
    }
    return json.dumps({"event": "start", "start": start, "streamSid": STREAM_SID})


async def test_duplicate_stream_ids_get_their_own_slots_and_free_them(quick_hang_up):
    app = app_with("server.max_sessions=2", "server.disconnect_timeout_secs=0.5")
    async with Served(app) as served:
        ws_url = served.url.replace("http", "ws") + "/ws/twilio"
        sockets = [await websockets.connect(ws_url) for _ in range(5)]
        for websocket in sockets:
            await websocket.send(twilio_start())
        refused = 0
        for websocket in sockets[2:]:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(websocket.recv(), 5)
            refused += closed.value.rcvd.code == 1013
        assert refused == 3
        assert (await served.health())["sessions"] == 2
        for websocket in sockets:
            await websocket.close()
        assert await wait_until(lambda: not app.state.hub.sessions, timeout=10)
        assert (await served.health())["sessions"] == 0
        assert await metric(served.url, 'mimo_voice_sessions_active{transport="twilio"}') == 0


async def test_pending_websocket_handshakes_are_capped():
    app = app_with("server.max_pending_handshakes=2")
    async with Served(app) as served:
        ws_url = served.url.replace("http", "ws") + "/ws/twilio"
        waiting = [await websockets.connect(ws_url) for _ in range(2)]
        await asyncio.sleep(0)  # both are now in their handshake, sending nothing
        assert await wait_until(lambda: app.state.hub._pending_handshakes == 2, timeout=5)
        async with websockets.connect(ws_url) as extra:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(extra.recv(), 5)
        assert closed.value.rcvd.code == 1013 and "too many connections" in closed.value.rcvd.reason
        for websocket in waiting:
            await websocket.close()


def test_per_client_calls_and_offer_rate_are_limited():
    config = load_config(None, ["server.max_sessions_per_client=2", "server.max_offers_per_minute=3"])
    hub = SessionHub(config, engine=None, tools=None, run_bot=until_hung_up, metrics=ServerMetrics())
    first, _second = hub.reserve("webrtc", client="10.0.0.1"), hub.reserve("webrtc", client="10.0.0.1")
    with pytest.raises(Refused) as refused:
        hub.reserve("webrtc", client="10.0.0.1")
    assert refused.value.status == 429 and refused.value.reason == "client_limit"
    assert hub.reserve("webrtc", client="10.0.0.2")  # another address still gets in
    hub.release(first)
    assert hub.reserve("webrtc", client="10.0.0.1")
    for _ in range(3):
        hub.admit_offer("10.0.0.3")
    with pytest.raises(Refused) as limited:
        hub.admit_offer("10.0.0.3")
    assert limited.value.status == 429
    hub.admit_offer("10.0.0.4")
    assert hub.metrics.sessions_refused.value("rate_limited") == 1


# --- requests --------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def post_huge(port: int, headers: str, chunks: list[bytes] | None = None) -> tuple[bytes, int]:
    """Send headers then ``chunks`` (100 MB of 1 MB blocks by default) until the server answers; the status line,
    and the peak RSS growth of this process (server and client) meanwhile."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status = asyncio.create_task(reader.readline())  # the answer may come, and the socket close, mid-upload
    before, peak = rss_bytes(), 0
    writer.write(headers.encode())
    block = b"x" * (1 << 20)
    try:
        for chunk in chunks or [block] * 100:
            if status.done():
                break
            writer.write(chunk)
            await writer.drain()
            peak = max(peak, rss_bytes() - before)
    except (ConnectionError, OSError):
        pass  # the server answered and closed without reading it all
    line = await asyncio.wait_for(status, 10)
    peak = max(peak, rss_bytes() - before)
    writer.close()
    return line, peak


async def test_a_100_mb_body_is_refused_without_being_read():
    app = app_with("server.auth_token=s3cret")
    async with Served(app) as served:
        head = "POST /api/offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        declared = f"Content-Length: {100 << 20}\r\n\r\n"
        unauthorized, grew = await post_huge(served.port, head + declared)
        assert unauthorized.startswith(b"HTTP/1.1 401"), unauthorized
        assert grew < 50 << 20
        authorized = head + "Authorization: Bearer s3cret\r\n"
        too_long, grew = await post_huge(served.port, authorized + declared)
        assert too_long.startswith(b"HTTP/1.1 413") and grew < 50 << 20
        block = b"x" * (64 << 10)
        chunked = [f"{len(block):x}\r\n".encode() + block + b"\r\n"] * 1600  # 100 MB, no length announced
        streamed, grew = await post_huge(served.port, authorized + "Transfer-Encoding: chunked\r\n\r\n", chunked)
        assert streamed.startswith(b"HTTP/1.1 413") and grew < 50 << 20
        assert (await served.health())["status"] == "ok"


async def test_slow_headers_and_bodies_are_cut_off():
    app = app_with("server.header_timeout_secs=1", "server.body_timeout_secs=1")
    async with Served(app) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"POST /api/offer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 408")
        writer.close()


# --- auth and start-up -----------------------------------------------------------------------------------------


def test_an_empty_token_is_a_configuration_error():
    for override in ("server.auth_token=", "server.auth_token=' '"):
        with pytest.raises(ConfigError, match="the token is empty"):
            load_config(None, [override])


def test_the_token_comes_from_the_environment_or_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MIMO_TEST_TOKEN", "from-env")
    assert resolve_auth_token(load_config(None, ["server.auth_token_env=MIMO_TEST_TOKEN"]).server) == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert resolve_auth_token(load_config(None, [f"server.auth_token_file={tmp_path}/token"]).server) == "from-file"
    monkeypatch.setenv("MIMO_TEST_TOKEN", "")
    with pytest.raises(ConfigError, match="MIMO_TEST_TOKEN is empty or unset"):
        create_app(load_config(None, ["server.auth_token_env=MIMO_TEST_TOKEN"]), run_bot=until_hung_up)
    with pytest.raises(ConfigError, match="at most one"):
        load_config(None, ["server.auth_token=a", "server.auth_token_env=MIMO_TEST_TOKEN"])


def test_a_public_bind_without_a_token_refuses_to_start(caplog):
    public = load_config(None, ["server.host=0.0.0.0", "server.port=0"])
    with pytest.raises(ConfigError, match="reachable from the network but no token"):
        check_exposure(public.server, None)
    messages = []
    handler = server.logger.add(messages.append, level="ERROR", format="{message}")
    try:
        assert server.main(public, []) == 2
    finally:
        server.logger.remove(handler)
    assert "allow_public_without_auth" in messages[0]
    check_exposure(public.server, "a-token")
    check_exposure(load_config(None, ["server.host=0.0.0.0", "server.allow_public_without_auth=true"]).server, None)
    check_exposure(load_config(None, ["server.host=::1"]).server, None)


def test_twilio_signature_matches_the_documented_example():
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature("12345", url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert twilio_signature("12345", url + "&x=1", params) != "RSOYDt4T1cUTdK1PDd93/VVr8B8="


async def test_twilio_streams_need_a_valid_signature_when_twilio_is_configured(monkeypatch, quick_hang_up):
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "twilio-secret")
    app = app_with("server.disconnect_timeout_secs=0.5", "server.public_url=https://voice.example.com")
    async with Served(app) as served:
        ws_url = served.url.replace("http", "ws") + "/ws/twilio"
        for headers in ({}, {"X-Twilio-Signature": twilio_signature("wrong", "https://voice.example.com/ws/twilio")}):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(ws_url, additional_headers=headers)
            assert refused.value.response.status_code == 403
        signed = {"X-Twilio-Signature": twilio_signature("twilio-secret", "https://voice.example.com/ws/twilio")}
        async with websockets.connect(ws_url, additional_headers=signed) as websocket:
            await websocket.send(twilio_start())
            assert await wait_until(lambda: len(app.state.hub.sessions) == 1, timeout=5)
        assert app.state.hub.metrics.sessions_refused.value("unauthorized") == 2


def test_call_sid_is_used_only_from_a_validated_stream(monkeypatch):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC0123")
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "twilio-secret")
    start = StreamStart.model_validate(json.loads(twilio_start())["start"])
    assert twilio_serializer(start, validated=False)._call_sid is None
    assert twilio_serializer(start, validated=True)._call_sid == start.callSid
    forged = start.model_copy(update={"callSid": "CA../../Accounts/other"})
    assert twilio_serializer(forged, validated=True)._call_sid is None
    assert phone.CALL_SID.fullmatch(start.callSid)


# --- calls end -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "note"),
    [("server.max_call_secs=0.5", sessions.OVERTIME_NOTE), ("server.idle_timeout_secs=0.5", sessions.IDLE_NOTE)],
)
async def test_a_call_over_its_limit_gets_a_goodbye_then_ends(limit, note):
    notes: list[str] = []

    async def polite(transport, ctx) -> None:
        said = asyncio.Event()

        async def say_goodbye(text: str) -> None:
            notes.append(text)
            said.set()

        ctx.say_goodbye = say_goodbye
        await said.wait()  # a real agent speaks, then ends its worker

    hub = SessionHub(load_config(None, [limit]), engine=None, tools=None, run_bot=polite, metrics=ServerMetrics())
    session = hub.reserve("webrtc", client="10.0.0.1")
    hung_up: list[bool] = []

    async def hang_up() -> None:
        hung_up.append(True)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(hub.run(session, None, hang_up), 10)
    assert notes == [note] and hung_up == [True] and not hub.sessions
    assert 0.5 <= loop.time() - started < 3


async def test_require_auth_guards_routes_the_middleware_does_not():
    """What a websocket route (e.g. a realtime API) uses: the same token, from the Authorization header."""
    app = app_with("server.auth_token=s3cret")

    @app.websocket("/ws/probe")
    async def probe(websocket: WebSocket) -> None:
        require_auth(websocket)
        await websocket.accept()
        await websocket.send_text("in")
        await websocket.close()

    async with Served(app) as served:
        ws_url = served.url.replace("http", "ws") + "/ws/probe"
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(ws_url, additional_headers={"Authorization": "Bearer wrong"})
        assert refused.value.response.status_code == 403
        async with websockets.connect(ws_url, additional_headers={"Authorization": "Bearer s3cret"}) as websocket:
            assert await websocket.recv() == "in"


async def test_a_call_whose_client_left_frees_its_slot_before_its_teardown_ends():
    """A caller who hangs up and calls straight back must not find the server busy with their own old call."""
    gone, teardown = asyncio.Event(), asyncio.Event()

    async def slow_to_stop(transport, ctx) -> None:
        ctx.client_gone()  # what run_worker does when the transport reports the client disconnected
        gone.set()
        await teardown.wait()  # the pipeline still winding down

    config = load_config(None, ["server.max_sessions=1", "server.max_sessions_per_client=1"])
    hub = SessionHub(config, engine=None, tools=None, run_bot=slow_to_stop, metrics=ServerMetrics())
    first = hub.reserve("webrtc", client="10.0.0.1")

    async def hang_up() -> None:
        pass

    call = asyncio.create_task(hub.run(first, None, hang_up))
    await asyncio.wait_for(gone.wait(), 5)
    again = hub.reserve("webrtc", client="10.0.0.1")  # would be Refused while the old call held the slot
    assert hub.metrics.sessions_active.value("webrtc") == 1 and not call.done()
    teardown.set()
    await asyncio.wait_for(call, 5)
    assert list(hub.sessions) == [again.id] and hub.metrics.sessions_active.value("webrtc") == 1
