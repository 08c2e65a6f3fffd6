"""Property-based testing of MCP endpoint relays: hypothesis strategies and a live checker.

For anyone testing an MCP peer or a relay (this one, the reference mcp-endpoint-server, or
another). Needs ``hypothesis`` (``pip install 'trio-mcp-relay[test]'``).

Strategies (all return hypothesis ``SearchStrategy`` objects):

* :func:`json_values`, :func:`ids`: JSON values and JSON-RPC ids, biased towards the values
  real clients trip on (``0``, ``""``, ``1`` vs ``1.0`` vs ``"1"``, integers beyond 64 bits,
  unicode).
* :func:`requests`, :func:`notifications`, :func:`responses`: well-formed JSON-RPC 2.0 frames
  as dicts.
* :func:`hostile_frames`: WebSocket messages a relay must answer with ``-32700``/``-32600``
  (``str`` for text frames, ``bytes`` for binary ones), never crash on.
* :func:`sessions`: scripts of what a tool and several callers send, for :func:`check_session`.

The live checker, :func:`check_session`, connects one tool and several callers to a relay
(any ``ws://`` endpoint speaking the mcp-endpoint-server protocol), plays a script and checks
the relay invariants: it stays up; every well-formed request is answered exactly once, with
its own id (same JSON type and value); nothing reaches a caller it was not meant for. It
returns the list of violations (empty when all hold). ``trio-mcp-relay fuzz`` drives it with
hypothesis and prints the minimal failing script.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import attrs
import trio
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, HandshakeError

from .client import connect_websocket

__all__ = [
    "Session",
    "Step",
    "check_session",
    "hostile_frames",
    "ids",
    "json_values",
    "notifications",
    "requests",
    "responses",
    "same_json",
    "sessions",
]

_RESERVED = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value: null, booleans, integers of any size, finite floats, text, nesting."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=16),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=8), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def ids() -> st.SearchStrategy[str | int | float]:
    """JSON-RPC request ids: strings and numbers, with the values that break naive relays."""
    return st.one_of(
        st.sampled_from([0, "", 1, 1.0, "1", -1, 0.5, 2**63, 2**64, -(2**63) - 1, 2**70, "ид-🙂"]),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    )


def _extra() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in _RESERVED), json_values(4), max_size=2
    )


def requests(
    id_strategy: st.SearchStrategy[Any] | None = None,
    methods: st.SearchStrategy[str] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed JSON-RPC requests (dicts), params absent, null, or structured."""
    return st.builds(
        lambda rid, method, params, extra: {
            **extra,
            "jsonrpc": "2.0",
            "id": rid,
            "method": method,
            **({} if params is _ABSENT else {"params": params}),
        },
        id_strategy if id_strategy is not None else ids(),
        methods if methods is not None else st.sampled_from(["tools/call", "tools/list", "ping"]),
        st.one_of(
            st.just(_ABSENT), st.none(), st.dictionaries(st.text(max_size=8), json_values(6))
        ),
        _extra(),
    )


_ABSENT = object()


def notifications() -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed JSON-RPC notifications (no id)."""
    return st.builds(
        lambda method, params: {"jsonrpc": "2.0", "method": method, "params": params},
        st.sampled_from(
            ["notifications/message", "notifications/tools/list_changed", "notifications/x"]
        ),
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "progressToken"), json_values(6)),
    )


def responses(
    id_strategy: st.SearchStrategy[Any] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed JSON-RPC responses: results and errors."""
    rid = id_strategy if id_strategy is not None else ids()
    result = st.builds(lambda i, r: {"jsonrpc": "2.0", "id": i, "result": r}, rid, json_values(6))
    error = st.builds(
        lambda i, code, message: {
            "jsonrpc": "2.0",
            "id": i,
            "error": {"code": code, "message": message},
        },
        rid,
        st.integers(min_value=-32768, max_value=32767),
        st.text(max_size=20),
    )
    return st.one_of(result, error)


def hostile_frames() -> st.SearchStrategy[str | bytes]:
    """Messages that are not one valid JSON-RPC object: a relay must answer, never crash.

    Text (``str``) and binary (``bytes``) messages: text that is not JSON, invalid UTF-8,
    batches, bare scalars, wrong ``jsonrpc``, ids of the wrong type, both ``result`` and
    ``error``, deep nesting, NaN.
    """
    not_json = st.sampled_from(
        ["", "{", "}", "nope", "{'single': 'quotes'}", '{"a":1,}', "NaN", '{"id": NaN}', "[1,"]
    )
    structural = st.sampled_from(
        [
            "[]",
            '[{"jsonrpc":"2.0","id":1,"method":"ping"}]',
            "null",
            "42",
            '"text"',
            "{}",
            '{"jsonrpc":"1.0","id":1,"method":"ping"}',
            '{"id":1,"method":"ping"}',
            '{"jsonrpc":"2.0","id":true,"method":"ping"}',
            '{"jsonrpc":"2.0","id":null,"method":"ping"}',
            '{"jsonrpc":"2.0","id":[1],"method":"ping"}',
            '{"jsonrpc":"2.0","id":{},"method":"ping"}',
            '{"jsonrpc":"2.0","id":1,"method":7}',
            '{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":"x"}}',
            '{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"x"}}',
            '{"jsonrpc":"2.0","id":1}',
        ]
    )
    nested = st.integers(min_value=300, max_value=5000).map(lambda n: "[" * n + "]" * n)
    bad_utf8 = st.sampled_from([b"\xff\xfe", b'{"jsonrpc":"2.0","method":"\xc3\x28"}', b"\x80"])
    return st.one_of(not_json, structural, nested, bad_utf8)


@attrs.frozen
class Step:
    """One thing a peer sends.

    ``who`` is ``"tool"`` or a caller index; ``kind`` is ``"request"`` (a caller's tools/call
    with id ``value``), ``"hostile"`` (``value`` is the message), ``"notify"`` (a tool
    notification to every caller), or ``"answer"`` (the tool answers its oldest unanswered
    request, or the newest one if ``value`` is true).
    """

    who: str | int
    kind: str
    value: Any = None


@attrs.frozen
class Session:
    """A script for :func:`check_session`."""

    callers: int
    steps: tuple[Step, ...]


def sessions(max_callers: int = 4, max_steps: int = 30) -> st.SearchStrategy[Session]:
    """Scripts of interleaved caller requests (colliding ids), hostile frames from both sides,
    tool notifications and tool answers in any order."""

    @st.composite
    def build(draw: Callable[..., Any]) -> Session:
        n = draw(st.integers(min_value=1, max_value=max_callers))
        caller = st.integers(min_value=0, max_value=n - 1)
        colliding = st.sampled_from([0, "", 1, 1.0, "1", 2**70, -(2**63) - 1, "☃"])
        step = st.one_of(
            st.builds(Step, caller, st.just("request"), st.one_of(colliding, ids())),
            st.builds(Step, caller, st.just("hostile"), hostile_frames()),
            st.builds(Step, st.just("tool"), st.just("hostile"), hostile_frames()),
            st.builds(Step, st.just("tool"), st.just("notify"), st.integers(0, 10**6)),
            st.builds(Step, st.just("tool"), st.just("answer"), st.booleans()),
        )
        return Session(n, tuple(draw(st.lists(step, max_size=max_steps))))

    return build()


def same_json(a: Any, b: Any) -> bool:
    """Equality of JSON values that also requires the same JSON types (``1`` is not ``1.0``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return False
    return bool(a == b)


@attrs.define
class _Caller:
    index: int
    outstanding: dict[int, Any] = attrs.Factory(dict)  # seq -> id sent
    hostile_sent: int = 0
    hostile_answered: int = 0
    notified: list[int] = attrs.Factory(list)
    synced: bool = False


@attrs.define
class _Run:
    """What one check_session run has seen so far; reader tasks update it as frames arrive."""

    callers: list[_Caller]
    problems: list[str] = attrs.Factory(list)
    forwarded: list[Any] = attrs.Factory(list)  # requests the tool got and has not answered
    requests_sent: int = 0
    requests_seen: int = 0
    notified: list[int] = attrs.Factory(list)
    changed: trio.Event = attrs.Factory(trio.Event)

    def poke(self) -> None:
        """A reader saw a frame: wake whoever waits in :meth:`until`."""
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()

    def settled(self) -> bool:
        return all(
            not c.outstanding
            and c.hostile_answered >= c.hostile_sent
            and len(c.notified) >= len(self.notified)
            for c in self.callers
        )


async def check_session(
    tool_url: str,
    caller_url: str,
    session: Session,
    *,
    patience: float = 10.0,
) -> list[str]:
    """Play ``session`` against a live relay and return the invariant violations found.

    Args:
        tool_url: ``ws://…/mcp_endpoint/mcp/?token=…`` for a fresh agent (nothing else may
            be connected to it).
        caller_url: ``ws://…/mcp_endpoint/call/?token=…`` for the same agent.
        session: the script (see :func:`sessions`).
        patience: seconds to wait for each phase (registration, forwarding, answers).

    Returns:
        Human-readable violations; empty if every invariant held.
    """
    run = _Run([_Caller(i) for i in range(session.callers)])
    try:
        async with connect_websocket(tool_url) as tool, trio.open_nursery() as nursery:
            nursery.start_soon(_tool_reader, tool, run)
            sockets = []
            for caller in run.callers:
                sockets.append(await nursery.start(_caller_reader, caller_url, caller, run))
            with trio.fail_after(patience):
                await _sync(tool, run)
            await _play(session, tool, sockets, run, patience)
            with trio.move_on_after(patience) as scope:
                await run.until(lambda: run.requests_seen >= run.requests_sent)
                for request in run.forwarded:
                    await _answer(tool, request)
                run.forwarded.clear()
                await run.until(run.settled)
            await trio.sleep(0.05)  # room for a duplicate answer to show up
            nursery.cancel_scope.cancel()
        _final_report(run, timed_out=scope.cancelled_caught, patience=patience)
        # The relay must still accept connections after all that.
        async with connect_websocket(caller_url):
            pass
    except (HandshakeError, ConnectionClosed, OSError) as exc:
        run.problems.append(f"relay connection failed: {exc!r}")
    except trio.TooSlowError:
        run.problems.append(f"no progress within {patience} s (callers not registered?)")
    return run.problems


async def _sync(tool: Any, run: _Run) -> None:
    """Wait until the relay has registered every caller: each must see a tool notification.

    A relay may answer the handshake before it registers the connection, so the tool repeats
    a marker notification until every caller has received one.
    """
    sync = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "fuzz-sync"}}
    while not all(c.synced for c in run.callers):
        await tool.send_message(json.dumps(sync))
        with trio.move_on_after(0.01):
            await run.until(lambda: all(c.synced for c in run.callers))


async def _play(
    session: Session, tool: Any, sockets: list[Any], run: _Run, patience: float
) -> None:
    seq = 0
    for step in session.steps:
        if step.who == "tool":
            if step.kind == "hostile":
                await tool.send_message(step.value)
            elif step.kind == "notify":
                run.notified.append(step.value)
                data = {"fuzz": step.value}
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/message",
                    "params": {"data": data},
                }
                await tool.send_message(json.dumps(note))
            else:  # answer: the tool first gets every request sent so far
                with trio.fail_after(patience):
                    await run.until(lambda: run.requests_seen >= run.requests_sent)
                if run.forwarded:
                    await _answer(tool, run.forwarded.pop(-1 if step.value else 0))
            continue
        assert isinstance(step.who, int)
        caller = run.callers[step.who]
        if step.kind == "request":
            seq += 1
            caller.outstanding[seq] = step.value
            run.requests_sent += 1
            arguments = {"caller": caller.index, "seq": seq}
            request = {
                "jsonrpc": "2.0",
                "id": step.value,
                "method": "tools/call",
                "params": {"name": "fuzz", "arguments": arguments},
            }
            await sockets[step.who].send_message(json.dumps(request))
        else:
            caller.hostile_sent += 1
            await sockets[step.who].send_message(step.value)


async def _answer(tool: Any, request: Any) -> None:
    arguments = (request.get("params") or {}).get("arguments")
    answer = {"jsonrpc": "2.0", "id": request["id"], "result": {"content": arguments}}
    await tool.send_message(json.dumps(answer))


async def _tool_reader(tool: Any, run: _Run) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            message = await tool.get_message()
            try:
                frame = json.loads(message)
            except ValueError:
                run.problems.append(f"tool received a frame that is not JSON: {message!r:.80}")
                continue
            if not isinstance(frame, dict) or "method" not in frame or "id" not in frame:
                continue  # the relay's answers to the tool's invalid frames, notifications
            if frame["method"] == "tools/call":
                run.forwarded.append(frame)
                run.requests_seen += 1
                run.poke()
            elif frame["method"] != "ping":
                run.problems.append(f"tool received an unexpected request: {frame!r:.120}")


async def _caller_reader(
    url: str, caller: _Caller, run: _Run, *, task_status: trio.TaskStatus[Any]
) -> None:
    async with connect_websocket(url) as ws:
        task_status.started(ws)
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await ws.get_message()
                try:
                    frame = json.loads(message)
                except ValueError:
                    run.problems.append(f"caller {caller.index} received a frame that is not JSON")
                    continue
                _check_caller_frame(caller, frame, run.problems)
                run.poke()
        run.problems.append(f"caller {caller.index} was disconnected by the relay")


def _final_report(run: _Run, *, timed_out: bool, patience: float) -> None:
    for caller in run.callers:
        if caller.outstanding:
            missing = list(caller.outstanding.values())
            run.problems.append(f"caller {caller.index}: no answer for ids {missing!r:.120}")
        if caller.hostile_answered != caller.hostile_sent:
            run.problems.append(
                f"caller {caller.index}: {caller.hostile_sent} invalid frames sent, "
                f"{caller.hostile_answered} error answers"
            )
        if sorted(caller.notified) != sorted(run.notified):
            run.problems.append(
                f"caller {caller.index}: got notifications {caller.notified} of {run.notified}"
            )
    if timed_out:
        run.problems.append(f"timed out after {patience} s waiting for answers")


def _check_caller_frame(caller: _Caller, frame: Any, problems: list[str]) -> None:
    name = f"caller {caller.index}"
    if not isinstance(frame, dict):
        problems.append(f"{name} received a non-object frame: {frame!r:.80}")
        return
    if frame.get("method") == "notifications/message":
        data = (frame.get("params") or {}).get("data")
        if data == "fuzz-sync":
            caller.synced = True
        elif isinstance(data, dict) and "fuzz" in data:
            caller.notified.append(data["fuzz"])
        else:
            problems.append(f"{name} received a notification nobody sent: {frame!r:.120}")
        return
    if "method" in frame:
        problems.append(f"{name} received an unexpected {frame['method']!r}")
        return
    if "error" in frame and frame.get("id") is None:
        code = frame["error"].get("code") if isinstance(frame["error"], dict) else None
        if code not in (-32700, -32600):
            problems.append(f"{name}: invalid frame answered with code {code}")
        caller.hostile_answered += 1
        return
    result = frame.get("result")
    content = result.get("content") if isinstance(result, dict) else None
    if not isinstance(content, dict) or "seq" not in content:
        problems.append(f"{name} received an unexpected response: {frame!r:.160}")
        return
    if content.get("caller") != caller.index:
        problems.append(f"{name} received caller {content.get('caller')}'s response")
        return
    sent_id = caller.outstanding.pop(content["seq"], _MISSING)
    if sent_id is _MISSING:
        problems.append(f"{name} got a second answer to request #{content['seq']}")
    elif not same_json(frame.get("id"), sent_id):
        problems.append(f"{name}: sent id {sent_id!r}, got back {frame.get('id')!r}")


_MISSING = object()
