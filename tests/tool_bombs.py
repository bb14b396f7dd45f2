"""Tools that misbehave on purpose, for the sandbox tests (importable by spawned worker processes)."""

import time

from langchain_core.tools import BaseTool, tool


@tool
def spin(seconds: float) -> str:
    """Burns CPU (holding the GIL) for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "done"


@tool
def nap(seconds: float) -> str:
    """Sleeps for ``seconds``."""
    time.sleep(seconds)
    return "rested"


@tool
def hog(megabytes: int) -> str:
    """Allocates ``megabytes`` of memory."""
    return str(len(bytearray(megabytes * 2**20)))


@tool
def leak_path(name: str) -> str:
    """Fails the way a library does, with an install path in the message."""
    raise OSError(36, "File name too long", f"/opt/secret/install/zoneinfo/{name}")


def bomb_tools() -> list[BaseTool]:
    return [spin, nap, hog, leak_path]
