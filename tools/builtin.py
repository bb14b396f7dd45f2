"""Built-in tools, as langchain-core ``@tool`` functions, and the choice of them from ``tools.enabled``."""

from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from langchain_core.tools import BaseTool, tool
from mimo_voice.configs import ConfigError
from mimo_voice.configs.schema import ToolsSection

from .calculator import evaluate, format_number
from .support import SUPPORT_TOOL_NAMES, support_tools

END_CALL_TOOL = "end_call"
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+){0,2}")  # IANA names: at most three parts, no dots


@tool(parse_docstring=True)
def current_time(timezone: str | None = None) -> str:
    """The current date and time.

    Args:
        timezone: An IANA time zone such as "Europe/Paris" or "America/New_York"; the server's local time if omitted.
    """
    if timezone and (len(timezone) > 64 or not _ZONE_NAME.fullmatch(timezone)):
        raise ValueError("unknown time zone; use an IANA name such as Europe/Paris")
    try:
        zone = ZoneInfo(timezone) if timezone else None
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as Europe/Paris") from None
    now = datetime.now(zone).astimezone(zone)  # aware in every case: astimezone(None) is the local zone
    where = timezone or "server local time"
    return f"{now:%A %d %B %Y, %H:%M} ({where}); ISO 8601: {now.isoformat(timespec='seconds')}"


@tool(parse_docstring=True)
def calculator(expression: str) -> str:
    """Compute an arithmetic expression exactly; use it instead of doing arithmetic in your head.

    Args:
        expression: Numbers, + - * / // % ** (or ^), parentheses, sqrt, abs, round, pi, e; e.g. "(3 + 4.5) * 2^3".
    """
    return f"{expression} = {format_number(evaluate(expression))}"


@tool(END_CALL_TOOL, parse_docstring=True)
def end_call(reason: str = "") -> str:
    """Hang up: end the call once the user has said goodbye or asked to end it.

    Args:
        reason: Why the call ends, in a few words.
    """
    return "The call ends after your next reply. Say a short, friendly goodbye now, and nothing else."


GENERAL_TOOLS: dict[str, BaseTool] = {t.name: t for t in (current_time, calculator, end_call)}
KNOWN_TOOLS = (*GENERAL_TOOLS, *SUPPORT_TOOL_NAMES)


def enabled_tools(tools_config: ToolsSection) -> list[BaseTool]:
    """The tools ``tools.enabled`` names, in its order; the support database is opened only when one needs it."""
    unknown = [name for name in tools_config.enabled if name not in KNOWN_TOOLS]
    if unknown:
        raise ConfigError(f"tools.enabled: unknown tool(s) {', '.join(unknown)}; known: {', '.join(KNOWN_TOOLS)}")
    names = list(dict.fromkeys(tools_config.enabled))
    available = dict(GENERAL_TOOLS)
    if any(name in SUPPORT_TOOL_NAMES for name in names):
        limit = tools_config.support_max_tickets_per_hour
        available.update((t.name, t) for t in support_tools(tools_config.support_db, max_tickets_per_hour=limit))
    return [available[name] for name in names]
