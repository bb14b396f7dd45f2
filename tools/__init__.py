"""Tool registry and built-in tools (langchain-core tools and pipecat function schemas)."""

from .builtin import END_CALL_TOOL
from .calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, ToolCallError, parse_tool_call, tools_prompt
from .registry import ToolRegistry, build_registry

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
