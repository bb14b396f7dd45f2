"""The worker's heartbeats (streaming/engine/worker.py): progress while it generates, and once when it becomes
idle, also after a reply short enough to start and end between two beats."""

from types import SimpleNamespace

from mimo_voice.streaming.engine.worker import Worker


def test_a_reply_that_starts_and_ends_between_two_beats_is_still_reported():
    sent = []
    worker = SimpleNamespace(
        active=[], steps=0, _last_beat=0.0, _worked_since_beat=False, connection=SimpleNamespace(send=sent.append)
    )

    def step(active: bool) -> None:
        worker.active = ["reply"] if active else []
        worker.steps += active
        Worker._heartbeat(worker)  # type: ignore[arg-type]

    step(active=False)  # idle from the start: nothing to report
    step(active=True)  # the first busy step after a long quiet: reported at once
    step(active=True)  # within HEARTBEAT_SECS of that beat: not reported
    step(active=False)  # idle again: the steps so far
    step(active=True)  # a short reply right after that beat: its steps fall between two beats...
    step(active=True)
    step(active=False)  # ...and are reported when it ends
    step(active=False)  # still idle: nothing new
    assert [(beat.steps, beat.active) for beat in sent] == [(1, 1), (2, 0), (4, 0)]
