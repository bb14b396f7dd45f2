"""Engine supervision under a real ``mimo-voice serve`` process: a killed or hung engine worker."""

from __future__ import annotations

import os
import signal
import time

import pytest
from fixtures.speech import track
from server_process import ServerProcess, engine_worker_pid, server_process
from transports_support import wait_until
from webrtc_client import Caller, RecordedMicrophone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _ended(messages: list[dict]) -> list[dict]:
    return [message for message in messages if message.get("type") == "call-ended"]


async def _call(server: ServerProcess, messages: list[dict], pcm=None) -> Caller:
    call = Caller(server.base_url, RecordedMicrophone(pcm), lambda message: messages.append(message.get("data") or {}))
    await call.connect()
    assert await wait_until(lambda: call.pc.connectionState == "connected", 20)
    return call


async def test_a_killed_engine_is_seen_calls_end_and_it_comes_back():
    async with server_process("engine.restart_backoff_secs=1") as server:
        await server.wait_health("ok", 180)
        messages: list[dict] = []
        call = await _call(server, messages)
        try:
            killed = time.monotonic()
            os.kill(engine_worker_pid(server.process.pid), signal.SIGKILL)  # as the OOM killer would
            health = await server.wait_health("engine_down", 2)
            assert health.status_code == 503 and "exited" in health.json()["detail"]
            refused = await Caller(server.base_url, RecordedMicrophone()).offer()
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
            assert await wait_until(lambda: bool(_ended(messages)), 5 - (time.monotonic() - killed))
            assert _ended(messages)[0]["reason"] == "the model restarted; call again"
            assert await wait_until(lambda: call.pc.connectionState != "connected", 5)
        finally:
            await call.close()
        await server.wait_health("ok", 180)  # a busy CI box reloads slowly
        turn = track(0.5, "Hello, how are you today?", 1.0, sample_rate=16000).pcm
        again = await _call(server, [], turn)
        try:
            assert await wait_until(lambda: again.audible_secs > 0, 60), "the restarted engine did not answer"
        finally:
            await again.close()
        metrics = (await server.metrics()).splitlines()
        assert "mimo_voice_engine_restarts_total 1" in metrics
        assert "mimo_voice_engine_up 1" in metrics


async def test_a_hung_step_loop_is_killed_and_restarted():
    async with server_process("engine.watchdog_secs=2", "engine.restart_backoff_secs=0.5") as server:
        await server.wait_health("ok", 180)
        worker = engine_worker_pid(server.process.pid)
        os.kill(worker, signal.SIGSTOP)  # hung: alive, but its loop makes no progress
        call = await _call(server, [])  # the call opens a session: work the worker now owes
        try:
            health = await server.wait_health("engine_down", 10)
            assert health.status_code == 503 and "stalled" in health.json()["detail"]
        finally:
            await call.close()
        await server.wait_health("ok", 180)  # a busy CI box reloads slowly
        assert engine_worker_pid(server.process.pid) != worker
