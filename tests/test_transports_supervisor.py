"""EngineSupervisor with scripted engines: deaths, stalls, idle engines, loads that keep failing, backoff."""

from __future__ import annotations

import asyncio
import time

from mimo_voice.configs import load_config
from mimo_voice.transports.metrics import ServerMetrics
from mimo_voice.transports.operations import Gate
from mimo_voice.transports.supervisor import RESTART_MESSAGE, EngineSupervisor
from transports_support import wait_until


class FakeEngine:
    def __init__(self) -> None:
        self.last_progress = time.monotonic()
        self.has_pending_work = False
        self.exit_code: int | None = None
        self.killed = self.closed = False
        self._ended = asyncio.Event()

    def is_alive(self) -> bool:
        return self.exit_code is None

    def end(self, code: int) -> None:
        self.exit_code = code
        self._ended.set()

    def kill(self) -> None:
        self.killed = True
        self.end(-9)

    async def wait_closed(self) -> int:
        await self._ended.wait()
        return self.exit_code

    async def aclose(self) -> None:
        self.closed = True


class Harness:
    def __init__(self, *overrides: str, failures: int = 0) -> None:
        backoff = ["engine.restart_backoff_secs=0.1", "engine.restart_backoff_max_secs=0.8"]
        self.config = load_config(None, [*backoff, *overrides])
        self.gate, self.metrics = Gate(), ServerMetrics()
        self.states: list[tuple[str, str]] = []
        set_engine = self.gate.set_engine
        self.gate.set_engine = lambda status, detail="": (
            self.states.append((status, detail)),
            set_engine(status, detail),
        )
        self.engines: list[FakeEngine] = []
        self.current: FakeEngine | None = None
        self.ended_calls: list[str] = []
        self.load_times: list[float] = []
        self.failures = failures
        self.supervisor = EngineSupervisor(
            self.config,
            load=self.load,
            gate=self.gate,
            metrics=self.metrics,
            on_engine=self.use,
            end_calls=self.end_calls,
        )

    def load(self, _config) -> FakeEngine:
        self.load_times.append(time.monotonic())
        if self.failures:
            self.failures -= 1
            raise OSError("no such checkpoint: /models/missing")
        engine = FakeEngine()
        self.engines.append(engine)
        return engine

    def use(self, engine: FakeEngine | None) -> None:
        self.current = engine

    async def end_calls(self, reason: str) -> None:
        self.ended_calls.append(reason)

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.supervisor.run())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_a_dead_engine_is_seen_at_once_calls_end_and_it_comes_back():
    async with Harness() as harness:
        assert await wait_until(lambda: harness.gate.health()[0] == 200, 2)
        first = harness.current
        assert harness.metrics.engine_up.value() == 1
        first.end(-9)  # as an OOM kill
        assert await wait_until(lambda: harness.gate.engine_status == "engine_down", 1)
        assert harness.gate.health() == (503, {"status": "engine_down", "detail": harness.gate.engine_detail})
        assert "exited (status -9)" in harness.gate.engine_detail
        assert harness.gate.refusal().retry_after > 0
        assert harness.metrics.engine_up.value() == 0
        assert await wait_until(lambda: harness.ended_calls == [RESTART_MESSAGE], 1)
        assert await wait_until(lambda: harness.current is not None and harness.current is not first, 2)
        assert harness.gate.health()[0] == 200
        assert first.closed
        assert harness.metrics.engine_restarts.value() == 1
        assert harness.metrics.engine_up.value() == 1


async def test_a_stalled_step_loop_is_killed_and_restarted():
    async with Harness("engine.watchdog_secs=0.3") as harness:
        assert await wait_until(lambda: harness.current is not None, 2)
        stuck = harness.current
        stuck.has_pending_work = True
        stuck.last_progress = time.monotonic()
        assert await wait_until(lambda: stuck.killed, 2)
        assert any("stalled" in detail for status, detail in harness.states if status == "engine_down")
        assert await wait_until(lambda: harness.current is not None and harness.current is not stuck, 2)
        assert harness.metrics.engine_restarts.value() == 1


async def test_an_idle_engine_is_not_a_stalled_one():
    async with Harness("engine.watchdog_secs=0.2") as harness:
        assert await wait_until(lambda: harness.current is not None, 2)
        idle = harness.current
        idle.last_progress = time.monotonic() - 3600  # nothing to do for an hour: fine
        await asyncio.sleep(1.0)  # five watchdog periods; a negative needs waiting
        assert not idle.killed and harness.current is idle
        assert harness.gate.health()[0] == 200


async def test_a_load_that_keeps_failing_stays_visible_and_backs_off():
    async with Harness(failures=4) as harness:
        assert await wait_until(lambda: len(harness.load_times) >= 4, 5)
        status, body = harness.gate.health()
        assert status == 503 and body["status"] in ("engine_down", "loading")
        assert await wait_until(lambda: "no such checkpoint" in harness.gate.engine_detail, 1)
        gaps = [b - a for a, b in zip(harness.load_times, harness.load_times[1:])]
        assert gaps[2] > gaps[0] * 2  # exponential: 0.1, 0.2, 0.4 s (and the cap, 0.8)
        assert await wait_until(lambda: harness.current is not None, 5)  # the fifth load works
        assert harness.gate.health()[0] == 200
        assert harness.metrics.engine_load_failures.value() == 4
        assert harness.metrics.engine_restarts.value() == 0


async def test_shutdown_closes_the_engine():
    harness = Harness()
    async with harness:
        assert await wait_until(lambda: harness.current is not None, 2)
    assert harness.engines[0].closed
