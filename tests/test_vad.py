"""VAD analyzers on espeak-ng tracks whose speech onsets and ends are known to the sample."""

import numpy as np
import pytest
from fixtures.speech import Track, track
from mimo_voice.agent.vad import WebrtcvadAnalyzer, create_turn_analyzer, create_vad_analyzer
from mimo_voice.configs.schema import VADSection
from pipecat.audio.vad.vad_analyzer import VADParams, VADState

# Multiples of 10, 20 and 30 ms, so that each frame size can express them exactly.
START_SECS, STOP_SECS = 0.24, 0.6


async def transitions(analyzer, clip: Track, chunk_ms: int) -> list[tuple[str, float]]:
    """(state, time) each time the analyzer settles on SPEAKING or QUIET, fed ``chunk_ms`` at a time."""
    analyzer.set_sample_rate(clip.sample_rate)
    chunk = clip.sample_rate * chunk_ms // 1000
    events, settled = [], VADState.QUIET
    for start in range(0, len(clip.pcm) - chunk + 1, chunk):
        state = await analyzer.analyze_audio(clip.pcm[start : start + chunk].tobytes())
        if state in (VADState.SPEAKING, VADState.QUIET) and state != settled:
            events.append((state.name, (start + chunk) / clip.sample_rate))
            settled = state
    await analyzer.cleanup()
    return events


def expected(clip: Track) -> list[tuple[str, float]]:
    """Truth: SPEAKING start_secs after each onset, QUIET stop_secs after each end."""
    return [e for on, off in clip.speech for e in (("SPEAKING", on + START_SECS), ("QUIET", off + STOP_SECS))]


def params() -> VADParams:
    return VADParams(confidence=0.7, start_secs=START_SECS, stop_secs=STOP_SECS, min_volume=0.0)


# Phrases that end on a voiced sound: a final plosive's closure makes the "end" ambiguous.
PHRASES = [
    ("Hello, how are you?", "Please book a table for two."),
    ("Good morning, my name is Anna.", "I would like to order a pizza."),
]


@pytest.fixture(scope="module", params=range(len(PHRASES)), ids=["hello", "morning"])
def two_phrases(request) -> Track:
    first, second = PHRASES[request.param]
    # A faint noise floor (about -60 dBFS), as a real microphone has.
    return track(1.5, first, 1.2, second, 1.0, noise=30.0)


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
async def test_webrtcvad_finds_speech_and_silence_within_one_frame(two_phrases, frame_ms, aggressiveness):
    analyzer = WebrtcvadAnalyzer(aggressiveness=aggressiveness, frame_ms=frame_ms, params=params())
    events = await transitions(analyzer, two_phrases, chunk_ms=frame_ms)
    truth = expected(two_phrases)
    assert [name for name, _ in events] == [name for name, _ in truth]
    for (_, got), (_, want) in zip(events, truth):
        assert abs(got - want) <= frame_ms / 1000 + 1e-9, (events, truth)


async def test_webrtcvad_at_phone_rate():
    clip = track(0.8, "Please book a table for two.", 0.9, sample_rate=8000, noise=30.0)
    analyzer = WebrtcvadAnalyzer(aggressiveness=3, frame_ms=20, params=params())
    events = await transitions(analyzer, clip, chunk_ms=20)
    assert [name for name, _ in events] == ["SPEAKING", "QUIET"]
    assert abs(events[0][1] - expected(clip)[0][1]) <= 0.02
    assert abs(events[1][1] - expected(clip)[1][1]) <= 0.02


async def test_short_blip_never_becomes_speech():
    # The first 150 ms of a word, as loud as speech but shorter than start_secs.
    blip = track("Hello").pcm[: 16000 * 150 // 1000]
    clip = Track(np.concatenate([np.zeros(8000, np.int16), blip, np.zeros(12800, np.int16)]), 16000, [])
    analyzer = WebrtcvadAnalyzer(aggressiveness=2, frame_ms=20, params=params())
    assert await transitions(analyzer, clip, chunk_ms=20) == []


async def test_silence_and_steady_noise_are_not_speech():
    rng = np.random.default_rng(1)
    noise = np.clip(rng.normal(0, 200, 16000 * 3), -32768, 32767).astype(np.int16)
    analyzer = WebrtcvadAnalyzer(aggressiveness=3, frame_ms=30, params=params())
    # webrtcvad adapts its noise model within ~100 ms, less than start_secs.
    assert await transitions(analyzer, Track(noise, 16000, []), chunk_ms=30) == []


def test_factory_follows_the_config():
    analyzer = create_vad_analyzer(VADSection(aggressiveness=1, frame_ms=30, start_secs=0.1, stop_secs=0.3))
    assert isinstance(analyzer, WebrtcvadAnalyzer)
    assert analyzer.frame_ms == 30
    analyzer.set_sample_rate(16000)
    assert analyzer.num_frames_required() == 480
    assert (analyzer.params.start_secs, analyzer.params.stop_secs) == (0.1, 0.3)


async def test_silero_option_detects_the_phrase():
    clip = track(1.0, "Hello, what time is it?", 1.0)
    analyzer = create_vad_analyzer(VADSection(analyzer="silero", start_secs=START_SECS, stop_secs=STOP_SECS))
    assert type(analyzer).__name__ == "SileroVADAnalyzer"
    events = await transitions(analyzer, clip, chunk_ms=32)
    assert [name for name, _ in events] == ["SPEAKING", "QUIET"]
    # Silero works on 32 ms windows and its probability ramps, so allow a few windows.
    assert abs(events[0][1] - expected(clip)[0][1]) <= 0.1
    assert abs(events[1][1] - expected(clip)[1][1]) <= 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aggressiveness": 4}, "aggressiveness"),
        ({"frame_ms": 25}, "10, 20 or 30 ms"),
        ({"sample_rate": 22050}, "8000, 16000, 32000, 48000 Hz"),
    ],
)
def test_webrtcvad_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WebrtcvadAnalyzer(**kwargs)


def test_unsupported_rates_are_refused_clearly():
    with pytest.raises(ValueError, match="Silero VAD runs at 8000, 16000 Hz, not 24000 Hz"):
        create_vad_analyzer(VADSection(analyzer="silero"), sample_rate=24000)
    analyzer = WebrtcvadAnalyzer()
    with pytest.raises(ValueError, match="not 44100 Hz"):
        analyzer.set_sample_rate(44100)


def test_smart_turn_only_when_asked_for():
    assert create_turn_analyzer(VADSection()) is None
    assert type(create_turn_analyzer(VADSection(smart_turn=True))).__name__ == "LocalSmartTurnAnalyzerV3"
