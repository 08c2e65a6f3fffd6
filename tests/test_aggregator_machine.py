"""A state machine over the pure Router as an aggregator: several servers per agent.

Servers connect (with and without ``server_id``, identities from a small pool so that
replacements happen), complete or fail the relay's initialization (an error answer, a result
that is not an object, silence until ``init_timeout``), list tools (names from a small pool so
that collisions happen), announce ``tools/list_changed`` and answer the re-list, answer the
requests they received in any order (or never), and leave. Callers come and go and send
``initialize``, ``tools/list``, ``tools/call`` by a name from the last list they got, and custom
methods. Time passes.

The model does not predict every frame; it checks what must hold whatever the interleaving:

* ``router.check_invariants()`` is empty after every step;
* every caller request gets exactly one answer, a response with its exact original id (same
  JSON type), to that caller only, and an answer relayed from a server is that server's answer
  to that very request; nothing else reaches a caller but the relay's own ``list_changed``
  (and only if it sent ``initialize``);
* a ``tools/call`` forwarded at once reaches the server that owned the listed name when it
  was sent (``catalog.resolve_tool`` at send time), with the original name; one that had to
  wait reaches the owner of the name when it was forwarded; a custom method forwarded at once
  goes to the default server of the model (first with ``server_id`` default or none, else
  the longest connected);
* a server receives only what the relay may send it, forwarded requests only once ready and
  only from callers still connected, with ids it never saw before;
* at teardown every server leaves, and every request of a connected caller has its answer.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import attrs
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.strategies import typed
from trio_mcp_relay._routing import CLOSE_REPLACED, Action, Close, Router, Send

AGENTS = ("a", "b")
#: Most traffic on one agent, so that its servers meet.
agents = st.sampled_from(("a", "a", "a", "b"))
SERVER_IDS = (None, None, "default", "alpha", "beta")
SERVER_NAMES = ("alpha", "beta", "gamma", "")  # "" reports no usable name: "default"
TOOL_NAMES = ("add", "echo", "sum")
INIT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
CUSTOM = "custom/call"
CANCELLED = "notifications/cancelled"
CLOSE_INIT_FAILED = 4003


def decode(action: Send) -> Any:
    assert b"\n" not in action.data
    return json.loads(action.data)


@attrs.define(eq=False)
class Srv:
    """A tool connection as the model sees it."""

    conn: int
    agent: str
    server_id: str | None
    name: str  # the serverInfo.name it reports
    tools: list[str]  # what it answers tools/list with
    state: str = "init"  # init (initialize unanswered), listing, ready
    init_id: Any = None
    list_ids: dict[Any, float] = attrs.Factory(dict)  # tools/list ids unanswered -> deadline
    received: dict[int, int] = attrs.Factory(dict)  # its request id -> caller request seq
    seen_ids: set[Any] = attrs.Factory(set)

    @property
    def identity(self) -> str | None:
        if self.server_id is not None:
            return self.server_id
        if self.state == "init":
            return None
        return self.name or "default"

    @property
    def is_default(self) -> bool:
        return self.server_id in (None, "default")


@attrs.define(eq=False)
class Req:
    """A caller request."""

    seq: int
    caller: int
    agent: str
    rid: Any
    method: str
    name: str | None = None  # tools/call: the listed name
    state: str = "open"  # answered, orphaned (its caller left)
    answers: int = 0
    forwarded_to: int | None = None
    #: what the caller must receive when a server answered it: (result or error) as sent
    relayed: Any = None


class AggregatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router(
            init_timeout=INIT_TIMEOUT,
            request_timeout=REQUEST_TIMEOUT,
            list_changed_delay=0.2,
        )
        self.now = 0.0
        self.conns = itertools.count(1)
        self.servers: dict[int, Srv] = {}  # connected, in connection order
        self.callers: dict[int, str] = {}
        self.initialized: set[int] = set()  # callers that sent initialize
        self.listed: dict[int, list[str]] = {}  # per caller, the names of its last tools/list
        self.requests: list[Req] = []
        self.by_seq: dict[int, Req] = {}
        self.used_ids: dict[int, set[Any]] = {}
        #: identities taken in the current step (a 4001 close must be for one of them)
        self.taken: set[str] = set()
        self.forwarded_late: list[tuple[Req, int, str]] = []
        self.sending = -1  # the seq of the request being sent in this step

    # ------------------------------------------------------------------ plumbing

    def servers_of(self, agent: str) -> list[Srv]:
        return [s for s in self.servers.values() if s.agent == agent]

    def default_of(self, agent: str) -> Srv | None:
        mine = self.servers_of(agent)
        for srv in mine:
            if srv.is_default:
                return srv
        return mine[0] if mine else None

    def initializing(self, agent: str) -> bool:
        return any(s.state != "ready" for s in self.servers_of(agent))

    def open_of(self, caller: int) -> list[Req]:
        return [r for r in self.requests if r.caller == caller and r.state == "open"]

    def check(self) -> None:
        assert list(self.router.check_invariants()) == []

    def process(self, actions: list[Action]) -> list[tuple[int, Any]]:
        """Check and record every action; the frames sent, in order."""
        frames: list[tuple[int, Any]] = []
        closes = [a for a in actions if isinstance(a, Close)]
        for action in actions:
            if isinstance(action, Close):
                continue
            assert isinstance(action, Send)
            frame = decode(action)
            frames.append((action.conn, frame))
            if action.conn in self.callers:
                assert action.request is None
                self.to_caller(action.conn, frame)
            else:
                assert action.conn in self.servers, f"frame to a connection gone: {frame}"
                self.to_server(self.servers[action.conn], frame, action.request)
        for close in closes:
            srv = self.servers.pop(close.conn, None)
            assert srv is not None, "closed a connection the model does not know"
            if close.code == CLOSE_REPLACED:
                assert srv.identity in self.taken, "replaced by no server of its identity"
                event("server replaced")
            else:
                assert close.code == CLOSE_INIT_FAILED
                assert srv.state != "ready", "a ready server closed 4003"
                event("server failed its initialization")
            self.server_left(srv)
        self.taken.clear()
        for req, conn, name in self.forwarded_late:
            # it waited: it reaches the owner of its name when it was forwarded
            session = self.router.session(req.agent)
            assert session is not None
            route = session.catalog.resolve_tool(req.name or "")
            assert route is not None, "a waiting tools/call forwarded for a name nobody lists"
            assert (session.servers[conn].identity, name) == tuple(route)
            event("tools/call forwarded after waiting")
        self.forwarded_late.clear()
        return frames

    def server_left(self, srv: Srv) -> None:
        srv.received.clear()

    def to_caller(self, conn: int, frame: Any) -> None:
        if "method" in frame:
            assert "id" not in frame, f"a server request reached a caller: {frame}"
            assert frame["method"] == "notifications/tools/list_changed", frame
            assert conn in self.initialized, "list_changed to a caller that never initialized"
            event("caller told tools/list_changed")
            return
        assert set(frame) in ({"jsonrpc", "id", "result"}, {"jsonrpc", "id", "error"}), frame
        matching = [r for r in self.open_of(conn) if typed(r.rid) == typed(frame["id"])]
        assert len(matching) == 1, f"answer to no open request of this caller: {frame}"
        [req] = matching
        req.state = "answered"
        req.answers += 1
        if req.relayed is not None:
            # the server's own answer, with the caller's id
            assert typed({k: v for k, v in frame.items() if k != "id"}) == typed(req.relayed)
        elif req.forwarded_to is not None and "result" in frame:
            raise AssertionError(f"a result for a forwarded request its server never gave: {frame}")
        if req.method == "tools/list" and "result" in frame:
            self.listed[conn] = [t["name"] for t in frame["result"]["tools"]]
            assert "nextCursor" not in frame["result"]
        if "error" in frame:
            event(f"caller got error {frame['error']['code']}")

    def to_server(self, srv: Srv, frame: Any, tag: int | None) -> None:
        method = frame.get("method")
        if "id" in frame:
            assert method is not None, f"a response reached a server: {frame}"
            key = typed(frame["id"])
            assert key not in srv.seen_ids, "a server saw the same request id twice"
            srv.seen_ids.add(key)
        if method == "initialize":
            assert srv.init_id is None and srv.state == "init"
            srv.init_id = frame["id"]
        elif method == "notifications/initialized":
            assert srv.state == "listing"
        elif method == "tools/list":
            assert srv.state != "init"
            srv.list_ids[frame["id"]] = self.now + INIT_TIMEOUT
        elif method == CANCELLED:
            srv.received.pop(frame["params"]["requestId"], None)
        else:
            assert "id" in frame, f"unexpected notification to a server: {frame}"
            assert tag == frame["id"]
            assert srv.state == "ready", "a request forwarded to a server not ready"
            params = frame["params"]
            seq = params["arguments"]["seq"] if method == "tools/call" else params["seq"]
            req = self.by_seq[seq]
            assert req.state == "open" and req.caller in self.callers
            assert req.forwarded_to is None, "a request forwarded twice"
            assert method == req.method and req.agent == srv.agent
            req.forwarded_to = srv.conn
            srv.received[frame["id"]] = seq
            if method == "tools/call" and req.seq != self.sending:
                self.forwarded_late.append((req, srv.conn, params["name"]))

    def receive(self, conn: int, frame: Any) -> list[tuple[int, Any]]:
        actions = self.router.received(conn, json.dumps(frame), self.now)
        return self.process(actions)

    # ------------------------------------------------------------------ servers

    @initialize(
        servers=st.lists(
            st.tuples(
                agents,
                st.sampled_from(SERVER_IDS),
                st.sampled_from(SERVER_NAMES),
                st.lists(st.sampled_from(TOOL_NAMES), unique=True, max_size=3),
            ),
            max_size=3,
        ),
        callers=st.lists(agents, max_size=3),
    )
    def start(self, servers: list[Any], callers: list[str]) -> None:
        for agent, server_id, name, tools in servers:
            self.server_joins_ready(agent, server_id, name, tools)
        for agent in callers:
            self.caller_connects(agent)
            conn = max(self.callers)
            req = self.new_request(None, conn, "tools/list")
            self.send(req, {})

    @precondition(lambda self: len(self.servers) < 6)
    @rule(
        agent=agents,
        server_id=st.sampled_from(SERVER_IDS),
        name=st.sampled_from(SERVER_NAMES),
        tools=st.lists(st.sampled_from(TOOL_NAMES), unique=True, max_size=3),
    )
    def server_joins_ready(
        self, agent: str, server_id: str | None, name: str, tools: list[str]
    ) -> None:
        """A server connects and completes its initialization at once."""
        self.server_connects(agent, server_id, name, tools)
        srv = self.servers[max(self.servers)]
        self.initialize_ok(srv)
        [rid] = srv.list_ids
        self.answer_list(srv, rid, True)
        assert srv.state == "ready"

    @precondition(lambda self: len(self.servers) < 6)
    @rule(
        agent=agents,
        server_id=st.sampled_from(SERVER_IDS),
        name=st.sampled_from(SERVER_NAMES),
        tools=st.lists(st.sampled_from(TOOL_NAMES), unique=True, max_size=3),
    )
    def server_connects(
        self, agent: str, server_id: str | None, name: str, tools: list[str]
    ) -> None:
        conn = next(self.conns)
        srv = Srv(conn, agent, server_id, name, tools)
        self.servers[conn] = srv
        if server_id is not None:
            self.taken.add(server_id)
        self.process(self.router.tool_connected(conn, agent, server_id, self.now))
        assert srv.init_id is not None

    def in_state(self, state: str) -> list[Srv]:
        return [s for s in self.servers.values() if s.state == state]

    @precondition(lambda self: self.in_state("init"))
    @rule(data=st.data(), how=st.sampled_from(["ok"] * 6 + ["error", "not an object"]))
    def server_answers_initialize(self, data: st.DataObject, how: str) -> None:
        srv = data.draw(st.sampled_from(self.in_state("init")))
        if how == "ok":
            self.initialize_ok(srv)
            return
        if how == "error":
            frame = {"jsonrpc": "2.0", "id": srv.init_id, "error": {"code": -1, "message": "no"}}
        else:
            frame = {"jsonrpc": "2.0", "id": srv.init_id, "result": [1]}
        self.receive(srv.conn, frame)
        assert srv.conn not in self.servers, "a server that failed initialize kept"

    def initialize_ok(self, srv: Srv) -> None:
        if True:
            result: Any = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}}
            if srv.name:
                result["serverInfo"] = {"name": srv.name, "version": "1"}
            frame = {"jsonrpc": "2.0", "id": srv.init_id, "result": result}
            srv.state = "listing"
            if srv.server_id is None:
                self.taken.add(srv.name or "default")
        self.receive(srv.conn, frame)
        assert srv.conn in self.servers and srv.list_ids

    def listing(self) -> list[Srv]:
        return [s for s in self.servers.values() if s.list_ids]

    @precondition(lambda self: self.listing())
    @rule(
        data=st.data(),
        ok=st.integers(0, 5),
        tools=st.none() | st.lists(st.sampled_from(TOOL_NAMES), unique=True, max_size=3),
    )
    def server_answers_tools_list(self, data: st.DataObject, ok: int, tools: Any) -> None:
        srv = data.draw(st.sampled_from(self.listing()))
        rid = data.draw(st.sampled_from(sorted(srv.list_ids)))
        if tools is not None:
            srv.tools = tools
        self.answer_list(srv, rid, bool(ok))

    def answer_list(self, srv: Srv, rid: Any, ok: bool) -> None:
        del srv.list_ids[rid]
        if ok and srv.state == "listing" and not srv.list_ids:
            srv.state = "ready"  # (before the answer: what it unparks may go to it)
        if ok:
            items = [{"name": t, "description": f"{t} of {srv.conn}"} for t in srv.tools]
            frame: Any = {"jsonrpc": "2.0", "id": rid, "result": {"tools": items}}
        else:
            frame = {"jsonrpc": "2.0", "id": rid, "error": {"code": -2, "message": "later"}}
        was = srv.state
        self.receive(srv.conn, frame)
        if not ok and was == "listing":
            assert srv.conn not in self.servers, "a server whose initial tools/list failed kept"

    @precondition(lambda self: self.in_state("ready"))
    @rule(
        data=st.data(),
        tools=st.none() | st.lists(st.sampled_from(TOOL_NAMES), unique=True, max_size=3),
    )
    def server_says_list_changed(self, data: st.DataObject, tools: Any) -> None:
        srv = data.draw(st.sampled_from(self.in_state("ready")))
        if tools is not None:
            srv.tools = tools
        before = len(srv.list_ids)
        frames = self.receive(
            srv.conn, {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        )
        # never forwarded; a re-list is asked unless one is running
        assert all(conn == srv.conn for conn, _ in frames)
        assert len(srv.list_ids) == before + (0 if before else 1)

    @precondition(lambda self: self.servers)
    @rule(data=st.data())
    def server_disconnects(self, data: st.DataObject) -> None:
        srv = data.draw(st.sampled_from(list(self.servers.values())))
        self.disconnect_server(srv)

    def disconnect_server(self, srv: Srv) -> None:
        del self.servers[srv.conn]
        in_flight = {self.by_seq[seq].seq for seq in srv.received.values()}
        self.server_left(srv)
        self.process(self.router.tool_disconnected(srv.conn, self.now))
        for seq in in_flight:
            req = self.by_seq[seq]
            if req.caller in self.callers:
                assert req.state == "answered", "a request in flight to a server that left"

    def with_requests(self) -> list[Srv]:
        return [s for s in self.servers.values() if s.received]

    @precondition(lambda self: self.with_requests())
    @rule(data=st.data(), how=st.sampled_from(["result", "result", "error", "forward failed"]))
    def server_answers_request(self, data: st.DataObject, how: str) -> None:
        srv = data.draw(st.sampled_from(self.with_requests()))
        tool_id = data.draw(st.sampled_from(sorted(srv.received)))
        seq = srv.received.pop(tool_id)
        req = self.by_seq[seq]
        if how == "forward failed":
            self.process(self.router.forward_failed(srv.conn, tool_id))
        else:
            if how == "result":
                body: dict[str, Any] = {"result": {"seq": seq, "by": srv.conn}}
            else:
                body = {"error": {"code": 7, "message": "tool error", "data": seq}}
            if req.state == "open":
                req.relayed = {"jsonrpc": "2.0", **body}
            self.receive(srv.conn, {"jsonrpc": "2.0", "id": tool_id, **body})
        if req.caller in self.callers:
            assert req.state == "answered"

    @precondition(lambda self: self.servers)
    @rule(data=st.data())
    def server_answers_twice_or_late(self, data: st.DataObject) -> None:
        """A server answers an id it already answered (or never got): nothing reaches anyone."""
        srv = data.draw(st.sampled_from(list(self.servers.values())))
        done = [i for i in srv.seen_ids if i[0] == "int" and i[1] not in srv.received]
        rid = data.draw(st.sampled_from(done))[1] if done else 10**6
        if rid in srv.list_ids or (srv.state == "init" and rid == srv.init_id):
            return
        frames = self.receive(srv.conn, {"jsonrpc": "2.0", "id": rid, "result": {"late": True}})
        assert frames == []

    # ------------------------------------------------------------------ callers

    @precondition(lambda self: len(self.callers) < 5)
    @rule(agent=agents)
    def caller_connects(self, agent: str) -> None:
        conn = next(self.conns)
        self.callers[conn] = agent
        self.used_ids[conn] = set()
        assert self.process(self.router.caller_connected(conn, agent)) == []

    @precondition(lambda self: self.callers)
    @rule(data=st.data())
    def caller_leaves(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from(sorted(self.callers)))
        del self.callers[caller]
        self.initialized.discard(caller)
        for req in self.open_of(caller):
            req.state = "orphaned"
        self.process(self.router.caller_disconnected(caller))

    def new_request(
        self, data: st.DataObject | None, caller: int, method: str, **extra: Any
    ) -> Req:
        used = self.used_ids[caller]
        if data is None:
            rid: Any = f"first-{len(self.requests)}"
        else:
            rid = data.draw(
                st.sampled_from([0, 1, 2]).flatmap(
                    lambda n: st.sampled_from([n, str(n), float(n), f"r-{n}"])
                ),
                label="id",
            )
        if typed(rid) in used:
            rid = f"fresh-{len(self.requests)}"
        used.add(typed(rid))
        req = Req(len(self.requests), caller, self.callers[caller], rid, method, **extra)
        self.requests.append(req)
        self.by_seq[req.seq] = req
        return req

    def send(self, req: Req, params: Any) -> list[tuple[int, Any]]:
        frame = {"jsonrpc": "2.0", "id": req.rid, "method": req.method, "params": params}
        self.sending = req.seq
        try:
            return self.receive(req.caller, frame)
        finally:
            self.sending = -1

    @precondition(lambda self: self.callers)
    @rule(data=st.data(), method=st.sampled_from(["initialize", "tools/list"]))
    def caller_asks_the_relay(self, data: st.DataObject, method: str) -> None:
        caller = data.draw(st.sampled_from(sorted(self.callers)))
        req = self.new_request(data, caller, method)
        params: Any = {}
        if method == "initialize":
            params = {"protocolVersion": "2025-06-18", "capabilities": {}}
            self.initialized.add(caller)
        self.send(req, params)
        agent = req.agent
        if not self.servers_of(agent):
            assert req.state == "answered"
        elif not self.initializing(agent):
            assert req.state == "answered", "the relay did not answer at once"
        event(f"{method} {'answered' if req.state == 'answered' else 'parked'}")

    @precondition(lambda self: self.callers)
    @rule(data=st.data(), unknown=st.integers(0, 5))
    def caller_calls_a_tool(
        self, data: st.DataObject, unknown: int, caller: int | None = None
    ) -> None:
        if caller is None:
            caller = data.draw(st.sampled_from(sorted(self.callers)))
        # a name from the last tools/list it got (else one it guesses); sometimes a bad one
        names = self.listed.get(caller) or list(TOOL_NAMES)
        name = data.draw(st.sampled_from(names)) if unknown else "nope"
        req = self.new_request(data, caller, "tools/call", name=name)
        agent = req.agent
        session = self.router.session(agent)
        route = session.catalog.resolve_tool(name) if session is not None else None
        owner = None
        if route is not None:
            owner = next((s for s in self.servers_of(agent) if s.identity == route.server), None)
        frames = self.send(req, {"name": name, "arguments": {"seq": req.seq}})
        if not self.servers_of(agent):
            assert req.state == "answered"
            event("tools/call without servers")
        elif route is not None and owner is not None and owner.state == "ready":
            # forwarded at once, to the owner at send time, with its own name
            [(conn, forwarded)] = frames
            assert conn == owner.conn and req.forwarded_to == owner.conn
            assert forwarded["params"]["name"] == route.name
            event(f"tools/call forwarded{' renamed' if route.name != name else ''}")
        elif route is None and not self.initializing(agent):
            [(conn, answer)] = frames
            assert conn == caller and answer["error"]["code"] == -32602
            event("tools/call of an unknown name")
        else:
            event(f"tools/call {'parked' if not frames else 'answered at once'}")

    @precondition(lambda self: self.callers)
    @rule(data=st.data(), unknown=st.integers(0, 5))
    def caller_lists_then_calls(self, data: st.DataObject, unknown: int) -> None:
        caller = data.draw(st.sampled_from(sorted(self.callers)))
        self.send(self.new_request(data, caller, "tools/list"), {})
        self.caller_calls_a_tool(data, unknown, caller)

    @precondition(lambda self: self.callers)
    @rule(data=st.data())
    def caller_sends_custom(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from(sorted(self.callers)))
        req = self.new_request(data, caller, CUSTOM)
        default = self.default_of(req.agent)
        frames = self.send(req, {"seq": req.seq})
        if default is None:
            assert req.state == "answered"
        elif default.state == "ready":
            assert [conn for conn, _ in frames] == [default.conn]
            assert req.forwarded_to == default.conn
            event("custom forwarded to the default server")
        else:
            assert frames == [] and req.state == "open"
            event("custom parked")

    # ------------------------------------------------------------------ time

    @rule(dt=st.sampled_from([0.1, 0.1, 0.5, 1.0, 1.0, 5.0, 11.0, 31.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        for srv in self.servers.values():
            # a re-list that timed out is forgotten (an initial one fails the server: 4003)
            srv.list_ids = {k: d for k, d in srv.list_ids.items() if d > self.now}
        self.process(self.router.expire(self.now))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def router_invariants_hold(self) -> None:
        self.check()

    @invariant()
    def nothing_is_answered_twice(self) -> None:
        for req in self.requests:
            assert req.answers == (1 if req.state == "answered" else 0)

    @invariant()
    def model_agrees_on_the_servers(self) -> None:
        for agent in AGENTS:
            session = self.router.session(agent)
            mine = self.servers_of(agent)
            theirs = list(session.servers.values()) if session is not None else []
            assert [s.conn for s in theirs] == [s.conn for s in mine]
            for srv, server in zip(mine, theirs, strict=True):
                assert server.ready == (srv.state == "ready")
                assert server.identity == srv.identity
            default = self.default_of(agent)
            assert self.router.tool_of(agent) == (default.conn if default else None)

    @invariant()
    def parked_only_while_a_server_initializes(self) -> None:
        for req in self.requests:
            if req.state == "open" and req.forwarded_to is None:
                assert self.initializing(req.agent), f"request {req.seq} neither answered nor sent"

    def teardown(self) -> None:
        for srv in list(self.servers.values()):
            if srv.conn in self.servers:
                self.disconnect_server(srv)
            self.check()
        for req in self.requests:
            if req.caller in self.callers:
                assert req.state == "answered", f"request {req.seq} never answered"
                assert req.answers == 1
        for caller in list(self.callers):
            del self.callers[caller]
            assert self.process(self.router.caller_disconnected(caller)) == []
        self.check()
        assert self.router.pending_count() == 0


AggregatorMachine.TestCase.settings = settings(
    max_examples=max(100, settings().max_examples),
    stateful_step_count=50,
    deadline=None,
)
TestAggregatorMachine = AggregatorMachine.TestCase
