"""Tool calls written by the model in its text stream, and the prompt that teaches the format.

MiMo-Audio's backbone is Qwen2, whose pre-training saw Qwen's tool format: the tool list as JSON lines inside
``<tools>`` tags and each call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. The official model
documents no tool support of its own, so this format is the one it is most likely to follow.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from mimo_voice.configs.errors import ToolError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_CALL_FORMAT = f'{TOOL_CALL_OPEN}{{"name": "<tool name>", "arguments": {{<JSON object>}}}}{TOOL_CALL_CLOSE}'
_CODE_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)


class ToolCallError(ToolError):
    """A tool call that could not be made or did not succeed; the message is written for the model's context."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    call_id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:16]}")


def unknown_tool_error(name: str, known: Collection[str]) -> ToolCallError:
    return ToolCallError(f'Unknown tool "{name}". Available tools: {", ".join(sorted(known)) or "none"}.')


def _strip_fences(raw: str) -> str:
    text = raw.strip()
    match = _CODE_FENCE.match(text)
    return match.group(1) if match else text


def _decode_arguments(arguments: Any) -> dict[str, Any]:
    # OpenAI-style models sometimes write the arguments as a JSON-encoded string.
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments) if arguments.strip() else {}
    if arguments is None:
        return {}
    if not isinstance(arguments, dict):
        raise ToolCallError(f'"arguments" must be a JSON object, got {json.dumps(arguments)}. Use: {_CALL_FORMAT}')
    return arguments


def parse_tool_call(raw: str, known: Collection[str]) -> ToolCall:
    """Parse the text between ``<tool_call>`` and ``</tool_call>``; raise ToolCallError saying what is wrong."""
    text = _strip_fences(raw)
    if not text:
        raise ToolCallError(f"The tool call is empty. Use: {_CALL_FORMAT}")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolCallError(f"The tool call is not valid JSON ({exc}). Use: {_CALL_FORMAT}") from None
    if not isinstance(payload, dict):
        raise ToolCallError(f"A tool call must be one JSON object. Use: {_CALL_FORMAT}")
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolCallError(f'The tool call has no "name". Use: {_CALL_FORMAT}')
    name = name.strip()
    if name not in known:
        raise unknown_tool_error(name, known)
    return ToolCall(name=name, arguments=_decode_arguments(payload.get("arguments")))


def tools_prompt(schemas: list[dict[str, Any]]) -> str:
    """The system-prompt section listing the tools (JSON schemas) and the exact call format; empty without tools."""
    if not schemas:
        return ""
    listing = "\n".join(json.dumps({"type": "function", "function": schema}, ensure_ascii=False) for schema in schemas)
    return (
        "# Tools\n\n"
        "You may call functions to help with the user's request. Their signatures are listed within <tools></tools>:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call a function, write one JSON object with the function name and its arguments within "
        f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} tags:\n"
        f'{TOOL_CALL_OPEN}{{"name": <function-name>, "arguments": <args-json-object>}}{TOOL_CALL_CLOSE}\n'
        "The call is never spoken to the user. Its result comes back in a tool turn, as text or as "
        '{"error": "..."}; then answer the user briefly, and never invent results you were not given.'
    )
