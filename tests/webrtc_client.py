"""A scripted WebRTC caller: aiortc peer + the server's real HTTP signalling.

It sends a recorded turn (then silence) as its microphone, in real time, counts the agent's audible
audio and hands the server's RTVI messages to a callback. Run as a script it is a caller that can be killed mid-answer
(no goodbye, like a crashed browser): ``python tests/webrtc_client.py BASE_URL WAV`` prints
``connected``, then ``rtvi <type>`` for each message from the server.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from aiortc import AudioStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

FRAME_SECS = 0.02
# Opus at 48 kHz; anything above this (int16 RMS) is sound, not codec noise or silence.
AUDIBLE_RMS = 100.0


class RecordedMicrophone(AudioStreamTrack):
    """Plays int16 mono PCM in real-time 20 ms frames, then silence."""

    def __init__(self, pcm: np.ndarray | None = None, sample_rate: int = 16000) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self._samples = int(sample_rate * FRAME_SECS)
        self._queue = np.zeros(0, np.int16) if pcm is None else pcm.astype(np.int16)
        self._sent = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self._sent / self.sample_rate - time.monotonic()))
        chunk, self._queue = self._queue[: self._samples], self._queue[self._samples :]
        chunk = np.pad(chunk, (0, self._samples - len(chunk)))
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, self.sample_rate)
        self._sent += self._samples
        return frame


class Caller:
    """One WebRTC call to the server: ``await call.connect()``, speak, listen, ``await call.close()``."""

    def __init__(
        self,
        base_url: str,
        microphone: RecordedMicrophone,
        on_rtvi: Callable[[dict], None] | None = None,
    ) -> None:
        self.base_url, self.microphone = base_url, microphone
        self.pc = RTCPeerConnection()
        self.pc_id: str | None = None
        self.session_secret: str | None = None
        self.audible_frames = 0
        self.channel = self.pc.createDataChannel("chat")
        self._readers: list[asyncio.Task] = []

        @self.pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio":
                self._readers.append(asyncio.ensure_future(self._listen(track)))

        @self.channel.on("message")
        def on_message(message) -> None:
            try:
                message = json.loads(message)
            except (TypeError, ValueError):
                return
            if on_rtvi is not None and message.get("label") == "rtvi-ai":
                on_rtvi(message)

    async def offer(self) -> httpx.Response:
        """Send the offer; the response is the server's answer (or its refusal)."""
        self.pc.addTransceiver(self.microphone, direction="sendrecv")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return await self._post({"sdp": self.pc.localDescription.sdp, "type": "offer"})

    async def _post(self, body: dict) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as http:
            return await http.post("/api/offer", json=body)

    async def connect(self) -> None:
        response = await self.offer()
        response.raise_for_status()
        await self._accept(response.json())

    async def renegotiate(self, *, restart: bool = False, secret: str | None = None) -> httpx.Response:
        """A new offer on the live connection (its ``pc_id`` tells the server which one; the answer's
        ``session_secret`` proves it is ours, unless another ``secret`` is given)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {
            "sdp": self.pc.localDescription.sdp,
            "type": "offer",
            "pc_id": self.pc_id,
            "restart_pc": restart,
            "session_secret": self.session_secret if secret is None else secret,
        }
        response = await self._post(body)
        if response.status_code == 200:
            await self._accept(response.json())
        return response

    async def _accept(self, answer: dict) -> None:
        self.pc_id, self.session_secret = answer["pc_id"], answer["session_secret"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    async def _listen(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray().reshape(-1)[:: len(frame.layout.channels)].astype(np.int16)
                if np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > AUDIBLE_RMS:
                    self.audible_frames += 1
        except MediaStreamError:
            pass

    @property
    def audible_secs(self) -> float:
        return self.audible_frames * FRAME_SECS

    async def close(self) -> None:
        await self.pc.close()
        for reader in self._readers:
            reader.cancel()


async def _run_script(base_url: str, wav: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures.speech import read_wav

    pcm, rate = read_wav(wav)
    call = Caller(base_url, RecordedMicrophone(pcm, rate), lambda message: print("rtvi", message["type"], flush=True))
    await call.connect()
    print("connected", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(_run_script(sys.argv[1], sys.argv[2]))
