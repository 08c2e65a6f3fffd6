"""Tests of one agent's session as a unit: no Router, no I/O, frames handed in parsed.

The session is the seam later work shards across nodes, and it holds several servers per
agent, so these tests drive it the way a registry would and look at what it records: each
pending entry names the server connection it went to and the method.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import colliding_ids, ids, typed
from trio_mcp_relay._frames import MISSING, parse_frame
from trio_mcp_relay.core.actions import CLOSE_REPLACED, Action, Close, Send
from trio_mcp_relay.core.session import Caller, Deadlines, Policy, Server, Session

SERVER, OTHER_SERVER, ONE, TWO = 10, 11, 20, 21


def frame(**members: Any) -> Any:
    return parse_frame(json.dumps({"jsonrpc": "2.0", **members}))


def sends(actions: list[Action]) -> list[tuple[int, Any]]:
    assert all(isinstance(a, Send) for a in actions), actions
    return [(a.conn, json.loads(a.data)) for a in actions if isinstance(a, Send)]


def check(session: Session) -> None:
    assert list(session.check_invariants()) == []


def initialize(
    session: Session,
    server: Server,
    identity: str = "main",
    tools: tuple[str, ...] = ("add", "x"),
    now: float = 0.0,
) -> list[Action]:
    """Connect ``server`` and play its side of the relay's initialization (initialize, then
    tools/list): the actions that were not frames to it (what a replacement caused)."""
    other: list[Action] = []

    def to_server(actions: list[Action]) -> list[Any]:
        mine = [
            json.loads(a.data) for a in actions if isinstance(a, Send) and a.conn == server.conn
        ]
        other.extend(a for a in actions if not (isinstance(a, Send) and a.conn == server.conn))
        return mine

    [init] = to_server(session.server_connected(server, now))
    assert init["method"] == "initialize"
    result = {"capabilities": {"tools": {}}, "serverInfo": {"name": identity}}
    initialized, listing = to_server(
        session.from_server(server, frame(id=init["id"], result=result), now)
    )
    assert initialized["method"] == "notifications/initialized"
    assert listing["method"] == "tools/list"
    listed = {"tools": [{"name": name} for name in tools]}
    assert to_server(session.from_server(server, frame(id=listing["id"], result=listed), now)) == []
    assert server.ready and server.identity == identity
    check(session)
    return other


def new_session(policy: Policy | None = None) -> tuple[Session, Server, Caller, Caller]:
    session = Session("agent", policy)
    server = Server(SERVER, session)
    one, two = Caller(ONE, session), Caller(TWO, session)
    assert initialize(session, server) == []
    assert session.caller_connected(one) == []
    assert session.caller_connected(two) == []
    check(session)
    return session, server, one, two


def forward(
    session: Session, caller: Caller, rid: Any, method: str, to: int = SERVER, **members: Any
) -> int:
    """A caller request the session forwards (to server connection ``to``): the id it sees."""
    [action] = session.from_caller(caller, frame(id=rid, method=method, **members), 0.0)
    assert isinstance(action, Send)
    assert action.conn == to
    assert action.request is not None
    assert action.request == json.loads(action.data)["id"]
    check(session)
    return action.request


def test_a_session_with_no_io_routes_a_round_trip() -> None:
    session, server, one, _ = new_session()
    tool_id = forward(session, one, "a", "tools/call", params={"name": "add"})
    entry = session.pending[tool_id]
    assert (entry.caller, entry.caller_id, entry.token) == (one, "a", MISSING)
    assert (entry.server, entry.method) == (SERVER, "tools/call")
    assert one.inflight == {tool_id: None}
    answer = session.from_server(server, frame(id=tool_id, result={"n": 3}), 0.0)
    assert sends(answer) == [(ONE, {"jsonrpc": "2.0", "id": "a", "result": {"n": 3}})]
    assert session.pending == {}
    assert one.inflight == {}
    check(session)


def test_each_pending_entry_records_its_method_and_server() -> None:
    session, _, one, two = new_session()
    asked = {
        forward(session, one, 1, "custom/list"): (one, "custom/list"),
        forward(session, two, 1, "tools/call", params={"name": "x"}): (two, "tools/call"),
        forward(session, one, 2, "get_weather"): (one, "get_weather"),
    }
    recorded = {k: (e.caller, e.method) for k, e in session.pending.items()}
    assert recorded == asked
    assert {e.server for e in session.pending.values()} == {SERVER}
    # tools/list is the relay's to answer: nothing pending for it
    [(conn, listed)] = sends(session.from_caller(one, frame(id=3, method="tools/list"), 0.0))
    assert (conn, [t["name"] for t in listed["result"]["tools"]]) == (ONE, ["add", "x"])
    assert len(session.pending) == 3
    # A newer server of the same identity replaces the first: its requests fail -32003,
    # new ones record the new one.
    newer = Server(OTHER_SERVER, session)
    actions = initialize(session, newer)
    assert actions[-1] == Close(
        SERVER, CLOSE_REPLACED, "replaced by a newer connection of server main"
    )
    failed = sends(actions[:-1])
    assert sorted((conn, f["id"], f["error"]["code"]) for conn, f in failed) == [
        (ONE, 1, -32003),
        (ONE, 2, -32003),
        (TWO, 1, -32003),
    ]
    assert session.pending == {}
    tool_id = forward(session, two, 9, "custom/read", to=OTHER_SERVER)
    entry = session.pending[tool_id]
    assert (entry.server, entry.method, entry.caller) == (OTHER_SERVER, "custom/read", two)
    check(session)


def test_only_the_server_an_entry_names_may_answer_it() -> None:
    # Several servers per agent: an entry belongs to the one it went to.
    session, server, one, _ = new_session()
    tool_id = forward(
        session, one, "r", "tools/call", params={"name": "add", "_meta": {"progressToken": "p"}}
    )
    stranger = Server(OTHER_SERVER, session)
    assert initialize(session, stranger, identity="stranger", tools=("s",)) == []
    progress = frame(method="notifications/progress", params={"progressToken": tool_id})
    assert session.from_server(stranger, progress, 0.0) == []
    assert session.from_server(stranger, frame(id=tool_id, result={}), 0.0) == []
    assert session.forward_failed(stranger, tool_id, "not reading") == []
    assert session.server_disconnected(stranger, 0.0) == []
    assert list(session.pending) == [tool_id]
    check(session)
    [(conn, restored)] = sends(session.from_server(server, progress, 0.0))
    assert (conn, restored["params"]["progressToken"]) == (ONE, "p")
    [(conn, answer)] = sends(session.forward_failed(server, tool_id, "not reading"))
    assert (conn, answer["id"], answer["error"]["code"]) == (ONE, "r", -32002)
    assert session.pending == {}


def test_tool_requests_record_their_server_and_go_back_to_it() -> None:
    session, server, one, two = new_session()
    forward(session, two, 1, "tools/call", params={"name": "add"})  # two is busy with it
    ask = frame(id="s1", method="sampling/createMessage", params={})
    [(conn, asked)] = sends(session.from_server(server, ask, 5.0))
    assert conn == TWO
    req = session.tool_requests[asked["id"]]
    assert (req.caller, req.server, req.tool_id, req.method) == (two, SERVER, "s1", ask.method)
    assert req.deadline == 5.0 + session.policy.tool_request_timeout
    assert session.from_caller(one, frame(id=asked["id"], result={}), 6.0) == []  # not its own
    answered = session.from_caller(two, frame(id=asked["id"], result={"ok": 1}), 6.0)
    assert sends(answered) == [(SERVER, {"jsonrpc": "2.0", "id": "s1", "result": {"ok": 1}})]
    assert session.tool_requests == {}
    check(session)


def test_choose_caller_prefers_the_most_recently_active_caller_busy_with_that_server() -> None:
    session, server, one, two = new_session()
    other = Server(OTHER_SERVER, session)
    initialize(session, other, identity="other", tools=("o",))
    method = "sampling/createMessage"
    assert session.choose_caller(server, method) is None  # nobody busy: nobody
    forward(session, one, 1, "tools/call", params={"name": "add"})
    assert session.choose_caller(server, method) is one
    assert session.choose_caller(other, method) is None  # one is busy with the other server
    session.from_caller(two, frame(method="notifications/initialized"), 0.0)
    assert session.choose_caller(server, method) is one  # two is more recent, but idle
    forward(session, two, 1, "tools/call", to=OTHER_SERVER, params={"name": "o"})
    assert session.choose_caller(server, method) is one
    assert session.choose_caller(other, method) is two
    forward(session, two, 2, "tools/call", params={"name": "add"})
    assert session.choose_caller(server, method) is two
    # a caller that declared capabilities without sampling is not asked to sample
    session.from_caller(two, frame(id=3, method="initialize", params={"capabilities": {}}), 0.0)
    assert session.choose_caller(server, method) is one
    assert session.choose_caller(server, "custom/ask") is two


def test_a_caller_leaving_cancels_at_the_server_each_entry_names() -> None:
    session, server, one, two = new_session()
    other = Server(OTHER_SERVER, session)
    initialize(session, other, identity="other", tools=("o",))
    first = forward(session, one, 1, "tools/call", params={"name": "add"})
    second = forward(session, one, 2, "tools/call", to=OTHER_SERVER, params={"name": "o"})
    kept = forward(session, two, 1, "tools/call", params={"name": "add"})
    actions = session.caller_disconnected(one)
    cancels = sorted(
        (conn, cancel["method"], cancel["params"]["requestId"]) for conn, cancel in sends(actions)
    )
    assert cancels == [
        (SERVER, "notifications/cancelled", first),
        (OTHER_SERVER, "notifications/cancelled", second),
    ]
    assert session.caller_disconnected(one) == []
    assert list(session.pending) == [kept]
    check(session)
    assert not session.idle
    session.caller_disconnected(two)
    session.server_disconnected(server, 0.0)
    session.server_disconnected(other, 0.0)
    assert session.idle


def test_sessions_share_their_policy_and_deadlines() -> None:
    policy, deadlines = Policy(request_timeout=5.0), Deadlines()
    a, b = Session("a", policy, deadlines), Session("b", policy, deadlines)
    callers: list[Caller] = []
    for session in (a, b):
        initialize(session, Server(len(callers) + 1, session))
        caller = Caller(len(callers) + 100, session)
        session.caller_connected(caller)
        callers.append(caller)
    assert [s.name for _, s, _, _ in deadlines.relay] == ["a", "a", "b", "b"]
    deadlines.added = False
    first = forward(a, callers[0], "x", "custom/call", to=1)
    assert deadlines.added
    second = forward(b, callers[1], "y", "custom/call", to=2)
    assert [(d, s.name, k) for d, s, k, _ in deadlines.requests] == [
        (5.0, "a", first),
        (5.0, "b", second),
    ]
    _, session, tool_id, entry = deadlines.requests[0]
    assert session.awaits_request(tool_id, entry)
    [(conn, timeout), (to, cancel)] = sends(session.expire_request(tool_id, entry))
    assert (conn, timeout["id"], timeout["error"]["code"]) == (100, "x", -32006)
    assert (to, cancel["params"]["requestId"]) == (1, tool_id)
    assert session.expire_request(tool_id, entry) == []  # already expired
    policy.draining = True
    refused = b.from_caller(callers[1], frame(id="z", method="custom/call"), 0.0)
    assert [(c, f["error"]["code"]) for c, f in sends(refused)] == [(101, -32003)]


@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from([ONE, TWO]),
            st.one_of(colliding_ids, ids),
            st.sampled_from(["tools/call", "tools/list", "custom/method", "prompts/custom"]),
        ),
        max_size=20,
    ),
    order=st.randoms(use_true_random=False),
)
def test_entries_record_what_was_sent_and_answers_restore_it(
    requests: list[tuple[int, Any, str]], order: Any
) -> None:
    session, server, one, two = new_session()
    callers = {ONE: one, TWO: two}
    sent = {}
    for conn, rid, method in requests:
        if method == "tools/list":
            # answered by the relay itself, at once, with the caller's id
            [(to, answer)] = sends(
                session.from_caller(callers[conn], frame(id=rid, method=method), 0.0)
            )
            assert (to, typed(answer["id"])) == (conn, typed(rid))
            assert "result" in answer
            continue
        members: dict[str, Any] = {"params": {"name": "add"}} if method == "tools/call" else {}
        tool_id = forward(session, callers[conn], rid, method, **members)
        entry = session.pending[tool_id]
        assert (entry.caller.conn, typed(entry.caller_id)) == (conn, typed(rid))
        assert (entry.server, entry.method) == (SERVER, method)
        sent[tool_id] = (conn, rid)
    assert len(sent) == sum(m != "tools/list" for _, _, m in requests)  # every id is new
    keys = sorted(sent)
    order.shuffle(keys)
    for tool_id in keys:
        [(conn, answer)] = sends(session.from_server(server, frame(id=tool_id, result={}), 0.0))
        assert (conn, typed(answer["id"])) == (sent[tool_id][0], typed(sent[tool_id][1]))
        check(session)
    assert session.pending == {}
