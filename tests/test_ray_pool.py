"""Scale-out on Ray: two tiny engines as actors of a local cluster, calls placed on them, one engine killed."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")
# A private Ray cluster and two engines: about two minutes on two busy cores. The "ray" group keeps this module on
# the xdist worker that runs test_ray_config first, whose "no cluster" test would otherwise find this cluster.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

from mimo_voice.configs import load_config  # noqa: E402
from mimo_voice.streaming.bench.engine import ForcedAudio  # noqa: E402
from mimo_voice.streaming.cluster.pool import EnginePool, connect_ray  # noqa: E402
from mimo_voice.streaming.engine.engine import EngineClosed  # noqa: E402
from mimo_voice.streaming.engine.events import AudioPatch, TurnEnd  # noqa: E402
from transports_support import wait_until  # noqa: E402

LIMIT = 3  # calls per engine


@pytest.fixture(scope="module")
def pool():
    """A private two-CPU Ray cluster with two tiny engines on CPU (one CPU each), shared by this module."""
    from mimo_voice.streaming.presets.tiny_training import ensure_preset_checkpoints

    config = load_config(
        None,
        [
            "model.device=cpu",
            "engine.backend=ray",
            "engine.ray_address=local",
            "engine.ray_engines=2",
            f"engine.sessions_per_engine={LIMIT}",
            "engine.ray_health_timeout_secs=2.5",
            "agent.max_new_groups=3000",
        ],
    )
    ensure_preset_checkpoints(config.model.preset, config.model.cache_dir)  # built once here, not by both actors
    connect_ray(config, num_cpus=2)
    engines = EnginePool.connect(config, wait_secs=300, testing=True)  # tests set text hooks
    assert engines.wait_ready(2, 300)
    try:
        yield engines
    finally:
        asyncio.run(engines.aclose())
        ray.shutdown()


def names(leases) -> collections.Counter:
    return collections.Counter(lease.name for lease in leases)


async def first_audio(events) -> None:
    async for event in events:
        if isinstance(event, AudioPatch):
            return
    raise AssertionError("the response ended before its first audio patch")


async def audio_after(events, moment: float) -> None:
    """Reads a response until an audio patch generated after ``moment`` (perf_counter, the same clock on
    this machine in every process)."""
    async for event in events:
        if isinstance(event, AudioPatch) and event.time > moment:
            return
        assert not isinstance(event, TurnEnd), f"the response ended: {event}"


async def until_end(events) -> TurnEnd:
    async for event in events:
        if isinstance(event, TurnEnd):
            return event
    raise AssertionError("the response stream ended without a TurnEnd")


async def test_four_calls_spread_two_and_two(pool):
    leases = [pool.lease() for _ in range(4)]
    try:
        assert names(leases) == {"mimo-engine-0": 2, "mimo-engine-1": 2}
        sessions = [lease.new_session() for lease in leases]
        await asyncio.gather(*(session.caught_up() for session in sessions))
        # Each engine itself reports the two sessions (what other front-ends place by).
        loads = {member.name: member.engine.channel.load["sessions"] for member in pool.members}
        assert await wait_until(lambda: all(member.load == 2 for member in pool.members), timeout=5), loads
        for session in sessions:
            await session.close()
        assert await wait_until(
            lambda: all(member.engine.channel.load["sessions"] == 0 for member in pool.members), timeout=5
        )
    finally:
        for lease in leases:
            lease.release()


async def test_killed_engine_ends_its_calls_others_go_on_and_it_comes_back(pool):
    leases = [pool.lease() for _ in range(4)]
    assert names(leases) == {"mimo-engine-0": 2, "mimo-engine-1": 2}
    sessions = [lease.new_session() for lease in leases]
    for lease, session in zip(leases, sessions):
        session.text_hook = ForcedAudio(lease.engine.special, patches=100_000)  # speaks until cancelled
    responses = [session.respond() for session in sessions]
    await asyncio.gather(*(first_audio(events) for events in responses))

    victim = pool.members[0]
    on_victim = [i for i, lease in enumerate(leases) if lease.name == victim.name]
    survivors = [i for i in range(4) if i not in on_victim]
    restarts = victim.restarts
    killed = time.perf_counter()
    os.kill(victim.engine.info.pid, signal.SIGKILL)

    ends = await asyncio.wait_for(asyncio.gather(*(until_end(responses[i]) for i in on_victim)), timeout=5)
    ended_within = time.perf_counter() - killed
    for end in ends:
        assert end.reason == "error" and victim.name in end.error
    reasons = await asyncio.wait_for(asyncio.gather(*(leases[i].wait_closed() for i in on_victim)), 1)
    assert all(victim.name in reason for reason in reasons)
    assert ended_within < 5

    # The other two calls go on: they still produce audio after their neighbours' calls ended.
    ended = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(audio_after(responses[i], ended) for i in survivors)), timeout=10)
    for i in survivors:
        await sessions[i].cancel()
        end = await until_end(responses[i])
        assert end.reason == "cancelled"
    with pytest.raises(EngineClosed):
        await sessions[on_victim[0]].add_text("user", "anyone there?")

    # New calls avoid the dead engine until Ray has restarted it and it has reported ready.
    assert not victim.ready.is_set()
    newcomer = pool.lease()
    assert newcomer is not None and newcomer.name == "mimo-engine-1"
    assert await asyncio.to_thread(victim.ready.wait, 120)
    assert victim.restarts == restarts + 1
    returning = pool.lease()
    assert returning is not None and returning.name == victim.name  # now the one with the most room
    session = returning.new_session()
    await session.add_text("user", "hello again")
    end = await until_end(session.respond())
    assert end.reason in ("stop", "length")

    await session.close()
    for i in survivors:
        await sessions[i].close()
    for i in on_victim:
        with contextlib.suppress(EngineClosed):
            await sessions[i].close()
    for lease in [*leases, newcomer, returning]:
        lease.release()


async def test_hung_engine_fails_its_health_check_ends_its_call_and_is_restarted(pool):
    assert await asyncio.to_thread(pool.wait_ready, 2, 180)
    victim = pool.members[1]
    leases = [pool.lease(), pool.lease()]  # one on each engine
    lease = next(lease for lease in leases if lease.name == victim.name)
    session = lease.new_session()
    session.text_hook = ForcedAudio(lease.engine.special, patches=100_000)
    events = session.respond()
    await first_audio(events)
    restarts = victim.restarts

    hung = time.perf_counter()
    os.kill(victim.engine.info.pid, signal.SIGSTOP)  # alive to the OS, silent to the pool
    end = await asyncio.wait_for(until_end(events), timeout=5)
    assert end.reason == "error" and "no heartbeat" in end.error and victim.name in end.error
    assert time.perf_counter() - hung < 5
    assert await asyncio.to_thread(victim.ready.wait, 120)  # killed by the pool, restarted by Ray
    assert victim.restarts == restarts + 1
    for each in leases:
        each.release()


async def test_a_silent_front_end_loses_its_sessions_and_others_keep_theirs(pool):
    from mimo_voice.streaming.cluster.actor import CLIENT_TIMEOUT_SECS
    from mimo_voice.streaming.cluster.pool import RemoteEngine

    assert await asyncio.to_thread(pool.wait_ready, 2, 180)
    member = pool.members[0]
    handle = member.handle
    # A second front-end that connects, opens a call, then stops touching the engine (as if it died).
    gone = RemoteEngine(pool.config, handle, await asyncio.to_thread(ray.get, handle.connect.remote()))
    orphan = gone.new_session()
    await orphan.caught_up()
    leases = [pool.lease(), pool.lease()]  # one on each engine
    kept = next(lease for lease in leases if lease.name == member.name).new_session()
    await kept.caught_up()
    assert await wait_until(lambda: member.engine.channel.load["sessions"] == 2, timeout=5)

    assert await wait_until(lambda: gone.down.is_set(), timeout=CLIENT_TIMEOUT_SECS + 5)
    assert await wait_until(lambda: member.engine.channel.load["sessions"] == 1, timeout=5)
    await kept.add_text("user", "still here?")  # this front-end's call goes on
    await kept.close()
    for each in leases:
        each.release()


async def test_overfull_pool_refuses_new_calls(pool):
    assert await asyncio.to_thread(pool.wait_ready, 2, 180)
    leases = [pool.lease() for _ in range(2 * LIMIT)]
    assert None not in leases and names(leases) == {"mimo-engine-0": LIMIT, "mimo-engine-1": LIMIT}
    assert pool.lease() is None
    assert "every engine is full" in pool.busy_message()
    leases.pop().release()
    again = pool.lease()
    assert again is not None
    for lease in [*leases, again]:
        lease.release()


async def test_server_over_a_full_pool_answers_503_and_reports_the_pool(pool):
    assert await asyncio.to_thread(pool.wait_ready, 2, 180)
    import httpx
    from aiortc import RTCPeerConnection
    from mimo_voice.transports.server import create_app

    async def never_runs(transport, ctx):
        raise AssertionError("no call gets through to a bot here")

    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
    await pc.close()
    app = create_app(pool.config, engine=pool, run_bot=never_runs)
    leases = [pool.lease() for _ in range(2 * LIMIT)]
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            refused = await http.post("/api/offer", json=offer)
            health = (await http.get("/health")).json()
            metrics = (await http.get("/metrics")).text
    finally:
        for lease in leases:
            lease.release()
    assert refused.status_code == 503
    assert refused.json()["detail"].startswith("every engine is full or down (2/2 ready)")
    assert app.state.hub.metrics.sessions_refused.value("engines_full") == 1
    engines = health["engines"]
    assert engines["engines"] == 2 and engines["ready"] == 2
    assert {row["name"]: row["sessions"] for row in engines["per_engine"]} == {
        "mimo-engine-0": LIMIT,
        "mimo-engine-1": LIMIT,
    }
    assert f'mimo_voice_engine_sessions{{engine="mimo-engine-0"}} {LIMIT}' in metrics
    assert 'mimo_voice_engine_ready{engine="mimo-engine-1"} 1' in metrics


def test_engines_command_lists_the_pool(pool, capsys):
    from mimo_voice.transports.cli import main

    assert main(["engines"]) == 0  # joins the cluster this process is already in
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "state", "sessions", "active", "device", "pid"]
    rows = [line.split() for line in lines[1:]]
    assert [row[:3] for row in rows] == [["mimo-engine-0", "ready", "0"], ["mimo-engine-1", "ready", "0"]]
    assert {int(row[5]) for row in rows} == {member.engine.info.pid for member in pool.members}


def test_bench_engine_reports_the_ray_hop_next_to_the_local_pipe(pool, tmp_path, capsys):
    import json

    from mimo_voice.streaming.bench import engine as bench

    target = tmp_path / "engine.json"
    argv = ["--backend", "ray", "--runs", "1", "--turns", "2", "--patches", "4", "--user-secs", "0.5"]
    config = pool.config.model_copy(deep=True)
    config.engine.ray_num_cpus = 0  # the bench's own engine actor fits beside the two engines on 2 CPUs
    assert bench.main(config, [*argv, "--json", str(target)]) in (0, 1)  # 1: the turn-ratio check, on a busy machine
    out = capsys.readouterr().out
    assert "the Ray hop (target: <= 2 ms added per audio group, p50)" in out
    report = json.loads(target.read_text())
    for metrics in (report["metrics"], report["ray"]["metrics"]):
        assert metrics["delivery_ms"]["n"] == 2 * 4 and 0 < metrics["delivery_ms"]["p50"] < 1000
    # The bench ran on an engine actor of its own, which is gone again; the pool's engines were not touched.
    assert asyncio.run(wait_until(lambda: "mimo-bench-engine" not in actor_names(), timeout=5))
    assert [member.load for member in pool.members] == [0, 0]


def actor_names() -> set[str]:
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}
