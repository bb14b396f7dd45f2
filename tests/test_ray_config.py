"""The Ray backend around the server without a cluster: configuration errors in one line, and how the server
treats a pool whose engines are all down (a stand-in pool: no Ray needed)."""

import os
import subprocess
import sys
import time

import httpx
import pytest
from mimo_voice.configs import load_config
from mimo_voice.transports.server import create_app
from mimo_voice.transports.sessions import Refused


class DownPool:
    """What the server reads of an :class:`~mimo_voice.streaming.cluster.pool.EnginePool` whose engines are down."""

    is_tiny = True

    def status(self):
        return {"backend": "ray", "engines": 2, "ready": 0, "per_engine": []}

    def lease(self):
        return None

    def busy_message(self):
        return "every engine is full or down (0/2 ready), try again later"

    def metrics(self):
        yield 'mimo_voice_engine_ready{engine="mimo-engine-0"} 0\n'


async def never_runs(transport, ctx):
    raise AssertionError("no call gets through to a bot here")


async def test_health_is_503_while_no_engine_of_the_pool_is_ready():
    app = create_app(load_config(None, ["engine.backend=ray"]), engine=DownPool(), run_bot=never_runs)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        health = await http.get("/health")
        metrics = (await http.get("/metrics")).text
    assert health.status_code == 503
    assert health.json()["status"] == "engine_down" and health.json()["engines"]["ready"] == 0
    assert 'mimo_voice_engine_ready{engine="mimo-engine-0"} 0' in metrics
    with pytest.raises(Refused) as refused:
        app.state.hub.reserve("webrtc", client=None)
    assert refused.value.status == 503
    assert app.state.hub.busy_message().startswith("every engine is full or down (0/2 ready)")
    assert app.state.hub.metrics.sessions_refused.value("engines_full") == 1


def no_local_ray_cluster(wait_secs: float = 30.0) -> bool:
    """Whether no Ray cluster runs on this machine, waiting a while for one that is shutting down.

    ``ray_address=auto`` joins any local cluster it finds by its processes, not only by address files."""
    from ray._private.services import find_gcs_addresses

    deadline = time.monotonic() + wait_secs
    while find_gcs_addresses():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.xdist_group("ray")  # with test_ray_pool, whose private cluster "auto" would join
def test_ray_backend_without_a_cluster_fails_in_one_line():
    pytest.importorskip("ray")
    if not no_local_ray_cluster():
        pytest.skip("a Ray cluster runs on this machine, and ray_address=auto joins it")
    command = [sys.executable, "-m", "mimo_voice.transports.cli", "engines", "--set", "engine.ray_address=auto"]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mimo-voice: engine.ray_address=auto: no Ray cluster there (start one with `ray start")
