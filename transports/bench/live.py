"""``mimo-voice bench live``: simulated WebRTC callers measure what a caller experiences.

N aiortc callers on 127.0.0.1 play a scripted scenario (transports/scenarios/*.yaml) through the real
server, in real time, and record the agent's audio. Response latency, barge-in stop time, takeover and
false barge-in rates and underruns come from that audio (bench_metrics documents each definition); the
server's RTVI events split each reply's latency into stages, and its ``GET /metrics`` gives its own
means and RTF. The server is started in this process from the config (uvicorn on a free port) unless
``--url`` points at a running one; the callers run in processes of their own, so that neither the
server's threads nor too many fellow callers hold up their real-time frames.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import queue
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvicorn
from loguru import logger
from mimo_voice.configs import Config, ConfigError
from mimo_voice.configs.logging import setup_logging
from mimo_voice.streaming.bench.report import (
    ProgressBar,
    Table,
    add_json_argument,
    print_tables,
    rate,
    summarize,
    write_json,
)

from ..operations import freeze_startup_heap
from ..security import resolve_auth_token
from .caller import Caller, CallResult
from .metrics import TURN_STAGES, CallAnalysis, Totals, analyse_call, pool
from .scenario import Fixture, FixtureFactory, Scenario, ScenarioError, load_scenario, packaged_scenarios
from .server_stats import MILESTONE_ROWS, ServerStats, server_figures

COMMAND = "mimo-voice bench live"
SERVER_START_TIMEOUT_SECS = 600.0  # loading real weights can take minutes
MAX_HONEST_LAG_SECS = 0.04  # two frames
# aiortc does Opus, RTP and SRTP in Python: a few callers per process keep their frames on time (the bench
# reports each caller's send lag; raise --processes when it warns).
CALLERS_PER_PROCESS = 4
STAGES_TOTAL = "= end of speech -> caller hears it"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Simulated WebRTC callers play a scripted conversation through the server and measure, from the "
        "audio they receive, response latency, barge-in stop time, takeover and false barge-in rates and "
        "underruns, and where each reply's latency goes.",
    )
    parser.add_argument(
        "--scenario",
        default="smoke",
        help=f"a scenario YAML file or a packaged one: {', '.join(packaged_scenarios())} (default: smoke)",
    )
    parser.add_argument("--callers", type=int, default=2, help="simultaneous callers (default: 2)")
    parser.add_argument(
        "--stagger", type=float, default=0.5, metavar="SECS", help="delay between callers' starts (default: 0.5)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="N",
        help=f"processes the callers run in (default: one per {CALLERS_PER_PROCESS} callers)",
    )
    parser.add_argument(
        "--url", help="benchmark a running server (e.g. http://127.0.0.1:7860) instead of starting one from the config"
    )
    parser.add_argument("--token", help="bearer token for signalling (default: server.auth_token)")
    parser.add_argument(
        "--minutes",
        type=float,
        metavar="M",
        help="soak: callers keep calling for M minutes; also reports failed calls, early vs late latency and the "
        "server's and engine's memory over time (default: each caller plays the scenario once)",
    )
    add_json_argument(parser, default="bench_live.json")
    parser.add_argument("--plot", metavar="PATH", help="PNG plot (default: the JSON path with .png)")
    return parser


def main(config: Config, argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.callers < 1 or args.stagger < 0 or not 0 <= args.processes <= args.callers or (args.minutes or 1) <= 0:
        print(
            f"{COMMAND}: --callers must be at least 1, --stagger not negative, --processes at most --callers, "
            "--minutes positive",
            file=sys.stderr,
        )
        return 2
    try:
        scenario = load_scenario(args.scenario)
        fixtures = FixtureFactory(scenario).build_all()
    except ScenarioError as exc:
        print(f"{COMMAND}: {exc}", file=sys.stderr)
        return 2
    try:
        token = args.token or resolve_auth_token(config.server)
    except ConfigError as exc:
        print(f"{COMMAND}: {exc}", file=sys.stderr)
        return 2
    if not args.url:  # every simulated caller comes from this machine's address
        callers = max(args.callers, config.server.max_sessions)
        limits = {"max_sessions": callers, "max_sessions_per_client": callers, "max_offers_per_minute": 10 * callers}
        config = config.model_copy(update={"server": config.server.model_copy(update=limits)})
    try:
        with contextlib.ExitStack() as stack:
            url = args.url or stack.enter_context(local_server(config))
            processes = args.processes or math.ceil(args.callers / CALLERS_PER_PROCESS)
            if args.minutes:
                return _soak(args, config, url, scenario, fixtures, token, processes)
            plan = CallPlan(url, scenario, fixtures, args.stagger, token, config.logging.level)
            report = run_bench(plan, args.callers, processes)
    except (ServerStartError, BrokenProcessPool) as exc:
        print(f"{COMMAND}: {exc or 'the callers process died'}", file=sys.stderr)
        return 1
    report["config"] = _describe_config(config, external=bool(args.url))
    json_path = Path(args.json)
    plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    figures = build_tables(report["summary"], scenario.name, args.callers)
    print_tables(figures)
    write_json(json_path, report, command=COMMAND, tables=figures)
    if _plot(report, plot_path):
        print(f"\nwrote {json_path} and {plot_path}")
    else:
        print(f"\nwrote {json_path}; no plot: matplotlib is missing (pip install 'mimo-voice[bench]')")
    _warn_about_measurement(report)
    failed = [c for c in report["calls"] if c["error"]]
    for call in failed:
        print(f"{COMMAND}: caller {call['caller']} failed: {call['error']}", file=sys.stderr)
    return 1 if failed else 0


def _plot(report: dict[str, Any], path: Path) -> bool:
    """The PNG, when the optional plotting dependency (the ``bench`` extra) is installed."""
    try:
        from .plot import plot_report
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        return False
    plot_report(report, path)
    return True


def _soak(
    args: argparse.Namespace,
    config: Config,
    url: str,
    scenario: Scenario,
    fixtures: list[Fixture],
    token: str | None,
    processes: int,
) -> int:
    """``--minutes``: the soak run (soak.py); the usual tables over all its calls, plus the soak table."""
    from .soak import MemorySampler, SoakPlan, run_soak_callers, soak_summary, soak_table

    origin = time.time()
    plan = SoakPlan(
        url, scenario, fixtures, args.stagger, token, config.logging.level, origin, origin + args.minutes * 60
    )
    stats = ServerStats(url, token)
    before = asyncio.run(stats.snapshot())
    with MemorySampler(url, token, origin) as sampler:
        calls = run_soak_callers(plan, args.callers, processes)
    after = asyncio.run(stats.snapshot())
    totals = pool([call.analysis for call in calls if not call.error])
    soak = soak_summary(calls, sampler.samples, args.minutes)
    report = {
        "scenario": scenario.model_dump(mode="json"),
        "url": url,
        "callers": args.callers,
        "processes": processes,
        "wall_secs": time.time() - origin,
        "summary": summarize_run(totals, server_figures(before, after)),
        "soak": soak,
        "config": _describe_config(config, external=bool(args.url)),
    }
    figures = [*build_tables(report["summary"], scenario.name, args.callers), soak_table(soak)]
    print_tables(figures)
    write_json(Path(args.json), report, command=COMMAND, tables=figures)
    print(f"\nwrote {args.json}")
    for failed in soak["failed_calls"]:
        print(f"{COMMAND}: caller {failed['caller']} failed at {failed['started_secs']:.0f} s: {failed['error']}")
    return 1 if soak["failed_calls"] else 0


def _warn_about_measurement(report: dict[str, Any]) -> None:
    """Figures are only as good as the callers' own timing: say when a busy CPU blurred them."""
    lag = max(c["max_send_lag_secs"] for c in report["calls"])
    if lag > MAX_HONEST_LAG_SECS:
        print(
            f"{COMMAND}: note: the callers' frames left up to {lag * 1000:.0f} ms late, which blurs the timings "
            "by as much: a busy CPU? (more --processes help when cores are free)",
            file=sys.stderr,
        )
    for call in report["calls"]:
        for note in call["notes"]:
            print(f"{COMMAND}: caller {call['caller']}: {note}", file=sys.stderr)


@dataclass(frozen=True)
class CallPlan:
    """What every callers' process needs (pickled to it)."""

    url: str
    scenario: Scenario
    fixtures: list[Fixture]
    stagger: float
    token: str | None
    log_level: str


def run_callers(plan: CallPlan, callers: int, processes: int) -> list[CallResult]:
    """The calls, in ``processes`` processes of their own: the callers must not share a GIL with the server (which
    may run in this process) nor crowd one another, or their 20 ms frames leave late and blur every timing."""
    context = multiprocessing.get_context("spawn")
    steps = context.Queue()
    groups = [list(range(callers))[i::processes] for i in range(processes)]  # round robin: starts stay staggered
    with ProcessPoolExecutor(
        processes, mp_context=context, initializer=_init_callers_process, initargs=(steps, plan.log_level)
    ) as pool:
        futures = [pool.submit(_call_group, plan, group) for group in groups]
        with ProgressBar(callers * len(plan.scenario.script), f"bench live: {plan.scenario.name} x{callers}") as bar:
            while not all(future.done() for future in futures) or not steps.empty():
                with contextlib.suppress(queue.Empty):
                    caller, name = steps.get(timeout=0.2)
                    bar.advance(note=f"caller {caller}: {name}"[:48])
        return sorted((result for future in futures for result in future.result()), key=lambda r: r.caller)


_steps: Any = None  # in a callers' process: where finished steps are reported for the progress bar


def _init_callers_process(steps: Any, log_level: str) -> None:
    global _steps
    _steps = steps
    setup_logging(log_level)  # a spawned process starts with loguru's defaults (DEBUG)


def _call_group(plan: CallPlan, indices: list[int]) -> list[CallResult]:
    async def call(index: int) -> CallResult:
        await asyncio.sleep(index * plan.stagger)
        caller = Caller(
            index,
            plan.url,
            plan.scenario,
            plan.fixtures,
            token=plan.token,
            on_step=lambda number, name: _steps.put((number, name)),
        )
        return await caller.run()

    async def call_all() -> list[CallResult]:
        return list(await asyncio.gather(*(call(index) for index in indices)))

    return asyncio.run(call_all())


def run_bench(plan: CallPlan, callers: int, processes: int) -> dict[str, Any]:
    """Play the scenario with ``callers`` staggered callers; the report holds the summary and every call."""
    stats = ServerStats(plan.url, plan.token)
    before = asyncio.run(stats.snapshot())
    started = time.perf_counter()
    results = run_callers(plan, callers, processes)
    wall = time.perf_counter() - started
    after = asyncio.run(stats.snapshot())
    scenario = plan.scenario
    params = scenario.detector.params()
    analyses = [analyse_call(r.agent_audio, r.sample_rate, r.events, params, r.server_events) for r in results]
    totals = pool([a for a, r in zip(analyses, results) if not r.error])
    server = server_figures(before, after)
    return {
        "scenario": scenario.model_dump(mode="json"),
        "url": plan.url,
        "callers": callers,
        "processes": processes,
        "wall_secs": wall,
        "summary": summarize_run(totals, server),
        "calls": [_call_record(r, a) for r, a in zip(results, analyses)],
    }


def summarize_run(totals: Totals, server: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary: latency percentiles, rates as (rate, hits, n), underruns, turn stages, server figures."""
    latency = totals.latency
    per_stage = list(zip(*totals.stages)) or [()] * len(TURN_STAGES)
    return {
        "latency_secs": {
            "response": summarize(v for values in latency.values() for v in values),
            "smooth_turn": summarize(latency["turn"]),
            "after_pause": summarize(latency["pause"]),
            "after_barge_in": summarize(latency["barge_in"]),
            "barge_in_stop": summarize(totals.stop_time),
        },
        "rates": {
            name: {"rate": rate(*counts), "hits": counts[0], "n": counts[1]}
            for name, counts in sorted(totals.counts.items())
        },
        "underruns": {
            "replies": totals.replies,
            "replies_with_underrun": totals.replies_with_underrun,
            "count": totals.underruns,
            "secs": totals.underrun_secs,
            "share_of_reply_time": totals.underrun_secs / totals.reply_secs if totals.reply_secs else None,
        },
        "turn_stages_secs": {
            **{name: summarize(values) for name, values in zip(TURN_STAGES, per_stage)},
            STAGES_TOTAL: summarize(sum(stage) for stage in totals.stages),
        },
        "server": server,
    }


RATE_ROWS = (  # (key in summary.rates, row label, which way is better)
    ("takeover_turn", "takeover rate, smooth turns", "higher"),
    ("takeover_pause", "takeover rate, pauses", "lower"),
    ("takeover_interruption", "takeover rate, after barge-in", "higher"),
    ("takeover_backchannel", "takeover rate, backchannels", "lower"),
    ("false_barge_in_backchannel", "false barge-in, backchannels", "lower"),
    ("false_barge_in_noise", "false barge-in, noise", "lower"),
    ("spurious_response_noise", "spurious reply to noise", "lower"),
    ("barge_in_agent_speaking", "barge-ins that met agent speech", "higher"),
)
LATENCY_ROWS = (
    ("response", "response latency, all turns"),
    ("smooth_turn", "  after a smooth turn"),
    ("after_pause", "  after a paused utterance"),
    ("after_barge_in", "  after a barge-in"),
    ("barge_in_stop", "barge-in stop time"),
)


def build_tables(summary: dict[str, Any], scenario: str, callers: int) -> list[Table]:
    latency = Table(
        f"bench live: {scenario}, {callers} callers - latency (s, from received audio)",
        ["metric", "n", "p50", "p90", "max"],
    )
    for key, label in LATENCY_ROWS:
        s = summary["latency_secs"][key]
        latency.add_row(label, s["n"], s["p50"], s["p90"], s["max"])
    rates = Table("turn-taking (from received audio)", ["metric", "rate", "hits", "n", "better"])
    for key, label, better in RATE_ROWS:
        r = summary["rates"].get(key, {"rate": None, "hits": 0, "n": 0})
        rates.add_row(label, r["rate"], r["hits"], r["n"], better)
    under = summary["underruns"]
    rates.add_row(
        "replies with a playout underrun",
        rate(under["replies_with_underrun"], under["replies"]),
        under["replies_with_underrun"],
        under["replies"],
        "lower",
    )
    stages = Table(
        "turn stages (per reply, from the server's RTVI events as the caller got them), s",
        ["stage", "n", "p50", "p90", "mean"],
    )
    for name, s in summary["turn_stages_secs"].items():
        stages.add_row(name, s["n"], s["p50"], s["p90"], s["mean"])
    server = summary["server"]
    figures = Table("server (GET /metrics, means over the run)", ["figure", "ms", "n"])
    for stage, figure in server["stages"].items():
        figures.add_row(f"stage: {stage}", _ms(figure["mean_secs"]), figure["n"])
    for key, label in MILESTONE_ROWS:
        figures.add_row(label, _ms(server[key]["mean_secs"]), server[key]["n"])
    figures.add_row("RTF (generation time / audio time)", server["rtf"], None)
    return [latency, rates, stages, figures]


def _ms(secs: float | None) -> float | None:
    return None if secs is None else secs * 1000


def _call_record(result: CallResult, analysis: CallAnalysis) -> dict[str, Any]:
    return {
        "caller": result.caller,
        "error": result.error,
        "duration_secs": result.duration,
        "max_send_lag_secs": result.max_send_lag,
        "notes": result.notes,
        "events": [asdict(e) for e in analysis.events],
        "agent_segments": [[s.start, s.end] for s in analysis.agent_segments],
        "replies": [
            {"start": r.span.start, "end": r.span.end, "underruns": [[g.start, g.end] for g in r.underruns]}
            for r in analysis.replies
        ],
    }


def _describe_config(config: Config, *, external: bool) -> dict[str, Any]:
    if external:
        return {"server": "external"}
    return {
        "model": config.model.model_dump(mode="json"),
        "agent_mode": config.agent.mode,
        "vad": config.vad.model_dump(mode="json"),
        "barge_in_min_speech_secs": config.agent.barge_in_min_speech_secs,
    }


class ServerStartError(RuntimeError):
    """The in-process server did not come up."""


@contextlib.contextmanager
def serve_in_thread(
    app: Any,
    host: str = "127.0.0.1",
    *,
    cleanup: Callable[[], Awaitable[None]] | None = None,
    timeout: float = SERVER_START_TIMEOUT_SECS,
) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free port of ``host`` in a thread with its own event loop (callers'
    pacing never waits on the server's loop); yields the base URL. ``cleanup`` runs on that loop at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            if cleanup is not None:
                await cleanup()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="bench-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=30)
            sock.close()
            raise ServerStartError("the in-process server did not start (see the log above)")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def local_server(config: Config) -> Iterator[str]:
    """The real server, agent and engine from ``config``, in this process on 127.0.0.1."""
    from mimo_voice.streaming.engine.engine import Engine  # heavy: torch and the model
    from mimo_voice.tools.registry import build_registry
    from mimo_voice.transports.server import create_app

    logger.info("bench live: loading the model and starting the server in-process")
    engine = Engine.load(config)
    tools = build_registry(config.tools, timeout_secs=config.agent.tool_timeout_secs)
    app = create_app(config, engine=engine, tools=tools)
    freeze_startup_heap()  # as `mimo-voice serve` does: the soak measures this process as the server
    with serve_in_thread(app, cleanup=engine.aclose) as url:
        yield url
