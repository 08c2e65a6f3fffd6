"""The relay as an aggregator, on the pure core: servers of an agent, catalog answers, routing
by name, collisions, parking, failed initializations, list_changed, filters, middleware."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from trio_mcp_relay.core.actions import Close, Send
from trio_mcp_relay.core.catalog import ToolFilter
from trio_mcp_relay.core.middleware import Call, Middleware, Refused, Reply
from trio_mcp_relay.core.registry import Router
from trio_mcp_relay.core.session import AgentFilters


class Net:
    """A Router and the frames it sends, per connection."""

    def __init__(self, **options: Any) -> None:
        self.router = Router(**options)
        self.now = 0.0
        self.conns = itertools.count(1)
        self.inbox: dict[int, list[Any]] = {}
        self.closed: dict[int, tuple[int, str]] = {}

    def _take(self, actions: list[Send | Close]) -> None:
        for action in actions:
            if isinstance(action, Close):
                self.closed[action.conn] = (action.code, action.reason)
            else:
                self.inbox.setdefault(action.conn, []).append(json.loads(action.data))
        assert list(self.router.check_invariants()) == []

    def pop(self, conn: int) -> list[Any]:
        frames, self.inbox[conn] = self.inbox.get(conn, []), []
        return frames

    def send(self, conn: int, frame: dict[str, Any]) -> None:
        self._take(self.router.received(conn, json.dumps({"jsonrpc": "2.0", **frame}), self.now))

    def expire(self, dt: float) -> None:
        self.now += dt
        self._take(self.router.expire(self.now))

    def connect(self, agent: str = "a", server_id: str | None = None) -> int:
        conn = next(self.conns)
        self._take(self.router.tool_connected(conn, agent, server_id, self.now))
        return conn

    def disconnect(self, conn: int) -> None:
        self._take(self.router.tool_disconnected(conn, self.now))

    def initialize(
        self, conn: int, name: str | None = None, capabilities: dict[str, Any] | None = None
    ) -> list[Any]:
        """Answer the relay's initialize; what the relay sent next."""
        [init] = self.pop(conn)
        assert init["method"] == "initialize"
        assert init["params"]["clientInfo"]["name"] == "trio-mcp-relay"
        # The newest revision, and what the relay can route to callers.
        assert init["params"]["protocolVersion"] == "2025-11-25"
        assert set(init["params"]["capabilities"]) == {"roots", "sampling", "elicitation"}
        result: dict[str, Any] = {
            "protocolVersion": "2025-06-18",
            "capabilities": {"tools": {}} if capabilities is None else capabilities,
        }
        if name is not None:
            result["serverInfo"] = {"name": name, "version": "1"}
        self.send(conn, {"id": init["id"], "result": result})
        return self.pop(conn)

    def server(
        self,
        name: str | None,
        tools: list[str],
        agent: str = "a",
        server_id: str | None = None,
        capabilities: dict[str, Any] | None = None,
        extra: dict[str, list[dict[str, Any]]] | None = None,
    ) -> int:
        """A server that connects and completes its initialization with these tools."""
        conn = self.connect(agent, server_id)
        sent = self.initialize(conn, name, capabilities)
        assert sent[0] == {"jsonrpc": "2.0", "method": "notifications/initialized"}
        for request in sent[1:]:
            kind = request["method"].split("/")[0]
            if request["method"] == "resources/templates/list":
                kind = "resourceTemplates"
            if kind == "tools":
                items: list[Any] = [{"name": t, "inputSchema": {"type": "object"}} for t in tools]
            else:
                items = (extra or {}).get(kind, [])
            self.send(conn, {"id": request["id"], "result": {kind: items}})
        return conn

    def caller(self, agent: str = "a", initialize: bool = True) -> int:
        conn = next(self.conns)
        self._take(self.router.caller_connected(conn, agent))
        if initialize:
            self.send(conn, {"id": 0, "method": "initialize", "params": {"capabilities": {}}})
            [answer] = self.pop(conn)
            assert "result" in answer
        return conn

    def call(self, caller: int, rid: Any, method: str, params: Any = None) -> None:
        frame: dict[str, Any] = {"id": rid, "method": method}
        if params is not None:
            frame["params"] = params
        self.send(caller, frame)

    def listed(self, caller: int) -> list[str]:
        self.call(caller, 99, "tools/list")
        [answer] = self.pop(caller)
        return [tool["name"] for tool in answer["result"]["tools"]]


def only(frames: list[Any]) -> Any:
    assert len(frames) == 1, frames
    return frames[0]


# --------------------------------------------------------------------------- catalog answers


def test_manager_api_sequence_is_answered_from_the_catalog_without_touching_servers() -> None:
    """3 servers, 60 tools: initialize id 1 then tools/list with params null, id 2."""
    net = Net()
    servers = [net.server(f"s{i}", [f"t{i}_{j}" for j in range(20)]) for i in range(3)]
    caller = net.caller(initialize=False)
    net.send(caller, {"id": 1, "method": "initialize", "params": {"protocolVersion": "2024-11-05"}})
    net.send(caller, {"id": 2, "method": "tools/list", "params": None})
    init, listing = net.pop(caller)
    assert init["id"] == 1 and init["result"]["protocolVersion"] == "2024-11-05"
    assert init["result"]["capabilities"]["tools"] == {"listChanged": True}
    assert init["result"]["serverInfo"]["name"] == "trio-mcp-relay"
    assert listing["id"] == 2 and len(listing["result"]["tools"]) == 60
    assert "nextCursor" not in listing["result"]
    # No round trip: answered at once, with no frame to any server (its latency over real
    # sockets is measured by scripts/bench_aggregate.py).
    assert all(net.pop(s) == [] for s in servers)


def test_one_server_gives_its_own_server_info_and_instructions() -> None:
    net = Net()
    conn = net.connect()
    [init] = net.pop(conn)
    result = {
        "protocolVersion": "2024-11-05",
        "capabilities": {"tools": {}, "logging": {}},
        "serverInfo": {"name": "calc", "version": "9"},
        "instructions": "Use add.",
    }
    net.send(conn, {"id": init["id"], "result": result})
    [_, tools_list] = net.pop(conn)
    net.send(conn, {"id": tools_list["id"], "result": {"tools": []}})
    caller = net.caller(initialize=False)
    net.call(caller, 1, "initialize", {"protocolVersion": "1999-01-01"})
    answer = only(net.pop(caller))["result"]
    assert answer["serverInfo"] == {"name": "calc", "version": "9"}
    assert answer["instructions"] == "Use add."
    assert answer["protocolVersion"] == "2025-11-25"  # unknown version: the newest
    assert answer["capabilities"]["logging"] == {}


def test_ping_and_initialized_are_handled_by_the_relay() -> None:
    net = Net()
    caller = net.caller(initialize=False)
    net.call(caller, "p", "ping")
    assert only(net.pop(caller)) == {"jsonrpc": "2.0", "id": "p", "result": {}}
    conn = net.server("s", ["a"])
    net.send(caller, {"method": "notifications/initialized"})
    assert net.pop(conn) == []


def test_no_server_connected_is_minus_32001_even_for_initialize() -> None:
    net = Net()
    caller = net.caller(initialize=False)
    net.call(caller, 1, "initialize", {})
    assert only(net.pop(caller))["error"]["code"] == -32001


def test_bad_cursor_is_invalid_params() -> None:
    net = Net()
    net.server("s", ["a"])
    caller = net.caller()
    net.call(caller, 5, "tools/list", {"cursor": "nope"})
    assert only(net.pop(caller))["error"]["code"] == -32602


# --------------------------------------------------------------------------- routing


def test_tools_call_goes_to_the_owner_with_its_own_name_and_collisions_are_prefixed() -> None:
    net = Net()
    alpha = net.server("alpha", ["add", "sub"])
    beta = net.server("beta", ["add", "weather"])
    caller = net.caller()
    assert net.listed(caller) == ["add", "sub", "beta_add", "weather"]
    net.call(caller, 1, "tools/call", {"name": "beta_add", "arguments": {"x": 1}})
    forwarded = only(net.pop(beta))
    assert forwarded["params"] == {"name": "add", "arguments": {"x": 1}}
    net.call(caller, 2, "tools/call", {"name": "add"})
    assert only(net.pop(alpha))["params"]["name"] == "add"
    net.send(beta, {"id": forwarded["id"], "result": {"content": []}})
    assert only(net.pop(caller)) == {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}


def test_unknown_tool_is_minus_32602_and_reaches_no_server() -> None:
    net = Net()
    conn = net.server("s", ["add"])
    caller = net.caller()
    net.call(caller, 7, "tools/call", {"name": "nope"})
    answer = only(net.pop(caller))
    assert answer["id"] == 7 and answer["error"]["code"] == -32602
    assert "nope" in answer["error"]["message"]
    net.call(caller, 8, "tools/call", {"arguments": {}})
    assert only(net.pop(caller))["error"]["code"] == -32602
    assert net.pop(conn) == []


def test_bare_name_passes_to_the_longest_connected_remaining_owner() -> None:
    net = Net()
    first = net.server("one", ["add"])
    net.server("two", ["add"])
    third = net.server("three", ["add"])
    caller = net.caller()
    assert net.listed(caller) == ["add", "two_add", "three_add"]
    net.disconnect(first)
    assert net.listed(caller) == ["add", "three_add"]
    net.call(caller, 1, "tools/call", {"name": "three_add"})
    assert only(net.pop(third))["params"]["name"] == "add"


def test_custom_methods_go_to_the_default_server() -> None:
    net = Net()
    named = net.server("x", ["a"], server_id="x")
    default = net.server("calc", ["b"])
    caller = net.caller()
    net.call(caller, "w", "get_weather", {"city": "Paris"})
    forwarded = only(net.pop(default))
    assert forwarded["method"] == "get_weather" and forwarded["params"] == {"city": "Paris"}
    assert net.pop(named) == []
    net.send(default, {"id": forwarded["id"], "result": {"t": 20}})
    assert only(net.pop(caller)) == {"jsonrpc": "2.0", "id": "w", "result": {"t": 20}}
    net.send(caller, {"method": "custom/note"})
    assert only(net.pop(default))["method"] == "custom/note"


def test_without_a_default_server_the_longest_connected_takes_custom_methods() -> None:
    net = Net()
    first = net.server("x", ["a"], server_id="x")
    net.server("y", ["b"], server_id="y")
    caller = net.caller()
    net.call(caller, 1, "custom")
    assert only(net.pop(first))["method"] == "custom"


def test_resources_prompts_and_completion_are_routed_by_uri_and_name() -> None:
    net = Net()
    caps = {"tools": {}, "resources": {"subscribe": True}, "prompts": {}}
    docs = net.server(
        "docs",
        [],
        capabilities=caps,
        extra={
            "resources": [{"uri": "file:///a", "name": "a"}],
            "resourceTemplates": [{"uriTemplate": "file:///docs/{x}", "name": "d"}],
            "prompts": [{"name": "greet"}],
        },
    )
    other = net.server("other", [], capabilities=caps, extra={"prompts": [{"name": "greet"}]})
    caller = net.caller()
    net.call(caller, 1, "resources/read", {"uri": "file:///docs/z"})
    assert only(net.pop(docs))["params"] == {"uri": "file:///docs/z"}
    net.call(caller, 2, "prompts/get", {"name": "other_greet"})
    assert only(net.pop(other))["params"] == {"name": "greet"}
    ref = {"type": "ref/prompt", "name": "other_greet"}
    net.call(caller, 3, "completion/complete", {"ref": ref, "argument": {}})
    assert only(net.pop(other))["params"]["ref"] == {"type": "ref/prompt", "name": "greet"}
    net.call(caller, 4, "resources/read", {"uri": "file:///elsewhere"})
    assert only(net.pop(caller))["error"]["code"] == -32602
    net.call(caller, 5, "prompts/list")
    names = [p["name"] for p in only(net.pop(caller))["result"]["prompts"]]
    assert names == ["greet", "other_greet"]


def test_resources_updated_goes_only_to_subscribers() -> None:
    net = Net()
    caps = {"tools": {}, "resources": {"subscribe": True}}
    docs = net.server("docs", [], capabilities=caps, extra={"resources": [{"uri": "u:1"}]})
    subscriber, bystander = net.caller(), net.caller()
    net.call(subscriber, 1, "resources/subscribe", {"uri": "u:1"})
    sub = only(net.pop(docs))
    net.send(docs, {"id": sub["id"], "result": {}})
    net.pop(subscriber)
    net.send(docs, {"method": "notifications/resources/updated", "params": {"uri": "u:1"}})
    assert only(net.pop(subscriber))["method"] == "notifications/resources/updated"
    assert net.pop(bystander) == []
    net.send(docs, {"method": "notifications/message", "params": {"level": "info"}})
    assert len(net.pop(subscriber)) == len(net.pop(bystander)) == 1


def test_logging_set_level_reaches_every_server_that_declared_logging() -> None:
    net = Net()
    loud = net.server("loud", ["a"], capabilities={"tools": {}, "logging": {}})
    quiet = net.server("quiet", ["b"])
    caller = net.caller()
    net.call(caller, 1, "logging/setLevel", {"level": "debug"})
    assert only(net.pop(caller)) == {"jsonrpc": "2.0", "id": 1, "result": {}}
    forwarded = only(net.pop(loud))
    assert forwarded["method"] == "logging/setLevel"
    assert net.pop(quiet) == []
    net.send(loud, {"id": forwarded["id"], "result": {}})
    assert net.pop(caller) == []


# --------------------------------------------------------------------------- identity


def test_same_server_id_replaces_and_in_flight_requests_elsewhere_are_unaffected() -> None:
    net = Net()
    a1 = net.server("whatever", ["add"], server_id="a")
    b = net.server("whatever", ["slow"], server_id="b")
    caller = net.caller()
    net.call(caller, 1, "tools/call", {"name": "slow"})
    on_b = only(net.pop(b))
    net.call(caller, 2, "tools/call", {"name": "add"})
    on_a = only(net.pop(a1))
    a2 = net.connect(server_id="a")
    assert net.closed[a1][0] == 4001
    answer = only(net.pop(caller))
    assert answer["id"] == 2 and answer["error"]["code"] == -32003
    assert on_a["params"]["name"] == "add"
    net.initialize(a2, "whatever")
    net.send(b, {"id": on_b["id"], "result": {"ok": True}})
    assert only(net.pop(caller)) == {"jsonrpc": "2.0", "id": 1, "result": {"ok": True}}
    assert b not in net.closed


def test_replacement_answers_the_old_connections_requests_minus_32003() -> None:
    net = Net()
    old = net.server("calc", ["add"])
    caller = net.caller()
    net.call(caller, 1, "tools/call", {"name": "add"})
    net.pop(old)
    new = net.connect()
    net.initialize(new, "calc")  # same serverInfo.name: a replacement
    assert net.closed[old][0] == 4001
    answer = only(net.pop(caller))
    assert answer["id"] == 1 and answer["error"]["code"] == -32003


def test_different_names_join() -> None:
    net = Net()
    net.server("calc", ["add"])
    net.server("weather", ["forecast"])
    assert net.closed == {}
    assert net.listed(net.caller()) == ["add", "forecast"]


def test_a_server_that_leaves_fails_only_its_own_requests_and_callers_hear_of_it() -> None:
    net = Net(list_changed_delay=0.2)
    calc = net.server("calc", ["add"])
    weather = net.server("weather", ["forecast"])
    caller = net.caller()
    net.call(caller, 1, "tools/call", {"name": "add"})
    net.call(caller, 2, "tools/call", {"name": "forecast"})
    net.pop(calc)
    on_weather = only(net.pop(weather))
    net.disconnect(calc)
    answer = only(net.pop(caller))
    assert answer["id"] == 1 and answer["error"]["code"] == -32003
    net.expire(0.2)
    assert only(net.pop(caller)) == {
        "jsonrpc": "2.0",
        "method": "notifications/tools/list_changed",
    }
    net.send(weather, {"id": on_weather["id"], "result": {}})
    assert only(net.pop(caller))["id"] == 2
    assert net.listed(caller) == ["forecast"]


# --------------------------------------------------------------------------- initialization


def test_requests_wait_for_a_server_that_is_initializing() -> None:
    net = Net()
    net.server("calc", ["add"])
    slow = net.connect()
    caller = net.caller(initialize=False)
    net.call(caller, 1, "initialize", {})
    net.call(caller, 2, "tools/list")
    net.call(caller, 3, "tools/call", {"name": "forecast"})
    assert net.pop(caller) == []
    sent = net.initialize(slow, "weather")
    net.send(slow, {"id": sent[1]["id"], "result": {"tools": [{"name": "forecast"}]}})
    init, listing = net.pop(caller)
    assert init["id"] == 1 and listing["id"] == 2
    assert [t["name"] for t in listing["result"]["tools"]] == ["add", "forecast"]
    assert only(net.pop(slow))["params"]["name"] == "forecast"


def test_tools_list_follows_next_cursor_at_initialization() -> None:
    net = Net()
    conn = net.connect()
    [_, first] = net.initialize(conn, "paged")
    net.send(conn, {"id": first["id"], "result": {"tools": [{"name": "a"}], "nextCursor": "p2"}})
    second = only(net.pop(conn))
    assert second["method"] == "tools/list" and second["params"] == {"cursor": "p2"}
    net.send(conn, {"id": second["id"], "result": {"tools": [{"name": "b"}]}})
    assert net.listed(net.caller()) == ["a", "b"]


@pytest.mark.parametrize("step", ["initialize", "tools/list"])
def test_a_server_that_does_not_answer_in_time_is_closed_4003(step: str) -> None:
    net = Net(init_timeout=10.0)
    conn = net.connect()
    if step == "tools/list":
        net.initialize(conn, "mute")
    caller = net.caller(initialize=False)
    net.call(caller, 1, "tools/list")
    net.expire(9.9)
    assert conn not in net.closed and net.pop(caller) == []
    net.expire(0.2)
    code, reason = net.closed[conn]
    assert code == 4003 and step in reason
    # The parked request is answered: no server is left.
    assert only(net.pop(caller))["error"]["code"] == -32001


def test_an_initialize_error_closes_4003_and_the_server_never_enters_the_catalog() -> None:
    net = Net()
    good = net.server("good", ["a"])
    bad = net.connect()
    [init] = net.pop(bad)
    net.send(bad, {"id": init["id"], "error": {"code": -32601, "message": "Method not found"}})
    assert net.closed[bad][0] == 4003
    assert net.listed(net.caller()) == ["a"]
    net.send(bad, {"method": "notifications/message"})  # late frames of a closed server
    assert net.router.servers()["a"][0]["identity"] == "good"
    assert good not in net.closed


def test_an_initialize_result_that_is_not_an_object_closes_4003() -> None:
    net = Net()
    conn = net.connect()
    [init] = net.pop(conn)
    net.send(conn, {"id": init["id"], "result": "hello"})
    assert net.closed[conn][0] == 4003


# --------------------------------------------------------------------------- list_changed


def test_list_changed_is_relisted_and_coalesced_into_one_notification() -> None:
    net = Net(list_changed_delay=0.2)
    conn = net.server("calc", ["add"])
    caller, legacy = net.caller(), net.caller(initialize=False)
    net.send(conn, {"method": "notifications/tools/list_changed"})
    relist = only(net.pop(conn))
    assert relist["method"] == "tools/list"
    assert net.pop(caller) == []  # the server's own notification is not forwarded
    net.send(conn, {"id": relist["id"], "result": {"tools": [{"name": "add"}, {"name": "mul"}]}})
    net.expire(0.1)
    net.server("weather", ["forecast"])
    net.expire(0.1)
    assert only(net.pop(caller)) == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    assert net.pop(legacy) == []  # never initialized: no list_changed
    assert net.listed(caller) == ["add", "mul", "forecast"]
    net.expire(1.0)
    assert net.pop(caller) == []


def test_no_notification_when_what_the_caller_saw_did_not_change() -> None:
    net = Net(list_changed_delay=0.2)
    conn = net.server("calc", ["add"])
    caller = net.caller()
    net.send(conn, {"method": "notifications/tools/list_changed"})
    relist = only(net.pop(conn))
    same = [{"name": "add", "inputSchema": {"type": "object"}}]
    net.send(conn, {"id": relist["id"], "result": {"tools": same}})
    net.expire(1.0)
    assert net.pop(caller) == []


# --------------------------------------------------------------------------- tool requests


def test_tool_requests_go_to_a_caller_with_a_request_in_flight_to_that_server() -> None:
    net = Net()
    calc = net.server("calc", ["add"])
    weather = net.server("weather", ["forecast"])
    busy_elsewhere, busy_here = net.caller(), net.caller()
    net.send(
        busy_here, {"id": 0, "method": "initialize", "params": {"capabilities": {"sampling": {}}}}
    )
    net.pop(busy_here)
    net.call(busy_elsewhere, 1, "tools/call", {"name": "forecast"})
    net.call(busy_here, 1, "tools/call", {"name": "add"})
    net.pop(weather)
    net.pop(calc)
    net.send(calc, {"id": "s", "method": "sampling/createMessage", "params": {}})
    assert only(net.pop(busy_here))["method"] == "sampling/createMessage"
    assert net.pop(busy_elsewhere) == []


def test_a_caller_that_did_not_declare_the_capability_is_not_asked() -> None:
    net = Net()
    calc = net.server("calc", ["add"])
    caller = net.caller()  # initialized with no capabilities
    net.call(caller, 1, "tools/call", {"name": "add"})
    net.pop(calc)
    net.send(calc, {"id": "s", "method": "sampling/createMessage", "params": {}})
    assert only(net.pop(calc))["error"]["code"] == -32005
    assert net.pop(caller) == []


# --------------------------------------------------------------------------- filters


def test_filters_hide_tools_per_agent_and_per_server() -> None:
    filters = {
        "a": AgentFilters(ToolFilter(deny=("danger_*",)), {"weather": ToolFilter(allow=("f*",))})
    }
    net = Net(filters=filters)
    net.server("calc", ["add", "danger_rm"])
    net.server("weather", ["forecast", "radar"])
    caller = net.caller()
    assert net.listed(caller) == ["add", "forecast"]
    net.call(caller, 1, "tools/call", {"name": "danger_rm"})
    assert only(net.pop(caller))["error"]["code"] == -32602
    other = Net(filters=filters)
    other.server("calc", ["danger_rm"], agent="b")
    assert other.listed(other.caller("b")) == ["danger_rm"]


# --------------------------------------------------------------------------- middleware


class Audit(Middleware):
    """The README's example: an audit log and a per-agent tool authorization."""

    ALLOWED = frozenset({"add"})

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str | None, Any]] = []

    def request(self, call: Call) -> None:
        self.log.append((call.agent, call.method, call.server, call.params))
        if call.agent == "kiosk" and call.method == "tools/call":
            if call.params.get("name") not in self.ALLOWED:
                raise Refused(-32602, f"Unknown tool: {call.params.get('name')}")
            call.params = {**call.params, "arguments": {**call.params["arguments"], "who": "kiosk"}}

    def answer(self, call: Call, reply: Reply) -> None:
        if call.agent == "kiosk" and call.method == "tools/list" and reply.error is None:
            tools = [t for t in reply.result["tools"] if t["name"] in self.ALLOWED]
            reply.result = {**reply.result, "tools": tools}


def test_middleware_audits_authorizes_and_injects_arguments() -> None:
    audit = Audit()
    net = Net(middleware=[audit])
    calc = net.server("calc", ["add", "rm"], agent="kiosk")
    caller = net.caller("kiosk")
    assert net.listed(caller) == ["add"]
    net.call(caller, 1, "tools/call", {"name": "rm", "arguments": {}})
    assert only(net.pop(caller))["error"] == {"code": -32602, "message": "Unknown tool: rm"}
    net.call(caller, 2, "tools/call", {"name": "add", "arguments": {"x": 1}})
    forwarded = only(net.pop(calc))
    assert forwarded["params"]["arguments"] == {"x": 1, "who": "kiosk"}
    net.send(calc, {"id": forwarded["id"], "result": {"content": []}})
    assert only(net.pop(caller))["id"] == 2
    assert ("kiosk", "tools/call", "calc", {"name": "add", "arguments": {"x": 1}}) in audit.log
    assert ("kiosk", "tools/list", None, None) in [(a, m, s, None) for a, m, s, _ in audit.log]


class Broken(Middleware):
    def request(self, call: Call) -> None:
        if call.method == "tools/call":
            raise RuntimeError("bug")

    def answer(self, call: Call, reply: Reply) -> None:
        if call.method == "custom":
            raise KeyError("bug")


def test_a_middleware_that_raises_is_minus_32603_for_that_request_only() -> None:
    net = Net(middleware=[Broken()])
    conn = net.server("calc", ["add"])
    caller = net.caller()
    net.call(caller, 1, "tools/call", {"name": "add"})
    assert only(net.pop(caller))["error"]["code"] == -32603
    assert net.pop(conn) == []
    net.call(caller, 2, "custom")
    forwarded = only(net.pop(conn))
    net.send(conn, {"id": forwarded["id"], "result": {}})
    assert only(net.pop(caller))["error"]["code"] == -32603
    assert net.listed(caller) == ["add"]


def test_resources_list_changed_relists_resources_and_templates() -> None:
    net = Net(list_changed_delay=0.2)
    caps = {"tools": {}, "resources": {"listChanged": True}}
    docs = net.server("docs", [], capabilities=caps, extra={"resources": [{"uri": "u:1"}]})
    caller = net.caller()
    net.send(docs, {"method": "notifications/resources/list_changed"})
    resources, templates = net.pop(docs)
    assert (resources["method"], templates["method"]) == (
        "resources/list",
        "resources/templates/list",
    )
    net.send(docs, {"id": resources["id"], "result": {"resources": [{"uri": "u:2"}]}})
    net.send(docs, {"id": templates["id"], "result": {"resourceTemplates": []}})
    net.expire(0.2)
    assert only(net.pop(caller))["method"] == "notifications/resources/list_changed"
    net.call(caller, 1, "resources/list")
    assert only(net.pop(caller))["result"]["resources"] == [{"uri": "u:2"}]


def test_a_relist_that_fails_keeps_the_previous_list() -> None:
    net = Net(init_timeout=10.0)
    conn = net.server("calc", ["add"])
    caller = net.caller()
    net.send(conn, {"method": "notifications/tools/list_changed"})
    relist = only(net.pop(conn))
    net.send(conn, {"id": relist["id"], "error": {"code": -32603, "message": "oops"}})
    assert net.listed(caller) == ["add"]
    net.send(conn, {"method": "notifications/tools/list_changed"})
    net.pop(conn)
    net.expire(11.0)
    assert conn not in net.closed
    assert net.listed(caller) == ["add"]


class Reroute(Middleware):
    """Rewrites arguments of every call, and sends calls of "old" to the tool "beta_add"."""

    def request(self, call: Call) -> None:
        if call.method == "tools/call":
            name = "beta_add" if call.params["name"] == "old" else call.params["name"]
            call.params = {"name": name, "arguments": {"rewritten": True}}


def test_rewritten_requests_are_routed_in_the_callers_names() -> None:
    net = Net(middleware=[Reroute()])
    alpha = net.server("alpha", ["add"])
    beta = net.server("beta", ["add"])
    caller = net.caller()
    net.call(caller, 1, "tools/call", {"name": "beta_add", "arguments": {}})
    assert only(net.pop(beta))["params"] == {"name": "add", "arguments": {"rewritten": True}}
    net.call(caller, 2, "tools/call", {"name": "old", "arguments": {}})
    assert only(net.pop(beta))["params"]["name"] == "add"
    assert net.pop(alpha) == []


def test_parked_requests_count_towards_the_in_flight_limit() -> None:
    net = Net(max_inflight_per_caller=2)
    slow = net.connect()
    caller = net.caller(initialize=False)
    net.call(caller, 1, "tools/list")
    net.call(caller, 2, "tools/list")
    net.call(caller, 3, "tools/list")
    answer = only(net.pop(caller))
    assert answer["id"] == 3 and answer["error"]["code"] == -32007
    net.send(caller, {"method": "notifications/cancelled", "params": {"requestId": 1}})
    sent = net.initialize(slow, "s")
    net.send(slow, {"id": sent[1]["id"], "result": {"tools": []}})
    assert [frame["id"] for frame in net.pop(caller)] == [2]


def test_logging_set_level_unanswered_is_forgotten_after_the_timeout() -> None:
    net = Net(init_timeout=10.0)
    loud = net.server("loud", ["a"], capabilities={"tools": {}, "logging": {}})
    caller = net.caller()
    net.call(caller, 1, "logging/setLevel", {"level": "info"})
    net.pop(loud)
    session = net.router.session("a")
    assert session is not None and len(session.relay_requests) == 1
    net.expire(10.0)
    assert session.relay_requests == {} and loud not in net.closed


def test_prompts_list_changed_relists_prompts() -> None:
    net = Net(list_changed_delay=0.2)
    caps = {"tools": {}, "prompts": {"listChanged": True}}
    talk = net.server("talk", [], capabilities=caps, extra={"prompts": [{"name": "greet"}]})
    caller = net.caller()
    net.send(talk, {"method": "notifications/prompts/list_changed"})
    relist = only(net.pop(talk))
    assert relist["method"] == "prompts/list"
    net.send(talk, {"id": relist["id"], "result": {"prompts": [{"name": "bye"}]}})
    net.expire(0.2)
    assert only(net.pop(caller))["method"] == "notifications/prompts/list_changed"
    net.call(caller, 1, "prompts/list")
    assert only(net.pop(caller))["result"]["prompts"] == [{"name": "bye"}]
