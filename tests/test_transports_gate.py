"""The admission gate over HTTP: /health states, 503 with Retry-After for offers and phone streams, metrics."""

from __future__ import annotations

import pytest
import websockets
from test_transports_server import app_with, audio_offer, client
from transports_support import serving


@pytest.mark.parametrize(
    ("state", "status", "detail"),
    [
        ("draining", "draining", "shutting down"),
        ("engine_down", "engine_down", "the engine process exited (status -9)"),
        ("loading", "loading", "the model is loading"),
    ],
)
async def test_a_closed_gate_answers_503_everywhere(state, status, detail):
    app = app_with()
    gate = app.state.gate
    if state == "draining":
        gate.draining = True
    else:
        gate.set_engine(state, detail)
    async with client(app) as http:
        health = await http.get("/health")
        assert health.status_code == 503
        assert health.json() == {
            "status": status,
            "detail": health.json()["detail"],
            "sessions": 0,
            "max_sessions": 4,
            "tiny": True,
            "auth_required": False,
        }
        assert detail in health.json()["detail"]
        offer = await http.post("/api/offer", json={"sdp": await audio_offer(), "type": "offer"})
        assert offer.status_code == 503 and int(offer.headers["retry-after"]) > 0
        assert detail in offer.json()["detail"]
        metrics = (await http.get("/metrics")).text
    assert f'mimo_voice_sessions_refused_total{{reason="{status}"}} 1' in metrics


async def test_a_closed_gate_refuses_phone_streams_with_503():
    app = app_with()
    app.state.gate.draining = True
    async with serving(app) as base_url:
        with pytest.raises(websockets.InvalidStatus) as denied:
            async with websockets.connect(base_url.replace("http://", "ws://") + "/ws/twilio"):
                pass
    assert denied.value.response.status_code == 503
    assert int(denied.value.response.headers["retry-after"]) == 30


async def test_an_open_gate_reports_ok_and_the_memory_of_the_server():
    async with client(app_with()) as http:
        health = await http.get("/health")
        metrics = (await http.get("/metrics")).text
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert 'mimo_voice_resident_memory_bytes{process="server"}' in metrics
    assert "mimo_voice_engine_up 1" in metrics
