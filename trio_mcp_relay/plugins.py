"""Write MCP tools in Python and serve them to an MCP endpoint.

A plugin is a class whose ``@tool`` methods become MCP tools; the JSON Schema of each tool's
arguments comes from the method's type hints and its description from the docstring::

    from typing import Annotated

    from trio_mcp_relay.plugins import Plugin, tool


    class Greeter(Plugin):
        @tool
        def greet(self, name: Annotated[str, "who to greet"], shout: bool = False) -> str:
            \"\"\"Say hello to someone.\"\"\"
            text = f"Hello, {name}!"
            return text.upper() if shout else text

Serve plugins with ``trio-mcp-relay tools --endpoint URL module:Greeter`` or
``await run_tools(url, [Greeter()])``; :class:`PluginHost` speaks MCP for a list of plugins on
any :class:`~trio_mcp_relay._transport.WebSocket` (it also fits ``serve_relay``'s
``embedded_tools``).

Theory of operation: :class:`PluginHost` answers ``initialize``, ``ping``, ``tools/list``
(paginated) and ``tools/call``; everything else gets ``-32601``. Its plugins' tools are
merged, paged and resolved by :mod:`trio_mcp_relay.core.catalog`, the relay's own catalog.
Tool arguments are checked against the tool's ``inputSchema`` before the plugin sees them
(``-32602`` with a message naming the argument), so a plugin receives only arguments of the
declared types. A tool that raises is reported *in the result* (``isError: true``, the message
as text), as MCP wants, so the model can read it; protocol errors are JSON-RPC errors.
:meth:`PluginHost.serve` runs each request in its own task, so a slow tool never holds up
``ping`` or other calls, and honours ``notifications/cancelled``.

Type hints understood by :func:`tool`: ``int``, ``float``, ``bool``, ``str``, ``list[X]``,
``dict[str, X]``, ``X | None`` and other unions, ``Literal[...]``, :class:`enum.Enum`
subclasses, ``Any``, and ``Annotated[X, "description"]``. A parameter with a default is
optional. Arguments arrive converted: enum members for enums, ``float`` for ``float``.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
import json
import logging
import random
import re
import types
import typing
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, ClassVar, Final, Literal, TypeAlias, overload
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from . import __version__
from ._frames import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    MISSING,
    FrameError,
    Id,
    Notification,
    Request,
    dumps,
    parse_frame,
)
from ._transport import ABNORMAL_CLOSURE, ConnectionClosed, WebSocket
from .core.catalog import SUPPORTED_PROTOCOL_VERSIONS, Catalog, CursorError, Kind, negotiate_version

__all__ = [
    "SUPPORTED_PROTOCOL_VERSIONS",
    "EndpointRefused",
    "InvalidArguments",
    "Plugin",
    "PluginHost",
    "PluginLoadError",
    "Tool",
    "ToolError",
    "ToolResult",
    "TrioWebsocketAdapter",
    "jsonrpc_err",
    "jsonrpc_ok",
    "load_plugin",
    "run_tools",
    "tool",
    "trio_websocket_adapter",
]

log = logging.getLogger("trio_mcp_relay.plugins")

#: Tool names as MCP 2025-11-25 recommends them (and every client accepts).
_TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}")

JSON: TypeAlias = Any
"""A value parsed from JSON (dict, list, str, int, float, bool or None)."""


# --------------------------------------------------------------------------- errors


class ToolError(Exception):
    """Raise from a tool to report a failure to the model: its message becomes the text of
    an ``isError: true`` result. (Any other exception is reported the same way, prefixed
    with its type name, and logged with its traceback as a probable bug.)"""


class InvalidArguments(Exception):
    """The arguments do not fit the tool's schema: answered ``-32602`` with this message.

    The host checks arguments against ``inputSchema`` itself; a plugin with hand-written
    ``call_tool`` may raise this for checks a schema cannot express.
    """


class PluginLoadError(Exception):
    """``load_plugin`` could not produce a plugin; the message says why."""


class EndpointRefused(Exception):
    """The endpoint refused this tool connection for good; reconnecting would not help.

    Raised by :func:`run_tools` for close code 1008 (bad token), 4001 (another tool
    connection for the same agent replaced this one) and HTTP 4xx handshake answers other
    than 408 and 429.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"the endpoint refused the connection ({self.code}: {self.reason})"


# --------------------------------------------------------------------------- JSON-RPC helpers


def jsonrpc_ok(id: Id | None, result: JSON) -> dict[str, Any]:
    """A JSON-RPC 2.0 success response."""
    return {"jsonrpc": "2.0", "id": id, "result": result}


def jsonrpc_err(
    id: Id | None,
    code: int,
    message: str,
    data: JSON = None,
) -> dict[str, Any]:
    """A JSON-RPC 2.0 error response (``data`` is left out when None)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": error}


# --------------------------------------------------------------------------- tool results


@attrs.frozen
class ToolResult:
    """A ``tools/call`` result built by hand: return one from a tool for full control.

    Attributes:
        content: MCP content blocks, e.g. ``[{"type": "text", "text": "..."}]``.
        structured: the ``structuredContent`` object, if any.
        is_error: report the call as failed (``isError``).
    """

    content: list[dict[str, Any]]
    structured: dict[str, Any] | None = None
    is_error: bool = False

    def to_json(self) -> dict[str, Any]:
        """The ``tools/call`` result object."""
        out: dict[str, Any] = {"content": self.content, "isError": self.is_error}
        if self.structured is not None:
            out["structuredContent"] = self.structured
        return out

    @classmethod
    def text(cls, text: str, *, is_error: bool = False) -> ToolResult:
        """A result holding one text block."""
        return cls([{"type": "text", "text": text}], is_error=is_error)


def _json_text(value: Any) -> str | None:
    """``value`` as JSON text; None if it cannot be (NaN, a circular reference)."""
    # default=str: datetimes, paths, decimals and the like become strings, not failures.
    try:
        return json.dumps(value, ensure_ascii=False, default=str, allow_nan=False)
    except (ValueError, RecursionError):
        return None


def _to_tool_result(value: Any) -> ToolResult:
    """Turn a tool's return value into a ``tools/call`` result.

    ``str`` becomes text; ``dict`` becomes JSON text plus ``structuredContent``; ``list`` and
    ``tuple`` become JSON text; ``None`` no content (as the MCP Python SDK does); a
    :class:`ToolResult` is kept as is; anything else becomes ``str(value)``.
    """
    if isinstance(value, ToolResult):
        return value
    if isinstance(value, str):
        return ToolResult.text(value)
    if value is None:
        return ToolResult([])
    if isinstance(value, dict | list | tuple):
        text = _json_text(value)
        if text is None:
            return ToolResult.text(str(value))
        structured = json.loads(text) if isinstance(value, dict) else None
        return ToolResult([{"type": "text", "text": text}], structured=structured)
    return ToolResult.text(str(value))


# --------------------------------------------------------------------------- JSON Schema


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _has_type(value: object, name: str) -> bool:
    kind = _json_type(value)
    if name == "number":
        return kind in ("integer", "number")
    if name == "integer":
        # JSON Schema counts 2.0 as an integer; models do send it.
        return kind == "integer" or (kind == "number" and float(value).is_integer())  # type: ignore[arg-type]
    return kind == name


def _same_json(a: object, b: object) -> bool:
    """JSON equality: ``true`` is not ``1``, ``1`` is ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _at(path: str) -> str:
    return f"'{path}'" if path else "the arguments"


def _schema_errors(schema: Mapping[str, Any], value: JSON, path: str = "") -> Iterator[str]:
    """Why ``value`` does not match ``schema``, one message per problem found.

    A JSON Schema subset, the part tools use: ``type``, ``enum``, ``const``, ``anyOf``,
    ``oneOf`` (checked as ``anyOf``), ``allOf``, ``properties``, ``required``,
    ``additionalProperties``, ``items``, ``minimum``, ``maximum``, ``exclusiveMinimum``,
    ``exclusiveMaximum``, ``minLength``, ``maxLength``, ``minItems``, ``maxItems``. Other
    keywords are not checked.
    """
    allowed = _schema_types(schema)
    if allowed is not None and not any(_has_type(value, name) for name in allowed):
        yield f"{_at(path)} must be {_kinds(allowed)}, not {_kind(_json_type(value))}"
        return
    if "enum" in schema and not any(_same_json(value, v) for v in schema["enum"]):
        choices = ", ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
        yield f"{_at(path)} must be one of {choices}"
        return
    if "const" in schema and not _same_json(value, schema["const"]):
        yield f"{_at(path)} must be {json.dumps(schema['const'], ensure_ascii=False)}"
        return
    for key in ("anyOf", "oneOf"):
        if key in schema:
            failures = [list(_schema_errors(option, value, path)) for option in schema[key]]
            if all(failures):
                # Report the first alternative of the value's JSON type; the type check
                # above already covered "none of the types fits".
                fitting = [
                    found
                    for option, found in zip(schema[key], failures, strict=True)
                    if _schema_types(option) is None
                    or any(_has_type(value, name) for name in _schema_types(option) or ())
                ]
                yield from fitting[0] if fitting else failures[0]
                return
    for option in schema.get("allOf", ()):
        yield from _schema_errors(option, value, path)
    if isinstance(value, dict):
        yield from _object_errors(schema, value, path)
    elif isinstance(value, list):
        yield from _array_errors(schema, value, path)
    elif isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            yield f"{_at(path)} must be at least {schema['minLength']} characters long"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            yield f"{_at(path)} must be at most {schema['maxLength']} characters long"
    elif _json_type(value) in ("integer", "number"):
        yield from _number_errors(schema, value, path)


def _schema_types(schema: Mapping[str, Any]) -> list[str] | None:
    """The JSON types ``schema`` allows at its top level; None when it does not say."""
    found: list[str] | None = None
    if "type" in schema:
        declared = schema["type"]
        found = [declared] if isinstance(declared, str) else list(declared)
    elif "enum" in schema:
        found = sorted({_json_type(v) for v in schema["enum"]})
    elif "const" in schema:
        found = [_json_type(schema["const"])]
    for key in ("anyOf", "oneOf"):
        if key in schema and found is None:
            members = [_schema_types(option) for option in schema[key]]
            if all(m is not None for m in members):
                found = list(dict.fromkeys(name for m in members for name in m or ()))
    if found is not None and "integer" in found and "number" in found:
        found.remove("integer")
    return found


def _kind(name: str) -> str:
    return name if name == "null" else ("an " if name[:1] in "aeiou" else "a ") + name


def _kinds(names: Sequence[str]) -> str:
    return " or ".join(_kind(name) for name in names)


def _object_errors(schema: Mapping[str, Any], value: dict[str, Any], path: str) -> Iterator[str]:
    properties: Mapping[str, Any] = schema.get("properties", {})
    prefix = f"{path}." if path else ""
    for name in schema.get("required", ()):
        if name not in value:
            yield f"missing required argument '{prefix}{name}'"
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            yield from _schema_errors(properties[name], item, prefix + name)
        elif extra is False:
            yield f"unexpected argument '{prefix}{name}'"
        elif isinstance(extra, Mapping):
            yield from _schema_errors(extra, item, prefix + name)


def _array_errors(schema: Mapping[str, Any], value: list[Any], path: str) -> Iterator[str]:
    if len(value) < schema.get("minItems", 0):
        yield f"{_at(path)} must have at least {schema['minItems']} items"
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        yield f"{_at(path)} must have at most {schema['maxItems']} items"
    items = schema.get("items")
    if isinstance(items, Mapping):
        for index, item in enumerate(value):
            yield from _schema_errors(items, item, f"{path}[{index}]")


def _number_errors(schema: Mapping[str, Any], value: float, path: str) -> Iterator[str]:
    if "minimum" in schema and value < schema["minimum"]:
        yield f"{_at(path)} must be at least {schema['minimum']}"
    if "maximum" in schema and value > schema["maximum"]:
        yield f"{_at(path)} must be at most {schema['maximum']}"
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        yield f"{_at(path)} must be greater than {schema['exclusiveMinimum']}"
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        yield f"{_at(path)} must be less than {schema['exclusiveMaximum']}"


# --------------------------------------------------------------------------- type hints


@attrs.frozen
class _Param:
    """What one type hint means: its JSON Schema, and how to turn JSON into the Python value."""

    schema: dict[str, Any]
    convert: Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


def _to_int(value: Any) -> int:
    return int(value)  # 2.0 passed the schema as an integer


def _to_float(value: Any) -> float:
    return float(value)


_SCALARS: Final[dict[Any, _Param]] = {
    bool: _Param({"type": "boolean"}, _identity),
    int: _Param({"type": "integer"}, _to_int),
    float: _Param({"type": "number"}, _to_float),
    str: _Param({"type": "string"}, _identity),
    type(None): _Param({"type": "null"}, _identity),
    None: _Param({"type": "null"}, _identity),
    Any: _Param({}, _identity),
}


def _enum_of(values: Sequence[Any], where: str) -> dict[str, Any]:
    kinds = {_json_type(v) for v in values}
    if not kinds <= {"string", "integer", "number", "boolean", "null"}:
        raise TypeError(f"{where}: choices must be strings, numbers, booleans or None")
    schema: dict[str, Any] = {"enum": list(values)}
    if len(kinds) == 1:
        schema = {"type": kinds.pop(), **schema}
    return schema


def _param(hint: Any, where: str) -> _Param:
    """The schema and converter for one type hint; TypeError for what JSON cannot carry."""
    if isinstance(hint, Hashable) and hint in _SCALARS:
        return _SCALARS[hint]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        inner = _param(args[0], where)
        notes = [meta for meta in args[1:] if isinstance(meta, str)]
        if not notes:
            return inner
        return _Param({**inner.schema, "description": " ".join(notes)}, inner.convert)
    if origin is typing.Union or origin is types.UnionType:
        return _union([_param(arg, where) for arg in args])
    if origin is Literal:
        return _Param(_enum_of(args, where), _identity)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _Param(_enum_of([member.value for member in hint], where), hint)
    if hint is list or origin is list:
        if not args:
            return _Param({"type": "array"}, list)
        item = _param(args[0], where)
        return _Param(
            {"type": "array", "items": item.schema},
            lambda value: [item.convert(v) for v in value],
        )
    if hint is dict or origin is dict:
        if not args:
            return _Param({"type": "object"}, dict)
        if args[0] is not str:
            raise TypeError(f"{where}: JSON object keys are strings; use dict[str, ...]")
        member = _param(args[1], where)
        return _Param(
            {"type": "object", "additionalProperties": member.schema},
            lambda value: {k: member.convert(v) for k, v in value.items()},
        )
    raise TypeError(
        f"{where}: unsupported type {hint!r}; use int, float, bool, str, list[X], "
        "dict[str, X], X | None, Literal[...], an Enum or Any"
    )


def _union(members: list[_Param]) -> _Param:
    def convert(value: Any) -> Any:
        # The first member the value fits decides: ``int | str`` keeps 3 an int.
        for member in members:
            if not any(True for _ in _schema_errors(member.schema, value)):
                return member.convert(value)
        return value

    return _Param({"anyOf": [member.schema for member in members]}, convert)


def _default_for_schema(value: Any) -> tuple[bool, Any]:
    """A default as JSON, if it is JSON (``(False, None)`` when it cannot be shown)."""
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False, None
    return True, value


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def _is_method(func: Callable[..., Any]) -> bool:
    """Whether ``func`` is a method: written in a class body (``C.f``, ``f.<locals>.C.g``),
    or, for functions built at run time, whose first parameter is ``self``."""
    parts = func.__qualname__.split(".")
    if len(parts) >= 2 and parts[-2] != "<locals>":
        return True
    first = next(iter(inspect.signature(func).parameters), None)
    return first == "self"


class Tool:
    """A function made into an MCP tool by :func:`tool`. Calling it calls the function.

    Attributes:
        name: the tool name (the function's, unless given).
        description: from the docstring's first paragraph, unless given.
        input_schema: the JSON Schema of the arguments, derived from the type hints.
        blocking: a sync function that runs in a worker thread.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        blocking: bool = False,
    ) -> None:
        self.func = func
        self.name = name if name is not None else func.__name__
        where = f"tool {self.name!r} ({func.__qualname__})"
        if not _TOOL_NAME.fullmatch(self.name):
            raise ValueError(f"{where}: a tool name is 1 to 128 letters, digits, '_', '-' or '.'")
        self.description = (
            description if description is not None else _first_paragraph(func.__doc__)
        )
        self.is_async = inspect.iscoroutinefunction(func)
        if blocking and self.is_async:
            raise TypeError(f"{where}: blocking=True is for sync functions only")
        self.blocking = blocking
        self.is_method = _is_method(func)
        self.input_schema, self._converters = self._derive_schema(where)
        functools.update_wrapper(self, func)

    def _derive_schema(self, where: str) -> tuple[dict[str, Any], dict[str, _Param]]:
        try:
            hints = typing.get_type_hints(self.func, include_extras=True)
        except Exception as exc:
            raise TypeError(f"{where}: cannot resolve its type hints: {exc}") from exc
        parameters = list(inspect.signature(self.func).parameters.values())
        if self.is_method:
            parameters = parameters[1:]  # self
        properties: dict[str, Any] = {}
        required: list[str] = []
        converters: dict[str, _Param] = {}
        open_ended = False
        for parameter in parameters:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                open_ended = True
                continue
            if parameter.kind in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.VAR_POSITIONAL,
            ):
                raise TypeError(
                    f"{where}: parameter {parameter.name!r} cannot be passed by name; "
                    "tool arguments are passed by name"
                )
            param = _param(hints.get(parameter.name, Any), f"{where}, parameter {parameter.name!r}")
            schema = dict(param.schema)
            if parameter.default is inspect.Parameter.empty:
                required.append(parameter.name)
            else:
                shown, default = _default_for_schema(parameter.default)
                if shown:
                    schema["default"] = default
            properties[parameter.name] = schema
            converters[parameter.name] = param
        input_schema: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            input_schema["required"] = required
        if not open_ended:
            input_schema["additionalProperties"] = False
        return input_schema, converters

    def definition(self) -> dict[str, Any]:
        """The tool as ``tools/list`` shows it: name, description, inputSchema."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["inputSchema"] = self.input_schema
        return out

    def convert_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """JSON arguments (already checked against the schema) as the function's values."""
        out: dict[str, Any] = {}
        for key, value in arguments.items():
            param = self._converters.get(key)
            try:
                out[key] = value if param is None else param.convert(value)
            except (ValueError, OverflowError) as exc:
                raise InvalidArguments(f"'{key}': {exc}") from None
        return out

    async def invoke(self, instance: object | None, arguments: Mapping[str, Any]) -> Any:
        """Run the tool with JSON ``arguments``; returns what the function returned.

        Async functions are awaited; sync ones run inline, or in a worker thread when
        ``blocking`` (a cancelled call then abandons the thread, which runs to its end).
        """
        kwargs = self.convert_arguments(arguments)
        func = functools.partial(self.func, instance) if self.is_method else self.func
        if self.is_async:
            return await func(**kwargs)
        if self.blocking:
            return await trio.to_thread.run_sync(
                functools.partial(func, **kwargs), abandon_on_cancel=True
            )
        return func(**kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __get__(self, instance: object | None, owner: type | None = None) -> Any:
        # On an instance a tool method is an ordinary bound method: plugin.add(1, 2) works.
        if instance is None or not self.is_method:
            return self
        return types.MethodType(self.func, instance)

    def __repr__(self) -> str:
        return f"<Tool {self.name!r} of {self.func.__qualname__}>"


@overload
def tool(func: Callable[..., Any], /) -> Tool: ...
@overload
def tool(
    *, name: str | None = None, description: str | None = None, blocking: bool = False
) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    blocking: bool = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a typed function (sync or async) an MCP tool: ``@tool`` or ``@tool(name=...)``.

    The arguments' JSON Schema comes from the type hints (see the module docstring), the
    description from the docstring's first paragraph. In a :class:`Plugin` subclass the
    decorated methods are its tools (``self`` is not an argument).

    Sync functions run on the Trio thread, which suits quick code; pass ``blocking=True`` for
    one that blocks (file or network I/O, heavy computation) to run it in a worker thread
    (``trio.to_thread.run_sync``). Async functions run in the Trio task.

    Args:
        func: the function (when used as ``@tool``).
        name: the tool name; default: the function's name.
        description: the tool description; default: the docstring's first paragraph.
        blocking: run a sync function in a worker thread.

    Raises:
        TypeError: a parameter's type cannot be expressed in JSON, or cannot be passed by
            name; ``blocking`` on an async function.
        ValueError: the name is not a valid MCP tool name.
    """
    if func is not None:
        return Tool(func, name=name, description=description, blocking=blocking)

    def decorate(f: Callable[..., Any]) -> Tool:
        return Tool(f, name=name, description=description, blocking=blocking)

    return decorate


# --------------------------------------------------------------------------- plugins


class Plugin:
    """Base class of tool plugins.

    Write ``@tool`` methods: they are collected when the class is created (inherited ones
    included) and served by the default :meth:`tools` and :meth:`call_tool`. A plugin that
    builds its tools at run time overrides both instead.

    :func:`load_plugin` (and so the ``tools`` command) instantiates a plugin with no
    arguments: give any constructor parameters defaults.
    """

    _tools: ClassVar[dict[str, Tool]] = {}

    jsonrpc_ok = staticmethod(jsonrpc_ok)
    jsonrpc_err = staticmethod(jsonrpc_err)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        members: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            members.update(vars(klass))  # a subclass's attribute hides its bases'
        collected: dict[str, Tool] = {}
        for attribute, member in members.items():
            if not isinstance(member, Tool):
                continue
            if member.name in collected:
                raise TypeError(
                    f"{cls.__qualname__}: two tools are named {member.name!r} "
                    f"({collected[member.name].func.__qualname__} and {attribute})"
                )
            collected[member.name] = member
        cls._tools = collected

    def tools(self) -> list[dict[str, Any]]:
        """The tool definitions: each a dict with name, description and inputSchema."""
        return [t.definition() for t in self._tools.values()]

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run tool ``name`` with ``arguments`` (already checked against its inputSchema).

        Returns:
            The tool's value, which the host turns into the result: ``str`` is text, a
            ``dict`` JSON text plus ``structuredContent``, a ``list`` JSON text, ``None`` no
            content, a :class:`ToolResult` is kept as is, anything else is ``str()``.

        Raises:
            InvalidArguments: answered ``-32602``.
            Exception: anything else is reported as an ``isError`` result.
        """
        found = self._tools.get(name)
        if found is None:
            raise InvalidArguments(f"Unknown tool: {name}")
        return await found.invoke(self, arguments)

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} plugin: {', '.join(self._tools) or 'no tools'}>"


class _RpcError(Exception):
    def __init__(self, code: int, message: str, data: JSON = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def _params(request: Request) -> dict[str, Any]:
    if request.params is MISSING or request.params is None:
        return {}
    if not isinstance(request.params, dict):
        raise _RpcError(INVALID_PARAMS, f"{request.method}: params must be an object")
    return request.params


class PluginHost:
    """Speaks MCP on the tool side for a list of plugins.

    It answers ``initialize``, ``ping``, ``tools/list`` and ``tools/call``: an aggregating
    relay's own ``initialize`` and ``tools/list`` on connect as much as a caller's. Its tools
    never change while it runs, so it declares ``tools.listChanged: false`` and sends no
    ``notifications/tools/list_changed``; several hosts on one token (``run_tools`` with
    distinct ``server_id``) join the agent, and the relay tells callers when one comes or goes.

    Args:
        plugins: the plugins; tool names must be unique across them.
        page_size: tools per ``tools/list`` page.
        name: ``serverInfo.name`` in the ``initialize`` answer.
        version: ``serverInfo.version``.
        instructions: optional ``instructions`` for the ``initialize`` answer.

    Raises:
        ValueError: two tools share a name, a definition lacks a name or an object
            ``inputSchema``, or ``page_size`` is below 1.
    """

    def __init__(
        self,
        plugins: Sequence[Plugin],
        *,
        page_size: int = 50,
        name: str = "trio-mcp-relay-tools",
        version: str = __version__,
        instructions: str | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        self.page_size = page_size
        self.server_info = {"name": name, "version": version}
        self.instructions = instructions
        # The relay's catalog merges the plugins' tools, each plugin a server named by its
        # position; a name defined twice is refused here rather than given a derived name,
        # so that every tool keeps the name its author wrote.
        self._plugins = list(plugins)
        self._catalog = Catalog()
        for index, plugin in enumerate(self._plugins):
            definitions = plugin.tools()
            for position, definition in enumerate(definitions):
                tool_name = definition.get("name")
                if not isinstance(tool_name, str) or not tool_name:
                    raise ValueError(f"{plugin!r}: a tool definition has no name")
                if not isinstance(definition.get("inputSchema"), dict):
                    raise ValueError(f"{plugin!r}: tool {tool_name!r} has no inputSchema object")
                earlier = self._catalog.owners(Kind.TOOLS, tool_name)
                if earlier or any(d.get("name") == tool_name for d in definitions[:position]):
                    other = self._plugins[int(earlier[0])] if earlier else plugin
                    raise ValueError(
                        f"duplicate tool name {tool_name!r}: defined by "
                        f"{type(other).__qualname__} and {type(plugin).__qualname__}"
                    )
            identity = str(index)
            self._catalog.add_server(identity, ready=True)
            self._catalog.set_items(identity, Kind.TOOLS, definitions)

    @property
    def tool_names(self) -> list[str]:
        """Every tool's name, in ``tools/list`` order."""
        return [d["name"] for d in self._catalog.items(Kind.TOOLS)]

    async def handle(self, frame_text: str | bytes) -> bytes | None:
        """Answer one frame: the response to send, or None (notifications, responses).

        Never raises for anything the peer sends: bad frames get ``-32700``/``-32600``
        with id null, unknown methods ``-32601``, bad params ``-32602``.
        """
        try:
            frame = parse_frame(frame_text)
        except FrameError as exc:
            return dumps(exc.to_response().to_json())
        if not isinstance(frame, Request):
            return None
        return dumps(await self.answer(frame))

    async def answer(self, request: Request) -> dict[str, Any]:
        """The response to one parsed request, as a dict."""
        try:
            result = await self._dispatch(request)
        except _RpcError as exc:
            return jsonrpc_err(request.id, exc.code, exc.message, exc.data)
        except Exception:
            log.exception("%s: internal error", request.method)
            return jsonrpc_err(request.id, INTERNAL_ERROR, "Internal error")
        return jsonrpc_ok(request.id, result)

    async def _dispatch(self, request: Request) -> JSON:
        method = request.method
        if method == "initialize":
            return self._initialize(_params(request))
        if method == "ping":
            return {}
        if method == "tools/list":
            return self._list_tools(_params(request))
        if method == "tools/call":
            return await self._call_tool(_params(request))
        raise _RpcError(METHOD_NOT_FOUND, "Method not found", {"method": method})

    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {
            "protocolVersion": negotiate_version(params.get("protocolVersion")),
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": self.server_info,
        }
        if self.instructions:
            result["instructions"] = self.instructions
        return result

    def _list_tools(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._catalog.list_result(Kind.TOOLS, params.get("cursor"), self.page_size)
        except CursorError as exc:
            raise _RpcError(exc.code, str(exc)) from None

    async def _call_tool(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            raise _RpcError(INVALID_PARAMS, "tools/call: params.name must be a string")
        route = self._catalog.resolve_tool(name)
        definition = self._catalog.listed_item(Kind.TOOLS, name)
        if route is None or definition is None:
            raise _RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
        plugin = self._plugins[int(route.server)]
        arguments = params.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise _RpcError(INVALID_PARAMS, f"Invalid arguments for tool {name!r}: not an object")
        problems = list(_schema_errors(definition["inputSchema"], arguments))
        if problems:
            raise _RpcError(
                INVALID_PARAMS, f"Invalid arguments for tool {name!r}: {'; '.join(problems)}"
            )
        try:
            value = await plugin.call_tool(route.name, arguments)
        except InvalidArguments as exc:
            raise _RpcError(INVALID_PARAMS, f"Invalid arguments for tool {name!r}: {exc}") from None
        except ToolError as exc:
            log.debug("tool %s failed: %s", name, exc)
            return ToolResult.text(str(exc) or type(exc).__name__, is_error=True).to_json()
        except Exception as exc:
            log.warning("tool %s raised", name, exc_info=True)
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return ToolResult.text(text, is_error=True).to_json()
        return _to_tool_result(value).to_json()

    async def serve(self, ws: WebSocket) -> None:
        """Answer MCP requests arriving on ``ws`` until the connection closes.

        Each request runs in its own task, so a slow tool holds up neither ``ping`` nor
        other calls; responses are sent as they are ready (``ws.send_many``), in any order.
        ``notifications/cancelled`` cancels the request it names, which then gets no answer.
        The frames the host cannot parse are answered at once.

        Resource handling:
            Returns when ``ws.receive`` raises ConnectionClosed; requests still running are
            cancelled then (their answers could not be sent). It does not close ``ws``.
        """
        running: dict[tuple[type, Any], trio.CancelScope] = {}

        async def run(request: Request, scope: trio.CancelScope) -> None:
            key = (type(request.id), request.id)
            try:
                with scope:
                    response = dumps(await self.answer(request))
                    await ws.send_many([response])
            except ConnectionClosed:
                pass  # the reader sees it too, and ends serve()
            finally:
                if running.get(key) is scope:
                    del running[key]

        async with trio.open_nursery() as nursery:
            try:
                while True:
                    message = await ws.receive()
                    try:
                        frame = parse_frame(message)
                    except FrameError as exc:
                        nursery.start_soon(_send_quietly, ws, dumps(exc.to_response().to_json()))
                        continue
                    if isinstance(frame, Request):
                        scope = trio.CancelScope()
                        running[(type(frame.id), frame.id)] = scope
                        nursery.start_soon(run, frame, scope)
                    elif isinstance(frame, Notification):
                        _cancel_named(frame, running)
            except ConnectionClosed as exc:
                log.debug("%s: connection closed (%d %s)", ws.remote, exc.code, exc.reason)
            finally:
                nursery.cancel_scope.cancel()


def _cancel_named(
    frame: Notification, running: Mapping[tuple[type, Any], trio.CancelScope]
) -> None:
    if frame.method != "notifications/cancelled" or not isinstance(frame.params, dict):
        return
    rid = frame.params.get("requestId")
    scope = running.get((type(rid), rid))
    if scope is not None:
        scope.cancel()


async def _send_quietly(ws: WebSocket, message: bytes) -> None:
    with suppress(ConnectionClosed):
        await ws.send_many([message])


# --------------------------------------------------------------------------- trio-websocket


@contextmanager
def _closed_as_ours() -> Iterator[None]:
    """trio-websocket's ConnectionClosed (and wsproto's refusal to send) as ours."""
    try:
        yield
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        code = reason.code if reason is not None else ABNORMAL_CLOSURE
        text = (reason.reason or "") if reason is not None else ""
        raise ConnectionClosed(code, text) from exc
    except LocalProtocolError as exc:
        raise ConnectionClosed(ABNORMAL_CLOSURE, "connection is closing") from exc


class TrioWebsocketAdapter:
    """A trio-websocket connection (client or server) as a :class:`WebSocket`.

    ``ping`` waits for the pong (trio-websocket's semantics) and then sets ``last_pong``.
    ``close`` waits at most ``close_timeout`` seconds for the close handshake, then drops
    the socket.

    Attributes:
        closed: how the connection ended, once ``receive`` has seen it end.
        last_pong: ``trio.current_time()`` when the last ping was answered (None: none yet).
    """

    def __init__(
        self, conn: trio_websocket.WebSocketConnection, *, close_timeout: float = 5.0
    ) -> None:
        self.conn = conn
        self.remote = str(conn.remote)
        self.closed: ConnectionClosed | None = None
        self.last_pong: float | None = None
        self._close_timeout = close_timeout

    async def receive(self) -> str | bytes:
        """The next message; ConnectionClosed when the connection has ended."""
        try:
            with _closed_as_ours():
                return await self.conn.get_message()
        except ConnectionClosed as exc:
            self.closed = exc
            raise

    async def send_many(self, messages: Sequence[bytes]) -> None:
        """Send each UTF-8 JSON message as a text frame."""
        with _closed_as_ours():
            for message in messages:
                await self.conn.send_message(message.decode("utf-8"))

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping and wait for its pong."""
        with _closed_as_ours():
            await self.conn.ping(payload or None)
        self.last_pong = trio.current_time()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code`` and ``reason``; drop the socket if the peer does not answer."""
        with trio.move_on_after(self._close_timeout):
            await self.conn.aclose(code, reason)
        await self.aclose()

    async def aclose(self) -> None:
        """Drop the socket at once."""
        # trio-websocket 0.12 keeps the socket open when the peer started the close
        # handshake; _stream is the only handle on it.
        await trio.aclose_forcefully(self.conn._stream)


def trio_websocket_adapter(conn: trio_websocket.WebSocketConnection) -> TrioWebsocketAdapter:
    """Wrap a trio-websocket connection so that :meth:`PluginHost.serve` can use it."""
    return TrioWebsocketAdapter(conn)


# --------------------------------------------------------------------------- run_tools

#: Close codes after which reconnecting cannot help: 1008 bad token, 4001 replaced by a newer
#: tool connection for the same agent (reconnecting would evict it in turn, forever).
_FINAL_CLOSE_CODES: Final = frozenset({1008, 4001})
#: A connection that lasted this long resets the backoff.
_STABLE_AFTER: Final = 10.0


def _redact_url(url: str) -> str:
    """``url`` without its query (which carries the token), for logs and messages."""
    parts = urlsplit(url)
    return parts._replace(query="…" if parts.query else "").geturl()


def _check_endpoint_url(url: str) -> None:
    """Raise ValueError unless ``url`` is a ``ws://`` or ``wss://`` URL with a host."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a bad port raises here
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {_redact_url(url)!r} ({exc})") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(
            f"the endpoint must be a ws:// or wss:// URL, e.g. "
            f"ws://127.0.0.1:8004/mcp_endpoint/mcp/?token=...; got {_redact_url(url)!r}"
        )


def _backoff(failures: int, initial: float, maximum: float) -> float:
    """Capped exponential backoff with "equal jitter": between half and all of the step."""
    step = min(maximum, initial * 2 ** min(failures, 32))
    return random.uniform(step / 2, step)


def _refusal(exc: BaseException) -> EndpointRefused | None:
    if isinstance(exc, trio_websocket.ConnectionRejected):
        status = exc.status_code
        if 400 <= status < 500 and status not in (408, 429):
            body = (exc.body or b"").decode("utf-8", "replace")[:200]
            return EndpointRefused(status, f"HTTP {status} {body}".strip())
    return None


async def _keepalive(adapter: TrioWebsocketAdapter, interval: float) -> None:
    """Ping every ``interval`` s; no pong within ``interval`` s drops the connection.

    Without it a tool behind a dead network path (no FIN, no RST) would wait forever.
    """
    while True:
        await trio.sleep(interval)
        with trio.move_on_after(interval) as scope:
            try:
                await adapter.ping()
            except ConnectionClosed:
                return
        if scope.cancelled_caught:
            log.warning("no pong from the endpoint in %g s: dropping the connection", interval)
            await adapter.aclose()
            return


async def _serve_once(
    host: PluginHost,
    url: str,
    keepalive: float,
    on_connected: Callable[[], None],
) -> ConnectionClosed:
    conn: trio_websocket.WebSocketConnection | None = None
    try:
        async with trio_websocket.open_websocket_url(
            url, max_message_size=16 * 2**20, connect_timeout=10, disconnect_timeout=5
        ) as conn:
            adapter = TrioWebsocketAdapter(conn)
            on_connected()
            async with trio.open_nursery() as nursery:
                if keepalive > 0:
                    nursery.start_soon(_keepalive, adapter, keepalive)
                await host.serve(adapter)
                nursery.cancel_scope.cancel()
            return adapter.closed or ConnectionClosed(ABNORMAL_CLOSURE, "connection lost")
    finally:
        if conn is not None:
            await trio.aclose_forcefully(conn._stream)


async def run_tools(
    endpoint_url: str,
    plugins: Sequence[Plugin],
    *,
    reconnect: bool = True,
    page_size: int = 50,
    keepalive: float = 20.0,
    initial_backoff: float = 0.5,
    max_backoff: float = 30.0,
    server_id: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect to an MCP endpoint as a tool and serve ``plugins`` there.

    Start it with ``await nursery.start(run_tools, url, plugins)`` to wait until the first
    connection is up.

    Args:
        endpoint_url: the tool URL, ``ws://host:port/mcp_endpoint/mcp/?token=...``.
        plugins: the plugins to serve (tool names unique across them).
        reconnect: when the connection drops or cannot be made, try again after a capped
            exponential backoff with jitter (``initial_backoff`` doubling up to
            ``max_backoff`` seconds; reset by a connection that lasted 10 s). When False,
            return once the first connection ends and raise if it cannot be made.
        page_size: tools per ``tools/list`` page.
        keepalive: ping the endpoint every this many seconds and reconnect when no pong
            comes within as long; 0 disables.
        initial_backoff: first reconnection delay, in seconds.
        max_backoff: longest reconnection delay, in seconds.
        server_id: connect with ``&server_id=`` this (replacing one the URL has), so that
            several plugin sets on one token join the agent side by side instead of
            replacing each other; None uses the URL as is (the relay then names the
            connection by its ``server_id``, else by ``serverInfo.name``). It is
            percent-encoded, never spelling ``key`` or ``call`` (see
            :func:`trio_mcp_relay._pipe.quote_server_id`).
        task_status: for ``nursery.start``; started once the first connection is up.

    Raises:
        ValueError: the URL is not ws:// or wss://, tool names collide, or ``server_id``
            is not 1 to 64 printable characters.
        EndpointRefused: the endpoint refused for good (bad token: 1008; replaced by another
            tool connection for the agent: 4001; HTTP 4xx), whatever ``reconnect`` says.
        trio_websocket.HandshakeError: the connection failed and ``reconnect`` is False.

    Error handling:
        Tool failures never end the connection (they are ``isError`` results). The token
        is never logged: URLs appear without their query.
    """
    _check_endpoint_url(endpoint_url)
    if server_id is not None:
        from ._pipe import check_server_id, server_url

        check_server_id(server_id)
        endpoint_url = server_url(endpoint_url, server_id)
    host = PluginHost(plugins, page_size=page_size)
    where = _redact_url(endpoint_url)
    if server_id is not None:
        where += f" (server_id {server_id!r})"
    failures = 0
    started = False

    def on_connected() -> None:
        nonlocal started
        log.info("connected to %s, serving %d tools", where, len(host.tool_names))
        if not started:
            started = True
            task_status.started()

    while True:
        began = trio.current_time()
        try:
            ended = await _serve_once(host, endpoint_url, keepalive, on_connected)
        except (trio_websocket.HandshakeError, OSError) as exc:
            refusal = _refusal(exc)
            if refusal is not None:
                raise refusal from exc
            if not reconnect:
                raise
            problem = f"cannot connect to {where}: {_describe_failure(exc)}"
        else:
            if ended.code in _FINAL_CLOSE_CODES:
                raise EndpointRefused(ended.code, ended.reason)
            if not reconnect:
                return
            problem = f"connection to {where} closed ({ended.code} {ended.reason})".rstrip()
            if trio.current_time() - began >= _STABLE_AFTER:
                failures = 0
        delay = _backoff(failures, initial_backoff, max_backoff)
        failures += 1
        log.warning("%s; reconnecting in %.1f s", problem, delay)
        await trio.sleep(delay)


def _describe_failure(exc: BaseException) -> str:
    """One line on why a connection attempt failed (trio-websocket wraps the OSError)."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return "timed out"
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


# --------------------------------------------------------------------------- load_plugin


def load_plugin(spec: str) -> Plugin:
    """Import and instantiate a plugin named ``package.module:ClassName``.

    The attribute may be dotted (``module:Outer.Inner``) and may also be a ready
    :class:`Plugin` instance. A class is instantiated with no arguments.

    Raises:
        PluginLoadError: the spec is malformed, the module cannot be imported, the
            attribute is missing, it is not a Plugin subclass, or instantiating it failed.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise PluginLoadError(f"{spec!r}: expected module:ClassName, e.g. my_tools:MyPlugin")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise PluginLoadError(f"{spec!r}: no module named {module_name!r}") from exc
        raise PluginLoadError(f"{spec!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise PluginLoadError(
            f"{spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise PluginLoadError(
                f"{spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if isinstance(target, Plugin):
        return target
    if not (isinstance(target, type) and issubclass(target, Plugin)):
        kind = "a class" if isinstance(target, type) else f"a {type(target).__name__}"
        raise PluginLoadError(
            f"{spec!r}: is {kind}, not a subclass of trio_mcp_relay.plugins.Plugin"
        )
    try:
        return target()
    except Exception as exc:
        raise PluginLoadError(
            f"{spec!r}: {attribute}() failed: {type(exc).__name__}: {exc}"
        ) from exc
