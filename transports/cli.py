"""The ``mimo-voice`` command line.

Sub-commands import their implementation lazily, so ``--help`` and ``config show`` stay fast
and never load torch. A sub-command whose module is missing says so instead of failing. The common
options (``-c``, ``--set``, ``-v``) are accepted before and after the command; any
:class:`~mimo_voice.configs.errors.MimoVoiceError` ends the command with a one-line message (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from mimo_voice.configs import Config, dump_config, load_config
from mimo_voice.configs.errors import MimoVoiceError
from mimo_voice.configs.logging import setup_logging

# sub-command -> "module:function"; each function takes (config, argv) and returns an exit code.
COMMANDS: dict[str, str] = {
    "serve": "mimo_voice.transports.server:main",
    "bench engine": "mimo_voice.streaming.bench.engine:main",
    "bench codec": "mimo_voice.streaming.bench.codec:main",
    "bench live": "mimo_voice.transports.bench.live:main",
    "model info": "mimo_voice.transports.cli:model_info",
}

BENCH_HELP = {
    "engine": "per-patch generation time, RTF, time to first PCM at turn 1 vs turn 20",
    "codec": "streaming decode error vs look-ahead, and first-chunk latency",
    "live": "simulated WebRTC callers: response latency, barge-in stop time, takeover rates",
}


def _common_options(after_command: bool) -> argparse.ArgumentParser:
    """The options every command takes. Before the command they fill ``config``/``overrides``/``verbose``;
    after it, ``*_after`` attributes that exist only when given (argparse lets a sub-command's defaults
    overwrite what was parsed before it), merged by :func:`_merge_common`."""
    suffix = "_after" if after_command else ""

    def unset(before: object) -> object:
        return argparse.SUPPRESS if after_command else before

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        dest=f"config{suffix}",
        default=unset(None),
        help="YAML file, or the name of a packaged config (default, support, phone)",
    )
    common.add_argument(
        "-s",
        "--set",
        dest=f"overrides{suffix}",
        action="append",
        default=unset([]),
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set agent.mode=thinking (repeatable)",
    )
    common.add_argument(
        "-v", "--verbose", dest=f"verbose{suffix}", action="store_true", default=unset(False), help="log at DEBUG"
    )
    return common


def _merge_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options given after the command join those given before it; two different config files are an error."""
    after = getattr(args, "config_after", None)
    if after is not None and args.config is not None and after != args.config:
        parser.error(f"two config files given: {args.config} and {after}")
    args.config = after or args.config
    args.overrides = list(args.overrides) + list(getattr(args, "overrides_after", []))
    args.verbose = args.verbose or getattr(args, "verbose_after", False)


def build_parser() -> argparse.ArgumentParser:
    """The common options go on the top-level parser and on each leaf command (``config show``, not ``config``)."""
    common = _common_options(after_command=True)
    parser = argparse.ArgumentParser(
        prog="mimo-voice",
        parents=[_common_options(after_command=False)],
        description="Real-time streaming voice agent for MiMo-Audio-7B (WebRTC and phone).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the WebRTC/phone server (GET /health, page at /)")
    serve.add_argument("--host", help="shorthand for --set server.host=HOST")
    serve.add_argument("--port", type=int, help="shorthand for --set server.port=PORT")

    bench = commands.add_parser("bench", help="benchmarks that print figures (table + JSON)")
    kinds = bench.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, text in BENCH_HELP.items():
        # No -h here: `bench KIND --help` is answered by the benchmark's own parser.
        kinds.add_parser(kind, parents=[common], help=text, add_help=False)

    config = commands.add_parser("config", help="inspect the configuration")
    config_cmds = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    config_cmds.add_parser("show", parents=[common], help="print the resolved config as YAML")

    model = commands.add_parser("model", help="inspect checkpoints")
    model_cmds = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = model_cmds.add_parser("info", parents=[common], help="parameter counts per part and special tokens")
    info.add_argument("path", nargs="?", help="checkpoint folder (default: the configured model)")
    return parser


def model_info(config: Config, argv: list[str]) -> int:
    """``model info``: the model package knows no app config, so the configured model is resolved here."""
    from mimo_voice.streaming.model import info

    return info.main(argv, default_path=config.model.path, preset=config.model.preset)


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
    return args.command, []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Benchmarks parse their own options: whatever this parser does not know goes to them.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _merge_common(parser, args)
    overrides = list(args.overrides)
    if args.command == "serve":
        overrides += [f"server.host={args.host}"] * bool(args.host) + [f"server.port={args.port}"] * (
            args.port is not None
        )
    try:
        return _run(args, unknown, overrides)
    except MimoVoiceError as exc:  # a bad config, checkpoint, tool set-up...: one line, no traceback
        message = " ".join(str(exc).split())
        print(f"mimo-voice: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, unknown: list[str], overrides: list[str]) -> int:
    config = load_config(args.config, overrides)
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
    return int(handler(config, rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
