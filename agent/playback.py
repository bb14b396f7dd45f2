"""How much of each response the user has actually heard.

Barge-in rolls the session back to the last audio the user heard, so the agent needs the played position, not the
generated one (generation runs ahead of playback by seconds). The output transport is the only place that knows it:
it pushes each audio chunk downstream only *after* writing it to the peer, and it passes ``TTSStartedFrame`` through
the same queue as the audio, in order. Watching what the output pushes therefore gives the written samples of each
response (by the ``context_id`` of its ``TTSStartedFrame``; the transport re-chunks audio and drops the id).

Written is not always played: SmallWebRTC writes in real time (about 40 ms ahead of the ear), but websocket outputs
write at twice real time and the phone buffers the rest. So the count is capped by the wall clock since the first
chunk of the response was written.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from mimo_voice.streaming.engine.events import SAMPLE_RATE
from pipecat.frames.frames import Frame, OutputAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.processors.frame_processor import FrameProcessor

_KEPT_RESPONSES = 8


@dataclass
class _Written:
    samples: int = 0
    first_write: float | None = None  # time.monotonic() of the first chunk
    stopped: bool = False  # its TTSStoppedFrame came out: all its audio was written


class PlaybackTracker:
    """Counts the 24 kHz samples of each response (``TTSStartedFrame.context_id``) an output transport has played."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._responses: OrderedDict[str, _Written] = OrderedDict()
        self._current: _Written | None = None
        self.attached = False

    def attach(self, output: FrameProcessor) -> None:
        """Watch the frames ``output`` (a pipecat output transport) pushes after writing them."""
        output.add_event_handler("on_after_push_frame", self._on_output_pushed)
        self.attached = True

    def played_out(self, context_id: str) -> bool:
        """Whether the whole response has been written, and had the time to play."""
        written = self._responses.get(context_id)
        return written is not None and written.stopped and self.played_samples(context_id) >= written.samples

    def played_samples(self, context_id: str) -> int:
        written = self._responses.get(context_id)
        if written is None or written.first_write is None:
            return 0
        elapsed = int((self._clock() - written.first_write) * SAMPLE_RATE)
        return min(written.samples, elapsed)

    async def _on_output_pushed(self, output: FrameProcessor, frame: Frame) -> None:
        if isinstance(frame, TTSStartedFrame) and frame.context_id:
            self._current = self._responses.setdefault(frame.context_id, _Written())
            while len(self._responses) > _KEPT_RESPONSES:
                self._responses.popitem(last=False)
        elif isinstance(frame, TTSStoppedFrame):
            if self._current is not None:
                self._current.stopped = True
            self._current = None
        elif isinstance(frame, OutputAudioRawFrame) and self._current is not None:
            if self._current.first_write is None:
                # The transport pushes a chunk once written, i.e. when it starts playing plus its own duration.
                self._current.first_write = self._clock() - _duration(frame)
            self._current.samples += int(frame.num_frames * SAMPLE_RATE / frame.sample_rate)


def _duration(frame: OutputAudioRawFrame) -> float:
    return frame.num_frames / frame.sample_rate
