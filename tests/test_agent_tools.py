"""Tool calls from the model's text stream, run through pipecat's function calling and the tool registry."""

from __future__ import annotations

import asyncio
import json

from agent_harness import Agent, spoken, tool_call, wait_until
from langchain_core.tools import tool
from loguru import logger
from mimo_voice.configs import load_config
from mimo_voice.tools import ToolRegistry, build_registry
from pipecat.frames.frames import (
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    LLMFullResponseEndFrame,
    TTSTextFrame,
)
from pipecat.services.llm_service import FunctionCallParams

calls: list[dict] = []


@tool
def weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: The city.
    """
    calls.append({"tool": "weather", "city": city})
    return f"Sunny in {city}, 21 degrees"


async def book_table(params: FunctionCallParams, people: int, time: str):
    """Book a table at the restaurant.

    Args:
        people: How many people.
        time: When, e.g. "19:30".
    """
    calls.append({"tool": "book_table", "people": people, "time": time})
    await params.result_callback({"booked": True, "people": people, "time": time})


@tool
def flaky() -> str:
    """A tool that breaks."""
    calls.append({"tool": "flaky"})
    raise RuntimeError("database is down")


@tool
async def slow() -> str:
    """A tool that never answers in time."""
    calls.append({"tool": "slow"})
    await asyncio.sleep(30)
    return "too late"


def registry() -> ToolRegistry:
    calls.clear()
    tools = ToolRegistry(timeout_secs=10.0)
    for item in (weather, book_table, flaky):
        tools.add(item)
    tools.add(slow, timeout_secs=0.3)
    return tools


def spoken_text(agent: Agent) -> str:
    return "".join(f.text for f in agent.pushed(TTSTextFrame))


async def converse(answers, *, responses: int) -> Agent:
    agent = Agent(answers, tools=registry())
    async with agent:
        await agent.user_says()
        await agent.responses_done(responses)
        await agent.played_out()
    return agent


async def test_tools_are_listed_in_the_system_prompt():
    agent = Agent([], tools=registry())
    async with agent:
        pass
    prompt = agent.engine.opened[0]["system_prompt"]
    assert prompt.startswith(agent.config.agent.system_prompt)
    for name in ("weather", "book_table", "flaky", "slow"):
        assert f'"name": "{name}"' in prompt
    assert "<tool_call>" in prompt


async def test_langchain_tool_runs_once_and_speech_resumes_with_its_result():
    raw = '{"name": "weather", "arguments": {"city": "Paris"}}'
    agent = await converse(
        [tool_call(raw, ack=["Let", " me", " check", "."]), spoken(["It", " is", " sunny"])], responses=2
    )
    assert calls == [{"tool": "weather", "city": "Paris"}]
    session = agent.session
    ((_, role, result),) = session.called("add_text")
    assert role == "tool" and result == "Sunny in Paris, 21 degrees"
    first, second = session.called("respond")
    assert session.calls.index(first) < session.calls.index(("add_text", role, result)) < session.calls.index(second)
    # The acknowledgement and the answer are spoken; nothing of the call is.
    assert spoken_text(agent) == "Let me check.It is sunny"
    messages = agent.context.messages
    call_message = next(m for m in messages if m.get("tool_calls"))
    assert call_message["tool_calls"][0]["function"]["name"] == "weather"
    assert json.loads(call_message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    call_id = call_message["tool_calls"][0]["id"]
    assert {"role": "tool", "content": json.dumps(result), "tool_call_id": call_id} in messages
    assert messages[-1] == {"role": "assistant", "content": "It is sunny"}


async def test_pipecat_direct_function_works_as_a_tool():
    raw = '{"name": "book_table", "arguments": {"people": 4, "time": "19:30"}}'
    agent = await converse([tool_call(raw), spoken(["Booked"])], responses=2)
    assert calls == [{"tool": "book_table", "people": 4, "time": "19:30"}]
    ((_, _, result),) = agent.session.called("add_text")
    assert json.loads(result) == {"booked": True, "people": 4, "time": "19:30"}
    assert spoken_text(agent) == "Booked"


async def _bad_call(raw: str) -> tuple[Agent, dict]:
    agent = await converse([tool_call(raw), spoken(["Sorry", ",", " I", " could", " not"])], responses=2)
    ((_, role, text),) = agent.session.called("add_text")
    assert role == "tool"
    assert spoken_text(agent) == "Sorry, I could not"
    return agent, json.loads(text)


async def test_malformed_call_is_answered_with_the_error_and_the_model_speaks_again():
    agent, result = await _bad_call('{"name": "weather", "arguments": {"city": ')
    assert "not valid JSON" in result["error"]
    assert not calls and not agent.pushed(FunctionCallInProgressFrame)


async def test_unknown_tool_is_answered_with_the_error():
    agent, result = await _bad_call('{"name": "teleport", "arguments": {}}')
    assert 'Unknown tool "teleport"' in result["error"] and "weather" in result["error"]
    assert not calls and not agent.pushed(FunctionCallInProgressFrame)


async def test_raising_tool_tells_the_model_it_failed_and_the_log_why():
    messages = []
    handler = logger.add(messages.append, level="DEBUG", format="{level} {message}")
    try:
        _agent, result = await _bad_call('{"name": "flaky", "arguments": {}}')
    finally:
        logger.remove(handler)
    assert calls == [{"tool": "flaky"}]
    assert "flaky failed because of an internal error" in result["error"]
    assert "database is down" not in result["error"]  # internals stay out of the model's context and the page
    assert any(m.startswith("DEBUG") and "database is down" in m for m in messages)


async def test_info_logs_carry_no_tool_arguments_results_or_thinking():
    messages = []
    handler = logger.add(messages.append, level="DEBUG", format="{level.no} {message}")
    raw = '{"name": "weather", "arguments": {"city": "Tegucigalpa"}}'
    try:
        await converse([tool_call(raw), spoken(["It", " is", " sunny"], thinking=["Secret", "-plan"])], responses=2)
    finally:
        logger.remove(handler)
    info_and_above = [m for m in messages if int(m.split(" ", 1)[0]) >= 20]
    assert any("tool call weather" in m for m in info_and_above)  # what happened is still at INFO
    for private in ("Tegucigalpa", "Sunny in", "Secret-plan"):
        assert not any(private in m for m in info_and_above), private
        assert any(private in m for m in messages), f"{private} is not even at DEBUG"


async def test_tool_timeout_tells_the_model():
    _agent, result = await _bad_call('{"name": "slow", "arguments": {}}')
    assert calls == [{"tool": "slow"}]
    assert "did not answer within 0.3 seconds" in result["error"]


async def test_bad_arguments_reach_the_model_as_an_error():
    _agent, result = await _bad_call('{"name": "weather", "arguments": {"town": "Paris"}}')
    assert not calls
    assert "missing argument 'city'" in result["error"]


async def test_a_model_that_keeps_calling_tools_is_stopped():
    bad = tool_call('{"name": "nope", "arguments": {}}')
    agent = Agent([bad, bad, bad, bad, spoken(["never"])], tools=registry())
    warnings: list[str] = []
    sink = logger.add(warnings.append, level="WARNING", format="{message}")
    try:
        async with agent:
            await agent.user_says()
            await agent.responses_done(4)
            # The service's decision not to answer the fourth call is the event to wait for, not a pause.
            await wait_until(lambda: any("tool calls in one turn" in w for w in warnings), what="the cap")
    finally:
        logger.remove(sink)
    assert len(agent.session.called("respond")) == 4
    assert len(agent.session.called("add_text")) == 3


async def test_end_call_ends_the_pipeline_after_the_goodbye():
    tools = build_registry(load_config(None).tools, timeout_secs=10.0)
    agent = Agent(
        [tool_call('{"name": "end_call", "arguments": {"reason": "bye"}}'), spoken(["Goodbye", "!"])], tools=tools
    )
    async with agent:
        await agent.user_says()
        await wait_until(lambda: agent.harness.finished, what="the pipeline to end by itself")
    assert spoken_text(agent) == "Goodbye!"
    assert len(agent.pushed(LLMFullResponseEndFrame)) == 2
    assert [f.function_name for f in agent.pushed(FunctionCallResultFrame)] == ["end_call"]
