"""Test hooks, kept out of the production API: an engine whose sessions can script and inspect the model.

``TestingEngine.load(config)`` starts a worker that accepts the testing requests of :mod:`.protocol`; a
production :class:`~.engine.Engine`'s worker refuses them. Tests and benchmarks (``bench engine``) use it to
force the model's text channel and to read a session's state inside the worker.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, ClassVar

from .engine import Engine
from .protocol import Inspect, SetTextHook
from .session import Session

TextHook = Callable[[list[int]], int | None]


class TestingSession(Session):
    """A :class:`~.session.Session` with :attr:`text_hook` and :meth:`inspect`."""

    __test__ = False  # not a pytest test class
    _hook: TextHook | None = None

    @property
    def text_hook(self) -> TextHook | None:
        """``hook(tokens so far) -> next text token or None`` (None: sample as usual). It runs in the worker
        process, so it must pickle (a module-level function or class instance); its state changes stay there."""
        return self._hook

    @text_hook.setter
    def text_hook(self, hook: TextHook | None) -> None:
        try:
            self._cast(SetTextHook(session_id=self._id, hook=hook))
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise TypeError(f"text_hook must be picklable (a module-level function or class): {exc}") from exc
        self._hook = hook

    async def inspect(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(conversation, *args)`` run in the worker on this session's state (a
        :class:`~.conversation.Conversation`); both it and its result must pickle."""
        return await self._call(Inspect(session_id=self._id, function=function, args=args))


class TestingEngine(Engine):
    """An :class:`~.engine.Engine` whose sessions are :class:`TestingSession`."""

    __test__ = False  # not a pytest test class
    session_class: ClassVar[type[Session]] = TestingSession
    testing: ClassVar[bool] = True

    def new_session(
        self, *, mode: str = "non_thinking", system_prompt: str | None = None, task: str = "spoken_dialogue"
    ) -> TestingSession:
        session = super().new_session(mode=mode, system_prompt=system_prompt, task=task)
        assert isinstance(session, TestingSession)
        return session
