"""Tests of the pure routing core: every rule of the Router, then properties and a state machine.

Frames are written with the standard library's ``json`` and the router's output is decoded
with it too, so these tests do not trust the relay's own serializer; ids are compared with
``typed`` (``1`` is not ``1.0`` is not ``"1"``).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any

import attrs
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.strategies import colliding_ids, ids, typed
from trio_mcp_relay import testing
from trio_mcp_relay._frames import MISSING
from trio_mcp_relay._routing import CLOSE_REPLACED, Action, Close, Role, Router, Send

CANCELLED = "notifications/cancelled"
PROGRESS = "notifications/progress"
#: A method the relay does not know: it goes to the agent's default server as it is.
CUSTOM = "custom/call"
TOOL_REQUEST_METHODS = ["sampling/createMessage", "roots/list", "elicitation/create"]


def decode(action: Action) -> Any:
    """The JSON a Send carries, after checking it is one compact line."""
    assert isinstance(action, Send), action
    assert b"\n" not in action.data
    assert b"\r" not in action.data
    return json.loads(action.data)


def sends(actions: list[Action]) -> list[tuple[int, Any]]:
    return [(action.conn, decode(action)) for action in actions]


def error(rid: Any, code: int) -> tuple[Any, int]:
    return (typed(rid), code)


def error_of(frame: Any) -> tuple[Any, int]:
    """The (typed id, code) of an error response, after checking its shape."""
    assert set(frame) == {"jsonrpc", "id", "error"}, frame
    assert frame["jsonrpc"] == "2.0"
    assert isinstance(frame["error"]["message"], str)
    return (typed(frame["id"]), frame["error"]["code"])


def tool_item(tool: str | dict[str, Any]) -> dict[str, Any]:
    """A tools/list entry: a bare name becomes a minimal tool."""
    if isinstance(tool, dict):
        return tool
    return {"name": tool, "inputSchema": {"type": "object"}}


class Harness:
    """Drives a Router as the I/O layer would, checking invariants after every input.

    ``tool()`` plays a tool through the relay's initialization (initialize, then tools/list),
    so the tool is ready when it returns. Catalog changes are flushed at once
    (``list_changed_delay=0``), so no notify deadline lingers after a tool connected.
    """

    def __init__(self, timeout: float = 30.0, **options: Any) -> None:
        options.setdefault("list_changed_delay", 0.0)
        self.router = Router(tool_request_timeout=timeout, **options)
        self.now = 0.0
        self._conns = itertools.count(1)
        #: what the relay sent callers while the last tool connected (list_changed...)
        self.notified: list[tuple[int, Any]] = []

    def check(self) -> None:
        assert list(self.router.check_invariants()) == []

    def connect(
        self,
        agent: str = "a",
        identity: str = "main",
        tools: list[str | dict[str, Any]] | tuple[str, ...] = (),
        server_id: str | None = None,
    ) -> tuple[int, list[Action]]:
        """Connect a tool and complete its initialization: its connection, and every action
        that was not part of the handshake with it (what a replacement caused, answers to
        parked requests)."""
        conn = next(self._conns)
        other: list[Action] = []

        def to_tool(actions: list[Action]) -> list[Any]:
            mine = [decode(a) for a in actions if isinstance(a, Send) and a.conn == conn]
            other.extend(a for a in actions if not (isinstance(a, Send) and a.conn == conn))
            self.check()
            return mine

        [init] = to_tool(self.router.tool_connected(conn, agent, server_id, self.now))
        assert init["method"] == "initialize"
        result = {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": identity},
        }
        reply = {"jsonrpc": "2.0", "id": init["id"], "result": result}
        initialized, listing = to_tool(self.router.received(conn, json.dumps(reply), self.now))
        assert initialized == {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert listing["method"] == "tools/list"
        reply = {
            "jsonrpc": "2.0",
            "id": listing["id"],
            "result": {"tools": [tool_item(t) for t in tools]},
        }
        assert to_tool(self.router.received(conn, json.dumps(reply), self.now)) == []
        flushed = self.router.expire(self.now)
        assert all(isinstance(a, Send) for a in flushed)
        self.notified = sends(flushed)
        assert all(f["method"].endswith("/list_changed") for _, f in self.notified)
        self.router.take_deadline_change()
        self.check()
        return conn, other

    def tool(
        self,
        agent: str = "a",
        identity: str = "main",
        tools: list[str | dict[str, Any]] | tuple[str, ...] = (),
        server_id: str | None = None,
    ) -> int:
        """A ready tool; one of the identity of a connected one replaces it."""
        conn, _ = self.connect(agent, identity, tools, server_id)
        return conn

    def replace_tool(
        self, agent: str = "a", identity: str = "main", tools: tuple[str, ...] = ()
    ) -> tuple[int, list[Action]]:
        return self.connect(agent, identity, tools)

    def caller(self, agent: str = "a") -> int:
        conn = next(self._conns)
        assert self.router.caller_connected(conn, agent) == []
        self.check()
        return conn

    def raw(self, conn: int, data: str | bytes) -> list[tuple[int, Any]]:
        actions = self.router.received(conn, data, self.now)
        self.check()
        return sends(actions)

    def send(self, conn: int, obj: Any) -> list[tuple[int, Any]]:
        return self.raw(conn, json.dumps(obj, ensure_ascii=False))

    def request(self, caller: int, rid: Any, method: str = CUSTOM, **members: Any) -> Any:
        """Send a caller request that must be forwarded: the frame the tool gets."""
        frame = {"jsonrpc": "2.0", "id": rid, "method": method, **members}
        actions = self.router.received(caller, json.dumps(frame), self.now)
        self.check()
        [action] = actions
        assert isinstance(action, Send)
        assert self.router.role(action.conn) is Role.TOOL
        forwarded = decode(action)
        assert action.request == forwarded["id"]
        return forwarded

    def respond(self, tool: int, tool_id: Any, result: Any = None) -> list[tuple[int, Any]]:
        return self.send(tool, {"jsonrpc": "2.0", "id": tool_id, "result": result or {}})

    def tool_request(self, tool: int, rid: Any, method: str = "sampling/createMessage") -> Any:
        return self.send(tool, {"jsonrpc": "2.0", "id": rid, "method": method, "params": {}})

    def expire(self, dt: float) -> list[tuple[int, Any]]:
        self.now += dt
        actions = self.router.expire(self.now)
        self.check()
        return sends(actions)

    def caller_gone(self, conn: int) -> list[tuple[int, Any]]:
        actions = self.router.caller_disconnected(conn)
        self.check()
        return sends(actions)

    def tool_gone(self, conn: int) -> list[tuple[int, Any]]:
        actions = self.router.tool_disconnected(conn)
        self.check()
        return sends(actions)


@pytest.fixture
def h() -> Harness:
    return Harness()


# ---------------------------------------------------------------------- requests and ids


@pytest.mark.parametrize(
    "rid", [0, "", 1, 1.0, "1", -7, 1.5, 2**64, -(2**80), "ид-🙂", 1e300, "x" * 40]
)
def test_request_id_is_rewritten_and_restored_exactly(h: Harness, rid: Any) -> None:
    tool = h.tool(tools=["add"])
    caller = h.caller()
    forwarded = h.request(
        caller, rid, method="tools/call", params={"name": "add", "arguments": {"a": 1}}
    )
    assert forwarded == {
        "jsonrpc": "2.0",
        "id": forwarded["id"],
        "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": 1}},
    }
    assert type(forwarded["id"]) in (int, str)
    assert h.router.pending_count() == 1
    [(conn, response)] = h.respond(tool, forwarded["id"], {"content": [1]})
    assert conn == caller
    assert typed(response) == typed({"jsonrpc": "2.0", "id": rid, "result": {"content": [1]}})
    assert h.router.pending_count() == 0


def test_sdk_initialize_with_id_zero(h: Harness) -> None:
    # The reference server loses this response (`if original_id:`). The relay answers
    # initialize itself now; id 0 must survive that, and a forwarded request's answer too.
    tool = h.tool()
    caller = h.caller()
    frame = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "x"}}
    [(conn, response)] = h.send(caller, frame)
    assert conn == caller
    assert typed(response["id"]) == typed(0)
    assert set(response) == {"jsonrpc", "id", "result"}
    assert isinstance(response["result"]["protocolVersion"], str)
    forwarded = h.request(caller, 0)
    [(conn, response)] = h.respond(tool, forwarded["id"], {"protocolVersion": "x"})
    assert conn == caller
    assert typed(response["id"]) == typed(0)


def test_same_id_twice_in_flight_from_one_caller(h: Harness) -> None:
    # xiaozhi-server reuses id 2 for every tools/list page.
    tool = h.tool()
    caller = h.caller()
    first = h.request(caller, 2, params={"cursor": "a"})
    second = h.request(caller, 2, params={"cursor": "b"})
    assert first["id"] != second["id"]
    assert h.respond(tool, second["id"], {"page": 2}) == [
        (caller, {"jsonrpc": "2.0", "id": 2, "result": {"page": 2}})
    ]
    assert h.respond(tool, first["id"], {"page": 1}) == [
        (caller, {"jsonrpc": "2.0", "id": 2, "result": {"page": 1}})
    ]
    assert h.respond(tool, first["id"], {"page": 1}) == []


def test_callers_sharing_an_id_get_their_own_responses(h: Harness) -> None:
    tool = h.tool()
    one, two = h.caller(), h.caller()
    to_one = h.request(one, 1)
    to_two = h.request(two, 1)
    assert to_one["id"] != to_two["id"]
    [(conn, response)] = h.respond(tool, to_two["id"], {"who": "two"})
    assert (conn, response["result"]) == (two, {"who": "two"})
    [(conn, response)] = h.respond(tool, to_one["id"], {"who": "one"})
    assert (conn, response["result"]) == (one, {"who": "one"})


def test_error_responses_are_routed_with_the_original_id(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    forwarded = h.request(caller, "req-1")
    reply = {
        "jsonrpc": "2.0",
        "id": forwarded["id"],
        "error": {"code": 7, "message": "no", "data": [1]},
    }
    assert h.send(tool, reply) == [
        (
            caller,
            {"jsonrpc": "2.0", "id": "req-1", "error": {"code": 7, "message": "no", "data": [1]}},
        )
    ]


def test_params_absent_null_and_extra_members_are_forwarded_as_sent(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    absent = h.request(caller, 1)
    assert "params" not in absent
    null = h.request(caller, 2, params=None)
    assert null["params"] is None
    extra = h.request(caller, 3, params={"a": 1}, trace="t-1")
    assert extra["trace"] == "t-1"
    reply = {"jsonrpc": "2.0", "id": extra["id"], "result": None, "vendor": {"x": 1}}
    assert h.send(tool, reply) == [
        (caller, {"jsonrpc": "2.0", "id": 3, "result": None, "vendor": {"x": 1}})
    ]


def test_response_ids_the_relay_did_not_hand_out_are_dropped(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    forwarded = h.request(caller, 5)
    tool_id = forwarded["id"]
    assert type(tool_id) is int
    for rid in [str(tool_id), float(tool_id), tool_id + 1000, -1, 0, None, "", 5]:
        assert h.respond(tool, rid) == []
        assert (
            h.send(tool, {"jsonrpc": "2.0", "id": rid, "error": {"code": 1, "message": "m"}}) == []
        )
    assert h.router.pending_count() == 1
    [(conn, response)] = h.respond(tool, tool_id)
    assert (conn, typed(response["id"])) == (caller, typed(5))


@pytest.mark.parametrize(
    "frame",
    [
        {"jsonrpc": "2.0", "result": {}},  # xiaozhi-client after notifications/initialized
        {"jsonrpc": "2.0", "id": None, "result": {}},
        {"jsonrpc": "2.0", "error": {"code": 0, "message": "m"}},
        {"jsonrpc": "2.0", "id": None, "error": {"code": 0, "message": "m"}},
    ],
)
def test_idless_responses_from_the_tool_are_dropped(h: Harness, frame: Any) -> None:
    tool = h.tool()
    caller = h.caller()
    h.request(caller, 1)
    assert h.send(tool, frame) == []
    assert h.raw(tool, json.dumps(frame) + "\n") == []
    assert h.router.pending_count() == 1


def test_no_tool_answers_32001_with_the_request_id(h: Harness) -> None:
    caller = h.caller()
    for rid in [0, "", 1.0, "1", 2**70]:
        [(conn, response)] = h.send(caller, {"jsonrpc": "2.0", "id": rid, "method": "tools/list"})
        assert conn == caller
        assert error_of(response) == error(rid, -32001)
    assert h.send(caller, {"jsonrpc": "2.0", "method": "notifications/initialized"}) == []
    assert h.router.pending_count() == 0


def test_caller_notifications_are_forwarded_without_an_id(h: Harness) -> None:
    tool = h.tool()
    other = h.tool(identity="other")
    caller = h.caller()
    # initialized is the relay's to absorb: it initialized the tools itself
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized", "params": {}}
    assert h.send(caller, initialized) == []
    # others go to the default server, as sent
    note = {"jsonrpc": "2.0", "method": "notifications/custom", "params": {"x": [1]}}
    assert h.send(caller, note) == [(tool, note)]
    # roots/list_changed concerns every server
    roots = {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}
    assert sorted(h.send(caller, roots), key=lambda s: s[0]) == [(tool, roots), (other, roots)]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"not json", -32700),
        (b"\xff\xfe", -32700),
        (b"[" * 100_000, -32700),
        (b'[{"jsonrpc":"2.0","id":1,"method":"m"}]', -32600),
        (b'{"jsonrpc":"2.0","id":true,"method":"m"}', -32600),
        (b'{"jsonrpc":"1.0","id":1,"method":"m"}', -32600),
    ],
    ids=["not-json", "not-utf8", "deep", "batch", "bool-id", "jsonrpc-1.0"],
)
@pytest.mark.parametrize("side", ["caller", "tool"])
def test_invalid_frames_are_answered_to_the_sender_only(
    h: Harness, data: bytes, code: int, side: str
) -> None:
    tool = h.tool()
    caller, other = h.caller(), h.caller()
    h.request(caller, 1)
    sender = caller if side == "caller" else tool
    [(conn, response)] = h.raw(sender, data)
    assert conn == sender
    assert error_of(response) == error(None, code)
    assert isinstance(response["error"]["data"], str)
    assert other != conn
    assert h.router.pending_count() == 1


@pytest.mark.parametrize(
    "data",
    [
        # nested deeper than the relay can write back
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":' + b"[" * 1000 + b"]" * 1000 + b"}",
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":' + b'{"a":' * 900 + b"1" + b"}" * 901,
        # a lone surrogate next to a long digit run (the stdlib parser's path)
        b'{"jsonrpc":"2.0","id":12345678901234567890,"method":"m","params":"\\ud800"}',
    ],
    ids=["deep-arrays", "deep-objects", "lone-surrogate"],
)
@pytest.mark.parametrize("side", ["caller", "tool"])
def test_frames_that_cannot_be_forwarded_are_refused_not_raised(
    h: Harness, data: bytes, side: str
) -> None:
    tool = h.tool()
    caller = h.caller()
    sender = caller if side == "caller" else tool
    [(conn, response)] = h.raw(sender, data)
    assert conn == sender
    assert error_of(response) == error(None, -32700)


@given(data=testing.hostile_frames(), side=st.sampled_from(["caller", "tool"]))
def test_hostile_frames_are_answered_to_their_sender(data: str | bytes, side: str) -> None:
    h = Harness()
    tool = h.tool()
    caller = h.caller()
    h.request(caller, 1)
    sender = caller if side == "caller" else tool
    [(conn, response)] = h.raw(sender, data)
    assert conn == sender
    assert response["id"] is None
    assert response["error"]["code"] in (-32700, -32600)
    assert h.router.pending_count() == 1


def test_unregistered_connections_are_ignored(h: Harness) -> None:
    h.tool()
    assert h.raw(999, b'{"jsonrpc":"2.0","id":1,"method":"m"}') == []
    assert h.router.caller_disconnected(999) == []
    assert h.router.tool_disconnected(999) == []
    assert h.router.forward_failed(999, 1) == []
    assert h.router.role(999) is None


# ---------------------------------------------------------------------- progress


def progress(token: Any, n: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": PROGRESS,
        "params": {"progressToken": token, "progress": n, "total": 3},
    }


@pytest.mark.parametrize("token", [3, "tok", 0, "", 1.0, 2**70])
def test_progress_token_is_rewritten_and_restored_to_its_caller(h: Harness, token: Any) -> None:
    tool = h.tool()
    caller, bystander = h.caller(), h.caller()
    forwarded = h.request(
        caller,
        3,
        params={"name": "count", "_meta": {"progressToken": token, "other": [1]}},
    )
    tool_token = forwarded["params"]["_meta"]["progressToken"]
    assert forwarded["params"] == {
        "name": "count",
        "_meta": {"progressToken": tool_token, "other": [1]},
    }
    # The bystander's request with the same token gets a different tool-side token.
    other = h.request(bystander, 3, params={"_meta": {"progressToken": token}})
    assert other["params"]["_meta"]["progressToken"] != tool_token

    [(conn, note)] = h.send(tool, progress(tool_token, 1))
    assert conn == caller
    assert typed(note) == typed(progress(token, 1))
    [(conn, note)] = h.send(tool, progress(other["params"]["_meta"]["progressToken"], 2))
    assert conn == bystander
    assert typed(note) == typed(progress(token, 2))

    h.respond(tool, forwarded["id"])
    assert h.send(tool, progress(tool_token, 3)) == []


def test_progress_for_a_request_without_token_is_not_delivered(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    forwarded = h.request(caller, 1, params={})
    assert h.send(tool, progress(forwarded["id"])) == []


def test_progress_with_an_unknown_token_goes_to_every_caller_of_the_agent(h: Harness) -> None:
    tool = h.tool()
    one, two = h.caller(), h.caller()
    h.tool("b")
    elsewhere = h.caller("b")
    note = progress("the-tool's-own-token")
    assert sorted(h.send(tool, note), key=lambda s: s[0]) == [(one, note), (two, note)]
    assert elsewhere not in {conn for conn, _ in h.send(tool, progress(10**9))}


def test_progress_with_no_caller_is_dropped(h: Harness) -> None:
    tool = h.tool()
    assert h.send(tool, progress("t")) == []


# ---------------------------------------------------------------------- notifications


def test_tool_notifications_go_to_every_caller_of_its_agent_only(h: Harness) -> None:
    tool = h.tool("a")
    one, two = h.caller("a"), h.caller("a")
    h.tool("b")
    h.caller("b")
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info"}}
    delivered = h.send(tool, note)
    assert sorted(delivered, key=lambda s: s[0]) == [(one, note), (two, note)]


def test_tool_notification_without_callers_is_dropped(h: Harness) -> None:
    tool = h.tool()
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info"}}
    assert h.send(tool, note) == []
    assert h.raw(tool, json.dumps(note) + "\n") == []


def test_tool_list_changed_is_not_forwarded_but_relisted(h: Harness) -> None:
    # xiaozhi-mcphub sends list_changed the moment it connects: the relay lists the tool
    # again; callers hear only the relay's own list_changed, and only if they initialized
    # and what they saw changed.
    tool = h.tool(tools=["a"])
    plain, initialized = h.caller(), h.caller()
    h.send(initialized, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})
    note = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    [(conn, listing)] = h.send(tool, note)
    assert (conn, listing["method"]) == (tool, "tools/list")
    # the same list: nothing to tell
    assert h.respond(tool, listing["id"], {"tools": [tool_item("a")]}) == []
    assert h.expire(1.0) == []
    [(_, listing)] = h.raw(tool, json.dumps(note) + "\n")
    assert h.respond(tool, listing["id"], {"tools": [tool_item("a"), tool_item("b")]}) == []
    assert h.expire(0.0) == [
        (initialized, {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
    ]
    assert plain != initialized


# ---------------------------------------------------------------------- cancellation


def cancel(rid: Any, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": CANCELLED, "params": {"requestId": rid, **params}}


def test_cancellation_is_rewritten_and_the_late_response_dropped(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    forwarded = h.request(caller, 0)
    assert h.send(caller, cancel(0, reason="user")) == [
        (tool, cancel(forwarded["id"], reason="user"))
    ]
    assert h.router.pending_count() == 0
    assert h.respond(tool, forwarded["id"]) == []
    assert (
        h.send(
            tool,
            {
                "jsonrpc": "2.0",
                "id": forwarded["id"],
                "error": {"code": 0, "message": "Request cancelled"},
            },
        )
        == []
    )


def test_cancellation_of_a_reused_id_cancels_the_latest(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    first = h.request(caller, 1)
    second = h.request(caller, 1)
    assert h.send(caller, cancel(1)) == [(tool, cancel(second["id"]))]
    [(conn, response)] = h.respond(tool, first["id"])
    assert (conn, typed(response["id"])) == (caller, typed(1))
    assert h.respond(tool, second["id"]) == []


@pytest.mark.parametrize("wanted", [1.0, "1", 2, None])
def test_cancellation_of_an_unknown_id_is_dropped(h: Harness, wanted: Any) -> None:
    h.tool()
    caller = h.caller()
    h.request(caller, 1)
    assert h.send(caller, cancel(wanted)) == []
    assert h.send(caller, {"jsonrpc": "2.0", "method": CANCELLED}) == []
    assert h.send(caller, {"jsonrpc": "2.0", "method": CANCELLED, "params": [1]}) == []
    assert h.router.pending_count() == 1


def test_a_caller_cannot_cancel_another_callers_request(h: Harness) -> None:
    tool = h.tool()
    owner, other = h.caller(), h.caller()
    forwarded = h.request(owner, 1)
    assert h.send(other, cancel(1)) == []
    assert [conn for conn, _ in h.respond(tool, forwarded["id"])] == [owner]


# ---------------------------------------------------------------------- tool-side requests


def test_tool_ping_is_answered_by_the_relay(h: Harness) -> None:
    tool = h.tool()
    h.caller()
    for rid in [0, "p", 1.0]:
        [(conn, response)] = h.send(tool, {"jsonrpc": "2.0", "id": rid, "method": "ping"})
        assert conn == tool
        assert typed(response) == typed({"jsonrpc": "2.0", "id": rid, "result": {}})
    assert h.router.pending_count() == 0


@pytest.mark.parametrize("method", TOOL_REQUEST_METHODS)
@pytest.mark.parametrize("tool_id", [0, "s-1", 1.0])
def test_tool_request_round_trip(h: Harness, method: str, tool_id: Any) -> None:
    tool = h.tool()
    caller = h.caller()
    h.request(caller, "busy")  # tool requests go to a caller with a request in flight
    params = {"messages": [{"role": "user"}], "maxTokens": 10}
    [(conn, forwarded)] = h.send(
        tool, {"jsonrpc": "2.0", "id": tool_id, "method": method, "params": params}
    )
    assert conn == caller
    assert forwarded == {
        "jsonrpc": "2.0",
        "id": forwarded["id"],
        "method": method,
        "params": params,
    }
    assert h.router.pending_count() == 2
    reply = {"jsonrpc": "2.0", "id": forwarded["id"], "result": {"content": "hi"}}
    [(conn, answer)] = h.send(caller, reply)
    assert conn == tool
    assert typed(answer) == typed({"jsonrpc": "2.0", "id": tool_id, "result": {"content": "hi"}})
    assert h.router.pending_count() == 1
    assert h.send(caller, reply) == []


def test_tool_request_error_answer_is_routed_back(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    h.request(caller, "busy")
    [(_, forwarded)] = h.tool_request(tool, 9, "roots/list")
    reply = {"jsonrpc": "2.0", "id": forwarded["id"], "error": {"code": -1, "message": "no roots"}}
    assert h.send(caller, reply) == [
        (tool, {"jsonrpc": "2.0", "id": 9, "error": {"code": -1, "message": "no roots"}})
    ]


def test_colliding_tool_request_ids_get_distinct_caller_side_ids(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    h.request(caller, "busy")
    [(_, first)] = h.tool_request(tool, 0)
    [(_, second)] = h.tool_request(tool, 0)
    assert first["id"] != second["id"]
    assert h.send(caller, {"jsonrpc": "2.0", "id": second["id"], "result": {"n": 2}}) == [
        (tool, {"jsonrpc": "2.0", "id": 0, "result": {"n": 2}})
    ]


def test_tool_request_goes_to_the_most_recently_active_busy_caller(h: Harness) -> None:
    h.tool()
    idle_old, busy_old, busy_new, idle_new = (h.caller() for _ in range(4))
    tool = h.router.tool_of("a")
    assert tool is not None
    h.request(busy_old, 1)
    h.request(busy_new, 1)
    h.send(idle_new, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    [(conn, _)] = h.tool_request(tool, 1)
    assert conn == busy_new
    # activity moves the choice: busy_old speaks last
    h.request(busy_old, 2)
    [(conn, _)] = h.tool_request(tool, 2)
    assert conn == busy_old
    assert idle_old not in (busy_old, busy_new)


def test_tool_request_goes_to_the_most_recently_active_caller_with_a_request_to_it(
    h: Harness,
) -> None:
    # Before, an idle caller would do; now only callers with a request in flight to that
    # tool are candidates, the most recently active of them.
    tool = h.tool()
    first, second, third = h.caller(), h.caller(), h.caller()
    [(conn, response)] = h.tool_request(tool, 1)
    assert (conn, error_of(response)) == (tool, error(1, -32005))  # nobody is busy
    h.request(first, "f")
    h.request(third, "t")
    [(conn, _)] = h.tool_request(tool, 2)
    assert conn == third
    h.send(first, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    [(conn, _)] = h.tool_request(tool, 3)
    assert conn == first
    # invalid frames are no sign of life
    h.raw(third, b"garbage")
    [(conn, _)] = h.tool_request(tool, 4)
    assert conn == first
    # an idle caller is never chosen, however recently active
    h.send(second, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    [(conn, _)] = h.tool_request(tool, 5)
    assert conn == first
    # a caller that had in-flight requests but got its answers is no longer busy
    forwarded = h.request(second, 1)
    [(conn, _)] = h.tool_request(tool, 6)
    assert conn == second
    h.respond(tool, forwarded["id"])
    [(conn, _)] = h.tool_request(tool, 7)
    assert conn == first


def test_tool_request_goes_only_to_a_caller_busy_with_that_tool(h: Harness) -> None:
    main = h.tool()
    other = h.tool(identity="other", tools=["o"])
    to_main, to_other = h.caller(), h.caller()
    h.request(to_main, 1)
    h.request(to_other, 1, method="tools/call", params={"name": "o"})
    [(conn, _)] = h.tool_request(main, "m")
    assert conn == to_main
    [(conn, _)] = h.tool_request(other, "o")
    assert conn == to_other


@pytest.mark.parametrize(
    ("method", "capability"),
    [
        ("sampling/createMessage", "sampling"),
        ("roots/list", "roots"),
        ("elicitation/create", "elicitation"),
    ],
)
def test_tool_request_needs_the_declared_capability(
    h: Harness, method: str, capability: str
) -> None:
    tool = h.tool()
    declared, undeclared, silent = h.caller(), h.caller(), h.caller()
    declarations: list[tuple[int, dict[str, Any]]] = [
        (declared, {capability: {}}),
        (undeclared, {"other": {}}),
    ]
    for conn, caps in declarations:
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"capabilities": caps}}
        h.send(conn, init)
    h.request(declared, 1)
    h.request(silent, 1)
    h.request(undeclared, 1)  # the most recent, but it declared no such capability
    [(conn, _)] = h.tool_request(tool, 1, method)
    assert conn == silent  # never sent initialize: taken at its word for none, accepted
    h.caller_gone(silent)
    [(conn, _)] = h.tool_request(tool, 2, method)
    assert conn == declared
    h.caller_gone(declared)
    [(conn, response)] = h.tool_request(tool, 3, method)
    assert (conn, error_of(response)) == (tool, error(3, -32005))


@pytest.mark.parametrize("method", TOOL_REQUEST_METHODS)
def test_tool_request_without_caller_is_answered_32005(h: Harness, method: str) -> None:
    tool = h.tool()
    busy_elsewhere = h.caller("other-agent")
    h.tool("other-agent")
    h.request(busy_elsewhere, 1)
    [(conn, response)] = h.tool_request(tool, "t-1", method)
    assert conn == tool
    assert error_of(response) == error("t-1", -32005)
    # a connected caller with nothing in flight to this tool does not count either
    h.caller()
    [(conn, response)] = h.tool_request(tool, "t-2", method)
    assert (conn, error_of(response)) == (tool, error("t-2", -32005))
    assert h.router.pending_count() == 1


def test_unanswered_tool_request_times_out() -> None:
    h = Harness(timeout=10.0)
    tool = h.tool()
    caller = h.caller()
    h.request(caller, "busy")
    assert h.router.next_deadline() is None
    assert not h.router.take_deadline_change()
    h.now = 100.0
    [(_, forwarded)] = h.tool_request(tool, 0)
    assert h.router.take_deadline_change()
    assert not h.router.take_deadline_change()
    assert h.router.next_deadline() == 110.0
    assert h.expire(9.5) == []
    delivered = h.expire(0.5)
    assert len(delivered) == 2
    assert (tool, error(0, -32006)) in [(c, error_of(f)) for c, f in delivered if "error" in f]
    [(conn, note)] = [(c, f) for c, f in delivered if "method" in f]
    assert conn == caller
    assert note["method"] == CANCELLED
    assert typed(note["params"]["requestId"]) == typed(forwarded["id"])
    assert h.router.pending_count() == 1
    assert h.router.next_deadline() is None
    # the caller answers too late
    assert h.send(caller, {"jsonrpc": "2.0", "id": forwarded["id"], "result": {}}) == []
    assert h.expire(100.0) == []


def test_only_the_chosen_caller_may_answer_a_tool_request(h: Harness) -> None:
    tool = h.tool()
    other, chosen = h.caller(), h.caller()
    h.request(other, 1)
    h.request(chosen, 1)
    [(conn, forwarded)] = h.tool_request(tool, 1)
    assert conn == chosen
    assert h.send(other, {"jsonrpc": "2.0", "id": forwarded["id"], "result": {}}) == []
    assert h.send(chosen, {"jsonrpc": "2.0", "id": str(forwarded["id"]), "result": {}}) == []
    assert [
        c for c, _ in h.send(chosen, {"jsonrpc": "2.0", "id": forwarded["id"], "result": {}})
    ] == [tool]


def test_tool_cancelling_its_request_tells_the_caller(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    h.request(caller, "busy")
    [(_, forwarded)] = h.tool_request(tool, "s")
    assert h.send(tool, cancel("s", reason="done")) == [
        (caller, cancel(forwarded["id"], reason="done"))
    ]
    assert h.router.pending_count() == 1
    assert h.send(caller, {"jsonrpc": "2.0", "id": forwarded["id"], "result": {}}) == []
    assert h.send(tool, cancel("unknown")) == []


def test_caller_leaving_fails_what_it_owed_the_tool(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    busy = h.request(caller, "busy")
    h.tool_request(tool, "s-1")
    delivered = h.caller_gone(caller)
    assert {conn for conn, _ in delivered} == {tool}
    [response] = [f for _, f in delivered if "error" in f]
    assert error_of(response) == error("s-1", -32003)
    [note] = [f for _, f in delivered if "method" in f]
    assert (note["method"], note["params"]["requestId"]) == (CANCELLED, busy["id"])
    assert h.router.pending_count() == 0


# ---------------------------------------------------------------------- departures


def test_tool_disconnect_answers_everything_in_flight_32003(h: Harness) -> None:
    tool = h.tool()
    one, two = h.caller(), h.caller()
    h.request(one, 0)
    h.request(one, 0)
    h.request(two, "x")
    h.request(two, 1.0)
    [(owing, forwarded)] = h.tool_request(tool, 5)
    delivered = h.tool_gone(tool)
    errors = Counter((c, error_of(f)) for c, f in delivered if "error" in f)
    assert errors == Counter(
        {
            (one, error(0, -32003)): 2,
            (two, error("x", -32003)): 1,
            (two, error(1.0, -32003)): 1,
        }
    )
    [(conn, note)] = [(c, f) for c, f in delivered if "method" in f]
    assert (conn, note["method"], note["params"]["requestId"]) == (
        owing,
        CANCELLED,
        forwarded["id"],
    )
    assert h.router.pending_count() == 0
    assert h.router.tool_of("a") is None
    assert h.router.role(tool) is None
    assert h.tool_gone(tool) == []
    [(conn, response)] = h.send(one, {"jsonrpc": "2.0", "id": 3, "method": "m"})
    assert error_of(response) == error(3, -32001)


def test_caller_disconnect_cancels_its_requests_at_the_tool(h: Harness) -> None:
    tool = h.tool()
    leaving, staying = h.caller(), h.caller()
    first = h.request(leaving, 1)
    second = h.request(leaving, 1)
    kept = h.request(staying, 1)
    delivered = h.caller_gone(leaving)
    assert {conn for conn, _ in delivered} == {tool}
    assert all(note["method"] == CANCELLED for _, note in delivered)
    assert all(isinstance(note["params"]["reason"], str) for _, note in delivered)
    assert sorted(note["params"]["requestId"] for _, note in delivered) == sorted(
        [first["id"], second["id"]]
    )
    assert h.router.pending_count() == 1
    assert h.respond(tool, first["id"]) == []
    assert h.send(tool, progress(second["id"])) == []
    assert [c for c, _ in h.respond(tool, kept["id"])] == [staying]
    assert h.caller_gone(leaving) == []


def test_caller_disconnect_without_tool(h: Harness) -> None:
    caller = h.caller()
    assert h.caller_gone(caller) == []
    assert h.router.stats()["robot_connections"] == 0


def test_tool_replacement(h: Harness) -> None:
    old = h.tool()
    caller = h.caller()
    h.request(caller, "r")
    [(owing, forwarded)] = h.tool_request(old, 1)
    new, actions = h.replace_tool()
    closes = [a for a in actions if isinstance(a, Close)]
    assert closes == [Close(old, CLOSE_REPLACED, closes[0].reason)]
    assert CLOSE_REPLACED == 4001
    assert 0 < len(closes[0].reason.encode()) <= 123
    delivered = sends([a for a in actions if isinstance(a, Send)])
    assert [(c, error_of(f)) for c, f in delivered if "error" in f] == [
        (caller, error("r", -32003))
    ]
    [(conn, note)] = [(c, f) for c, f in delivered if "method" in f]
    assert (conn, note["params"]["requestId"]) == (owing, forwarded["id"])
    assert h.router.tool_of("a") == new
    assert h.router.role(old) is None
    assert h.router.role(new) is Role.TOOL

    # the old connection's late frames and its own disconnect change nothing
    assert h.raw(old, json.dumps(progress("x"))) == []
    assert h.raw(old, b'{"jsonrpc":"2.0","id":1,"method":"sampling/createMessage"}') == []
    assert h.tool_gone(old) == []
    assert h.router.tool_of("a") == new
    assert h.router.stats()["tool_connections"] == 1

    forwarded = h.request(caller, "after")
    [(conn, response)] = h.respond(new, forwarded["id"])
    assert (conn, typed(response["id"])) == (caller, typed("after"))


def test_tool_ids_stay_unique_across_a_replacement(h: Harness) -> None:
    h.tool()
    caller = h.caller()
    before = h.request(caller, 1)["id"]
    new, _ = h.replace_tool()
    after = h.request(caller, 1)["id"]
    assert before != after
    assert h.respond(new, before) == []


def test_forward_failed_answers_32002(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    actions = h.router.received(caller, b'{"jsonrpc":"2.0","id":"f","method":"m"}', 0.0)
    [send] = actions
    assert isinstance(send, Send)
    assert send.request is not None
    [(conn, response)] = sends(h.router.forward_failed(tool, send.request))
    h.check()
    assert conn == caller
    assert error_of(response) == error("f", -32002)
    assert h.router.pending_count() == 0
    assert h.router.forward_failed(tool, send.request) == []
    assert h.respond(tool, send.request) == []


def test_forward_failed_on_a_replaced_tool_is_a_no_op(h: Harness) -> None:
    old = h.tool()
    caller = h.caller()
    tool_id = h.request(caller, 1)["id"]
    h.replace_tool()
    assert h.router.forward_failed(old, tool_id) == []


def test_only_forwarded_requests_carry_a_request_tag(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    actions = h.router.received(caller, b'{"jsonrpc":"2.0","method":"n"}', 0.0)
    assert [a.request for a in actions if isinstance(a, Send)] == [None]
    actions = h.router.received(tool, b'{"jsonrpc":"2.0","id":1,"method":"ping"}', 0.0)
    assert [a.request for a in actions if isinstance(a, Send)] == [None]


# ---------------------------------------------------------------------- limits and shutdown


def test_caller_request_timeout() -> None:
    h = Harness(request_timeout=5.0)
    tool = h.tool()
    caller = h.caller()
    assert h.router.next_deadline() is None
    h.now = 100.0
    forwarded = h.request(caller, 0)
    assert h.router.take_deadline_change()
    assert h.router.next_deadline() == 105.0
    answered = h.request(caller, 1)
    h.respond(tool, answered["id"])
    assert h.expire(4.0) == []
    delivered = h.expire(1.0)
    assert len(delivered) == 2
    [(conn, response)] = [(c, f) for c, f in delivered if "error" in f]
    assert (conn, error_of(response)) == (caller, error(0, -32006))
    [(conn, note)] = [(c, f) for c, f in delivered if "method" in f]
    assert (conn, note["method"], note["params"]["requestId"]) == (tool, CANCELLED, forwarded["id"])
    assert h.router.pending_count() == 0
    assert h.router.next_deadline() is None
    assert h.respond(tool, forwarded["id"]) == []
    assert h.expire(100.0) == []


def test_requests_answered_in_time_do_not_expire() -> None:
    h = Harness(request_timeout=5.0)
    tool = h.tool()
    caller = h.caller()
    for rid in range(3):
        h.respond(tool, h.request(caller, rid)["id"])
    h.request(caller, "cancelled")
    h.send(caller, cancel("cancelled"))
    h.request(caller, "orphaned")
    h.caller_gone(caller)
    assert h.router.next_deadline() is None
    assert h.expire(10.0) == []


def test_no_request_timeout_by_default(h: Harness) -> None:
    h.tool()
    caller = h.caller()
    h.request(caller, 1)
    assert h.router.next_deadline() is None
    assert h.expire(10**9) == []
    assert h.router.pending_count() == 1


def test_the_timer_is_woken_before_it_would_oversleep_a_deadline() -> None:
    # The server's timer task sleeps until next_deadline() and is woken after a frame when
    # take_deadline_change() says so; it must never sleep past a deadline.
    h = Harness(timeout=10.0, request_timeout=5.0)
    tool = h.tool()
    caller = h.caller()
    timer: float | None = None

    def frame_handled() -> None:
        nonlocal timer
        if h.router.take_deadline_change():
            timer = h.router.next_deadline()
        earliest = h.router.next_deadline()
        assert earliest is None or (timer is not None and timer <= earliest)

    assert not h.router.take_deadline_change()
    first = h.request(caller, 1)
    frame_handled()
    assert timer == 5.0
    h.now = 1.0
    h.request(caller, 2)
    frame_handled()
    h.tool_request(tool, "s")
    frame_handled()
    h.respond(tool, first["id"])
    frame_handled()
    assert h.expire(4.0) == []  # the timer fires at 5 for a request answered meanwhile
    timer = h.router.next_deadline()
    assert timer == 6.0
    h.request(caller, 3)
    frame_handled()
    assert timer == 6.0


def test_max_inflight_per_caller() -> None:
    h = Harness(max_inflight_per_caller=2)
    tool = h.tool()
    caller, other = h.caller(), h.caller()
    first = h.request(caller, 1)
    h.request(caller, 2)
    [(conn, response)] = h.send(caller, {"jsonrpc": "2.0", "id": 3, "method": CUSTOM})
    assert (conn, error_of(response)) == (caller, error(3, -32007))
    # what the relay answers itself takes no slot
    [(conn, response)] = h.send(caller, {"jsonrpc": "2.0", "id": 4, "method": "tools/list"})
    assert (conn, response["result"]) == (caller, {"tools": []})
    assert h.router.pending_count() == 2
    h.request(other, 3)
    h.respond(tool, first["id"])
    h.request(caller, 4)
    assert h.router.pending_count() == 3


def test_max_tool_requests_per_agent() -> None:
    h = Harness(max_tool_requests=1)
    tool = h.tool()
    caller = h.caller()
    h.request(caller, "busy")
    [(_, forwarded)] = h.tool_request(tool, "a")
    [(conn, response)] = h.tool_request(tool, "b")
    assert (conn, error_of(response)) == (tool, error("b", -32007))
    [(conn, response)] = h.send(tool, {"jsonrpc": "2.0", "id": "p", "method": "ping"})
    assert (conn, response["result"]) == (tool, {})
    h.send(caller, {"jsonrpc": "2.0", "id": forwarded["id"], "result": {}})
    [(conn, _)] = h.tool_request(tool, "c")
    assert conn == caller


def test_draining_refuses_new_requests_and_finishes_old_ones(h: Harness) -> None:
    tool = h.tool()
    caller = h.caller()
    forwarded = h.request(caller, 1)
    h.router.draining = True
    [(conn, response)] = h.send(caller, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert (conn, error_of(response)) == (caller, error(2, -32003))
    note = {"jsonrpc": "2.0", "method": "notifications/custom"}
    assert h.send(caller, note) == [(tool, note)]
    [(conn, response)] = h.respond(tool, forwarded["id"])
    assert (conn, typed(response["id"])) == (caller, typed(1))


# ---------------------------------------------------------------------- stats


def test_stats_and_roles(h: Harness) -> None:
    empty = {
        "tool_connections": 0,
        "robot_connections": 0,
        "total_connections": 0,
        "robot_connections_by_agent": {},
    }
    assert h.router.stats() == empty
    ta = h.tool("a")
    h.tool("b")
    ca1, ca2 = h.caller("a"), h.caller("a")
    h.caller("c")
    assert h.router.stats() == {
        "tool_connections": 2,
        "robot_connections": 3,
        "total_connections": 5,
        "robot_connections_by_agent": {"a": 2, "c": 1},
    }
    assert h.router.role(ta) is Role.TOOL
    assert (h.router.caller_count("a"), h.router.caller_count("b")) == (2, 0)
    assert h.router.caller_count("nobody") == 0
    assert h.router.role(ca1) is Role.CALLER
    h.replace_tool("a")
    assert h.router.stats()["tool_connections"] == 2
    h.caller_gone(ca1)
    h.caller_gone(ca2)
    h.tool_gone(ta)  # replaced already: no effect
    stats = h.router.stats()
    assert stats["robot_connections_by_agent"] == {"c": 1}
    assert (stats["tool_connections"], stats["robot_connections"]) == (2, 1)
    assert stats["total_connections"] == 3


# ---------------------------------------------------------------------- properties


@given(
    calls=st.lists(
        st.tuples(st.integers(0, 2), st.one_of(colliding_ids, ids), st.booleans()),
        min_size=1,
        max_size=12,
    ),
    order=st.randoms(use_true_random=False),
)
def test_id_round_trip_property(calls: list[tuple[int, Any, bool]], order: Any) -> None:
    h = Harness()
    tool = h.tool()
    callers = [h.caller() for _ in range(3)]
    sent: list[tuple[int, Any, Any, bool]] = []  # (caller, id, tool-side id, ok)
    for n, (index, rid, ok) in enumerate(calls):
        forwarded = h.request(callers[index], rid, params={"n": n})
        assert forwarded["params"] == {"n": n}
        assert typed(forwarded["id"]) not in {typed(s[2]) for s in sent}
        sent.append((callers[index], rid, forwarded["id"], ok))
    assert h.router.pending_count() == len(calls)
    answers = list(enumerate(sent))
    order.shuffle(answers)
    for n, (caller, rid, tool_id, ok) in answers:
        if ok:
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": tool_id, "result": {"n": n}}
        else:
            reply = {"jsonrpc": "2.0", "id": tool_id, "error": {"code": n, "message": "e"}}
        [(conn, response)] = h.send(tool, reply)
        assert conn == caller
        assert typed(response) == typed({**reply, "id": rid})
    assert h.router.pending_count() == 0


@attrs.define
class _Call:
    agent: str
    caller: int
    rid: Any
    tool_id: Any
    n: int


@given(data=st.data(), n_agents=st.integers(1, 3), n_callers=st.integers(1, 3))
def test_interleavings_over_several_agents(data: Any, n_agents: int, n_callers: int) -> None:
    h = Harness()
    agents = [f"agent-{i}" for i in range(n_agents)]
    tools = {agent: h.tool(agent) for agent in agents}
    callers = {agent: [h.caller(agent) for _ in range(n_callers)] for agent in agents}
    peers = {agent: {tools[agent], *callers[agent]} for agent in agents}
    in_flight: dict[str, list[_Call]] = {agent: [] for agent in agents}
    answered: Counter[int] = Counter()
    calls = 0
    steps = data.draw(st.integers(1, 40), label="steps")
    for step in range(steps + 100):
        finishing = step >= steps
        agent = data.draw(st.sampled_from(agents))
        if finishing:
            pending = [a for a in agents if in_flight[a]]
            if not pending:
                break
            agent = pending[0]
        if not finishing and data.draw(st.integers(0, 5)) == 0:
            note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": step}}
            delivered = h.send(tools[agent], note)
            assert sorted(conn for conn, _ in delivered) == sorted(callers[agent])
            assert all(frame == note for _, frame in delivered)
            continue
        if not finishing and (not in_flight[agent] or data.draw(st.booleans())):
            caller = data.draw(st.sampled_from(callers[agent]))
            rid = data.draw(st.one_of(colliding_ids, ids), label="id")
            forwarded = h.request(caller, rid, params={"n": calls})
            assert typed(forwarded["id"]) not in {typed(c.tool_id) for c in in_flight[agent]}
            in_flight[agent].append(_Call(agent, caller, rid, forwarded["id"], calls))
            calls += 1
            continue
        call = in_flight[agent].pop(data.draw(st.integers(0, len(in_flight[agent]) - 1)))
        [(conn, response)] = h.respond(tools[agent], call.tool_id, {"n": call.n})
        assert conn == call.caller
        assert conn in peers[agent]
        assert typed(response) == typed({"jsonrpc": "2.0", "id": call.rid, "result": {"n": call.n}})
        answered[call.n] += 1
    assert answered == Counter(range(calls))
    assert h.router.pending_count() == 0


# ---------------------------------------------------------------------- state machine


class _AnyStr:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)

    __hash__ = None  # type: ignore[assignment]


ANY_STR = _AnyStr()
RELAY_CODES = frozenset({-32001, -32002, -32003, -32004, -32005, -32006, -32007})


def normalize(frame: Any) -> Any:
    """Drop the free-text parts of what the relay writes itself (messages, reasons)."""
    if isinstance(frame.get("error"), dict) and frame["error"].get("code") in RELAY_CODES:
        frame = {**frame, "error": {"code": frame["error"]["code"]}}
    if frame.get("method") == CANCELLED and isinstance(frame.get("params"), dict):
        frame = {**frame, "params": {"requestId": frame["params"]["requestId"]}}
    return frame


def out(conn: int, frame: Any) -> tuple[Any, ...]:
    return ("send", conn, typed(normalize(frame)))


def relay_error(conn: int, rid: Any, code: int) -> tuple[Any, ...]:
    return out(conn, {"jsonrpc": "2.0", "id": rid, "error": {"code": code}})


def cancelled(conn: int, rid: Any) -> tuple[Any, ...]:
    return out(conn, {"jsonrpc": "2.0", "method": CANCELLED, "params": {"requestId": rid}})


def same_id(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def observed(actions: list[Action]) -> Counter[tuple[Any, ...]]:
    seen: Counter[tuple[Any, ...]] = Counter()
    for action in actions:
        if isinstance(action, Close):
            seen[("close", action.conn, action.code)] += 1
        else:
            assert action.request is None
            seen[out(action.conn, decode(action))] += 1
    return seen


# Requests are what everything else acts on: two rules issue them, for twice the weight.
request_rule = rule(
    data=st.data(),
    rid=st.one_of(colliding_ids, colliding_ids, ids),
    token_kind=st.sampled_from(["none", "id", "other"]),
    token=st.one_of(colliding_ids, ids),
)


@attrs.define(eq=False)
class CallerRequest:
    seq: int
    caller: int
    agent: str
    rid: Any
    token: Any  # the caller's progress token, or MISSING
    tool: int | None = None
    tool_id: Any = None
    tool_token: Any = MISSING
    forward_tag: int | None = None
    deadline: float | None = None  # when the relay gives up waiting for the tool
    state: str = "in flight"  # answered, cancelled, orphaned (its caller left)
    answers: int = 0


@attrs.define(eq=False)
class ToolRequest:
    agent: str
    tool: int
    tool_id: Any
    caller: int
    key: Any  # the id the caller saw
    deadline: float
    state: str = "pending"  # answered, expired, cancelled, failed


class RouterMachine(RuleBasedStateMachine):
    """Random traffic against a model of what each peer should see, frame by frame.

    The model also plays the server's timer task: it sleeps until ``next_deadline()``, is
    woken when ``take_deadline_change()`` says so after a frame, and calls ``expire``.
    """

    AGENTS = ("a", "b")
    TIMEOUT = 10.0
    # Off here; LimitedRouterMachine turns them on.
    REQUEST_TIMEOUT = 0.0
    MAX_INFLIGHT = 0
    MAX_TOOL_REQUESTS = 0
    DRAINS = False

    def __init__(self) -> None:
        super().__init__()
        self.router = Router(
            tool_request_timeout=self.TIMEOUT,
            request_timeout=self.REQUEST_TIMEOUT,
            max_inflight_per_caller=self.MAX_INFLIGHT,
            max_tool_requests=self.MAX_TOOL_REQUESTS,
        )
        self.draining = False
        self.timer: float | None = None  # what the timer task sleeps until
        self.conns = itertools.count(1)
        self.now = 0.0
        self.activity = 0
        self.tools: dict[str, int] = {}
        self.replaced: list[tuple[str, int]] = []
        self.callers: dict[int, str] = {}
        self.last_active: dict[int, int] = {}
        self.requests: list[CallerRequest] = []
        self.tool_requests: list[ToolRequest] = []
        self.seen_by_tool: dict[int, set[Any]] = {}
        self.encodings = itertools.cycle(["text", "bytes", "line"])

    # ------------------------------------------------------------------ helpers

    def expect(
        self, actions: list[Action], expected: list[tuple[Any, ...]], label: str = ""
    ) -> None:
        assert observed(actions) == Counter(expected)
        if label:
            event(f"{label}: {'nothing' if not expected else len(expected)}")

    def answer(self, req: CallerRequest, frame: Any) -> tuple[Any, ...]:
        assert req.state == "in flight"
        req.state = "answered"
        req.answers += 1
        return out(req.caller, frame)

    def receive(self, conn: int, frame: Any) -> list[Action]:
        text = json.dumps(frame, ensure_ascii=False)
        encoding = next(self.encodings)
        data: str | bytes = text if encoding == "text" else text.encode()
        if encoding == "line":
            data = text.encode() + b"\r\n"
        if conn in self.callers:
            self.activity += 1
            self.last_active[conn] = self.activity
        return self.router.received(conn, data, self.now)

    def in_flight(self, agent: str | None = None) -> list[CallerRequest]:
        return [
            r
            for r in self.requests
            if r.state == "in flight" and (agent is None or r.agent == agent)
        ]

    def pending_tool_requests(self, agent: str | None = None) -> list[ToolRequest]:
        return [
            t
            for t in self.tool_requests
            if t.state == "pending" and (agent is None or t.agent == agent)
        ]

    def in_flight_of(self, caller: int) -> list[CallerRequest]:
        return [r for r in self.in_flight() if r.caller == caller]

    def deadlines(self) -> list[float]:
        """Every deadline the router must act on, per the model."""
        requests = [r.deadline for r in self.in_flight() if r.deadline is not None]
        return requests + [t.deadline for t in self.pending_tool_requests()]

    def callers_of(self, agent: str) -> list[int]:
        return [c for c, a in self.callers.items() if a == agent]

    def tool_gone(self, agent: str) -> list[tuple[Any, ...]]:
        expected = []
        for req in self.in_flight(agent):
            expected.append(
                self.answer(req, {"jsonrpc": "2.0", "id": req.rid, "error": {"code": -32003}})
            )
        for treq in self.pending_tool_requests(agent):
            treq.state = "cancelled"
            expected.append(cancelled(treq.caller, treq.key))
        del self.tools[agent]
        return expected

    # ------------------------------------------------------------------ connections

    @initialize(
        tools=st.sets(st.sampled_from(AGENTS)),
        callers=st.lists(st.sampled_from(AGENTS), min_size=2, max_size=5),
    )
    def start(self, tools: set[str], callers: list[str]) -> None:
        for agent in sorted({"a", *tools}):
            self.connect_tool(agent)
        for agent in callers:
            self.connect_caller(agent)

    def handshake(self, conn: int, agent: str) -> list[Action]:
        """Connect a tool and play its side of the relay's initialization (one identity per
        agent, no tools): every action not part of that handshake."""
        other: list[Action] = []

        def to_tool(actions: list[Action]) -> list[Any]:
            mine = [decode(a) for a in actions if isinstance(a, Send) and a.conn == conn]
            other.extend(a for a in actions if not (isinstance(a, Send) and a.conn == conn))
            return mine

        [init] = to_tool(self.router.tool_connected(conn, agent, None, self.now))
        assert init["method"] == "initialize"
        self.seen_by_tool[conn] = {typed(init["id"])}
        result = {"capabilities": {"tools": {}}, "serverInfo": {"name": "main"}}
        frame = {"jsonrpc": "2.0", "id": init["id"], "result": result}
        initialized, listing = to_tool(self.receive(conn, frame))
        assert initialized["method"] == "notifications/initialized"
        assert listing["method"] == "tools/list"
        self.seen_by_tool[conn].add(typed(listing["id"]))
        frame = {"jsonrpc": "2.0", "id": listing["id"], "result": {"tools": []}}
        assert to_tool(self.receive(conn, frame)) == []
        return other

    @rule(agent=st.sampled_from(AGENTS))
    def connect_tool(self, agent: str) -> None:
        conn = next(self.conns)
        expected = []
        if agent in self.tools:
            old = self.tools[agent]
            expected = [*self.tool_gone(agent), ("close", old, CLOSE_REPLACED)]
            self.replaced.append((agent, old))
        self.expect(self.handshake(conn, agent), expected, "tool connected, replaced")
        self.tools[agent] = conn

    @precondition(lambda self: len(self.callers) < 6)
    @rule(agent=st.sampled_from(AGENTS))
    def connect_caller(self, agent: str) -> None:
        conn = next(self.conns)
        self.expect(self.router.caller_connected(conn, agent), [])
        self.callers[conn] = agent
        self.activity += 1
        self.last_active[conn] = self.activity

    @precondition(lambda self: self.callers)
    @rule(data=st.data())
    def caller_disconnects(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from(sorted(self.callers)))
        agent = self.callers.pop(caller)
        tool = self.tools.get(agent)
        expected = []
        for req in self.in_flight(agent):
            if req.caller == caller:
                req.state = "orphaned"
                assert tool is not None
                expected.append(cancelled(tool, req.tool_id))
        for treq in self.pending_tool_requests(agent):
            if treq.caller == caller:
                treq.state = "failed"
                expected.append(relay_error(treq.tool, treq.tool_id, -32003))
        self.expect(self.router.caller_disconnected(caller), expected, "caller left")
        self.expect(self.router.caller_disconnected(caller), [])

    @precondition(lambda self: self.tools)
    @rule(data=st.data())
    def tool_disconnects(self, data: st.DataObject) -> None:
        agent = data.draw(st.sampled_from(sorted(self.tools)))
        tool = self.tools[agent]
        expected = self.tool_gone(agent)
        self.expect(self.router.tool_disconnected(tool), expected, "tool left")

    @precondition(lambda self: self.replaced)
    @rule(data=st.data())
    def replaced_tool_disconnects(self, data: st.DataObject) -> None:
        agent, old = self.replaced.pop(data.draw(st.integers(0, len(self.replaced) - 1)))
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {}}
        self.expect(self.router.received(old, json.dumps(note), self.now), [])
        self.expect(self.router.tool_disconnected(old), [])
        assert self.router.tool_of(agent) == self.tools.get(agent)

    # ------------------------------------------------------------------ caller to tool

    @precondition(lambda self: self.callers)
    @request_rule
    def caller_requests(self, data: st.DataObject, rid: Any, token_kind: str, token: Any) -> None:
        caller = data.draw(st.sampled_from(sorted(self.callers)))
        agent = self.callers[caller]
        seq = len(self.requests)
        params: dict[str, Any] = {"name": "tool", "arguments": {"seq": seq}}
        if token_kind != "none":
            token = rid if token_kind == "id" else token
            params["_meta"] = {"progressToken": token, "k": "v"}
        else:
            token = MISSING
        req = CallerRequest(seq, caller, agent, rid, token)
        self.requests.append(req)
        frame = {"jsonrpc": "2.0", "id": rid, "method": CUSTOM, "params": params, "x": seq}
        actions = self.receive(caller, frame)
        tool = self.tools.get(agent)
        refusal = None
        if tool is None:
            refusal = -32001
        elif self.draining:
            refusal = -32003
        elif self.MAX_INFLIGHT and len(self.in_flight_of(caller)) > self.MAX_INFLIGHT:
            # (the model already counts this request as in flight)
            refusal = -32007
        if refusal is not None:
            expected = self.answer(req, {"jsonrpc": "2.0", "id": rid, "error": {"code": refusal}})
            self.expect(actions, [expected], f"request refused {refusal}")
            return
        assert tool is not None
        [action] = actions
        assert isinstance(action, Send)
        assert action.conn == tool
        assert action.request is not None
        forwarded = decode(action)
        tool_id = forwarded["id"]
        assert action.request == tool_id
        assert typed(tool_id) not in self.seen_by_tool[tool]
        self.seen_by_tool[tool].add(typed(tool_id))
        if token is not MISSING:
            req.tool_token = forwarded["params"]["_meta"]["progressToken"]
            others = {
                typed(r.tool_token)
                for r in self.in_flight(agent)
                if r is not req and r.tool_token is not MISSING
            }
            assert typed(req.tool_token) not in others
            params = {**params, "_meta": {**params["_meta"], "progressToken": req.tool_token}}
        assert typed(forwarded) == typed({**frame, "id": tool_id, "params": params})
        req.tool, req.tool_id, req.forward_tag = tool, tool_id, action.request
        if self.REQUEST_TIMEOUT:
            req.deadline = self.now + self.REQUEST_TIMEOUT
        event(f"request forwarded, {'with' if token is not MISSING else 'no'} progress token")
        if any(
            same_id(r.rid, rid)
            for r in self.in_flight(agent)
            if r.caller == caller and r is not req
        ):
            event("request forwarded while the same id is in flight")

    @precondition(lambda self: self.callers)
    @request_rule
    def caller_requests_again(
        self, data: st.DataObject, rid: Any, token_kind: str, token: Any
    ) -> None:
        self.caller_requests(data, rid, token_kind, token)

    @precondition(lambda self: self.callers)
    @rule(data=st.data(), unknown=st.one_of(colliding_ids, ids))
    def caller_cancels(self, data: st.DataObject, unknown: Any) -> None:
        live = self.in_flight()
        if len(live) > 0 and data.draw(st.booleans()):
            chosen = data.draw(st.sampled_from(live))
            caller, wanted = chosen.caller, chosen.rid
        else:
            caller, wanted = data.draw(st.sampled_from(sorted(self.callers))), unknown
        matching = [r for r in live if r.caller == caller and same_id(r.rid, wanted)]
        frame = {
            "jsonrpc": "2.0",
            "method": CANCELLED,
            "params": {"requestId": wanted, "reason": "u"},
        }
        actions = self.receive(caller, frame)
        if not matching:
            self.expect(actions, [], "cancel unmatched")
            return
        # A caller that reuses an id while it is in flight can only mean the latest one.
        target = max(matching, key=lambda r: r.seq)
        target.state = "cancelled"
        assert target.tool is not None
        self.expect(actions, [cancelled(target.tool, target.tool_id)], "cancel matched")

    @precondition(lambda self: self.callers or self.tools)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["caller notifies", "tool notifies", "tool pings", "garbage"]),
        rid=st.one_of(colliding_ids, ids),
    )
    def chatter(self, data: st.DataObject, kind: str, rid: Any) -> None:
        if kind == "caller notifies" and self.callers:
            caller = data.draw(st.sampled_from(sorted(self.callers)))
            tool = self.tools.get(self.callers[caller])
            if data.draw(st.booleans()):
                # the relay initialized its tools itself: a caller's initialized is absorbed
                frame = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                self.expect(self.receive(caller, frame), [], "caller initialized absorbed")
            else:
                custom: dict[str, Any] = {"jsonrpc": "2.0", "method": "notifications/custom"}
                self.expect(self.receive(caller, custom), [out(tool, custom)] if tool else [])
        elif kind == "tool notifies" and self.tools:
            agent = data.draw(st.sampled_from(sorted(self.tools)))
            tool = self.tools[agent]
            if data.draw(st.booleans()):
                message: dict[str, Any] = {"jsonrpc": "2.0", "method": "notifications/message"}
                actions = self.receive(tool, message)
                expected = [out(c, message) for c in self.callers_of(agent)]
                self.expect(actions, expected, "tool notification")
            else:
                # not forwarded: the relay lists the tool again (and the list is the same)
                frame = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
                [action] = self.receive(tool, frame)
                assert isinstance(action, Send) and action.conn == tool
                listing = decode(action)
                assert listing["method"] == "tools/list"
                assert typed(listing["id"]) not in self.seen_by_tool[tool]
                self.seen_by_tool[tool].add(typed(listing["id"]))
                reply = {"jsonrpc": "2.0", "id": listing["id"], "result": {"tools": []}}
                self.expect(self.receive(tool, reply), [], "tool list_changed, relisted")
        elif kind == "tool pings" and self.tools:
            tool = self.tools[data.draw(st.sampled_from(sorted(self.tools)))]
            actions = self.receive(tool, {"jsonrpc": "2.0", "id": rid, "method": "ping"})
            self.expect(actions, [out(tool, {"jsonrpc": "2.0", "id": rid, "result": {}})])
        else:
            # Invalid frames are answered to their sender only, and are no sign of life.
            conn = data.draw(st.sampled_from(sorted([*self.callers, *self.tools.values()])))
            garbage = data.draw(st.sampled_from([b"{", b"[]", b'{"jsonrpc":"2.0","id":null}']))
            code = -32700 if garbage == b"{" else -32600
            [action] = self.router.received(conn, garbage, self.now)
            assert isinstance(action, Send)
            assert action.conn == conn
            frame = decode(action)
            assert isinstance(frame["error"].pop("data"), str)  # the reason is free text
            error_frame = {"code": code, "message": ANY_STR}
            assert frame == {"jsonrpc": "2.0", "id": None, "error": error_frame}

    # ------------------------------------------------------------------ tool to caller

    def live_requests_of_tool(self) -> list[CallerRequest]:
        return [
            r for r in self.requests if r.tool is not None and r.tool == self.tools.get(r.agent)
        ]

    def pick_request(self, data: st.DataObject) -> CallerRequest:
        """A request its tool can still answer, in flight more often than not."""
        live = self.live_requests_of_tool()
        in_flight = [r for r in live if r.state == "in flight"]
        if len(in_flight) > 0 and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(in_flight))
        return data.draw(st.sampled_from(live))

    @precondition(lambda self: self.live_requests_of_tool())
    @rule(data=st.data(), how=st.sampled_from(["result", "error", "forward failed"]))
    def tool_responds(self, data: st.DataObject, how: str) -> None:
        req = self.pick_request(data)
        assert req.tool is not None and req.forward_tag is not None
        if how == "forward failed":
            actions = self.router.forward_failed(req.tool, req.forward_tag)
            frame: dict[str, Any] = {"jsonrpc": "2.0", "error": {"code": -32002}}
        else:
            if how == "result":
                frame = {"jsonrpc": "2.0", "id": req.tool_id, "result": {"seq": req.seq}}
            else:
                frame = {"jsonrpc": "2.0", "id": req.tool_id, "error": {"code": 7, "message": "m"}}
            actions = self.receive(req.tool, frame)
        if req.state == "in flight":
            self.expect(actions, [self.answer(req, {**frame, "id": req.rid})], how)
        else:
            self.expect(actions, [], f"{how} late")

    @precondition(lambda self: self.tools)
    @rule(data=st.data(), kind=st.sampled_from(["request", "request", "unknown", "huge"]))
    def tool_sends_progress(self, data: st.DataObject, kind: str) -> None:
        req: CallerRequest | None = None
        if kind == "request" and self.live_requests_of_tool():
            req = self.pick_request(data)
            assert req.tool is not None
            agent, tool = req.agent, req.tool
            token = req.tool_id if req.token is MISSING else req.tool_token
        else:
            agent = data.draw(st.sampled_from(sorted(self.tools)))
            tool = self.tools[agent]
            token = "unknown-token" if kind == "unknown" else 10**12
        frame = {
            "jsonrpc": "2.0",
            "method": PROGRESS,
            "params": {"progressToken": token, "progress": 1},
        }
        actions = self.receive(tool, frame)
        if req is None:
            expected = [out(c, frame) for c in self.callers_of(agent)]
            self.expect(actions, expected, "progress broadcast")
        elif req.state == "in flight" and req.token is not MISSING:
            restored = {**frame, "params": {"progressToken": req.token, "progress": 1}}
            self.expect(actions, [out(req.caller, restored)], "progress restored")
        else:
            self.expect(actions, [], "progress dropped")

    @precondition(lambda self: self.tools)
    @rule(
        data=st.data(),
        rid=st.one_of(colliding_ids, ids),
        method=st.sampled_from(TOOL_REQUEST_METHODS),
    )
    def tool_requests_something(self, data: st.DataObject, rid: Any, method: str) -> None:
        agent = data.draw(st.sampled_from(sorted(self.tools)))
        tool = self.tools[agent]
        frame = {"jsonrpc": "2.0", "id": rid, "method": method, "params": {"q": 1}}
        actions = self.receive(tool, frame)
        if (
            self.MAX_TOOL_REQUESTS
            and len(self.pending_tool_requests(agent)) >= self.MAX_TOOL_REQUESTS
        ):
            self.expect(actions, [relay_error(tool, rid, -32007)], "tool request over the limit")
            return
        # only callers with a request in flight to this tool (one tool per agent here)
        busy = {r.caller for r in self.in_flight(agent) if r.tool == tool}
        candidates = [c for c in self.callers_of(agent) if c in busy]
        if not candidates:
            self.expect(actions, [relay_error(tool, rid, -32005)], "tool request without caller")
            return
        chosen = max(candidates, key=self.last_active.__getitem__)
        event("tool request routed to a busy caller")
        [action] = actions
        assert isinstance(action, Send)
        assert action.conn == chosen
        assert action.request is None
        forwarded = decode(action)
        key = forwarded["id"]
        assert typed(key) not in {typed(t.key) for t in self.pending_tool_requests(agent)}
        assert typed(forwarded) == typed({**frame, "id": key})
        self.tool_requests.append(
            ToolRequest(agent, tool, rid, chosen, key, self.now + self.TIMEOUT)
        )

    def answerable(self) -> list[ToolRequest]:
        return [t for t in self.tool_requests if t.caller in self.callers]

    @precondition(lambda self: self.answerable())
    @rule(data=st.data(), ok=st.booleans(), impostor=st.booleans())
    def caller_answers_tool(self, data: st.DataObject, ok: bool, impostor: bool) -> None:
        answerable = self.answerable()
        pending = [t for t in answerable if t.state == "pending"]
        if len(pending) > 0 and data.draw(st.integers(0, 3)) > 0:
            treq = data.draw(st.sampled_from(pending))
        else:
            treq = data.draw(st.sampled_from(answerable))
        others = [c for c in self.callers_of(treq.agent) if c != treq.caller]
        sender = data.draw(st.sampled_from(others)) if impostor and others else treq.caller
        if ok:
            frame: dict[str, Any] = {"jsonrpc": "2.0", "id": treq.key, "result": {"answer": 1}}
        else:
            frame = {"jsonrpc": "2.0", "id": treq.key, "error": {"code": -1, "message": "no"}}
        actions = self.receive(sender, frame)
        if sender == treq.caller and treq.state == "pending":
            treq.state = "answered"
            self.expect(
                actions, [out(treq.tool, {**frame, "id": treq.tool_id})], "tool request answered"
            )
        else:
            self.expect(actions, [], "tool request answer dropped")

    @precondition(lambda self: self.pending_tool_requests())
    @rule(data=st.data())
    def tool_cancels_its_request(self, data: st.DataObject) -> None:
        treq = data.draw(st.sampled_from(self.pending_tool_requests()))
        # the router cancels the first pending request with that tool id
        same = [
            t for t in self.pending_tool_requests(treq.agent) if same_id(t.tool_id, treq.tool_id)
        ]
        target = same[0]
        target.state = "cancelled"
        frame = {"jsonrpc": "2.0", "method": CANCELLED, "params": {"requestId": treq.tool_id}}
        self.expect(
            self.receive(treq.tool, frame),
            [cancelled(target.caller, target.key)],
            "tool cancelled its request",
        )

    @rule(dt=st.sampled_from([0.0, 1.0, 4.0, 10.0, 25.0]))
    def time_passes(self, dt: float) -> None:
        assert self.router.next_deadline() == min(self.deadlines(), default=None)
        self.now += dt
        expected = []
        for treq in self.pending_tool_requests():
            if treq.deadline <= self.now:
                treq.state = "expired"
                expected.append(cancelled(treq.caller, treq.key))
                expected.append(relay_error(treq.tool, treq.tool_id, -32006))
        for req in self.in_flight():
            if req.deadline is not None and req.deadline <= self.now:
                error_frame = {"jsonrpc": "2.0", "id": req.rid, "error": {"code": -32006}}
                expected.append(self.answer(req, error_frame))
                assert req.tool is not None
                expected.append(cancelled(req.tool, req.tool_id))
        self.expect(self.router.expire(self.now), expected, "expired")
        if any(req.deadline is not None and req.deadline <= self.now for req in self.requests):
            event("a caller request timed out")
        self.timer = self.router.next_deadline()

    @precondition(lambda self: self.DRAINS)
    @rule()
    def toggle_draining(self) -> None:
        self.draining = not self.draining
        self.router.draining = self.draining

    # ------------------------------------------------------------------ invariants

    @invariant()
    def timer_wakes_in_time(self) -> None:
        if self.router.take_deadline_change():
            self.timer = self.router.next_deadline()
        for deadline in self.deadlines():
            assert self.timer is not None
            assert self.timer <= deadline

    @invariant()
    def router_invariants_hold(self) -> None:
        assert list(self.router.check_invariants()) == []

    @invariant()
    def pending_matches_the_model(self) -> None:
        expected = len(self.in_flight()) + len(self.pending_tool_requests())
        assert self.router.pending_count() == expected

    @invariant()
    def connections_match_the_model(self) -> None:
        by_agent = Counter(self.callers.values())
        assert self.router.stats() == {
            "tool_connections": len(self.tools),
            "robot_connections": len(self.callers),
            "total_connections": len(self.tools) + len(self.callers),
            "robot_connections_by_agent": dict(by_agent),
        }
        for agent in self.AGENTS:
            assert self.router.tool_of(agent) == self.tools.get(agent)

    @invariant()
    def nothing_is_answered_twice(self) -> None:
        for req in self.requests:
            assert req.answers == (1 if req.state == "answered" else 0)

    def teardown(self) -> None:
        # With every tool gone, each request whose caller neither cancelled it nor left has
        # had exactly one answer.
        for agent in list(self.tools):
            self.tool_disconnects_for_teardown(agent)
        for req in self.requests:
            if req.state not in ("cancelled", "orphaned"):
                assert req.state == "answered"
                assert req.answers == 1
        assert self.router.pending_count() == len(self.pending_tool_requests())

    def tool_disconnects_for_teardown(self, agent: str) -> None:
        tool = self.tools[agent]
        expected = self.tool_gone(agent)
        self.expect(self.router.tool_disconnected(tool), expected)
        assert list(self.router.check_invariants()) == []


TestRouterMachine = RouterMachine.TestCase


class LimitedRouterMachine(RouterMachine):
    """The same, with a request timeout, both in-flight limits and graceful shutdown."""

    REQUEST_TIMEOUT = 15.0
    MAX_INFLIGHT = 2
    MAX_TOOL_REQUESTS = 2
    DRAINS = True


TestLimitedRouterMachine = LimitedRouterMachine.TestCase
