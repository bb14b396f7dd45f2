"""One loguru set-up for every process (the CLI, the engine worker, benchmark callers)."""

from __future__ import annotations

import sys

from loguru import logger

LOG_FORMAT = "{time:HH:mm:ss.SSS} | {level: <7} | {name}: {message}"


def setup_logging(level: str) -> None:
    """One stderr sink at ``level`` for us and pipecat (which logs at DEBUG by default)."""
    logger.remove()
    logger.add(sys.stderr, level=level, format=LOG_FORMAT)
