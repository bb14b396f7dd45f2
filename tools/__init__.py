"""Tool registry and built-in tools (langchain-core tools and pipecat function schemas).

Names are imported on first use, so that a tool worker process (tools/sandbox.py) that imports only the built-in
tools does not load pipecat.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .builtin import END_CALL_TOOL
    from .calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, ToolCallError, parse_tool_call, tools_prompt
    from .registry import ToolRegistry, build_registry

_EXPORTS = {
    "END_CALL_TOOL": "builtin",
    "TOOL_CALL_CLOSE": "calls",
    "TOOL_CALL_OPEN": "calls",
    "ToolCall": "calls",
    "ToolCallError": "calls",
    "parse_tool_call": "calls",
    "tools_prompt": "calls",
    "ToolRegistry": "registry",
    "build_registry": "registry",
}

__all__ = [
    "END_CALL_TOOL",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ToolCall",
    "ToolCallError",
    "ToolRegistry",
    "build_registry",
    "parse_tool_call",
    "tools_prompt",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
