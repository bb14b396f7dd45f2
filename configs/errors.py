"""The one error hierarchy of mimo-voice: every error meant for a user derives from :class:`MimoVoiceError`.

This module imports nothing, so every layer may import it, the model included (the single exception to the
rule that ``streaming.model`` imports nothing from ``configs``). The CLI catches :class:`MimoVoiceError` and
prints its message on one line. Each kind also derives from the builtin it refines (``ValueError``,
``RuntimeError``), so code that catches the builtin keeps working.
"""

from __future__ import annotations


class MimoVoiceError(Exception):
    """An error whose message is meant for the user: it says what is wrong and, where it can, what to do."""


class ConfigError(MimoVoiceError, ValueError):
    """A configuration that cannot be used: the app's YAML, an override, or a checkpoint's ``config.json``."""


class CheckpointError(MimoVoiceError, ValueError):
    """A checkpoint that cannot be found or read (missing files, missing or misshapen weights)."""


class TokenizerError(MimoVoiceError, ValueError):
    """A text tokenizer that cannot be loaded or lacks the special tokens MiMo-Audio needs."""


class EngineError(MimoVoiceError, RuntimeError):
    """The engine cannot serve: it failed to load, or its worker process is gone."""


class EngineClosed(EngineError):
    """The engine was closed, or its worker process ended."""


class ToolError(MimoVoiceError, ValueError):
    """A tool call that cannot run: a malformed call, or arguments the tool rejects."""
