"""The ``mimo-voice`` command line.

Sub-commands import their implementation lazily, so ``--help`` and ``config show`` stay fast
and never load torch. A sub-command whose module is missing says so instead of failing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from mimo_voice.configs import Config, ConfigError, dump_config, load_config
from mimo_voice.configs.logging import setup_logging

# sub-command -> "module:function"; each function takes (config, argv) and returns an exit code.
COMMANDS: dict[str, str] = {
    "serve": "mimo_voice.transports.server:main",
    "bench engine": "mimo_voice.streaming.bench.engine:main",
    "bench codec": "mimo_voice.streaming.bench.codec:main",
    "bench live": "mimo_voice.transports.bench.live:main",
    "model info": "mimo_voice.streaming.model.info:main",
    "engines": "mimo_voice.streaming.cluster.cli:main",
}

BENCH_HELP = {
    "engine": "per-patch generation time, RTF, time to first PCM at turn 1 vs turn 20",
    "codec": "streaming decode error vs look-ahead, and first-chunk latency",
    "live": "simulated WebRTC callers: response latency, barge-in stop time, takeover rates",
}


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="YAML file, or the name of a packaged config (default, support, phone)")
    common.add_argument(
        "-s",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set agent.mode=thinking (repeatable)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="mimo-voice",
        parents=[common],
        description="Real-time streaming voice agent for MiMo-Audio-7B (WebRTC and phone).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the WebRTC/phone server (GET /health, page at /)")
    serve.add_argument("--host", help="shorthand for --set server.host=HOST")
    serve.add_argument("--port", type=int, help="shorthand for --set server.port=PORT")

    bench = commands.add_parser("bench", parents=[common], help="benchmarks that print figures (table + JSON)")
    kinds = bench.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, text in BENCH_HELP.items():
        # No -h here: `bench KIND --help` is answered by the benchmark's own parser.
        kinds.add_parser(kind, parents=[common], help=text, add_help=False)

    config = commands.add_parser("config", parents=[common], help="inspect the configuration")
    config_cmds = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    config_cmds.add_parser("show", parents=[common], help="print the resolved config as YAML")

    model = commands.add_parser("model", parents=[common], help="inspect checkpoints")
    model_cmds = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = model_cmds.add_parser("info", parents=[common], help="parameter counts per part and special tokens")
    info.add_argument("path", nargs="?", help="checkpoint folder (default: the configured model)")
    engines = commands.add_parser(
        "engines", parents=[common], help="the Ray engine pool (engine.ray_address): list, start or stop it"
    )
    engines.add_argument("action", nargs="?", choices=("list", "start", "stop"), default="list")
    return parser


def _resolve(target: str) -> Callable[[Config, list[str]], int] | None:
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise
    return getattr(module, func_name)


def _command_argv(args: argparse.Namespace) -> tuple[str, list[str]]:
    if args.command == "bench":
        return f"bench {args.kind}", [arg for arg in args.unknown if arg != "--"]
    if args.command == "model":
        return "model info", [args.path] if args.path else []
    if args.command == "engines":
        return "engines", [args.action]
    return args.command, []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Benchmarks parse their own options: whatever this parser does not know goes to them.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = list(args.overrides)
    if args.command == "serve":
        overrides += [f"server.host={args.host}"] * bool(args.host) + [f"server.port={args.port}"] * (
            args.port is not None
        )
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"mimo-voice: {exc}", file=sys.stderr)
        return 2
    setup_logging("DEBUG" if args.verbose else config.logging.level)

    if args.command == "config":
        print(dump_config(config), end="")
        return 0
    args.unknown = unknown
    name, rest = _command_argv(args)
    handler = _resolve(COMMANDS[name])
    if handler is None:
        print(f"mimo-voice: `{name}` is not yet available in this version", file=sys.stderr)
        return 3
    try:
        return int(handler(config, rest) or 0)
    except ConfigError as exc:  # e.g. an unknown tool or an unusable database found while starting
        print(f"mimo-voice: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
