"""Tests of one agent's session as a unit: no Router, no I/O, frames handed in parsed.

The session is the seam later work shards across nodes and grows to several servers per
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


def new_session(policy: Policy | None = None) -> tuple[Session, Server, Caller, Caller]:
    session = Session("agent", policy)
    server = Server(SERVER, session)
    one, two = Caller(ONE, session), Caller(TWO, session)
    assert session.server_connected(server) == []
    assert session.caller_connected(one) == []
    assert session.caller_connected(two) == []
    check(session)
    return session, server, one, two


def forward(session: Session, caller: Caller, rid: Any, method: str, **members: Any) -> int:
    """A caller request the session forwards: the id its server sees."""
    [action] = session.from_caller(caller, frame(id=rid, method=method, **members), 0.0)
    assert isinstance(action, Send)
    assert session.server is not None and action.conn == session.server.conn
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
        forward(session, one, 1, "tools/list"): (one, "tools/list"),
        forward(session, two, 1, "tools/call", params={"name": "x"}): (two, "tools/call"),
        forward(session, one, 2, "get_weather"): (one, "get_weather"),
    }
    recorded = {k: (e.caller, e.method) for k, e in session.pending.items()}
    assert recorded == asked
    assert {e.server for e in session.pending.values()} == {SERVER}
    # A newer server replaces the first: its requests fail -32003, new ones record the new one.
    newer = Server(OTHER_SERVER, session)
    actions = session.server_connected(newer)
    assert actions[-1] == Close(SERVER, CLOSE_REPLACED, "replaced by a newer tool connection")
    failed = sends(actions[:-1])
    assert sorted((conn, f["id"], f["error"]["code"]) for conn, f in failed) == [
        (ONE, 1, -32003),
        (ONE, 2, -32003),
        (TWO, 1, -32003),
    ]
    assert session.pending == {}
    tool_id = forward(session, two, 9, "resources/read")
    entry = session.pending[tool_id]
    assert (entry.server, entry.method, entry.caller) == (OTHER_SERVER, "resources/read", two)
    check(session)


def test_only_the_server_an_entry_names_may_answer_it() -> None:
    # One server per agent today; these are the rules several servers will rely on.
    session, server, one, _ = new_session()
    tool_id = forward(session, one, "r", "tools/call", params={"_meta": {"progressToken": "p"}})
    stranger = Server(OTHER_SERVER, session)
    progress = frame(method="notifications/progress", params={"progressToken": tool_id})
    assert session.from_server(stranger, progress, 0.0) == []
    assert session.from_server(stranger, frame(id=tool_id, result={}), 0.0) == []
    assert session.forward_failed(stranger, tool_id, "not reading") == []
    assert session.server_disconnected(stranger) == []
    assert list(session.pending) == [tool_id]
    check(session)
    [(conn, restored)] = sends(session.from_server(server, progress, 0.0))
    assert (conn, restored["params"]["progressToken"]) == (ONE, "p")
    [(conn, answer)] = sends(session.forward_failed(server, tool_id, "not reading"))
    assert (conn, answer["id"], answer["error"]["code"]) == (ONE, "r", -32002)
    assert session.pending == {}


def test_tool_requests_record_their_server_and_go_back_to_it() -> None:
    session, server, one, two = new_session()
    forward(session, two, 1, "tools/call")  # two is busy: the tool asks on its behalf
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


def test_choose_caller_prefers_the_most_recently_active_busy_caller() -> None:
    session, _, one, two = new_session()
    assert session.choose_caller() is two  # none busy: the most recently active
    forward(session, one, 1, "tools/call")
    assert session.choose_caller() is one
    session.from_caller(two, frame(method="notifications/initialized"), 0.0)
    assert session.choose_caller() is one  # two is more recent, but idle
    forward(session, two, 1, "tools/call")
    assert session.choose_caller() is two


def test_a_caller_leaving_cancels_at_the_server_each_entry_names() -> None:
    session, server, one, two = new_session()
    first = forward(session, one, 1, "tools/call")
    kept = forward(session, two, 1, "tools/call")
    actions = session.caller_disconnected(one)
    [(conn, cancel)] = sends(actions)
    assert (conn, cancel["method"], cancel["params"]["requestId"]) == (
        SERVER,
        "notifications/cancelled",
        first,
    )
    assert session.caller_disconnected(one) == []
    assert list(session.pending) == [kept]
    check(session)
    assert not session.idle
    session.caller_disconnected(two)
    session.server_disconnected(server)
    assert session.idle


def test_sessions_share_their_policy_and_deadlines() -> None:
    policy, deadlines = Policy(request_timeout=5.0), Deadlines()
    a, b = Session("a", policy, deadlines), Session("b", policy, deadlines)
    callers = []
    for session in (a, b):
        session.server_connected(Server(len(callers) + 1, session))
        caller = Caller(len(callers) + 100, session)
        session.caller_connected(caller)
        callers.append(caller)
    first = forward(a, callers[0], "x", "tools/call")
    assert deadlines.added
    forward(b, callers[1], "y", "tools/call")
    assert [(d, s.name, k) for d, s, k, _ in deadlines.requests] == [
        (5.0, "a", first),
        (5.0, "b", 1),
    ]
    _, session, tool_id, entry = deadlines.requests[0]
    assert session.awaits_request(tool_id, entry)
    [(conn, timeout), (to, cancel)] = sends(session.expire_request(tool_id, entry))
    assert (conn, timeout["id"], timeout["error"]["code"]) == (100, "x", -32006)
    assert (to, cancel["params"]["requestId"]) == (1, tool_id)
    assert session.expire_request(tool_id, entry) == []  # already expired
    policy.draining = True
    refused = b.from_caller(callers[1], frame(id="z", method="tools/call"), 0.0)
    assert [(c, f["error"]["code"]) for c, f in sends(refused)] == [(101, -32003)]


@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from([ONE, TWO]),
            st.one_of(colliding_ids, ids),
            st.sampled_from(["tools/call", "tools/list", "prompts/get", "custom/method"]),
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
        tool_id = forward(session, callers[conn], rid, method)
        entry = session.pending[tool_id]
        assert (entry.caller.conn, typed(entry.caller_id)) == (conn, typed(rid))
        assert (entry.server, entry.method) == (SERVER, method)
        sent[tool_id] = (conn, rid)
    assert len(sent) == len(requests)  # every server-side id is new
    keys = sorted(sent)
    order.shuffle(keys)
    for tool_id in keys:
        [(conn, answer)] = sends(session.from_server(server, frame(id=tool_id, result={}), 0.0))
        assert (conn, typed(answer["id"])) == (sent[tool_id][0], typed(sent[tool_id][1]))
        check(session)
    assert session.pending == {}
