import asyncio
import json
from dataclasses import dataclass, field

import pytest
from langchain_core.tools import BaseTool, tool
from mimo_voice.configs import ConfigError, load_config
from mimo_voice.tools import END_CALL_TOOL, ToolCallError, ToolRegistry, build_registry, parse_tool_call, tools_prompt
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import DataFrame, FunctionCallFromLLM, FunctionCallResultFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.llm_service import FunctionCallParams, FunctionCallResultProperties, LLMService
from pipecat.services.settings import LLMSettings
from pipecat.tests.utils import SleepFrame, run_test
from pydantic import BaseModel, Field


@tool(parse_docstring=True)
def add_numbers(a: int, b: int = 2) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


async def get_weather(params: FunctionCallParams, city: str, unit: str = "celsius"):
    """Current weather in a city.

    Args:
        city: The city's name.
        unit: celsius or fahrenheit.
    """
    await params.result_callback({"city": city, "unit": unit, "temperature": 21})


async def spell_word(params: FunctionCallParams):
    await params.result_callback({"letters": list(params.arguments["word"])})


SPELL_SCHEMA = FunctionSchema(
    name="spell_word",
    description="Spell a word letter by letter.",
    properties={"word": {"type": "string"}},
    required=["word"],
)


@tool
def broken_tool() -> str:
    """Always fails."""
    raise RuntimeError("disk on fire")


@tool
async def slow_tool() -> str:
    """Never answers in time."""
    await asyncio.sleep(30)
    return "too late"


async def silent_function(params: FunctionCallParams):
    """Forgets to report a result."""


@pytest.fixture
def registry() -> ToolRegistry:
    registry = ToolRegistry(timeout_secs=5.0)
    registry.add(add_numbers)
    registry.add(get_weather)
    registry.add((SPELL_SCHEMA, spell_word))
    registry.add(broken_tool)
    registry.add(slow_tool, timeout_secs=0.05)
    registry.add(silent_function)
    return registry


def test_schemas_from_a_langchain_tool_and_a_pipecat_direct_function(registry):
    schemas = {schema["name"]: schema for schema in registry.schemas()}
    assert registry.names[:3] == ["add_numbers", "get_weather", "spell_word"]
    assert schemas["add_numbers"]["description"] == "Add two integers."
    assert schemas["add_numbers"]["parameters"]["properties"]["a"] == {
        "description": "The first number.",
        "type": "integer",
    }
    assert schemas["add_numbers"]["parameters"]["required"] == ["a"]
    assert schemas["get_weather"]["description"] == "Current weather in a city."
    assert schemas["get_weather"]["parameters"]["properties"]["city"]["type"] == "string"
    assert schemas["get_weather"]["parameters"]["required"] == ["city"]
    assert schemas["spell_word"] == SPELL_SCHEMA.to_default_dict()


def test_pipecat_tools_schema_advertises_without_handlers(registry):
    tools = registry.tools_schema()
    assert isinstance(tools, ToolsSchema)
    assert [schema.name for schema in tools.standard_tools] == registry.names
    # Handlers would make pipecat auto-register the tools, bypassing the registry's timeouts and error handling.
    assert all(schema.handler is None for schema in tools.standard_tools) and not tools.direct_functions


async def test_langchain_tool_runs_with_validated_arguments(registry):
    assert await registry.call("add_numbers", {"a": 40}) == "42"
    assert await registry.call("add_numbers", {"a": "40", "b": 1}) == "41"  # pydantic coerces "40"


async def test_direct_function_answers_through_its_result_callback(registry):
    result = json.loads(await registry.call("get_weather", {"city": "Paris"}))
    assert result == {"city": "Paris", "unit": "celsius", "temperature": 21}


class RepeatArgs(BaseModel):
    text: str = Field(description="What to repeat.")
    times: int = Field(2, ge=1, le=5, description="How often.")


class RepeatTool(BaseTool):
    name: str = "repeat"
    description: str = "Repeat a text."
    args_schema: type[BaseModel] = RepeatArgs

    def _run(self, text: str, times: int = 2) -> str:
        return " ".join([text] * times)

    async def _arun(self, text: str, times: int = 2) -> str:
        return self._run(text, times)


async def test_a_langchain_base_tool_subclass():
    registry = ToolRegistry()
    registry.add(RepeatTool())
    (schema,) = registry.schemas()
    assert schema["parameters"]["properties"]["times"]["maximum"] == 5 and schema["parameters"]["required"] == ["text"]
    assert await registry.call("repeat", {"text": "hi", "times": 3}) == "hi hi hi"
    with pytest.raises(ToolCallError, match="times: Input should be less than or equal to 5"):
        await registry.call("repeat", {"text": "hi", "times": 9})


async def test_function_schema_with_handler(registry):
    assert json.loads(await registry.call("spell_word", {"word": "abc"})) == {"letters": ["a", "b", "c"]}
    carrying = ToolRegistry()
    carrying.add(FunctionSchema("spell", "Spell.", {"word": {"type": "string"}}, ["word"], handler=spell_word))
    assert json.loads(await carrying.call("spell", {"word": "ok"})) == {"letters": ["o", "k"]}


async def test_only_the_final_result_of_a_pipecat_handler_counts():
    async def progress(params: FunctionCallParams):
        """Reports progress, then the result."""
        await params.result_callback("half way", properties=FunctionCallResultProperties(is_final=False))
        await params.result_callback("done")

    registry = ToolRegistry()
    registry.add(progress)
    assert await registry.call("progress", {}) == "done"


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("weather", {}, 'Unknown tool "weather"'),
        ("add_numbers", {}, "missing argument 'a'"),
        ("add_numbers", {"a": 1, "c": 2}, "unknown argument 'c'"),
        ("add_numbers", {"a": "forty"}, "Invalid arguments for add_numbers: a: Input should be a valid integer"),
        ("get_weather", {"town": "Paris"}, "unknown argument 'town'; missing argument 'city'"),
        ("broken_tool", {}, "broken_tool failed: disk on fire"),
        ("slow_tool", {}, "slow_tool did not answer within 0.05 seconds"),
        ("silent_function", {}, "silent_function finished without reporting a result"),
    ],
)
async def test_failures_become_tool_call_errors_for_the_model(registry, name, arguments, message):
    with pytest.raises(ToolCallError, match=message):
        await registry.call(name, arguments)


async def test_a_direct_function_that_raises():
    async def explode(params: FunctionCallParams):
        """Raises."""
        raise KeyError("missing record")

    registry = ToolRegistry()
    registry.add(explode)
    with pytest.raises(ToolCallError, match="explode failed: 'missing record'"):
        await registry.call("explode", {})


async def test_a_timed_out_direct_function_is_cancelled():
    cancelled = asyncio.Event()

    async def hang(params: FunctionCallParams):
        """Hangs."""
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    registry = ToolRegistry(timeout_secs=0.05)
    registry.add(hang)
    with pytest.raises(ToolCallError, match="did not answer"):
        await registry.call("hang", {})
    assert cancelled.is_set()


def test_add_rejects_duplicates_and_non_tools():
    registry = ToolRegistry()
    registry.add(add_numbers)
    with pytest.raises(ValueError, match="already registered"):
        registry.add(add_numbers)
    with pytest.raises(TypeError, match="cannot use"):
        registry.add(42)
    with pytest.raises(TypeError, match="direct function"):
        registry.add(lambda x: x)  # not async, first parameter not `params`
    with pytest.raises(ValueError, match="positive"):
        registry.add(get_weather, timeout_secs=0)
    assert registry.names == ["add_numbers"]


async def test_parse_then_call_end_to_end(registry):
    call = parse_tool_call('{"name": "add_numbers", "arguments": {"a": 1, "b": 1}}', registry.names)
    assert await registry.call(call.name, call.arguments) == "2"
    assert '"name": "get_weather"' in tools_prompt(registry.schemas())


# --- through pipecat's own function-call machinery -------------------------------------------------------------


@dataclass
class CallToolsFrame(DataFrame):
    calls: list[tuple[str, dict]] = field(default_factory=list)


class ScriptedLLM(LLMService):
    """An LLM service whose 'generation' is a list of tool calls, dispatched by pipecat's run_function_calls."""

    def __init__(self):
        settings = LLMSettings(
            model="scripted",
            system_instruction=None,
            temperature=None,
            max_tokens=None,
            top_p=None,
            top_k=None,
            frequency_penalty=None,
            presence_penalty=None,
            seed=None,
            filter_incomplete_user_turns=False,
            user_turn_completion_config=None,
        )
        super().__init__(settings=settings)

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, CallToolsFrame):
            context = LLMContext()
            await self.run_function_calls(
                [
                    FunctionCallFromLLM(function_name=name, tool_call_id=f"call-{i}", arguments=args, context=context)
                    for i, (name, args) in enumerate(frame.calls)
                ]
            )
        else:
            await self.push_frame(frame, direction)


async def test_register_with_answers_every_call_through_pipecat(registry):
    llm = ScriptedLLM()
    registry.register_with(llm)
    calls = [
        ("add_numbers", {"a": 2, "b": 3}),
        ("get_weather", {"city": "Oslo"}),
        ("broken_tool", {}),
        ("slow_tool", {}),
        ("add_numbers", {"a": "x"}),
    ]
    down, _ = await run_test(llm, frames_to_send=[CallToolsFrame(calls=calls), SleepFrame(sleep=0.5)])
    results = {frame.tool_call_id: frame.result for frame in down if isinstance(frame, FunctionCallResultFrame)}
    assert results["call-0"] == "5"
    assert json.loads(results["call-1"])["city"] == "Oslo"
    assert json.loads(results["call-2"]) == {"error": "broken_tool failed: disk on fire"}
    assert "did not answer" in json.loads(results["call-3"])["error"]
    assert "Input should be a valid integer" in json.loads(results["call-4"])["error"]
    assert len(results) == len(calls)


# --- from the configuration -------------------------------------------------------------------------------------


async def test_default_config_builds_the_general_tools():
    registry = build_registry(load_config("default").tools, timeout_secs=3.0)
    assert registry.names == ["current_time", "calculator", END_CALL_TOOL]
    assert await registry.call("calculator", {"expression": "6 * 7"}) == "6 * 7 = 42"
    assert "goodbye" in await registry.call(END_CALL_TOOL, {})


async def test_support_config_builds_the_demo_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    config = load_config("support")
    registry = build_registry(config.tools, timeout_secs=3.0)
    assert registry.names == config.tools.enabled
    assert json.loads(await registry.call("lookup_order", {"order_id": "A1001"}))["status"] == "delivered"
    assert (tmp_path / "mimo-voice" / config.tools.support_db).is_file()


def test_unknown_tool_in_config_is_a_config_error():
    config = load_config(None, ["tools.enabled=[calculator, teleport]"])
    with pytest.raises(ConfigError, match=r"tools\.enabled: unknown tool.*teleport"):
        build_registry(config.tools, timeout_secs=1.0)
