"""The engine's typed boundary: messages cross a PipeChannel intact, and what cannot cross fails at the sender."""

from __future__ import annotations

import pickle
import threading
from multiprocessing.connection import Pipe

import numpy as np
import pytest
import torch
from mimo_voice.streaming.engine import protocol
from mimo_voice.streaming.engine.events import AudioPatch, Turn, TurnEnd
from mimo_voice.streaming.engine.protocol import (
    AddText,
    Call,
    Cancel,
    EventMessage,
    FeedAudio,
    FeedCodes,
    Heartbeat,
    History,
    PipeChannel,
    Request,
    Result,
    Stop,
)


@pytest.fixture
def channels():
    left, right = Pipe()
    yield PipeChannel(left), PipeChannel(right)
    left.close()
    right.close()


def test_every_request_kind_is_a_keyword_only_dataclass_of_one_session():
    kinds = [value for value in vars(protocol).values() if isinstance(value, type) and issubclass(value, Request)]
    assert len(kinds) >= 11  # Open ... Close, plus the two testing requests
    for kind in kinds:
        with pytest.raises(TypeError):
            kind(1)  # positional arguments are refused: a request names its fields
    assert Cancel(session_id=3) == Cancel(session_id=3, played_samples=None)


def test_messages_cross_the_channel_whole(channels):
    sender, receiver = channels
    pcm = np.linspace(-1, 1, 320, dtype=np.float32)
    codes = torch.arange(16).reshape(2, 8)
    messages = [
        Call(7, AddText(session_id=1, role="tool", text='{"ok": true}')),
        FeedAudio(session_id=1, pcm=pcm, sample_rate=16_000),
        FeedCodes(session_id=2, codes=codes),
        Result(7, value=None, error=ValueError("bad role")),
        EventMessage(1, 2, AudioPatch(np.zeros((4, 8), np.int64), index=0)),
        History(1, [Turn("user", "", audio_seconds=1.5)]),
        Heartbeat(steps=12, active=1),
        Stop(),
    ]
    threading.Thread(target=lambda: [sender.send(message) for message in messages]).start()
    received = [receiver.recv() for _ in messages]
    assert [type(message) for message in received] == [type(message) for message in messages]
    assert received[0] == messages[0] and received[5] == messages[5] and received[6] == messages[6]
    assert np.array_equal(received[1].pcm, pcm) and torch.equal(received[2].codes, codes)
    assert isinstance(received[3].error, ValueError) and str(received[3].error) == "bad role"
    assert received[4].response_id == 2 and received[4].event.codes.shape == (4, 8)


def test_a_message_that_cannot_be_carried_fails_when_encoded(channels):
    sender, _ = channels
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        sender.encode(EventMessage(1, None, TurnEnd("error", error=lambda: None)))
