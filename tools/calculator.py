"""A safe arithmetic calculator: Python's own parser builds the tree and a whitelist walks it; `eval` is never used.

Supported: numbers, ``+ - * / // %``, powers (``**`` or ``^``), unary signs, parentheses, the constants ``pi`` and
``e`` and the functions ``sqrt``, ``abs`` and ``round``. Powers whose result would exceed ``MAX_RESULT_BITS`` are
refused before they are computed, so ``9**9**9`` cannot exhaust memory or time.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from mimo_voice.configs.errors import ToolError

MAX_EXPRESSION_CHARS = 300
MAX_RESULT_BITS = 4096  # about 1,200 decimal digits

Number = int | float

# Spellings a speech model is likely to write for the same operators.
_SPELLINGS = {"^": "**", "×": "*", "·": "*", "÷": "/", "−": "-"}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
_FUNCTIONS: dict[str, Callable[..., Number]] = {"sqrt": math.sqrt, "abs": abs, "round": round}


class CalculatorError(ToolError):
    """An expression the calculator refuses; the message says why."""


def _check_size(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large")
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
        raise CalculatorError("the result is too large")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int):
        # (bits - 1) * exponent bounds the result's size from below: refuse before computing it.
        if exponent > 0 and abs(base) > 1 and (abs(base).bit_length() - 1) * exponent > MAX_RESULT_BITS:
            raise CalculatorError("the power is too large")
        return base**exponent
    try:
        # math.pow raises instead of returning a complex number for a negative base and fractional exponent.
        return math.pow(base, exponent)
    except OverflowError:
        raise CalculatorError("the power is too large") from None


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _call(node: ast.Call) -> Number:
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS or node.keywords:
        raise CalculatorError(f"unknown function; known: {', '.join(_FUNCTIONS)}")
    function = _FUNCTIONS[node.func.id]
    args = [_evaluate(arg) for arg in node.args]
    try:
        return function(*args)
    except TypeError:
        raise CalculatorError(f"wrong number of arguments for {node.func.id}") from None


def _evaluate(node: ast.AST) -> Number:
    return _check_size(_value(node))


def _value(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise CalculatorError(f"unknown name {node.id!r}; only numbers, pi and e are allowed")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Call):
        return _call(node)
    if isinstance(node, ast.Tuple):
        raise CalculatorError("commas are not allowed: write 1234.5, not 1,234.5")
    raise CalculatorError(f"unsupported expression element: {ast.unparse(node)!r}")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression; CalculatorError for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    for spelling, python in _SPELLINGS.items():
        expression = expression.replace(spelling, python)
    if not expression.strip():
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"cannot parse the expression ({exc.msg})") from None
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except ValueError as exc:  # math domain errors, e.g. sqrt(-1)
        if isinstance(exc, CalculatorError):
            raise
        raise CalculatorError(f"math error: {exc}") from None
    except (OverflowError, RecursionError):
        raise CalculatorError("the result is too large") from None


def format_number(value: Number) -> str:
    """Integers exactly; floats to 12 significant digits (``0.1 + 0.2`` -> ``0.3``, ``sqrt(16)`` -> ``4``)."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.12g}"
