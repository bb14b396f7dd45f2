"""Tools in killable worker processes: overruns are stopped, the event loop never stalls, faults stay generic."""

import asyncio
import os
import time
from contextlib import asynccontextmanager

import pytest
from mimo_voice.configs import load_config
from mimo_voice.tools import ToolCallError, ToolRegistry, build_registry
from mimo_voice.tools.sandbox import ToolSandbox
from tool_bombs import bomb_tools

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def sandbox():
    box = ToolSandbox(bomb_tools, workers=1, memory_mb=256)
    yield box
    box.close()


def sandboxed_registry(sandbox: ToolSandbox, timeout_secs: float) -> ToolRegistry:
    registry = ToolRegistry(timeout_secs=timeout_secs)
    for tool in bomb_tools():
        registry.add(tool, sandbox=sandbox)
    return registry


@asynccontextmanager
async def lag_probe(period: float = 0.01):
    """Measures the worst event-loop stall while the body runs (in seconds, in the yielded list)."""
    worst = [0.0]

    async def probe() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(period)
            worst[0] = max(worst[0], time.perf_counter() - before - period)

    task = asyncio.create_task(probe())
    try:
        yield worst
    finally:
        task.cancel()


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def warm(registry: ToolRegistry) -> None:
    """The worker's start-up (imports) is not what the probe measures."""
    assert await registry.call("nap", {"seconds": 0}) == "rested"


@pytest.mark.parametrize("tool", ["spin", "nap"])
async def test_a_tool_past_its_timeout_is_killed_and_the_loop_never_stalls(sandbox, tool):
    registry = sandboxed_registry(sandbox, timeout_secs=0.5)
    await warm(registry)
    [pid] = sandbox.pids
    async with lag_probe() as worst:
        started = time.monotonic()
        with pytest.raises(ToolCallError, match=f"{tool} did not answer within 0.5 seconds"):
            await registry.call(tool, {"seconds": 30})
        took = time.monotonic() - started
    assert took < 2.0
    assert not is_alive(pid), "the overrunning worker still runs"
    assert worst[0] < 0.05, f"the event loop stalled {worst[0] * 1000:.0f} ms"
    await warm(registry)  # a fresh worker took its place
    assert sandbox.pids != [pid]


async def test_a_memory_bomb_fails_in_its_worker(sandbox):
    registry = sandboxed_registry(sandbox, timeout_secs=20)
    with pytest.raises(ToolCallError, match="hog failed because of an internal error"):
        await registry.call("hog", {"megabytes": 4096})
    assert await registry.call("hog", {"megabytes": 8}) == str(8 * 2**20)


async def test_internal_errors_reach_the_model_generic_and_the_log_in_detail(sandbox):
    registry = sandboxed_registry(sandbox, timeout_secs=20)
    messages = []
    from loguru import logger

    handler = logger.add(messages.append, level="DEBUG", format="{level} {message}")
    try:
        with pytest.raises(ToolCallError) as error:
            await registry.call("leak_path", {"name": "x" * 300})
    finally:
        logger.remove(handler)
    assert "/opt/secret" not in str(error.value) and "internal error" in str(error.value)
    assert any(m.startswith("DEBUG") and "/opt/secret" in m for m in messages)
    assert not any("/opt/secret" in m for m in messages if not m.startswith("DEBUG"))


async def test_calculator_bombs_through_the_server_registry():
    registry = build_registry(load_config(None).tools, timeout_secs=2.0)
    try:
        for _ in range(load_config(None).tools.workers):  # every worker has started (imports are not the bomb's time)
            await registry.call("calculator", {"expression": "1 + 1"})
        for expression in ("round(1, -10**7)", "round(1, -10**8)", "10**10**10", "9**9**9", "(2**4000)**3"):
            started = time.monotonic()
            with pytest.raises(ToolCallError, match="calculator failed: "):
                await registry.call("calculator", {"expression": expression})
            assert time.monotonic() - started < 0.5, expression
    finally:
        registry.close()
