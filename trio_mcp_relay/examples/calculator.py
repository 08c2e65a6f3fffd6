"""A calculator tool that evaluates arithmetic safely, without ``eval``.

The expression is parsed with :mod:`ast` and walked node by node; only these are allowed:
numbers, ``+ - * / // % **``, unary ``-`` and ``+``, parentheses, the constants ``pi`` and
``e``, and the functions in :data:`FUNCTIONS`. Names, attributes, subscripts, lambdas,
comprehensions, strings and calls of anything else are refused before anything runs.

``^`` is read as a power (as calculator users mean it), ``×`` and ``÷`` as ``*`` and ``/``.

Resource limits: at most :data:`MAX_LENGTH` characters and :data:`MAX_DEPTH` operations
inside one another (``1+1+...`` counts one per ``+``); integer results of at most
:data:`MAX_INT_BITS` bits, checked *before* a power or product is computed, so ``9**9**9``
is refused at once instead of running for hours.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Callable
from typing import Annotated, Final

from trio_mcp_relay.plugins import Plugin, ToolError, tool

__all__ = ["FUNCTIONS", "Calculator", "CalculatorError", "evaluate"]

Number = int | float

#: Longest expression accepted, in characters.
MAX_LENGTH: Final = 1000
#: Largest integer a step may produce (about 3000 decimal digits).
MAX_INT_BITS: Final = 10_000
#: Deepest nesting of operations: the walk is recursive, and this keeps it well inside
#: Python's recursion limit wherever it runs.
MAX_DEPTH: Final = 200


class CalculatorError(ToolError):
    """The expression is not allowed or cannot be computed; the message says why."""


def _round(x: Number, ndigits: int | None = None) -> Number:
    if ndigits is not None and (not isinstance(ndigits, int) or abs(ndigits) > 1000):
        raise CalculatorError("round(x, n): n must be a whole number between -1000 and 1000")
    return round(x) if ndigits is None else round(x, ndigits)


def _variadic(name: str, func: Callable[..., Number]) -> Callable[..., Number]:
    def call(*args: Number) -> Number:
        if not args:
            raise CalculatorError(f"{name}() needs at least one argument")
        return func(*args)

    return call


#: The functions an expression may call.
FUNCTIONS: Final[dict[str, Callable[..., Number]]] = {
    "sqrt": math.sqrt,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "log": math.log,
    "exp": math.exp,
    "abs": abs,
    "round": _round,
    "floor": math.floor,
    "ceil": math.ceil,
    "min": _variadic("min", min),
    "max": _variadic("max", max),
}

CONSTANTS: Final[dict[str, float]] = {"pi": math.pi, "e": math.e}


def _check_int(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("the result is too large")
    return value


def _power(base: Number, exponent: Number) -> Number:
    # bits(base ** exponent) is about exponent * bits(base): refuse before computing.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and abs(base) > 1
        and exponent * (abs(base).bit_length() - 1) > MAX_INT_BITS
    ):
        raise CalculatorError("the result is too large")
    result = base**exponent
    if isinstance(result, complex):
        raise CalculatorError("the result is not a real number")
    return _check_int(result)


def _multiply(a: Number, b: Number) -> Number:
    if (
        isinstance(a, int)
        and isinstance(b, int)
        and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1
    ):
        raise CalculatorError("the result is too large")
    return a * b


_BINARY: Final[dict[type[ast.operator], Callable[[Number, Number], Number]]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: _multiply,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: _power,
}

_SYMBOLS: Final[dict[type[ast.AST], str]] = {
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
    ast.Invert: "~",
    ast.Not: "not",
}


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Attribute):
        return "attribute access"
    if isinstance(node, ast.Constant):
        return f"the {type(node.value).__name__} constant {node.value!r}"[:80]
    op: object = getattr(node, "op", None)
    symbol = _SYMBOLS.get(type(op)) if isinstance(op, ast.AST) else None
    if symbol is not None:
        return f"the operator {symbol!r}"
    return type(node).__name__.lower()


def _walk(node: ast.AST, depth: int = 0) -> Number:
    if depth > MAX_DEPTH:
        raise CalculatorError(
            f"the expression is too deeply nested (more than {MAX_DEPTH} operations "
            "inside one another)"
        )
    walk = functools.partial(_walk, depth=depth + 1)
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _check_int(value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = walk(node.left), walk(node.right)
        return _check_int(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = walk(node.operand)
        return -operand if isinstance(node.op, ast.USub) else +operand
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            name = node.func.id if isinstance(node.func, ast.Name) else None
            known = ", ".join(FUNCTIONS)
            what = f"{name}()" if name else "this call"
            raise CalculatorError(f"{what} is not allowed; functions: {known}")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise CalculatorError("functions take plain positional arguments only")
        args = [walk(arg) for arg in node.args]
        try:
            return _check_int(FUNCTIONS[node.func.id](*args))
        except TypeError as exc:
            raise CalculatorError(f"{node.func.id}(): {exc}") from None
    raise CalculatorError(f"{_describe(node)} is not allowed in an expression")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression.

    Raises:
        CalculatorError: the expression is too long, malformed, uses something not allowed,
            divides by zero, or its value is too large or not a real number.
    """
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"the expression is longer than {MAX_LENGTH} characters")
    # The mathematicians' ^ for powers: Python's ^ (xor) means nothing to a calculator user.
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if not text:
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not a valid expression: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise CalculatorError("the expression is too deeply nested") from None
    try:
        result = _walk(tree.body)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    except ValueError as exc:  # math domain errors: sqrt(-1), log(0)
        raise CalculatorError(f"not defined: {exc}") from None
    if isinstance(result, float) and not math.isfinite(result):
        raise CalculatorError("the result is too large")
    return result


class Calculator(Plugin):
    """Arithmetic for the assistant: exact integers, floats, a few functions."""

    @tool
    def calculate(
        self,
        expression: Annotated[
            str,
            "Arithmetic such as '(3 + 4) * 2', '2 ** 10', 'sqrt(2) * pi' or 'round(10 / 3, 2)'",
        ],
    ) -> str:
        """Evaluate an arithmetic expression and return its value.

        Supports + - * / // % ** (or ^), parentheses, pi, e, and sqrt, sin, cos, tan, log,
        exp, abs, round, floor, ceil, min, max. Use it for any calculation instead of
        guessing.
        """
        return str(evaluate(expression))
