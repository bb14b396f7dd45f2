"""Graceful drain of a real ``mimo-voice serve`` process: SIGTERM and Ctrl-C with a WebRTC call in progress."""

from __future__ import annotations

import signal

import httpx
import pytest
import websockets
from server_process import ServerProcess, server_process
from transports_support import wait_until
from webrtc_client import Caller, RecordedMicrophone

pytestmark = pytest.mark.slow


async def _call(server: ServerProcess, messages: list[dict]) -> Caller:
    await server.wait_health("ok", 180)  # the engine loads in the background
    call = Caller(server.base_url, RecordedMicrophone(), lambda message: messages.append(message.get("data") or {}))
    await call.connect()
    assert await wait_until(lambda: call.pc.connectionState == "connected", 20)
    assert (await server.health()).json()["sessions"] == 1
    return call


async def _assert_refuses_new_calls(server: ServerProcess) -> None:
    health = await server.health()
    assert health.status_code == 503
    assert health.json()["status"] == "draining"
    assert health.json()["sessions"] == 1  # the call in progress goes on
    refused = await Caller(server.base_url, RecordedMicrophone()).offer()
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) > 0
    phone_url = server.base_url.replace("http://", "ws://") + "/ws/twilio"
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with websockets.connect(phone_url):
            pass
    assert denied.value.response.status_code == 503
    assert int(denied.value.response.headers["retry-after"]) > 0


async def test_sigterm_lets_the_call_finish_then_exits_0():
    async with server_process("server.drain_timeout_secs=60") as server:
        call = await _call(server, [])
        server.signal(signal.SIGTERM)
        await server.wait_health("draining", 5)
        await _assert_refuses_new_calls(server)
        assert server.process.returncode is None  # still serving the call
        await call.close()  # the caller hangs up: nothing left to wait for
        assert await server.exit_code(15) == 0


async def test_the_drain_timeout_ends_calls_with_a_reason_then_exits_0():
    messages: list[dict] = []
    async with server_process("server.drain_timeout_secs=2") as server:
        call = await _call(server, messages)
        server.signal(signal.SIGTERM)
        await server.wait_health("draining", 5)
        assert await server.exit_code(15) == 0
        ended = [message for message in messages if message.get("type") == "call-ended"]
        assert ended and "shutting down" in ended[0]["reason"]
        assert await wait_until(lambda: call.pc.connectionState in ("closed", "failed", "disconnected"), 10)
        await call.close()


async def test_a_second_ctrl_c_exits_at_once():
    async with server_process("server.drain_timeout_secs=120") as server:
        call = await _call(server, [])
        server.signal(signal.SIGINT)
        await server.wait_health("draining", 5)
        server.signal(signal.SIGINT)
        assert await server.exit_code(10) == 130
        await call.close()
        with pytest.raises(httpx.ConnectError):
            await server.health()


async def test_ctrl_c_once_drains_like_sigterm():
    async with server_process("server.drain_timeout_secs=60") as server:
        call = await _call(server, [])
        server.signal(signal.SIGINT)
        await server.wait_health("draining", 5)
        assert (await server.health()).json()["sessions"] == 1
        await call.close()
        assert await server.exit_code(15) == 0
