"""The serving engine: the asyncio side (Engine, Session), the typed messages, and the worker process that owns
the model and steps every session's response."""
