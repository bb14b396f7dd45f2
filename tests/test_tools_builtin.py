"""Built-in tools: current time, calculator, end of call."""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from mimo_voice.tools import END_CALL_TOOL, ToolCallError, ToolRegistry
from mimo_voice.tools.builtin import GENERAL_TOOLS


@pytest.fixture
def registry() -> ToolRegistry:
    registry = ToolRegistry(timeout_secs=5.0)
    for tool in GENERAL_TOOLS.values():
        registry.add(tool)
    return registry


def iso_time(result: str) -> datetime:
    return datetime.fromisoformat(result.rsplit("ISO 8601: ", 1)[1])


@pytest.mark.parametrize(("zone", "offset"), [("Asia/Kolkata", timedelta(hours=5, minutes=30)), ("UTC", timedelta(0))])
async def test_current_time_in_a_time_zone(registry, zone, offset):
    result = await registry.call("current_time", {"timezone": zone})
    stamp = iso_time(result)
    assert stamp.utcoffset() == offset and zone in result
    assert abs(stamp - datetime.now(ZoneInfo(zone))) < timedelta(minutes=5)
    assert stamp.strftime("%A") in result


async def test_current_time_defaults_to_the_server_zone(registry):
    stamp = iso_time(await registry.call("current_time", {}))
    assert stamp.utcoffset() == datetime.now().astimezone().utcoffset()


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd"])
async def test_unknown_time_zone(registry, zone):
    with pytest.raises(ToolCallError, match="unknown time zone"):
        await registry.call("current_time", {"timezone": zone})


async def test_calculator_tool(registry):
    assert await registry.call("calculator", {"expression": "(3 + 4.5) * 2^3"}) == "(3 + 4.5) * 2^3 = 60"
    with pytest.raises(ToolCallError, match="calculator failed: division by zero"):
        await registry.call("calculator", {"expression": "1/0"})
    with pytest.raises(ToolCallError, match="unknown name 'y'"):
        await registry.call("calculator", {"expression": "y * 2"})


async def test_end_call_says_the_call_is_ending(registry):
    assert END_CALL_TOOL in registry.names
    result = await registry.call(END_CALL_TOOL, {"reason": "user said bye"})
    assert "call ends" in result and "goodbye" in result


@pytest.mark.parametrize("zone", ["Europe/" + "x" * 300, "../../etc/passwd", "Mars/Olympus_Mons"])
async def test_a_bad_time_zone_is_refused_without_internals(registry, zone):
    with pytest.raises(ToolCallError, match="unknown time zone") as error:
        await registry.call("current_time", {"timezone": zone})
    assert "/usr" not in str(error.value) and "site-packages" not in str(error.value)
