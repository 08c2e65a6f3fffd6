"""The plugin API: tool schemas from type hints, the MCP tool side, the examples, the command.

Layers, as a newcomer meets them: schemas and argument checks are pure functions (property
tests with hypothesis); :class:`PluginHost.handle` is one frame in, one frame out (no
sockets); :meth:`PluginHost.serve` runs on an in-memory WebSocket pair; ``run_tools`` is
tested end to end against a real relay on a loopback port, with a real caller.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import os
import re
import signal
import sys
import threading
import typing
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pytest
import trio
import typer
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.helpers import (
    RunningRelay,
    peer,
    recv,
    send,
    start_command,
    start_relay,
    wait_for_counts,
)
from trio_mcp_relay import _cmd_tools
from trio_mcp_relay._frames import dumps
from trio_mcp_relay._transport import memory_websocket_pair
from trio_mcp_relay.examples.calculator import Calculator, CalculatorError, evaluate
from trio_mcp_relay.examples.clock import Clock
from trio_mcp_relay.plugins import (
    SUPPORTED_PROTOCOL_VERSIONS,
    EndpointRefused,
    InvalidArguments,
    Plugin,
    PluginHost,
    PluginLoadError,
    Tool,
    ToolError,
    ToolResult,
    _param,
    _schema_errors,
    jsonrpc_err,
    jsonrpc_ok,
    load_plugin,
    run_tools,
    tool,
)
from trio_mcp_relay.testing import json_values

TIMEOUT = 10

# ----------------------------------------------------------------------------- helpers


def request(rid: Any, method: str, params: Any = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        frame["params"] = params
    return frame


def call(rid: Any, name: str, arguments: Any = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name}
    if arguments is not None:
        params["arguments"] = arguments
    return request(rid, "tools/call", params)


async def ask(host: PluginHost, frame: Any) -> Any:
    """Send one frame (a dict, or raw text) to ``host``; the parsed answer, or None."""
    with trio.fail_after(TIMEOUT):
        raw = await host.handle(frame if isinstance(frame, str | bytes) else json.dumps(frame))
    return None if raw is None else json.loads(raw)


def errors(schema: dict[str, Any], value: Any) -> list[str]:
    return list(_schema_errors(schema, value))


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Sample(Plugin):
    """A plugin with one tool of each kind the host must handle."""

    @tool
    def add(self, a: Annotated[int, "the first addend"], b: int = 2) -> int:
        """Add two integers.

        This second paragraph is not part of the description.
        """
        return a + b

    @tool(name="paint", description="Paint something.")
    async def paint_it(self, color: Color, shade: float | None = None) -> dict[str, Any]:
        return {"color": color.value, "shade": shade, "types": [type(shade).__name__]}

    @tool
    def listing(self) -> list[int]:
        """A list result."""
        return [1, 2, 3]

    @tool
    def nothing(self) -> None:
        """No result at all."""

    @tool
    def custom(self) -> ToolResult:
        """A hand-made result."""
        return ToolResult([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])

    @tool
    def refuse(self) -> str:
        """Fails the way a tool reports a failure."""
        raise ToolError("cannot do that")

    @tool
    def crash(self) -> str:
        """Fails with a bug."""
        raise KeyError("missing")

    @tool(blocking=True)
    def in_thread(self) -> str:
        """Reports the thread it runs on."""
        return threading.current_thread().name


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize(
    ("hint", "schema"),
    [
        (int, {"type": "integer"}),
        (float, {"type": "number"}),
        (bool, {"type": "boolean"}),
        (str, {"type": "string"}),
        (Any, {}),
        (list[int], {"type": "array", "items": {"type": "integer"}}),
        (list, {"type": "array"}),
        (dict[str, float], {"type": "object", "additionalProperties": {"type": "number"}}),
        (dict, {"type": "object"}),
        (int | None, {"anyOf": [{"type": "integer"}, {"type": "null"}]}),
        (typing.Optional[str], {"anyOf": [{"type": "string"}, {"type": "null"}]}),  # noqa: UP045
        (Literal["a", "b"], {"type": "string", "enum": ["a", "b"]}),
        (Literal[1, "x"], {"enum": [1, "x"]}),
        (Color, {"type": "string", "enum": ["red", "green"]}),
        (Annotated[int, "how many"], {"type": "integer", "description": "how many"}),
        (
            list[Annotated[str, "a tag"]],
            {"type": "array", "items": {"type": "string", "description": "a tag"}},
        ),
    ],
)
def test_schema_of_each_supported_hint(hint: Any, schema: dict[str, Any]) -> None:
    assert _param(hint, "test").schema == schema


@pytest.mark.parametrize("hint", [bytes, set[int], dict[int, str], tuple[int, int], complex])
def test_unsupported_hints_are_refused_when_decorating(hint: Any) -> None:
    def f(x: Any) -> None: ...

    f.__annotations__["x"] = hint
    with pytest.raises(TypeError, match="parameter 'x'"):
        tool(f)


def test_tool_definition_from_signature_and_docstring() -> None:
    (add,) = [d for d in Sample().tools() if d["name"] == "add"]
    assert add == {
        "name": "add",
        "description": "Add two integers.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "description": "the first addend"},
                "b": {"type": "integer", "default": 2},
            },
            "required": ["a"],
            "additionalProperties": False,
        },
    }


def test_tool_name_and_description_overrides_and_enum_default() -> None:
    (paint,) = [d for d in Sample().tools() if d["name"] == "paint"]
    assert paint["description"] == "Paint something."
    assert paint["inputSchema"]["required"] == ["color"]
    assert paint["inputSchema"]["properties"]["shade"]["default"] is None


def test_plain_functions_and_kwargs() -> None:
    @tool
    async def free(x: int, *, flag: bool = False, **rest: Any) -> str:
        return f"{x} {flag} {rest}"

    assert isinstance(free, Tool)
    assert not free.is_method
    schema = free.input_schema
    assert schema["required"] == ["x"]
    assert "additionalProperties" not in schema  # **rest takes anything else
    assert errors(schema, {"x": 1, "other": [1]}) == []


def test_decorated_methods_stay_callable() -> None:
    plugin = Sample()
    assert plugin.add(1, 2) == 3
    assert Sample.add.name == "add"


@pytest.mark.parametrize("name", ["", "has space", "slash/name", "x" * 129])
def test_invalid_tool_names(name: str) -> None:
    with pytest.raises(ValueError, match="tool name"):
        tool(name=name)(lambda: None)


def test_decorator_misuse_is_reported() -> None:
    def positional(x: int, /) -> None: ...

    with pytest.raises(TypeError, match="by name"):
        tool(positional)

    async def coro() -> None: ...

    with pytest.raises(TypeError, match="sync functions only"):
        tool(blocking=True)(coro)


def test_tools_are_inherited_overridden_and_unique() -> None:
    class Base(Plugin):
        @tool
        def one(self) -> str:
            return "base"

        @tool
        def two(self) -> str:
            return "base"

    class Child(Base):
        @tool
        def one(self) -> str:
            return "child"

        two = None  # hides the inherited tool

        @tool
        def three(self) -> str:
            return "child"

    assert [d["name"] for d in Child().tools()] == ["one", "three"]
    assert [d["name"] for d in Base().tools()] == ["one", "two"]

    with pytest.raises(TypeError, match="two tools are named 'same'"):

        class Clash(Plugin):
            @tool(name="same")
            def a(self) -> None: ...

            @tool(name="same")
            def b(self) -> None: ...


def test_schema_error_messages() -> None:
    schema = Sample.add.input_schema
    assert errors(schema, {"a": "1"}) == ["'a' must be an integer, not a string"]
    assert errors(schema, {}) == ["missing required argument 'a'"]
    assert errors(schema, {"a": 1, "c": 3}) == ["unexpected argument 'c'"]
    assert errors(schema, {"a": True}) == ["'a' must be an integer, not a boolean"]
    assert errors(schema, {"a": 2.0}) == []  # JSON Schema: 2.0 is an integer
    nested = _param(dict[str, list[int | None]], "t").schema
    assert errors(nested, {"k": [1, None, "x"]}) == [
        "'k[2]' must be an integer or null, not a string"
    ]
    bounded = {"type": "string", "minLength": 2, "maxLength": 3}
    assert errors(bounded, "a") == ["the arguments must be at least 2 characters long"]
    assert errors({"type": "number", "minimum": 0, "exclusiveMaximum": 1}, 1) == [
        "the arguments must be less than 1"
    ]


# Types as hypothesis builds them, and an independent oracle for "does this value fit".
_LEAF_TYPES = st.sampled_from([int, float, bool, str, Any, Color, Literal["x", 2, None]])


def _types() -> st.SearchStrategy[Any]:
    return st.recursive(
        _LEAF_TYPES,
        lambda inner: st.one_of(
            inner.map(lambda t: list[t]),  # type: ignore[valid-type]
            inner.map(lambda t: dict[str, t]),  # type: ignore[valid-type]
            inner.map(lambda t: typing.Optional[t]),  # noqa: UP045
            st.tuples(inner, inner).map(lambda ts: typing.Union[ts]),  # noqa: UP007
        ),
        max_leaves=4,
    )


def _values_of(hint: Any) -> st.SearchStrategy[Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    simple: dict[Any, st.SearchStrategy[Any]] = {
        int: st.integers(),
        float: st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53),
        bool: st.booleans(),
        str: st.text(max_size=8),
        Any: json_values(4),
        Color: st.sampled_from([c.value for c in Color]),
        type(None): st.none(),
    }
    if hint in simple:
        return simple[hint]
    if origin is list:
        return st.lists(_values_of(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=4), _values_of(args[1]), max_size=3)
    if origin is typing.Union:
        return st.one_of([_values_of(a) for a in args])
    assert origin is Literal
    return st.sampled_from(args)


def _fits(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int or (type(value) is float and value.is_integer())
    if hint is float:
        return type(value) in (int, float)
    if hint is str:
        return type(value) is str
    if hint is type(None):
        return value is None
    if hint is Color:
        return type(value) is str and value in ("red", "green")
    if origin is list:
        return type(value) is list and all(_fits(args[0], v) for v in value)
    if origin is dict:
        return type(value) is dict and all(_fits(args[1], v) for v in value.values())
    if origin is typing.Union:
        return any(_fits(a, value) for a in args)
    assert origin is Literal
    return any(type(value) is type(a) and value == a for a in args)


@given(st.data())
def test_values_of_the_type_are_accepted_and_converted(data: st.DataObject) -> None:
    hint = data.draw(_types(), label="type")
    value = data.draw(_values_of(hint), label="value")
    param = _param(hint, "test")
    assert errors(param.schema, json.loads(json.dumps(value))) == []
    converted = param.convert(value)
    if hint is Color:
        assert converted is Color(value)
    elif hint is float:
        assert type(converted) is float and converted == value


@given(_types(), json_values(6))
def test_schema_accepts_exactly_what_fits_the_type(hint: Any, value: Any) -> None:
    assert (errors(_param(hint, "test").schema, value) == []) == _fits(hint, value)


# ----------------------------------------------------------------------------- PluginHost.handle


@pytest.mark.parametrize("version", SUPPORTED_PROTOCOL_VERSIONS)
async def test_initialize_echoes_a_supported_version(version: str) -> None:
    with trio.fail_after(10):
        answer = await ask(
            PluginHost([Sample()]), request(0, "initialize", {"protocolVersion": version})
        )
        assert answer["id"] == 0
        assert answer["result"]["protocolVersion"] == version
        assert answer["result"]["capabilities"] == {"tools": {"listChanged": False}}
        assert set(answer["result"]["serverInfo"]) == {"name", "version"}


@pytest.mark.parametrize("params", [{"protocolVersion": "1999-01-01"}, {}, None])
async def test_initialize_offers_the_latest_version_otherwise(params: Any) -> None:
    with trio.fail_after(10):
        host = PluginHost([Sample()], name="mine", version="9", instructions="Be nice.")
        answer = await ask(host, request("i", "initialize", params))
        assert answer["result"]["protocolVersion"] == SUPPORTED_PROTOCOL_VERSIONS[-1]
        assert answer["result"]["serverInfo"] == {"name": "mine", "version": "9"}
        assert answer["result"]["instructions"] == "Be nice."


async def test_ping_and_notifications() -> None:
    with trio.fail_after(10):
        host = PluginHost([Sample()])
        assert await ask(host, request(1.5, "ping")) == {"jsonrpc": "2.0", "id": 1.5, "result": {}}
        for method in ("notifications/initialized", "notifications/cancelled", "tools/call"):
            assert await ask(host, {"jsonrpc": "2.0", "method": method}) is None
        # Responses (to requests the host never sends) are dropped too.
        assert await ask(host, {"jsonrpc": "2.0", "id": 3, "result": {}}) is None


async def test_tools_list_pages_through_every_tool() -> None:
    with trio.fail_after(10):
        many = [_numbered_plugin(i) for i in range(7)]
        host = PluginHost(many, page_size=3)
        seen: list[str] = []
        pages = 0
        cursor: str | None = None
        while True:
            params = {"cursor": cursor} if cursor else None
            answer = await ask(host, request(pages, "tools/list", params))
            result = answer["result"]
            assert len(result["tools"]) <= 3
            seen += [t["name"] for t in result["tools"]]
            pages += 1
            cursor = result.get("nextCursor")
            if cursor is None:
                break
            assert isinstance(cursor, str)
        assert seen == [f"tool_{i}" for i in range(7)]
        assert pages == 3
        assert host.tool_names == seen


async def test_tools_list_single_page_has_no_cursor() -> None:
    with trio.fail_after(10):
        answer = await ask(PluginHost([Sample()]), request(1, "tools/list", {}))
        assert "nextCursor" not in answer["result"]
        assert len(answer["result"]["tools"]) == len(Sample().tools())


@pytest.mark.parametrize("cursor", ["nonsense", "", 5, "bzo5OQ", "bzow"])
async def test_tools_list_rejects_bad_cursors(cursor: Any) -> None:
    with trio.fail_after(10):
        host = PluginHost([_numbered_plugin(i) for i in range(3)], page_size=1)
        answer = await ask(host, request(1, "tools/list", {"cursor": cursor}))
        assert answer["error"]["code"] == -32602
        assert "cursor" in answer["error"]["message"]


def _numbered_plugin(index: int) -> Plugin:
    def body(self: Plugin) -> str:
        return str(index)

    body.__name__ = body.__qualname__ = f"tool_{index}"
    return type(f"Numbered{index}", (Plugin,), {"t": Tool(body, name=f"tool_{index}")})()


@pytest.mark.parametrize(
    ("name", "arguments", "content", "structured"),
    [
        ("add", {"a": 40}, [{"type": "text", "text": "42"}], None),
        ("add", {"a": 1.0, "b": 2}, [{"type": "text", "text": "3"}], None),
        (
            "paint",
            {"color": "red", "shade": 1},
            [{"type": "text", "text": '{"color": "red", "shade": 1.0, "types": ["float"]}'}],
            {"color": "red", "shade": 1.0, "types": ["float"]},
        ),
        ("listing", None, [{"type": "text", "text": "[1, 2, 3]"}], None),
        ("nothing", {}, [], None),
        ("custom", {}, [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], None),
    ],
)
async def test_tools_call_results(
    name: str, arguments: Any, content: list[Any], structured: Any
) -> None:
    with trio.fail_after(10):
        answer = await ask(PluginHost([Sample()]), call(7, name, arguments))
        expected: dict[str, Any] = {"content": content, "isError": False}
        if structured is not None:
            expected["structuredContent"] = structured
        assert answer == {"jsonrpc": "2.0", "id": 7, "result": expected}


async def test_a_tool_that_raises_reports_it_in_the_result() -> None:
    with trio.fail_after(10):
        host = PluginHost([Sample()])
        refused = await ask(host, call(1, "refuse"))
        assert refused["result"] == {
            "content": [{"type": "text", "text": "cannot do that"}],
            "isError": True,
        }
        crashed = await ask(host, call(2, "crash"))
        assert crashed["result"]["isError"] is True
        assert crashed["result"]["content"][0]["text"] == "KeyError: 'missing'"


async def test_blocking_tools_run_in_a_worker_thread() -> None:
    with trio.fail_after(10):
        answer = await ask(PluginHost([Sample()]), call(1, "in_thread"))
        assert answer["result"]["content"][0]["text"] != threading.current_thread().name


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"name": "nope", "arguments": {}}, "Unknown tool: nope"),
        ({"name": "add", "arguments": {}}, "missing required argument 'a'"),
        ({"name": "add", "arguments": {"a": "x"}}, "'a' must be an integer, not a string"),
        ({"name": "add", "arguments": {"a": 1, "z": 0}}, "unexpected argument 'z'"),
        ({"name": "paint", "arguments": {"color": "blue"}}, 'must be one of "red", "green"'),
        ({"name": "add", "arguments": [1]}, "not an object"),
        ({"arguments": {}}, "params.name must be a string"),
        ([1, 2], "params must be an object"),
    ],
)
async def test_tools_call_invalid_params(params: Any, message: str) -> None:
    with trio.fail_after(10):
        answer = await ask(PluginHost([Sample()]), request("r", "tools/call", params))
        assert answer["id"] == "r"
        assert answer["error"]["code"] == -32602
        assert message in answer["error"]["message"]
        assert "result" not in answer


async def test_unknown_method() -> None:
    with trio.fail_after(10):
        answer = await ask(PluginHost([Sample()]), request(3, "resources/list"))
        assert answer == {
            "jsonrpc": "2.0",
            "id": 3,
            "error": {
                "code": -32601,
                "message": "Method not found",
                "data": {"method": "resources/list"},
            },
        }


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", -32700),
        (b"\xff\xfe", -32700),
        ("[]", -32600),
        ('[{"jsonrpc":"2.0","id":1,"method":"ping"}]', -32600),
        ('{"id":1,"method":"ping"}', -32600),
        ('{"jsonrpc":"2.0","id":null,"method":"ping"}', -32600),
        ('"just a string"', -32600),
    ],
)
async def test_malformed_frames(frame: str | bytes, code: int) -> None:
    with trio.fail_after(10):
        answer = await ask(PluginHost([Sample()]), frame)
        assert answer["id"] is None
        assert answer["error"]["code"] == code


async def test_frames_with_a_trailing_newline_are_fine() -> None:
    with trio.fail_after(10):
        assert (await ask(PluginHost([]), b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n'))[
            "result"
        ] == {}


def test_tool_names_must_be_unique_across_plugins() -> None:
    with pytest.raises(ValueError, match="duplicate tool name 'add'"):
        PluginHost([Sample(), Sample()])
    with pytest.raises(ValueError, match="page_size"):
        PluginHost([], page_size=0)


class HandWritten(Plugin):
    """A plugin without @tool: it lists and runs its tools itself."""

    def tools(self) -> list[dict[str, Any]]:
        schema = {"type": "object", "properties": {"word": {"type": "string"}}}
        return [{"name": "echo", "description": "Echo a word.", "inputSchema": schema}]

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        if arguments.get("word") == "forbidden":
            raise InvalidArguments("'word' may not be 'forbidden'")
        return arguments.get("word", "")


async def test_hand_written_plugins() -> None:
    with trio.fail_after(10):
        host = PluginHost([HandWritten()])
        answer = await ask(host, call(1, "echo", {"word": "hi"}))
        assert answer["result"]["content"] == [{"type": "text", "text": "hi"}]
        wrong_type = await ask(host, call(2, "echo", {"word": 5}))
        assert wrong_type["error"]["code"] == -32602  # the host checked the schema
        refused = await ask(host, call(3, "echo", {"word": "forbidden"}))
        assert refused["error"] == {
            "code": -32602,
            "message": "Invalid arguments for tool 'echo': 'word' may not be 'forbidden'",
        }


def test_jsonrpc_helpers() -> None:
    assert jsonrpc_ok(1, {}) == {"jsonrpc": "2.0", "id": 1, "result": {}}
    assert Plugin.jsonrpc_err("a", -32000, "boom") == {
        "jsonrpc": "2.0",
        "id": "a",
        "error": {"code": -32000, "message": "boom"},
    }
    assert jsonrpc_err(None, -32000, "boom", {"x": 1})["error"]["data"] == {"x": 1}


# ----------------------------------------------------------------------------- PluginHost.serve


class Slow(Plugin):
    def __init__(self) -> None:
        self.release = trio.Event()
        self.started = trio.Event()
        self.cancelled = False

    @tool
    async def slow(self) -> str:
        """Waits until released."""
        self.started.set()
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled = True
            raise
        return "done"


async def _send(ws: Any, frame: Any) -> None:
    await ws.send_many([dumps(frame)])


async def _recv(ws: Any) -> Any:
    return json.loads(await ws.receive())


async def test_a_slow_tool_does_not_block_ping_or_other_calls() -> None:
    plugin = Slow()
    host = PluginHost([plugin, Sample()])
    relay_end, tool_end = memory_websocket_pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.serve, tool_end)
            await _send(relay_end, call(1, "slow"))
            await plugin.started.wait()
            await _send(relay_end, request(2, "ping"))
            assert await _recv(relay_end) == {"jsonrpc": "2.0", "id": 2, "result": {}}
            await _send(relay_end, call(3, "add", {"a": 1}))
            assert (await _recv(relay_end))["id"] == 3
            await relay_end.send_many([b"garbage"])
            assert (await _recv(relay_end))["error"]["code"] == -32700
            plugin.release.set()
            answer = await _recv(relay_end)
            assert answer["id"] == 1
            assert answer["result"]["content"] == [{"type": "text", "text": "done"}]
            await relay_end.close(1000)
        # serve() returned by itself once the connection closed.


async def test_cancelled_requests_are_not_answered() -> None:
    plugin = Slow()
    host = PluginHost([plugin])
    relay_end, tool_end = memory_websocket_pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.serve, tool_end)
            await _send(relay_end, call(7, "slow"))
            await plugin.started.wait()
            cancel = {"requestId": 7, "reason": "user gave up"}
            await _send(
                relay_end, {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel}
            )
            await _send(relay_end, request(8, "ping"))
            assert (await _recv(relay_end))["id"] == 8
            plugin.release.set()
            # The sentinel: had id 7 been answered, its answer would come before this one.
            await _send(relay_end, request(9, "ping"))
            assert (await _recv(relay_end))["id"] == 9
            assert plugin.cancelled
            await relay_end.close(1000)


async def test_serve_cancels_running_tools_when_the_connection_ends() -> None:
    plugin = Slow()
    relay_end, tool_end = memory_websocket_pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(PluginHost([plugin]).serve, tool_end)
            await _send(relay_end, call(1, "slow"))
            await plugin.started.wait()
            await relay_end.close(1001, "going away")
    assert plugin.cancelled


# ----------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 // 2 + 7 % 2", 4),
        ("2 ** 10", 1024),
        ("2 ^ 10", 1024),
        ("-3 - -3", 0),
        ("10 / 4", 2.5),
        ("sqrt(16) + abs(-2)", 6.0),
        ("round(pi, 2)", 3.14),
        ("min(3, 1, 2) + max(1, 5)", 6),
        ("cos(0) + sin(0)", 1.0),
        ("round(e ** 1, 3)", 2.718),
        ("floor(2.7) + ceil(2.1)", 5),
        ("2 ** 1000 % 7", pow(2, 1000, 7)),
        ("+".join(["1"] * 200), 200),
        ("-" * 200 + "1", 1),
    ],
)
def test_calculator_results(expression: str, value: float) -> None:
    result = evaluate(expression)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "__import__() is not allowed"),
        ("__import__('os').system('true')", "is not allowed"),
        ("(1).__class__", "attribute access is not allowed"),
        ("math.pi", "attribute access is not allowed"),
        ("x + 1", "the name 'x' is not allowed"),
        ("lambda: 1", "lambda is not allowed"),
        ("9**9**9", "too large"),
        ("10 ** 10 ** 10", "too large"),
        ("2 ** 100000", "too large"),
        ("10**3000 * 10**3000", "too large"),
        ("exp(1000)", "too large"),
        ("1e308 * 10", "too large"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("sqrt(-1)", "not defined"),
        ("(-8) ** 0.5", "not a real number"),
        ("'a' * 3", "str constant"),
        ("[1, 2]", "list is not allowed"),
        ("{}", "dict is not allowed"),
        ("1 < 2", "compare is not allowed"),
        ("1 << 3", "operator '<<' is not allowed"),
        ("max(*[1])", "positional arguments only"),
        ("round(1.5, ndigits=1)", "positional arguments only"),
        ("open('/etc/passwd')", "open() is not allowed"),
        ("1 +", "not a valid expression"),
        ("", "empty"),
        ("1+" * 600 + "1", "longer than 1000 characters"),
        ("-" * 201 + "1", "too deeply nested"),
        ("-" * 990 + "1", "too deeply nested"),
        ("(" * 300 + "1" + ")" * 300, "not a valid expression"),
    ],
)
def test_calculator_refuses(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=re.escape(message)):
        evaluate(expression)


def _int_expressions() -> st.SearchStrategy[str]:
    leaves = st.integers(0, 60).map(str)
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%"]), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"
            ),
            st.tuples(inner, st.integers(0, 3)).map(lambda t: f"({t[0]}) ** {t[1]}"),
            inner.map(lambda e: f"-{e}"),
        ),
        max_leaves=12,
    )


@given(_int_expressions())
def test_calculator_agrees_with_python(expression: str) -> None:
    try:
        expected = eval(expression, {"__builtins__": {}})  # generated arithmetic only
    except ZeroDivisionError:
        with pytest.raises(CalculatorError, match="division by zero"):
            evaluate(expression)
        return
    result = evaluate(expression)
    assert type(result) is type(expected)
    assert result == expected or (math.isnan(result) and math.isnan(expected))


async def test_calculator_through_the_host() -> None:
    with trio.fail_after(10):
        host = PluginHost([Calculator()])
        ok = await ask(host, call(1, "calculate", {"expression": "6 * 7"}))
        assert ok["result"] == {"content": [{"type": "text", "text": "42"}], "isError": False}
        bad = await ask(host, call(2, "calculate", {"expression": "__import__('os')"}))
        assert bad["result"]["isError"] is True
        assert "__import__() is not allowed" in bad["result"]["content"][0]["text"]


# ----------------------------------------------------------------------------- clock

NOON_UTC = datetime(2024, 7, 1, 12, 0, 0, tzinfo=UTC)


def fixed_clock() -> Clock:
    return Clock(now=lambda: NOON_UTC)


def test_clock_current_time() -> None:
    shanghai = fixed_clock().current_time("Asia/Shanghai")
    assert shanghai == {
        "timezone": "Asia/Shanghai",
        "datetime": "2024-07-01T20:00:00+08:00",
        "date": "2024-07-01",
        "time": "20:00:00",
        "weekday": "Monday",
        "utc_offset": "+08:00",
        "abbreviation": "CST",
    }
    assert fixed_clock().current_time()["datetime"] == "2024-07-01T12:00:00+00:00"
    assert fixed_clock().current_time("america/new_york")["utc_offset"] == "-04:00"


def test_clock_convert_time() -> None:
    converted = fixed_clock().convert_time("09:30", "America/New_York", "Asia/Kolkata")
    assert converted["from"]["datetime"] == "2024-07-01T09:30:00-04:00"
    assert converted["to"]["datetime"] == "2024-07-01T19:00:00+05:30"
    assert converted["difference_hours"] == 9.5
    winter = fixed_clock().convert_time("2024-12-31 23:00", "Europe/London", "Asia/Tokyo")
    assert winter["to"]["datetime"] == "2025-01-01T08:00:00+09:00"
    assert winter["difference_hours"] == 9


def test_clock_list_timezones() -> None:
    assert fixed_clock().list_timezones("new york")["timezones"] == ["America/New_York"]
    assert len(fixed_clock().list_timezones("america", limit=3)["timezones"]) == 3


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime", ""])
def test_clock_unknown_zones(zone: str) -> None:
    with pytest.raises(ToolError, match="unknown timezone"):
        fixed_clock().current_time(zone)


async def test_clock_errors_through_the_host() -> None:
    with trio.fail_after(10):
        host = PluginHost([fixed_clock()])
        answer = await ask(host, call(1, "current_time", {"timezone": "Shanghai"}))
        assert answer["result"]["isError"] is True
        assert answer["result"]["content"][0]["text"] == (
            "unknown timezone 'Shanghai'; did you mean Asia/Shanghai?"
        )
        bad_time = await ask(
            host,
            call(
                2, "convert_time", {"time": "25:99", "from_timezone": "UTC", "to_timezone": "UTC"}
            ),
        )
        assert "cannot read the time" in bad_time["result"]["content"][0]["text"]
        ok = await ask(host, call(3, "current_time", {"timezone": "Europe/Paris"}))
        assert ok["result"]["structuredContent"]["utc_offset"] == "+02:00"


# ----------------------------------------------------------------------------- load_plugin


def test_load_plugin() -> None:
    assert isinstance(load_plugin("trio_mcp_relay.examples.calculator:Calculator"), Calculator)
    assert isinstance(load_plugin("tests.test_plugins:Sample"), Sample)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected module:ClassName"),
        (":Cls", "expected module:ClassName"),
        ("mod:", "expected module:ClassName"),
        ("surely_not_a_module_xyz:Cls", "no module named 'surely_not_a_module_xyz'"),
        ("trio_mcp_relay.examples.nope:Cls", "no module named 'trio_mcp_relay.examples.nope'"),
        ("trio_mcp_relay.examples.calculator:Missing", "has no attribute 'Missing'"),
        ("trio_mcp_relay.examples.calculator:evaluate", "is a function, not a subclass"),
        ("trio_mcp_relay.examples.calculator:CalculatorError", "is a class, not a subclass"),
        ("tests.test_plugins:NeedsArguments", "NeedsArguments() failed: TypeError"),
    ],
)
def test_load_plugin_errors(spec: str, message: str) -> None:
    with pytest.raises(PluginLoadError, match=re.escape(message)):
        load_plugin(spec)


class NeedsArguments(Plugin):
    def __init__(self, required: str) -> None:
        self.required = required


# ----------------------------------------------------------------------------- end to end


@asynccontextmanager
async def tools_serving(
    relay: RunningRelay, agent: str, plugins: Sequence[Plugin], **kwargs: Any
) -> AsyncIterator[None]:
    """``run_tools`` connected to ``relay`` as ``agent``'s tool, until the block ends."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            run_tools, relay.tool_url(agent), plugins, initial_backoff=0.01, **kwargs
        )
        await nursery.start(serve)
        yield
        nursery.cancel_scope.cancel()


async def test_run_tools_through_a_relay(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            tools_serving(relay, "e2e", [Calculator(), fixed_clock()], page_size=2),
            peer(relay.caller_url("e2e")) as caller,
        ):
            await wait_for_counts(relay, tools=1, callers=1)
            params = {
                "protocolVersion": "2024-11-05",
                "capabilities": {},
                "clientInfo": {"name": "t"},
            }
            await send(caller, request(0, "initialize", params))
            init = await recv(caller)
            assert init["id"] == 0
            assert init["result"]["protocolVersion"] == "2024-11-05"
            await send(caller, {"jsonrpc": "2.0", "method": "notifications/initialized"})

            names: list[str] = []
            cursor = None
            while True:
                await send(caller, request(2, "tools/list", {"cursor": cursor} if cursor else {}))
                page = (await recv(caller))["result"]
                names += [t["name"] for t in page["tools"]]
                cursor = page.get("nextCursor")
                if not cursor:
                    break
            assert names == ["calculate", "current_time", "convert_time", "list_timezones"]

            await send(caller, call(3, "calculate", {"expression": "2 ** 16 - 1"}))
            assert (await recv(caller))["result"]["content"][0]["text"] == "65535"
            await send(caller, call(4, "current_time", {"timezone": "Asia/Tokyo"}))
            tokyo = await recv(caller)
            assert tokyo["id"] == 4
            assert tokyo["result"]["structuredContent"]["datetime"] == "2024-07-01T21:00:00+09:00"
            await send(caller, call(5, "nope", {}))
            assert (await recv(caller))["error"]["code"] == -32602


class Big(Plugin):
    @tool
    def big(self) -> str:
        """A result larger than the relay accepts."""
        return "x" * 5000

    @tool
    def small(self) -> str:
        """A result the relay accepts."""
        return "ok"


async def test_run_tools_reconnects_after_the_relay_closes_it(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, max_message_size=2000)
    with trio.fail_after(TIMEOUT):
        async with (
            tools_serving(relay, "again", [Big()]),
            peer(relay.caller_url("again")) as caller,
        ):
            await wait_for_counts(relay, tools=1, callers=1)
            # The answer is too big: the relay closes the tool with 1009 (its requests get
            # -32003), and run_tools connects again.
            await send(caller, call(1, "big"))
            assert (await recv(caller))["error"]["code"] == -32003
            await wait_for_counts(relay, tools=1, callers=1)
            await send(caller, call(2, "small"))
            assert (await recv(caller))["result"]["content"] == [{"type": "text", "text": "ok"}]


async def test_run_tools_stops_on_a_bad_token(relay: RunningRelay) -> None:
    url = relay.tool_url("agent").split("token=")[0] + "token=not-a-token"
    with trio.fail_after(TIMEOUT), pytest.raises(EndpointRefused) as refused:
        await run_tools(url, [Calculator()], initial_backoff=0.01)
    assert refused.value.code == 1008


async def test_run_tools_stops_when_replaced(relay: RunningRelay) -> None:
    outcome: list[BaseException] = []

    async def first(task_status: trio.TaskStatus[None]) -> None:
        try:
            await run_tools(relay.tool_url("twice"), [Calculator()], task_status=task_status)
        except EndpointRefused as exc:
            outcome.append(exc)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(first)
            await wait_for_counts(relay, tools=1, callers=0)
            async with tools_serving(relay, "twice", [Calculator()]):
                while not outcome:  # noqa: ASYNC110 (bounded by fail_after)
                    await trio.sleep(0.01)
    assert isinstance(outcome[0], EndpointRefused)
    assert outcome[0].code == 4001


async def list_tool_names(caller: Any, rid: int) -> list[str]:
    await send(caller, request(rid, "tools/list"))
    answer = await recv(caller)
    assert answer["id"] == rid, answer
    return [t["name"] for t in answer["result"]["tools"]]


async def test_plugin_sets_with_their_own_server_ids_join_one_agent(relay: RunningRelay) -> None:
    params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t"}}
    with trio.fail_after(TIMEOUT):
        async with (
            tools_serving(relay, "sets", [Calculator()], server_id="math"),
            peer(relay.caller_url("sets")) as caller,
        ):
            await send(caller, request(0, "initialize", params))
            assert (await recv(caller))["id"] == 0
            await send(caller, {"jsonrpc": "2.0", "method": "notifications/initialized"})
            assert await list_tool_names(caller, 1) == ["calculate"]
            # A second set on the same token joins (a plain second connection would replace
            # the first): the relay initializes it, lists it, and tells the caller.
            async with tools_serving(relay, "sets", [fixed_clock()], server_id="keys-and-calls"):
                changed = await recv(caller)
                assert changed == {
                    "jsonrpc": "2.0",
                    "method": "notifications/tools/list_changed",
                }
                await wait_for_counts(relay, tools=2, callers=1)
                names = await list_tool_names(caller, 2)
                assert names == ["calculate", "current_time", "convert_time", "list_timezones"]
                await send(caller, call(3, "calculate", {"expression": "6 * 7"}))
                assert (await recv(caller))["result"]["content"][0]["text"] == "42"
                await send(caller, call(4, "current_time", {"timezone": "UTC"}))
                now = await recv(caller)
                assert now["result"]["structuredContent"]["datetime"].startswith("2024-07-01T12")
            # The clock set left: only its tools went, the calculator still answers.
            assert (await recv(caller))["method"] == "notifications/tools/list_changed"
            assert await list_tool_names(caller, 5) == ["calculate"]
            await send(caller, call(6, "calculate", {"expression": "1 + 1"}))
            assert (await recv(caller))["result"]["content"][0]["text"] == "2"


async def test_run_tools_refuses_a_server_id_the_relay_would_refuse() -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="1 to 64 printable"):
        await run_tools("ws://127.0.0.1:1/mcp/?token=t", [Calculator()], server_id="x" * 65)


async def test_run_tools_without_reconnect_raises_when_it_cannot_connect() -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(Exception) as caught:
        await run_tools(
            "ws://127.0.0.1:1/mcp_endpoint/mcp/?token=t", [Calculator()], reconnect=False
        )
    assert not isinstance(caught.value, EndpointRefused)
    with pytest.raises(ValueError, match="ws:// or wss://"):
        await run_tools("http://127.0.0.1/", [Calculator()])


async def test_plugin_host_as_an_embedded_tool(nursery: trio.Nursery) -> None:
    host = PluginHost([Calculator()])
    relay = await start_relay(nursery, embedded_tools={"inside": host.serve})
    with trio.fail_after(TIMEOUT):
        async with peer(relay.caller_url("inside")) as caller:
            await wait_for_counts(relay, tools=1, callers=1)
            await send(caller, call("c", "calculate", {"expression": "max(2, 3) ** 2"}))
            assert (await recv(caller))["result"]["content"][0]["text"] == "9"


# ----------------------------------------------------------------------------- the command

runner = CliRunner()
CALCULATOR = "trio_mcp_relay.examples.calculator:Calculator"
CLOCK = "trio_mcp_relay.examples.clock:Clock"


def command_app() -> typer.Typer:
    app = typer.Typer(rich_markup_mode=None, add_completion=False)

    @app.callback()
    def root() -> None:
        """A test app."""

    _cmd_tools.register(app)
    return app


@pytest.fixture(autouse=True)
def no_endpoint_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCP_ENDPOINT", raising=False)
    monkeypatch.delenv("LOG_LEVEL", raising=False)


def test_tools_help_has_an_example() -> None:
    result = runner.invoke(command_app(), ["tools", "--help"])
    assert result.exit_code == 0
    text = result.output
    assert "MCP_ENDPOINT" in text
    assert f"trio-mcp-relay tools {CALCULATOR}" in text
    assert "--no-reconnect" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([CALCULATOR], "no endpoint: pass --endpoint URL or set MCP_ENDPOINT"),
        (
            ["--endpoint", "http://127.0.0.1/", CALCULATOR],
            "a base URL has no token: give the tool URL (ws://127.0.0.1/mcp_endpoint/mcp/",
        ),
        (["--endpoint", "ws://h/", "calculator"], "expected module:ClassName"),
        (["--endpoint", "ws://h/", "no_such_module_q:X"], "no module named 'no_such_module_q'"),
        (["--endpoint", "ws://h/", "trio_mcp_relay.examples.calculator:X"], "no attribute 'X'"),
        (
            ["--endpoint", "ws://h/", "trio_mcp_relay.examples.calculator:evaluate"],
            "not a subclass",
        ),
        (["--endpoint", "ws://h/", CALCULATOR, CALCULATOR], "duplicate tool name 'calculate'"),
        (["--endpoint", "ws://h/", "--log-level", "loud", CALCULATOR], "--log-level must be"),
    ],
)
def test_tools_command_errors_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(command_app(), ["tools", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_tools_command_without_plugins_shows_usage() -> None:
    result = runner.invoke(command_app(), ["tools"])
    assert result.exit_code == 2
    assert "Usage" in result.output


def _fake_run_tools(calls: list[dict[str, Any]], behaviour: str) -> Any:
    async def fake(url: str, plugins: Sequence[Plugin], **kwargs: Any) -> None:
        calls.append({"url": url, "plugins": plugins, **kwargs})
        if behaviour == "interrupt":
            signal.raise_signal(signal.SIGINT)
            await trio.sleep_forever()
        if behaviour == "refused":
            raise EndpointRefused(1008, "invalid token")

    return fake


@pytest.mark.parametrize(
    ("behaviour", "exit_code", "message"),
    [
        ("return", 0, ""),
        ("interrupt", 0, ""),
        ("refused", 1, "refused the connection (1008: invalid token)"),
    ],
)
def test_tools_command_runs_the_plugins(
    monkeypatch: pytest.MonkeyPatch, behaviour: str, exit_code: int, message: str
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(_cmd_tools, "run_tools", _fake_run_tools(calls, behaviour))
    monkeypatch.setenv("MCP_ENDPOINT", "ws://127.0.0.1:8004/mcp_endpoint/mcp/?token=T")
    result = runner.invoke(command_app(), ["tools", "--no-reconnect", CALCULATOR, CLOCK])
    assert result.exit_code == exit_code, result.output
    assert message in result.output
    (made,) = calls
    assert made["url"] == "ws://127.0.0.1:8004/mcp_endpoint/mcp/?token=T"
    assert [type(p) for p in made["plugins"]] == [Calculator, Clock]
    assert made["reconnect"] is False


def test_tools_command_serves_each_set_on_its_own_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(_cmd_tools, "run_tools", _fake_run_tools(calls, "return"))
    monkeypatch.setenv("MCP_ENDPOINT", "ws://127.0.0.1:8004/mcp_endpoint/mcp/?token=T")
    args = ["tools", CLOCK, "--set", f"math={CALCULATOR}", "--set", f"both={CALCULATOR},{CLOCK}"]
    result = runner.invoke(command_app(), args)
    assert result.exit_code == 0, result.output
    made = sorted(
        ((c["server_id"] or "", [type(p) for p in c["plugins"]]) for c in calls),
        key=lambda row: row[0],
    )
    assert made == [("", [Clock]), ("both", [Calculator, Clock]), ("math", [Calculator])]
    assert {c["url"] for c in calls} == {"ws://127.0.0.1:8004/mcp_endpoint/mcp/?token=T"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "math"], "expected ID=MODULE:CLASS"),
        (["--set", f"={CALCULATOR}"], "expected ID=MODULE:CLASS"),
        (["--set", "math="], "expected ID=MODULE:CLASS"),
        (["--set", f"{'x' * 65}={CALCULATOR}"], "1 to 64 printable characters"),
        (["--set", f"a={CALCULATOR}", "--set", f"a={CLOCK}"], "is given twice"),
        (["--set", f"a={CALCULATOR},{CALCULATOR}"], "--set a: duplicate tool name"),
        (["--set", "a=no_such_module_q:X"], "no module named 'no_such_module_q'"),
    ],
)
def test_tools_command_set_errors_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(command_app(), ["tools", "--endpoint", "ws://h/?token=t", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


async def test_the_command_serves_two_sets_on_one_token(relay: RunningRelay) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MCP_ENDPOINT", "LOG_LEVEL")}
    env["MCP_ENDPOINT"] = relay.tool_url("cli-sets")
    command = [
        sys.executable,
        "-m",
        "trio_mcp_relay",
        "tools",
        "--set",
        f"math={CALCULATOR}",
        "--set",
        f"time={CLOCK}",
    ]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            process = await start_command(nursery, command, env=env)
            await wait_for_counts(relay, tools=2, callers=0)
            async with peer(relay.caller_url("cli-sets")) as caller:
                rid = 0
                while len(names := await list_tool_names(caller, rid)) < 4:
                    rid += 1
                    await trio.sleep(0.01)
                assert sorted(names) == [
                    "calculate",
                    "convert_time",
                    "current_time",
                    "list_timezones",
                ]
                await send(caller, call("a", "calculate", {"expression": "2 ** 10"}))
                assert (await recv(caller))["result"]["content"][0]["text"] == "1024"
                await send(caller, call("b", "list_timezones", {"query": "tokyo"}))
                zones = await recv(caller)
                assert "Asia/Tokyo" in json.dumps(zones["result"])
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0


def test_tools_command_cannot_connect() -> None:
    url = "ws://127.0.0.1:1/mcp_endpoint/mcp/?token=SECRET"
    result = runner.invoke(
        command_app(), ["tools", "--endpoint", url, "--no-reconnect", CALCULATOR]
    )
    assert result.exit_code == 1
    assert "nothing listens at 127.0.0.1:1 (connection refused)" in result.output
    assert "SECRET" not in result.output
