import subprocess
import sys

import yaml
from mimo_voice.transports import cli


def test_config_show_prints_resolved_config(capsys):
    assert cli.main(["config", "show", "--set", "agent.mode=thinking", "--set", "server.port=9001"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["agent"]["mode"] == "thinking"
    assert shown["server"]["port"] == 9001
    assert shown["model"]["preset"] == "tiny"


def test_config_show_with_packaged_config(capsys):
    assert cli.main(["config", "show", "-c", "support"]) == 0
    assert "lookup_order" in yaml.safe_load(capsys.readouterr().out)["tools"]["enabled"]


def test_invalid_override_exits_2_with_message(capsys):
    assert cli.main(["config", "show", "--set", "vad.aggressiveness=9"]) == 2
    assert "vad.aggressiveness" in capsys.readouterr().err


def test_every_command_is_documented():
    out = subprocess.run([sys.executable, "-m", "mimo_voice.transports.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("serve", "bench", "config", "model"):
        assert name in out.stdout
    bench = subprocess.run(
        [sys.executable, "-m", "mimo_voice.transports.cli", "bench", "--help"], capture_output=True, text=True
    )
    for kind in ("engine", "codec", "live"):
        assert kind in bench.stdout


def test_console_script_is_installed():
    exe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import shutil,sys; print(shutil.which('mimo-voice', path=__import__('os').path.dirname(sys.executable)))",
        ],
        capture_output=True,
        text=True,
    )
    assert exe.stdout.strip().endswith("mimo-voice")


def _capture(config, argv):
    _capture.seen = (config.agent.mode, argv)
    return 0


def test_bench_options_reach_the_benchmark(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "bench codec", f"{__name__}:_capture")
    assert cli.main(["bench", "codec", "--seconds", "5", "--set", "agent.mode=thinking", "--", "--json", "x"]) == 0
    mode, argv = _capture.seen
    assert mode == "thinking"
    assert argv == ["--seconds", "5", "--json", "x"]


def test_unknown_option_outside_bench_is_rejected(capsys):
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["config", "show", "--bogus"])
    assert "--bogus" in capsys.readouterr().err


def test_missing_command_module_says_not_yet_available(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "bench live", "mimo_voice.no_such_module:main")
    assert cli.main(["bench", "live"]) == 3
    assert "not yet available" in capsys.readouterr().err
