"""The OpenAI Realtime API on ``/v1/realtime``: any Realtime client (the ``openai`` SDK, pipecat, LiveKit) talks to
the same agent as the WebRTC page and the phone."""

from .endpoint import add_realtime_route

__all__ = ["add_realtime_route"]
