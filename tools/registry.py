"""One registry for langchain-core tools and pipecat functions, with a timeout per tool.

Every tool becomes a pipecat ``FunctionSchema`` (advertised to the model) and an ``invoke`` coroutine. ``call`` runs a
tool within its timeout and turns anything that goes wrong into a ``ToolCallError`` whose message is written for the
model; ``register_with`` wires the same path into a pipecat ``LLMService`` so that ``run_function_calls`` always gets
an answer through ``result_callback``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from loguru import logger
from pipecat.adapters.llm.schemas.direct_function import DirectFunctionWrapper
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.services.llm_service import FunctionCallParams, FunctionCallResultProperties
from pydantic import ValidationError

from .builtin import enabled_tools
from .calls import ToolCallError, error_text, result_text, unknown_tool_error

if TYPE_CHECKING:
    from mimo_voice.configs.schema import ToolsSection
    from pipecat.services.llm_service import LLMService

DEFAULT_TIMEOUT_SECS = 10.0

Invoke = Callable[[dict[str, Any], FunctionCallParams], Awaitable[Any]]
PipecatHandler = Callable[[FunctionCallParams], Awaitable[None]]


@dataclass(frozen=True)
class _Entry:
    schema: FunctionSchema  # carries no handler: pipecat must reach the tool only through this registry
    invoke: Invoke
    timeout_secs: float


def _langchain_entry(tool: BaseTool) -> tuple[FunctionSchema, Invoke]:
    spec = convert_to_openai_tool(tool)["function"]
    parameters = spec.get("parameters", {})
    schema = FunctionSchema(
        name=spec["name"],
        description=spec.get("description", ""),
        properties=parameters.get("properties", {}),
        required=parameters.get("required", []),
    )

    async def invoke(arguments: dict[str, Any], params: FunctionCallParams) -> Any:
        return await tool.ainvoke(arguments)

    return schema, invoke


def _pipecat_entry(schema: FunctionSchema, handler: PipecatHandler) -> tuple[FunctionSchema, Invoke]:
    """A pipecat handler answers through ``params.result_callback``: capture its final result."""

    async def invoke(arguments: dict[str, Any], params: FunctionCallParams) -> Any:
        results: list[Any] = []

        async def capture(result: Any, *, properties: FunctionCallResultProperties | None = None) -> None:
            if properties is None or properties.is_final:
                results.append(result)

        await handler(dataclasses.replace(params, arguments=arguments, result_callback=capture))
        if not results:
            raise ToolCallError(f"{schema.name} finished without reporting a result.")
        return results[0]

    advertised = FunctionSchema(schema.name, schema.description, schema.properties, schema.required)
    return advertised, invoke


def _direct_function_entry(function: Callable[..., Awaitable[Any]]) -> tuple[FunctionSchema, Invoke]:
    try:
        wrapper = DirectFunctionWrapper(function)
    except Exception as exc:  # pipecat raises a bare Exception for a function of the wrong shape
        raise TypeError(f"not a pipecat direct function: {exc}") from None

    async def handler(params: FunctionCallParams) -> None:
        await wrapper.invoke(params.arguments, params)

    return _pipecat_entry(wrapper.to_function_schema(), handler)


def _entry_parts(tool: Any) -> tuple[FunctionSchema, Invoke]:
    if isinstance(tool, BaseTool):
        return _langchain_entry(tool)
    if isinstance(tool, tuple) and len(tool) == 2 and isinstance(tool[0], FunctionSchema) and callable(tool[1]):
        return _pipecat_entry(*tool)
    if isinstance(tool, FunctionSchema) and tool.handler is not None:
        return _pipecat_entry(tool, tool.handler)
    if callable(tool):
        return _direct_function_entry(tool)
    raise TypeError(
        f"cannot use {tool!r} as a tool: expected a langchain BaseTool, a pipecat direct function, "
        "or a (FunctionSchema, handler) pair"
    )


def _check_arguments(schema: FunctionSchema, arguments: dict[str, Any]) -> None:
    unknown = sorted(set(arguments) - set(schema.properties))
    missing = [name for name in schema.required if name not in arguments]
    problems = [f"unknown argument {name!r}" for name in unknown] + [f"missing argument {name!r}" for name in missing]
    if problems:
        expected = ", ".join(schema.properties) or "none"
        raise ToolCallError(f"Invalid arguments for {schema.name}: {'; '.join(problems)} (arguments: {expected}).")


def _describe_validation(name: str, error: ValidationError) -> str:
    details = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'arguments'}: {item['msg']}" for item in error.errors())
    return f"Invalid arguments for {name}: {details}."


def _standalone_params(name: str, arguments: dict[str, Any]) -> FunctionCallParams:
    """Params for a call made outside a pipeline (no LLM, worker or context)."""

    async def discard(result: Any, *, properties: FunctionCallResultProperties | None = None) -> None:
        return None

    return FunctionCallParams(
        function_name=name,
        tool_call_id=f"local-{name}",
        arguments=arguments,
        llm=None,  # type: ignore[arg-type]
        pipeline_worker=None,  # type: ignore[arg-type]
        context=None,  # type: ignore[arg-type]
        result_callback=discard,
    )


class ToolRegistry:
    """Tools by name; ``timeout_secs`` is the default for tools added without their own."""

    def __init__(self, *, timeout_secs: float = DEFAULT_TIMEOUT_SECS) -> None:
        if timeout_secs <= 0:
            raise ValueError("timeout_secs must be positive")
        self._timeout_secs = timeout_secs
        self._entries: dict[str, _Entry] = {}

    def add(self, tool: Any, *, timeout_secs: float | None = None) -> None:
        """Add a langchain ``BaseTool`` (``@tool`` functions included), a pipecat direct function
        (``async def f(params: FunctionCallParams, ...)`` with a docstring), or a ``(FunctionSchema, handler)`` pair
        (a ``FunctionSchema`` carrying its ``handler`` works too)."""
        if timeout_secs is not None and timeout_secs <= 0:
            raise ValueError("timeout_secs must be positive")
        schema, invoke = _entry_parts(tool)
        if schema.name in self._entries:
            raise ValueError(f"a tool named {schema.name!r} is already registered")
        timeout = self._timeout_secs if timeout_secs is None else timeout_secs
        self._entries[schema.name] = _Entry(schema, invoke, timeout)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def schemas(self) -> list[dict[str, Any]]:
        """JSON-schema dicts (name, description, parameters), the form ``tools_prompt`` lists."""
        return [entry.schema.to_default_dict() for entry in self._entries.values()]

    def tools_schema(self) -> ToolsSchema:
        return ToolsSchema(standard_tools=[entry.schema for entry in self._entries.values()])

    async def call(self, name: str, arguments: dict[str, Any], *, params: FunctionCallParams | None = None) -> str:
        """Run a tool within its timeout and return its result as text.

        Raises ToolCallError (message meant for the model) for an unknown tool, bad arguments, a timeout or an
        exception in the tool. ``params`` are the pipecat call's own, when called from a pipeline.
        """
        entry = self._entries.get(name)
        if entry is None:
            raise unknown_tool_error(name, self._entries)
        if not isinstance(arguments, dict):
            raise ToolCallError(f"Arguments for {name} must be a JSON object.")
        _check_arguments(entry.schema, arguments)
        params = params or _standalone_params(name, arguments)
        try:
            async with asyncio.timeout(entry.timeout_secs) as deadline:
                result = await entry.invoke(arguments, params)
        except ToolCallError:
            raise
        except ValidationError as exc:
            raise ToolCallError(_describe_validation(name, exc)) from None
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                logger.warning(f"tool {name} timed out after {entry.timeout_secs:g} s")
                raise ToolCallError(f"{name} did not answer within {entry.timeout_secs:g} seconds.") from None
            logger.warning(f"tool {name} failed: {exc!r}")
            logger.opt(exception=exc).debug(f"traceback of tool {name}")
            raise ToolCallError(f"{name} failed: {str(exc) or type(exc).__name__}") from None
        return result_text(result)

    async def _answer(self, params: FunctionCallParams) -> None:
        """pipecat handler: every outcome, errors included, goes back through ``result_callback``."""
        try:
            result = await self.call(params.function_name, dict(params.arguments), params=params)
        except ToolCallError as exc:
            result = error_text(str(exc))
        await params.result_callback(result)

    def register_with(self, llm: LLMService) -> None:
        """Register every tool on a pipecat LLM service, for ``run_function_calls``."""
        for name in self._entries:
            llm.register_function(name, self._answer)


def build_registry(tools_config: ToolsSection, *, timeout_secs: float) -> ToolRegistry:
    """The registry of the tools a config enables (``tools.enabled``), each with ``timeout_secs``."""
    registry = ToolRegistry(timeout_secs=timeout_secs)
    for tool in enabled_tools(tools_config):
        registry.add(tool)
    return registry
