"""A real browser: headless Chromium opens the page, talks through a fake microphone fed from a WAV file,
and must hear the agent; the page is driven and read through the DevTools protocol."""

import asyncio
import itertools
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import websockets
from fixtures.speech import require_tool, track, write_wav
from transports_support import agent_app, metric, serving, tiny_engine, wait_until  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]  # the first engine load may build the tiny model

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",  # both peers on 127.0.0.1: no other network is used
    "--autoplay-policy=no-user-gesture-required",
    "--remote-debugging-port=0",
]


class DevTools:
    """Just enough of the Chrome DevTools protocol: evaluate JavaScript in the page."""

    def __init__(self, websocket) -> None:
        self.websocket = websocket
        self._ids = itertools.count(1)

    @classmethod
    async def attach(cls, profile: Path, page_url: str, timeout: float = 30) -> "DevTools":
        port_file = profile / "DevToolsActivePort"
        assert await wait_until(port_file.exists, timeout), "chromium did not open its DevTools port"
        port = port_file.read_text().split()[0]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            deadline = time.monotonic() + timeout
            while True:
                targets = (await http.get("/json/list")).json()
                pages = [t for t in targets if t["type"] == "page" and t["url"].startswith(page_url)]
                if pages or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert pages, "the page did not open"
        devtools = cls(await websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=None))
        while not await devtools.evaluate("document.readyState === 'complete' && 'mimo' in window"):
            assert time.monotonic() < deadline, "the page's script did not load"
            await asyncio.sleep(0.1)
        return devtools

    async def wait_for_stats(self, condition: Callable[[dict], bool], timeout: float = 60) -> dict:
        """The page's ``mimo.stats()`` once ``condition`` holds for them."""
        async with asyncio.timeout(timeout):
            while not condition(stats := await self.evaluate("mimo.stats()")):
                await asyncio.sleep(0.25)
        return stats

    async def evaluate(self, expression: str):
        command_id = next(self._ids)
        params = {"expression": expression, "awaitPromise": True, "returnByValue": True, "userGesture": True}
        await self.websocket.send(json.dumps({"id": command_id, "method": "Runtime.evaluate", "params": params}))
        while True:
            reply = json.loads(await self.websocket.recv())
            if reply.get("id") == command_id:
                result = reply["result"]
                assert "exceptionDetails" not in result, result["exceptionDetails"]
                return result["result"].get("value")


@pytest.fixture
def chromium() -> str:
    return require_tool("chromium")


@pytest.fixture
def fake_microphone(tmp_path) -> Path:
    # Silence first: the file starts playing when the page opens the microphone, before the call is up.
    turn = track(2.5, "Hello, how are you today?", 4.0, sample_rate=48000)
    return write_wav(tmp_path / "microphone.wav", turn.pcm, turn.sample_rate)


async def test_the_page_talks_to_the_agent_in_headless_chromium(chromium, fake_microphone, tiny_engine, tmp_path):
    app = agent_app(tiny_engine)
    profile = tmp_path / "profile"
    async with serving(app) as base_url:
        browser = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--use-file-for-fake-audio-capture={fake_microphone}%noloop",
                base_url + "/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            page = await DevTools.attach(profile, base_url)
            info = await page.evaluate("mimo.ready")
            assert info["tiny"] is True
            assert await page.evaluate("document.getElementById('notice').textContent") == info["notice"]
            await page.evaluate("mimo.connect()")
            stats = await page.evaluate("mimo.stats()")
            assert stats["errors"] == [] and stats["status"] != "idle", stats

            # The server sends digital silence between answers: any energy is the agent's voice.
            stats = await page.wait_for_stats(lambda s: s["botTurns"] >= 1 and s["inbound"]["totalAudioEnergy"] > 0)
            assert stats["connected"] and stats["botReady"] and stats["userTurns"] >= 1, stats
            assert await metric(base_url, 'mimo_voice_user_turns_total{transport="webrtc"}') >= 1
            assert stats["latencies"] and all(ms > 0 for ms in stats["latencies"]), stats

            # The mode switch goes to the agent over the data channel, and the agent confirms it.
            await page.evaluate("document.querySelector('input[name=mode][value=thinking]').click()")
            stats = await page.wait_for_stats(lambda s: {"kind": "system", "text": "mode: thinking"} in s["transcript"])
            assert stats["mode"] == "thinking" and stats["errors"] == [], stats
            await page.evaluate("mimo.disconnect()")
            await page.websocket.close()
            assert await wait_until(lambda: not app.state.hub.sessions, timeout=15), "the page's session was not freed"
        finally:
            os.killpg(browser.pid, 15)
            browser.wait(10)
