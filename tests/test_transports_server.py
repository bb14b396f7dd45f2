"""HTTP surface of the server: page, info, health, metrics, signalling errors, auth, limits, start-up."""

import socket
from types import SimpleNamespace

import httpx
import pytest
from aiortc import RTCPeerConnection
from mimo_voice.configs import load_config
from mimo_voice.transports import server
from mimo_voice.transports.metrics import Counter, Histogram, ServerMetrics
from mimo_voice.transports.server import TINY_NOTICE, create_app


async def never_runs(transport, ctx):
    raise AssertionError("these tests never connect a client")


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def app_with(*overrides: str, engine=None):
    return create_app(load_config(None, list(overrides)), engine=engine, run_bot=never_runs)


async def audio_offer(kind: str = "audio") -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver(kind, direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_page_and_its_assets_are_served():
    async with client(app_with()) as http:
        page = await http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'src="/static/app.js"' in page.text and 'id="talk"' in page.text
        script = await http.get("/static/app.js")
        assert script.status_code == 200 and "client-ready" in script.text and "/api/offer" in script.text
        assert (await http.get("/static/style.css")).status_code == 200


async def test_without_weights_the_server_says_it_babbles():
    async with client(app_with()) as http:
        info = (await http.get("/api/info")).json()
        health = (await http.get("/health")).json()
    assert info["tiny"] is True and info["model"] == "tiny" and info["notice"] == TINY_NOTICE
    assert info["notice"].startswith("tiny: babbles")
    assert info["mode"] == "non_thinking" and info["auth_required"] is False
    assert health == {"status": "ok", "sessions": 0, "max_sessions": 4, "tiny": True, "auth_required": False}


async def test_with_real_weights_there_is_no_notice():
    engine = SimpleNamespace(is_tiny=False)
    async with client(app_with("model.path=/models/MiMo-Audio-7B-Instruct", engine=engine)) as http:
        info = (await http.get("/api/info")).json()
    assert (info["tiny"], info["notice"], info["model"]) == (False, None, "/models/MiMo-Audio-7B-Instruct")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "invalid request: body: not valid JSON"),
        ('{"type": "offer"}', "invalid request: sdp: Field required"),
        ('{"sdp": "v=0", "type": "answer"}', "type: Input should be 'offer'"),
        ('{"sdp": "m=audio x", "type": "offer"}', "malformed SDP offer"),
        ('{"sdp": "hello", "type": "offer"}', "the SDP offer has no audio track"),
    ],
)
async def test_malformed_offers_get_a_clear_400(body, message):
    app = app_with()
    async with client(app) as http:
        response = await http.post("/api/offer", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["detail"]
    assert not app.state.hub.sessions


async def test_an_offer_aiortc_cannot_use_is_a_400_and_frees_its_slot():
    sdp = (await audio_offer()).replace("a=ice-ufrag:", "a=x-removed:")
    app = app_with()
    async with client(app) as http:
        response = await http.post("/api/offer", json={"sdp": sdp, "type": "offer"})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("the SDP offer was rejected")
    assert not app.state.hub.sessions


async def test_video_only_offer_is_refused():
    async with client(app_with()) as http:
        response = await http.post("/api/offer", json={"sdp": await audio_offer("video"), "type": "offer"})
    assert response.status_code == 400 and "no audio track" in response.json()["detail"]


async def test_bearer_token_guards_everything_but_health_and_the_page():
    app = app_with("server.auth_token=s3cret")
    offer = {"sdp": "hello", "type": "offer"}
    async with client(app) as http:
        missing = await http.post("/api/offer", json=offer)
        wrong = await http.post("/api/offer", json=offer, headers={"Authorization": "Bearer nope"})
        patch = await http.patch("/api/offer", json={"pc_id": "x", "session_secret": "y", "candidates": []})
        info, metrics = await http.get("/api/info"), await http.get("/metrics")
        right = await http.post("/api/offer", json=offer, headers={"Authorization": "Bearer s3cret"})
        authorized = {"Authorization": "Bearer s3cret"}
        assert (await http.get("/api/info", headers=authorized)).json()["auth_required"] is True
        assert (await http.get("/metrics", headers=authorized)).status_code == 200
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["auth_required"] is True
        assert (await http.get("/")).status_code == 200 and (await http.get("/static/app.js")).status_code == 200
    for refused in (missing, wrong, patch, info, metrics):
        assert refused.status_code == 401
        assert refused.json()["detail"] == "missing or wrong bearer token"
        assert refused.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 400  # past the token check, stopped by the SDP check
    assert app.state.hub.metrics.sessions_refused.value("unauthorized") == 3


async def test_api_docs_are_off_by_default():
    async with client(app_with()) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(path)).status_code == 404
    async with client(app_with("server.docs=true")) as http:
        assert (await http.get("/openapi.json")).status_code == 200


async def test_full_server_answers_503_with_a_reason():
    app = app_with("server.max_sessions=2")
    hub = app.state.hub
    assert hub.reserve("webrtc", client="10.0.0.1") and hub.reserve("twilio", client=None)
    async with client(app) as http:
        response = await http.post("/api/offer", json={"sdp": await audio_offer(), "type": "offer"})
        health = (await http.get("/health")).json()
    assert response.status_code == 503
    assert response.json()["detail"] == "the server is busy: all 2 session slots are in use, try again later"
    assert health["sessions"] == 2
    assert hub.metrics.sessions_refused.value("capacity") == 1


async def test_trickled_candidates_need_a_known_connection_and_its_secret():
    candidate = {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", "sdp_mid": "0", "sdp_mline_index": 0}
    async with client(app_with()) as http:
        unknown = await http.patch(
            "/api/offer", json={"pc_id": "nobody", "session_secret": "guess", "candidates": [candidate]}
        )
        malformed = await http.patch(
            "/api/offer", json={"pc_id": "nobody", "session_secret": "guess", "candidates": [{"candidate": 5}]}
        )
    assert unknown.status_code == 404 and unknown.json()["detail"] == "no such connection, or the wrong session_secret"
    assert malformed.status_code == 400 and "candidates.0.sdp_mid: Field required" in malformed.json()["detail"]


async def test_metrics_endpoint_speaks_prometheus_text():
    app = app_with()
    metrics = app.state.hub.metrics
    metrics.response_latency.observe(0.35, "webrtc")
    metrics.tool_calls.inc("calculator")
    async with client(app) as http:
        response = await http.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    lines = response.text.splitlines()
    assert "# TYPE mimo_voice_sessions_active gauge" in lines
    assert 'mimo_voice_sessions_active{transport="webrtc"} 0' in lines
    assert "# TYPE mimo_voice_response_latency_seconds histogram" in lines
    assert 'mimo_voice_response_latency_seconds_bucket{transport="webrtc",le="0.3"} 0' in lines
    assert 'mimo_voice_response_latency_seconds_bucket{transport="webrtc",le="0.4"} 1' in lines
    assert 'mimo_voice_response_latency_seconds_bucket{transport="webrtc",le="+Inf"} 1' in lines
    assert 'mimo_voice_response_latency_seconds_count{transport="webrtc"} 1' in lines
    assert 'mimo_voice_tool_calls_total{tool="calculator"} 1' in lines
    names = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    assert names == {m.name for m in vars(ServerMetrics()).values() if hasattr(m, "name")}


def test_metric_families_render_exactly():
    counter = Counter("calls_total", "Calls.", ("who",))
    counter.inc('say "hi"\n')
    assert counter.render().splitlines() == [
        "# HELP calls_total Calls.",
        "# TYPE calls_total counter",
        'calls_total{who="say \\"hi\\"\\n"} 1',
    ]
    histogram = Histogram("wait_seconds", "Waits.", (0.5, 0.1))
    for value in (0.05, 0.2, 7.0):
        histogram.observe(value)
    assert histogram.render().splitlines()[2:] == [
        'wait_seconds_bucket{le="0.1"} 1',
        'wait_seconds_bucket{le="0.5"} 2',
        'wait_seconds_bucket{le="+Inf"} 3',
        "wait_seconds_sum 7.25",
        "wait_seconds_count 3",
    ]
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc()


def test_serve_reports_a_port_in_use_without_loading_anything(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(None, ["server.host=127.0.0.1", f"server.port={port}"])
        messages = []
        handler = server.logger.add(messages.append, level="ERROR", format="{message}")
        try:
            assert server.main(config, []) == 2
        finally:
            server.logger.remove(handler)
    assert messages and f"cannot listen on 127.0.0.1:{port}" in messages[0]


def test_serve_rejects_unknown_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        server.main(load_config(None), ["--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
