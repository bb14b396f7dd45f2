"""``mimo-voice bench live``: scenarios, fixtures, the aiortc caller, server metrics and the CI smoke run."""

import asyncio
import json
import shutil
import textwrap

import numpy as np
import pytest
from fastapi import FastAPI
from mimo_voice.transports.bench.caller import Caller
from mimo_voice.transports.bench.live import serve_in_thread
from mimo_voice.transports.bench.metrics import Segment, speech_segments
from mimo_voice.transports.bench.scenario import (
    FixtureFactory,
    ScenarioError,
    load_scenario,
    packaged_scenarios,
)
from mimo_voice.transports.bench.server_stats import parse_prometheus, server_figures

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def write_scenario(tmp_path, body, name="s.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# --- scenarios and fixtures ---


def test_packaged_scenarios_load_and_include_the_ci_smoke():
    names = packaged_scenarios()
    assert "smoke" in names
    for name in names:
        scenario = load_scenario(name)
        assert scenario.script, name
    smoke = load_scenario("smoke")
    assert {step.kind for step in smoke.steps} == {"turn", "pause", "backchannel", "noise", "barge_in"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: x\nsteps: []\n", "steps"),
        ("name: x\nsteps: [{kind: turn}]\n", "exactly one of say, wav, noise_secs"),
        ("name: x\nsteps: [{kind: turn, say: hi, noise_secs: 1}]\n", "exactly one of"),
        ("name: x\nsteps: [{kind: pause, say: hi}]\n", "at least two parts"),
        ("name: x\nsteps: [{kind: turn, say: [a, b]}]\n", "only a pause"),
        ("name: x\nsteps: [{kind: shout, say: hi}]\n", "steps.0.kind"),
        ("name: x\nsteps: [{kind: turn, say: hi, after: never}]\n", "steps.0.after"),
        ("name: x\nspeed: 3\nsteps: [{kind: turn, say: hi}]\n", "speed"),
        ("name: x\ndetector: {speech_dbfs: -80}\nsteps: [{kind: turn, say: hi}]\n", "silence_dbfs must be below"),
        ("- just a list\n", "top level must be a mapping"),
        ("name: [unclosed\n", "cannot read"),
    ],
)
def test_bad_scenarios_are_refused_with_the_file_and_field(tmp_path, body, message):
    path = write_scenario(tmp_path, body)
    with pytest.raises(ScenarioError, match=message) as error:
        load_scenario(path)
    assert "s.yaml" in str(error.value)


def test_unknown_scenario_names_the_packaged_ones():
    with pytest.raises(ScenarioError, match="smoke"):
        load_scenario("no-such-scenario")


@needs_espeak
def test_fixtures_have_known_speech_extents_and_exact_pauses(tmp_path):
    path = write_scenario(
        tmp_path,
        """
        name: fixtures
        repeat: 2
        steps:
          - {kind: turn, say: "Hello there.", level_dbfs: -18}
          - {kind: pause, say: ["one moment", "please"], pause_secs: 0.8}
          - {kind: noise, noise_secs: 0.3, level_dbfs: -30}
    """,
    )
    scenario = load_scenario(path)
    factory = FixtureFactory(scenario)
    fixtures = factory.build_all()
    assert len(fixtures) == 6 and fixtures[0] is fixtures[3]  # steps repeat; fixtures are built once
    turn, pause, noise = fixtures[:3]
    assert turn.speech[0].start == 0 and turn.speech[0].end == pytest.approx(turn.duration)
    [first, second] = pause.speech
    assert second.start - first.end == pytest.approx(0.8, abs=1e-3)
    assert noise.duration == pytest.approx(0.3, abs=0.02)
    # The detector that scores the agent finds the same extents in the fixture audio.
    found = speech_segments(pause.pcm, pause.sample_rate, scenario.detector.params())
    assert len(found) == 2 and abs(found[1].start - second.start) <= 0.02
    level = 20 * np.log10(np.sqrt(np.mean((noise.pcm / 32768.0) ** 2)))
    assert level == pytest.approx(-30, abs=1.0)


def test_wav_fixtures_are_read_relative_to_the_scenario(tmp_path):
    import wave

    tone = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000) * 8000).astype(np.int16)
    with wave.open(str(tmp_path / "beep.wav"), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(8000)
        wav.writeframes(tone.tobytes())
    scenario = load_scenario(write_scenario(tmp_path, "name: w\nsteps: [{kind: noise, wav: beep.wav}]\n"))
    [fixture] = FixtureFactory(scenario).build_all()
    assert fixture.sample_rate == 48_000 and fixture.duration == pytest.approx(1.0, abs=0.03)
    missing = load_scenario(write_scenario(tmp_path, "name: w\nsteps: [{kind: noise, wav: nope.wav}]\n"))
    with pytest.raises(ScenarioError, match=r"nope\.wav"):
        FixtureFactory(missing).build_all()


# --- server metrics ---

METRICS_BEFORE = """
# HELP mimo_voice_response_latency_seconds End of user speech to first audio.
# TYPE mimo_voice_response_latency_seconds histogram
mimo_voice_response_latency_seconds_bucket{transport="webrtc",le="+Inf"} 2
mimo_voice_response_latency_seconds_sum{transport="webrtc"} 1.0
mimo_voice_response_latency_seconds_count{transport="webrtc"} 2
mimo_voice_generation_seconds_total 4.0
mimo_voice_generated_audio_seconds_total 10.0
"""
METRICS_AFTER = (
    (
        METRICS_BEFORE.replace("} 2\n", "} 6\n").replace("} 1.0", "} 3.4")
        + """
mimo_voice_stage_seconds_sum{stage="prefill"} 0.3
mimo_voice_stage_seconds_count{stage="prefill"} 3
mimo_voice_stage_seconds_sum{stage="vad_hangover",note="a \\"quoted\\" label"} 1.5
mimo_voice_stage_seconds_count{stage="vad_hangover",note="a \\"quoted\\" label"} 3
"""
    )
    .replace("generation_seconds_total 4.0", "generation_seconds_total 7.0")
    .replace("generated_audio_seconds_total 10.0", "generated_audio_seconds_total 22.0")
)


def test_prometheus_text_is_parsed_with_labels():
    samples = parse_prometheus(METRICS_AFTER + 'garbage line\nbad_value{a="b"} x\n')
    assert samples[("mimo_voice_response_latency_seconds_count", (("transport", "webrtc"),))] == 6
    assert samples[("mimo_voice_stage_seconds_sum", (("note", 'a "quoted" label'), ("stage", "vad_hangover")))] == 1.5
    assert not any(name.startswith(("garbage", "bad_value")) for name, _ in samples)


def test_server_figures_use_only_what_changed_during_the_run():
    run = server_figures(parse_prometheus(METRICS_BEFORE), parse_prometheus(METRICS_AFTER))
    assert run["audio_out"] == {"mean_secs": pytest.approx(2.4 / 4), "n": 4}
    assert run["stages"] == {
        "vad_hangover": {"mean_secs": pytest.approx(0.5), "n": 3},
        "prefill": {"mean_secs": pytest.approx(0.1), "n": 3},
    }
    assert list(run["stages"]) == ["vad_hangover", "prefill"]  # in the order of a turn
    assert run["model_first_audio"] == {"mean_secs": None, "n": 0}
    assert run["rtf"] == pytest.approx(3.0 / 12.0)
    assert server_figures(None, None)["available"] is False


def test_the_models_first_audio_is_read_from_the_services_ttfb():
    after = (
        METRICS_AFTER
        + """
mimo_voice_ttfb_seconds_sum{processor="MiMoAudioService#0"} 1.2
mimo_voice_ttfb_seconds_count{processor="MiMoAudioService#0"} 3
"""
    )
    run = server_figures(parse_prometheus(METRICS_BEFORE), parse_prometheus(after))
    assert run["model_first_audio"] == {"mean_secs": pytest.approx(0.4), "n": 3}


# --- the caller's playout buffer ---


def recorder_with(frames):
    """An AgentRecorder fed (RTP timestamp, arrival, level in dBFS) 20 ms frames."""
    from mimo_voice.transports.bench.caller import RECORD_RATE, AgentRecorder, CallClock
    from mimo_voice.transports.bench.metrics import DetectorParams

    recorder = AgentRecorder(CallClock(), DetectorParams())
    for timestamp, arrival, level in frames:
        pcm = np.full(int(0.02 * RECORD_RATE), 10 ** (level / 20) * 32767 if level > -200 else 0, np.int16)
        pcm[1::2] *= -1
        recorder.add(pcm, timestamp, arrival)
    return recorder


def test_playout_places_frames_by_timestamp_behind_the_network_delay():
    from mimo_voice.transports.bench.caller import MIN_PLAYOUT_DELAY_SECS, RECORD_RATE

    # 4 s of stream; the agent speaks from 1.0 s to 2.0 s; the network takes 50 ms, +-8 ms of jitter.
    jitter = np.random.default_rng(0).uniform(0, 0.008, 200)
    frames = [(k * 0.02, k * 0.02 + 0.05 + jitter[k], -20 if 50 <= k < 100 else -200) for k in range(200)]
    audio = recorder_with(frames).playout()
    [speech] = speech_segments(audio, RECORD_RATE)
    delay = 0.05 + float(jitter.min()) + MIN_PLAYOUT_DELAY_SECS + float(jitter.max() - jitter.min())
    assert abs(speech.start - (1.0 + delay)) <= 0.02 and abs(speech.duration - 1.0) <= 0.04


def test_a_server_stall_is_heard_as_a_gap_that_its_catch_up_burst_cannot_fill():
    from mimo_voice.transports.bench.caller import RECORD_RATE
    from mimo_voice.transports.bench.metrics import DetectorParams, UserEvent, analyse_call

    # The agent speaks from 1.0 s to 3.0 s, but frames meant for 1.6-1.9 s all arrive at 1.9 s.
    arrival = [max(k * 0.02, 1.9) if 80 <= k < 95 else k * 0.02 for k in range(250)]
    frames = [(k * 0.02, arrival[k] + 0.03, -20 if 50 <= k < 150 else -200) for k in range(250)]
    audio = recorder_with(frames).playout()
    call = analyse_call(audio, RECORD_RATE, [UserEvent("turn", (Segment(0.2, 0.6),))], DetectorParams())
    [reply] = call.replies
    [gap] = reply.underruns
    assert abs(gap.start - (1.6 + 0.05)) <= 0.04 and abs(gap.duration - 0.3) <= 0.04


# --- the caller, against an echo peer through pipecat's WebRTC transport ---


def echo_app() -> FastAPI:
    """A server that plays every caller's audio straight back (pipecat SmallWebRTC, no model)."""
    from pipecat.frames.frames import InputAudioRawFrame, OutputAudioRawFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
    from pipecat.workers.runner import WorkerRunner

    class Echo(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, InputAudioRawFrame):
                frame = OutputAudioRawFrame(frame.audio, frame.sample_rate, frame.num_channels)
            await self.push_frame(frame, direction)

    app = FastAPI()
    handler = SmallWebRTCRequestHandler()
    running: set[asyncio.Task] = set()

    async def run_echo(connection):
        transport = SmallWebRTCTransport(connection, TransportParams(audio_in_enabled=True, audio_out_enabled=True))
        worker = PipelineWorker(
            Pipeline([transport.input(), Echo(), transport.output()]), params=PipelineParams(), enable_rtvi=False
        )
        runner = WorkerRunner(handle_sigint=False)

        @transport.event_handler("on_client_disconnected")
        async def on_disconnected(_transport, _client):
            await worker.cancel()

        await runner.add_workers(worker)
        await runner.run()

    @app.post("/api/offer")
    async def offer(body: dict):
        async def start(connection):
            task = asyncio.create_task(run_echo(connection))
            running.add(task)
            task.add_done_callback(running.discard)

        return await handler.handle_web_request(SmallWebRTCRequest(sdp=body["sdp"], type=body["type"]), start)

    return app


@needs_espeak
async def test_caller_records_what_it_hears_on_the_clock_it_plays_on(tmp_path):
    scenario = load_scenario(
        write_scenario(
            tmp_path,
            """
        name: echo
        lead_in_secs: 0.3
        quiet_secs: 1.0
        steps:
          - {kind: turn, say: "Hello, this is a test call."}
          - {kind: pause, say: ["one", "two three"], pause_secs: 0.9, after: user_end, delay_secs: 0.6}
          - {kind: noise, noise_secs: 0.3, after: user_end, delay_secs: 0.8}
    """,
        )
    )
    fixtures = FixtureFactory(scenario).build_all()
    steps: list[str] = []
    with serve_in_thread(echo_app()) as url:
        result = await Caller(0, url, scenario, fixtures, on_step=lambda caller, name: steps.append(name)).run()
    assert result.error is None, result.error
    assert steps == [step.name for step in scenario.steps]
    sent = [part for event in result.events for part in event.speech]
    assert [e.kind for e in result.events] == ["turn", "pause", "noise"] and len(sent) == 4
    heard = speech_segments(result.agent_audio, result.sample_rate, scenario.detector.params())
    assert len(heard) == len(sent)
    delays = [h.start - s.start for h, s in zip(heard, sent)]
    # Every part comes back whole and in order, a little later than it was played (Opus, jitter buffers). On a busy
    # CPU an echo bot's backlog grows with each stall and the caller's buffer hears stalls as gaps, so the delay
    # may creep up and a part stretch a little.
    assert all(d > 0 for d in delays) and delays[0] < 1.0, delays
    for h, s in zip(heard, sent):
        assert s.duration - 0.1 <= h.duration <= s.duration + 0.5


async def test_signalling_refusal_is_a_clear_caller_error(tmp_path):
    app = FastAPI()

    @app.post("/api/offer")
    async def offer():
        from fastapi import HTTPException

        raise HTTPException(503, "server busy: 1 of 1 sessions in use")

    scenario = load_scenario(write_scenario(tmp_path, "name: r\nsteps: [{kind: noise, noise_secs: 0.2}]\n"))
    with serve_in_thread(app) as url:
        result = await Caller(0, url, scenario, FixtureFactory(scenario).build_all()).run()
    assert "HTTP 503" in result.error and "server busy" in result.error
    assert result.events == []


@needs_espeak
async def test_a_server_that_hangs_up_mid_call_ends_the_call_with_an_error(tmp_path, monkeypatch):
    from mimo_voice.transports.bench import caller as bench_caller
    from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler

    monkeypatch.setattr(bench_caller, "STALL_SECS", 1.0)
    app = FastAPI()
    handler = SmallWebRTCRequestHandler()
    hang_ups: set[asyncio.Task] = set()

    @app.post("/api/offer")
    async def offer(body: dict):
        async def hang_up_soon(connection):
            async def later():
                await asyncio.sleep(1.5)
                await connection.disconnect()

            hang_ups.add(asyncio.create_task(later()))

        return await handler.handle_web_request(SmallWebRTCRequest(sdp=body["sdp"], type=body["type"]), hang_up_soon)

    scenario = load_scenario(
        write_scenario(
            tmp_path,
            """
        name: hang-up
        lead_in_secs: 0.2
        steps:
          - {kind: noise, noise_secs: 0.3, after: user_end}
          - {kind: turn, say: "Are you still there? I am talking to you.", after: user_end, delay_secs: 2.0}
    """,
        )
    )
    with serve_in_thread(app) as url:
        result = await asyncio.wait_for(Caller(0, url, scenario, FixtureFactory(scenario).build_all()).run(), 30)
    assert result.error is not None and "stalled" in result.error
    assert [e.kind for e in result.events] == ["noise"]


# --- the command ---


@needs_espeak
def test_bench_live_against_a_running_server_prints_and_writes_json_and_png(tmp_path, capsys):
    from mimo_voice.configs import load_config
    from mimo_voice.transports.bench.live import main

    scenario = write_scenario(
        tmp_path,
        """
        name: echo-run
        lead_in_secs: 0.2
        quiet_secs: 0.5
        steps:
          - {kind: turn, say: "Hello, how are you doing today?"}
          - {kind: barge_in, say: "Wait, wait.", after: user_end, delay_secs: 0.6}
    """,
    )
    out = tmp_path / "out" / "live.json"
    with serve_in_thread(echo_app()) as url:
        code = main(
            load_config(None, []),
            [
                "--url",
                url,
                "--scenario",
                scenario,
                "--callers",
                "2",
                "--processes",
                "2",
                "--stagger",
                "0.2",
                "--json",
                str(out),
            ],
        )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "response latency, all turns" in printed.out and "barge-in stop time" in printed.out
    report = json.loads(out.read_text())
    assert report["meta"]["command"] == "mimo-voice bench live" and report["processes"] == 2
    assert [c["caller"] for c in report["calls"]] == [0, 1] and [c["error"] for c in report["calls"]] == [None, None]
    assert all(len(c["events"]) == 2 and c["agent_segments"] for c in report["calls"])
    # An echo "agent" talks over the caller: every turn gets a latency of zero.
    assert report["summary"]["latency_secs"]["smooth_turn"]["max"] == 0.0
    assert report["summary"]["server"]["available"] is False  # an echo server has no /metrics
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_bench_live_refuses_bad_arguments_with_a_message(capsys, tmp_path):
    from mimo_voice.configs import load_config
    from mimo_voice.transports.bench.live import main

    config = load_config(None, [])
    assert main(config, ["--scenario", "nope"]) == 2
    assert "scenario not found" in capsys.readouterr().err
    assert main(config, ["--callers", "0"]) == 2
    assert "--callers" in capsys.readouterr().err
    assert main(config, ["--callers", "2", "--processes", "3"]) == 2
    assert "--processes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(config, ["--frobnicate"])


@needs_espeak
@pytest.mark.slow
def test_ci_smoke_two_callers_through_the_real_server_on_the_tiny_model(tmp_path, capsys):
    """The CI smoke run: `mimo-voice bench live --callers 2` (packaged smoke scenario) against the real server,
    agent and tiny engine started in-process (the session limit of 1 is raised to the 2 callers)."""
    from mimo_voice.transports.bench.live import STAGES_TOTAL
    from mimo_voice.transports.bench.metrics import TURN_STAGES
    from mimo_voice.transports.cli import main

    out = tmp_path / "smoke.json"
    code = main(
        [
            "bench",
            "live",
            "--set",
            "agent.max_new_groups=40",
            "--set",
            "server.max_sessions=1",
            "--set",
            "logging.level=WARNING",
            "--callers",
            "2",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["model"]["preset"] == "tiny"
    calls = report["calls"]
    assert [c["error"] for c in calls] == [None, None]
    assert all(len(c["events"]) == 5 for c in calls)
    # The tiny model babbles, but it answers every turn with audio that reaches the callers.
    assert all(c["agent_segments"] for c in calls)
    summary = report["summary"]
    assert summary["rates"]["takeover_turn"]["n"] == 2
    # Replies were heard, and the server's RTVI events split their latency into stages that add up.
    stages = summary["turn_stages_secs"]
    assert summary["latency_secs"]["response"]["n"] > 0 and stages[STAGES_TOTAL]["n"] > 0
    assert sum(stages[name]["mean"] for name in TURN_STAGES) == pytest.approx(stages[STAGES_TOTAL]["mean"])
    server = summary["server"]
    assert server["available"] and server["audio_out"]["n"] > 0 and server["rtf"] > 0
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "response latency, all turns" in printed.out
