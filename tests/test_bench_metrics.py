"""The live benchmark's metrics on synthetic recordings whose truth is known to the sample."""

import math

import numpy as np
import pytest
from mimo_voice.transports.bench.metrics import (
    DetectorParams,
    Segment,
    UserEvent,
    analyse_call,
    audible_extent,
    frame_levels,
    merge_segments,
    pool,
    speech_segments,
)

RATE = 16_000
FRAME = 0.02
PARAMS = DetectorParams()


def track(duration, bursts, quiet=(), seed=0):
    """Digital silence with -20 dBFS noise bursts at [start, end) and -60 dBFS hiss in ``quiet`` spans."""
    rng = np.random.default_rng(seed)
    audio = np.zeros(int(duration * RATE), np.float32)
    for spans, level in ((bursts, -20.0), (quiet, -60.0)):
        for start, end in spans:
            a, b = round(start * RATE), round(end * RATE)
            audio[a:b] = rng.standard_normal(b - a) * 10 ** (level / 20)
    return audio


def user(kind, *parts, label=""):
    return UserEvent(kind, tuple(Segment(a, b) for a, b in parts), label)


def within_a_frame(measured, truth):
    return measured is not None and abs(measured - truth) <= FRAME + 1e-9


def test_levels_are_the_same_for_int16_and_float_and_silence_is_minus_infinity():
    audio = track(1.0, [(0.2, 0.6)])
    as_float = frame_levels(audio, RATE)
    as_int16 = frame_levels((audio * 32768).astype(np.int16), RATE)
    assert np.allclose(as_float[15:25], -20, atol=1.0)
    assert np.allclose(as_float[15:25], as_int16[15:25], atol=0.01)
    assert math.isinf(as_float[0]) and as_float[0] < 0


def test_segments_merge_gaps_up_to_the_merge_gap_only():
    assert merge_segments([Segment(0, 1), Segment(1.5, 2), Segment(2.6, 3)], 0.5) == [Segment(0, 2), Segment(2.6, 3)]
    found = speech_segments(track(4.0, [(0.5, 1.0), (1.3, 1.8), (2.9, 3.5)]), RATE)
    assert len(found) == 2
    assert within_a_frame(found[0].start, 0.5) and within_a_frame(found[0].end, 1.8)
    assert within_a_frame(found[1].start, 2.9) and within_a_frame(found[1].end, 3.5)


def test_audible_extent_spans_first_to_last_active_frame():
    extent = audible_extent(track(3.0, [(0.413, 1.0), (2.0, 2.271)]), RATE)
    assert within_a_frame(extent.start, 0.413) and within_a_frame(extent.end, 2.271)
    assert audible_extent(np.zeros(RATE, np.float32), RATE) is None


@pytest.mark.parametrize("seed", range(12))
def test_response_latency_is_within_one_frame_of_the_truth(seed):
    rng = np.random.default_rng(seed)
    speech_end = 1.0 + rng.uniform(0, 1)
    onset = speech_end + rng.uniform(0.05, 1.5)
    call = analyse_call(track(8.0, [(onset, onset + 2.0)], seed=seed), RATE, [user("turn", (0.5, speech_end))])
    [result] = call.events
    assert result.takeover and not result.agent_was_speaking
    assert within_a_frame(result.latency, onset - speech_end)


def test_short_output_is_a_backchannel_not_a_takeover_but_still_a_reply():
    [result] = analyse_call(track(6.0, [(2.0, 2.6)]), RATE, [user("turn", (0.5, 1.5))]).events
    assert not result.takeover and within_a_frame(result.latency, 0.5)


def test_reply_after_the_response_timeout_is_not_a_takeover():
    params = DetectorParams(response_timeout_secs=2.0)
    [result] = analyse_call(track(8.0, [(4.0, 6.0)]), RATE, [user("turn", (0.5, 1.5))], params).events
    assert not result.takeover and result.latency is None


def test_talking_over_the_user_gives_latency_zero():
    [result] = analyse_call(track(6.0, [(1.2, 3.5)]), RATE, [user("turn", (0.5, 1.5))]).events
    assert result.takeover and result.latency == 0.0


@pytest.mark.parametrize("seed", range(8))
def test_barge_in_stop_time_and_interruption_latency_are_within_one_frame(seed):
    rng = np.random.default_rng(100 + seed)
    barge_onset = 3.0 + rng.uniform(0, 0.5)
    barge_end = barge_onset + rng.uniform(0.6, 1.2)
    agent_stop = barge_onset + rng.uniform(0.15, 0.6)
    answer = barge_end + rng.uniform(0.55, 1.0)
    audio = track(10.0, [(1.5, agent_stop), (answer, answer + 1.5)], seed=seed)
    events = [user("turn", (0.3, 1.0)), user("barge_in", (barge_onset, barge_end))]
    turn, barge = analyse_call(audio, RATE, events).events
    assert turn.takeover and within_a_frame(turn.latency, 0.5)
    assert barge.agent_was_speaking
    assert within_a_frame(barge.stop_time, agent_stop - barge_onset)
    assert barge.takeover and within_a_frame(barge.latency, answer - barge_end)


def test_barge_in_while_the_agent_is_silent_has_no_stop_time():
    [barge] = analyse_call(track(6.0, [(3.0, 4.5)]), RATE, [user("barge_in", (1.0, 2.0))]).events
    assert not barge.agent_was_speaking and barge.stop_time is None
    assert barge.takeover


def test_pause_takeover_counts_agent_speech_that_starts_inside_the_pause():
    pause = user("pause", (1.0, 2.0), (3.5, 4.5))
    taken = analyse_call(track(10.0, [(2.6, 3.8), (5.3, 7.0)]), RATE, [pause]).events[0]
    assert taken.pause_takeover
    assert taken.takeover and within_a_frame(taken.latency, 0.8)  # the answer after the user resumed
    held = analyse_call(track(10.0, [(2.6, 3.0), (5.3, 7.0)]), RATE, [pause]).events[0]
    assert held.pause_takeover is False
    waited = analyse_call(track(10.0, [(5.3, 7.0)]), RATE, [pause]).events[0]
    assert waited.pause_takeover is False and within_a_frame(waited.latency, 0.8)


def test_backchannel_that_stops_the_agent_is_a_false_barge_in():
    events = [user("turn", (0.2, 0.8)), user("backchannel", (2.0, 2.4))]
    stopped = analyse_call(track(8.0, [(1.2, 2.9)]), RATE, events).events[1]
    assert stopped.agent_was_speaking and stopped.false_barge_in
    assert within_a_frame(stopped.stop_time, 0.9)
    kept_talking = analyse_call(track(8.0, [(1.2, 6.0)]), RATE, events).events[1]
    assert kept_talking.false_barge_in is False and not kept_talking.takeover


def test_noise_while_the_agent_is_silent_can_only_cause_a_spurious_response():
    events = [user("noise", (1.0, 1.3))]
    answered = analyse_call(track(6.0, [(2.0, 3.5)]), RATE, events).events[0]
    assert answered.false_barge_in is None and answered.takeover
    ignored = analyse_call(track(6.0, []), RATE, events).events[0]
    assert not ignored.takeover


def test_underruns_are_digital_silence_inside_a_reply_not_quiet_speech():
    bursts = [(1.0, 2.0), (2.1, 3.0), (3.04, 4.0)]
    call = analyse_call(track(6.0, bursts, quiet=[(2.5, 2.7)]), RATE, [user("turn", (0.2, 0.8))])
    [reply] = call.replies
    assert within_a_frame(reply.span.start, 1.0) and within_a_frame(reply.span.end, 4.0)
    assert len(reply.underruns) == 2
    assert within_a_frame(reply.underruns[0].start, 2.0) and within_a_frame(reply.underruns[0].duration, 0.1)


def test_a_long_stall_inside_a_reply_is_one_underrun_unless_the_user_spoke():
    audio = track(8.0, [(1.0, 2.0), (3.0, 4.0)])
    [reply] = analyse_call(audio, RATE, [user("turn", (0.2, 0.8))]).replies
    [stall] = reply.underruns
    assert within_a_frame(stall.start, 2.0) and within_a_frame(stall.duration, 1.0)
    prompted = analyse_call(audio, RATE, [user("turn", (0.2, 0.8)), user("turn", (2.2, 2.6))])
    assert [r.underruns for r in prompted.replies] == [[], []]


def test_pool_counts_each_category_over_calls():
    events = [user("turn", (0.2, 0.8)), user("backchannel", (2.0, 2.3)), user("barge_in", (3.0, 3.8))]
    calls = [
        analyse_call(track(10.0, [(1.3, 3.6), (4.5, 6.0)]), RATE, events),  # keeps talking through the mm-hm
        analyse_call(track(10.0, [(1.3, 2.6), (4.5, 6.0)]), RATE, events),  # stops at the mm-hm
    ]
    totals = pool(calls)
    assert totals.counts["takeover_turn"] == [2, 2]
    assert totals.counts["false_barge_in_backchannel"] == [1, 2]
    assert totals.counts["barge_in_agent_speaking"] == [1, 2]
    assert totals.counts["takeover_interruption"] == [2, 2]
    assert len(totals.latency["turn"]) == 2 and len(totals.stop_time) == 1
    assert within_a_frame(totals.stop_time[0], 0.6)
    assert totals.replies == 4 and totals.underruns == 0


def test_invalid_detector_settings_are_refused():
    with pytest.raises(ValueError, match="silence_dbfs"):
        DetectorParams(speech_dbfs=-70, silence_dbfs=-60)
    with pytest.raises(ValueError, match="no audible part"):
        UserEvent("turn", ())


def test_user_speech_overlapping_a_reply_starts_a_new_one():
    # The agent starts just after the user barges in, is cut off, and answers much later: two replies, no underrun.
    audio = track(10.0, [(1.1, 1.4), (5.0, 6.0)])
    call = analyse_call(audio, RATE, [user("barge_in", (1.0, 3.0))])
    assert len(call.replies) == 2 and all(not r.underruns for r in call.replies)


def test_turn_stages_split_the_latency_at_the_servers_rtvi_events_and_add_up():
    from mimo_voice.transports.bench.metrics import SERVER_AUDIO_START, SERVER_TURN_END

    # A pause: the server ends the turn in the pause and starts to answer (interrupted), then again after it.
    server_events = [
        (2.7, SERVER_TURN_END),
        (3.3, SERVER_AUDIO_START),
        (5.05, SERVER_TURN_END),
        (5.9, SERVER_AUDIO_START),
        (7.0, SERVER_TURN_END),
    ]
    pause = user("pause", (1.0, 2.0), (3.4, 4.5))
    call = analyse_call(track(10.0, [(5.97, 8.0)]), RATE, [pause], PARAMS, server_events)
    [(vad, server, transport)] = call.stages
    assert vad == pytest.approx(0.55) and server == pytest.approx(0.85)
    assert within_a_frame(transport, 0.07)
    assert within_a_frame(vad + server + transport, call.events[0].latency)
    # None when the server ended the turn in the pause only, without a reply, or when the server's audio is far
    # from what the caller heard.
    in_pause_only = [(2.7, SERVER_TURN_END), (5.9, SERVER_AUDIO_START)]
    assert analyse_call(track(10.0, [(5.97, 8.0)]), RATE, [pause], PARAMS, in_pause_only).stages == []
    assert analyse_call(track(10.0, []), RATE, [pause], PARAMS, server_events).stages == []
    late = [(5.05, SERVER_TURN_END), (7.5, SERVER_AUDIO_START)]
    assert analyse_call(track(10.0, [(5.97, 8.0)]), RATE, [pause], PARAMS, late).stages == []
