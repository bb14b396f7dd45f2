"""Tool calls as the model writes them: parsing, malformed calls, the tools prompt."""

import json
import re

import pytest
from mimo_voice.tools.calls import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCall,
    ToolCallError,
    parse_tool_call,
    tools_prompt,
)

KNOWN = ["calculator", "lookup_order", "end_call"]


@pytest.mark.parametrize(
    "raw",
    [
        '{"name": "lookup_order", "arguments": {"order_id": "A1001"}}',
        '\n  {"name": "lookup_order", "arguments": {"order_id": "A1001"}}  \n',
        '```json\n{"name": "lookup_order", "arguments": {"order_id": "A1001"}}\n```',
        '```\n{"name": " lookup_order ", "arguments": {"order_id": "A1001"}}```',
        '{"name": "lookup_order", "arguments": "{\\"order_id\\": \\"A1001\\"}"}',  # arguments JSON-encoded as a string
    ],
)
def test_parses_a_call_despite_whitespace_fences_and_string_arguments(raw):
    call = parse_tool_call(raw, KNOWN)
    assert call.name == "lookup_order" and call.arguments == {"order_id": "A1001"}


@pytest.mark.parametrize("raw", ['{"name": "end_call"}', '{"name": "end_call", "arguments": null}'])
def test_missing_arguments_mean_none(raw):
    assert parse_tool_call(raw, KNOWN).arguments == {}


def test_each_call_gets_its_own_id():
    raw = '{"name": "end_call", "arguments": {}}'
    ids = {parse_tool_call(raw, KNOWN).call_id for _ in range(5)}
    assert len(ids) == 5 and all(ids)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"name": "calculator", "arguments": {"expression": "1+1"}', "not valid JSON"),
        ("calculator(1+1)", "not valid JSON"),
        ("", "empty"),
        ("```\n```", "empty"),
        ('[{"name": "calculator", "arguments": {}}]', "one JSON object"),
        ('{"arguments": {"expression": "1"}}', 'no "name"'),
        ('{"name": 3, "arguments": {}}', 'no "name"'),
        ('{"name": "calculator", "arguments": [1, 2]}', '"arguments" must be a JSON object'),
        ('{"name": "calculator", "arguments": "not json"}', '"arguments" must be a JSON object'),
        ('{"name": "weather", "arguments": {}}', 'Unknown tool "weather"'),
    ],
)
def test_bad_calls_raise_a_message_for_the_model(raw, expected):
    with pytest.raises(ToolCallError, match=re.escape(expected)) as info:
        parse_tool_call(raw, KNOWN)
    assert isinstance(info.value, ValueError)


def test_errors_show_the_format_or_the_available_tools():
    with pytest.raises(ToolCallError) as malformed:
        parse_tool_call("{oops", KNOWN)
    assert TOOL_CALL_OPEN in str(malformed.value) and TOOL_CALL_CLOSE in str(malformed.value)
    with pytest.raises(ToolCallError) as unknown:
        parse_tool_call('{"name": "weather"}', KNOWN)
    assert all(name in str(unknown.value) for name in KNOWN)


def test_tool_call_is_frozen():
    call = ToolCall("calculator", {"expression": "1"}, "call_1")
    with pytest.raises(AttributeError):
        call.name = "other"  # type: ignore[misc]


def test_prompt_lists_each_schema_as_json_and_states_the_call_format():
    schemas = [
        {"name": "calculator", "description": "Compute.", "parameters": {"type": "object", "properties": {}}},
        {"name": "end_call", "description": "Hang up.", "parameters": {"type": "object", "properties": {}}},
    ]
    prompt = tools_prompt(schemas)
    listed = re.search(r"<tools>\n(.*)\n</tools>", prompt, re.DOTALL).group(1).splitlines()
    assert [json.loads(line)["function"] for line in listed] == schemas
    assert f'{TOOL_CALL_OPEN}{{"name": <function-name>, "arguments": <args-json-object>}}{TOOL_CALL_CLOSE}' in prompt


def test_a_call_written_as_the_prompt_says_parses():
    prompt = tools_prompt([{"name": "end_call", "description": "", "parameters": {"type": "object"}}])
    example = prompt.split(TOOL_CALL_OPEN)[-1].split(TOOL_CALL_CLOSE)[0]
    filled = example.replace("<function-name>", '"end_call"').replace("<args-json-object>", "{}")
    assert parse_tool_call(filled, ["end_call"]).name == "end_call"


def test_no_tools_no_prompt():
    assert tools_prompt([]) == ""
