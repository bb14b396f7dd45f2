"""The command line: sub-commands, the common options in either place, one-line errors."""

import json
import subprocess
import sys

import pytest
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
    with pytest.raises(SystemExit):
        cli.main(["config", "show", "--bogus"])
    assert "--bogus" in capsys.readouterr().err


def test_missing_command_module_says_not_yet_available(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "bench live", "mimo_voice.no_such_module:main")
    assert cli.main(["bench", "live"]) == 3
    assert "not yet available" in capsys.readouterr().err


# --- the common options, before and after the command ---


@pytest.mark.parametrize("before", [True, False])
def test_config_and_set_work_before_and_after_the_command(before, capsys):
    options = ["-c", "support", "--set", "server.port=9002"]
    argv = [*options, "config", "show"] if before else ["config", "show", *options]
    assert cli.main(argv) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["server"]["port"] == 9002 and "lookup_order" in shown["tools"]["enabled"]


def test_overrides_before_and_after_the_command_add_up(capsys):
    argv = ["--set", "server.port=9003", "config", "show", "--set", "agent.mode=thinking"]
    assert cli.main(argv) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["server"]["port"] == 9003 and shown["agent"]["mode"] == "thinking"


@pytest.mark.parametrize("before", [True, False])
def test_verbose_works_before_and_after_the_command(before, monkeypatch):
    levels = []
    monkeypatch.setattr(cli, "setup_logging", levels.append)
    assert cli.main(["-v", "config", "show"] if before else ["config", "show", "--verbose"]) == 0
    assert cli.main(["config", "show"]) == 0
    assert levels == ["DEBUG", "INFO"]


@pytest.mark.parametrize("before", [True, False])
def test_a_missing_config_file_fails_clearly_in_either_place(before, tmp_path, capsys):
    missing = str(tmp_path / "bad.yaml")
    assert cli.main(["--config", missing, "config", "show"] if before else ["config", "show", "-c", missing]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"mimo-voice: config file not found: {missing}\n"


def test_two_different_config_files_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["-c", "support", "config", "show", "-c", "phone"])
    assert "two config files" in capsys.readouterr().err


# --- errors end in one line ---


def _broken_checkpoint(tmp_path):
    from mimo_voice.streaming.model.modeling_mimo_audio import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "llm")
    config = json.loads((folder / "config.json").read_text())
    config["delay_pattern"] = "0-1-2"  # three delays for eight channels
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("command", [["model", "info"], ["serve", "--port", "0"]])
def test_a_bad_checkpoint_config_ends_in_one_line_without_traceback(command, tmp_path):
    folder = _broken_checkpoint(tmp_path)
    argv = [*command, "--set", f"model.path={folder}", "--set", f"model.tokenizer_path={folder}"]
    out = subprocess.run(
        [sys.executable, "-m", "mimo_voice.transports.cli", *argv], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mimo-voice: ") and "delay_pattern" in last
    assert "Traceback" not in out.stderr
