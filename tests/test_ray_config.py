"""The Ray backend's configuration errors: one line, no traceback (no cluster is started here)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("ray")


def test_ray_backend_without_a_cluster_fails_in_one_line():
    command = [sys.executable, "-m", "mimo_voice.transports.cli", "engines", "--set", "engine.ray_address=auto"]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mimo-voice: engine.ray_address=auto: no Ray cluster there (start one with `ray start")
