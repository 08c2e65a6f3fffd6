"""The pure part of cluster mode: what nodes keep in Redis and send each other, the directory
every node mirrors, and a server link's answers (with a bus that records what it is given)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from trio_mcp_relay._frames import MISSING, dumps
from trio_mcp_relay.core.catalog import Kind
from trio_mcp_relay.server.cluster.links import ServerLink
from trio_mcp_relay.server.cluster.records import (
    CLOSE_FROM_SERVER,
    TO_SERVER,
    BusMessage,
    Change,
    Directory,
    Keys,
    NodeRecord,
    ServerRecord,
    decode_message,
    encode_message,
)
from trio_mcp_relay.testing import json_values

names = st.text(min_size=1, max_size=12)
nodes = st.sampled_from(["A", "B", "C"])


@st.composite
def records(
    draw: st.DrawFn, agent: Any = names, identity: Any = names, values: Any = None
) -> ServerRecord:
    extra = json_values() if values is None else values
    items = {
        kind.value: tuple(
            draw(st.lists(st.fixed_dictionaries({"name": names}, optional={"x": extra})))
        )
        for kind in Kind
    }
    return ServerRecord(
        draw(agent),
        draw(identity),
        draw(nodes),
        draw(st.integers(1, 2**53)),
        draw(st.none() | names),
        {"capabilities": draw(st.dictionaries(names, st.fixed_dictionaries({})))},
        items,
    )


@given(records())
def test_a_server_record_survives_redis(record: ServerRecord) -> None:
    data = record.encode()
    assert data.startswith(record.owner())
    assert ServerRecord.decode(data) == record


@given(st.binary())
def test_a_value_that_is_no_record_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        ServerRecord.decode(b"A 1\n" + data + b"\xff")


@given(names, names, names, names)
def test_server_keys_never_collide(a1: str, i1: str, a2: str, i2: str) -> None:
    keys = Keys()
    assert (keys.server(a1, i1) == keys.server(a2, i2)) == ((a1, i1) == (a2, i2))


@given(
    st.sampled_from(["s", "c", "x", "X"]),
    names,
    st.integers(0, 2**40),
    names,
    names,
    st.binary(),
)
def test_a_bus_message_survives_the_bus(
    kind: str, node: str, tunnel: int, agent: str, identity: str, frame: bytes
) -> None:
    message = BusMessage(kind, node, tunnel, agent, identity, frame)
    assert decode_message(encode_message(message)) == message


@given(st.binary())
def test_a_bus_message_that_is_not_ours_is_refused(data: bytes) -> None:
    try:
        message = decode_message(data)
    except ValueError:
        return
    assert encode_message(message) == data.partition(b"\n")[0] + b"\n" + message.frame or True


def test_a_node_record_survives_redis() -> None:
    record = NodeRecord("A", "h:1", 1.5, True, {"ag": 2}, {"ag": 1}, 3, 4)
    assert NodeRecord.decode(record.encode()) == record
    with pytest.raises(ValueError):
        NodeRecord.decode(b"{}")


class DirectoryMachine(RuleBasedStateMachine):
    """Against a model: a directory holds, per server, the newest record it was told of that
    no later news removed, and every change it reports is exactly what changed."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Directory()
        self.model: dict[tuple[str, str], ServerRecord] = {}

    def check(self, before: dict[tuple[str, str], ServerRecord], changes: list[Change]) -> None:
        after = self.model
        expected = {
            key: (after.get(key), before.get(key))
            for key in set(before) | set(after)
            if before.get(key) != after.get(key)
        }
        got = {(c.agent, c.identity): (c.now, c.before) for c in changes}
        assert got == expected
        assert len(changes) == len(got)

    @rule(record=records(st.sampled_from("ab"), st.sampled_from("xy"), st.integers(0, 2)))
    def up(self, record: ServerRecord) -> None:
        before = dict(self.model)
        key = (record.agent, record.identity)
        if key not in self.model or self.model[key].version < record.version:
            self.model[key] = record
        self.check(before, self.directory.up(record))

    @rule(agent=st.sampled_from("ab"), identity=st.sampled_from("xy"), version=st.integers(1, 5))
    def down(self, agent: str, identity: str, version: int) -> None:
        before = dict(self.model)
        known = self.model.get((agent, identity))
        if known is not None and known.version == version:
            del self.model[(agent, identity)]
        self.check(before, self.directory.down(agent, identity, version))

    @rule(
        fresh=st.lists(
            records(st.sampled_from("ab"), st.sampled_from("xy"), st.integers(0, 2)), max_size=4
        )
    )
    def replace(self, fresh: list[ServerRecord]) -> None:
        before = dict(self.model)
        self.model = {(r.agent, r.identity): r for r in fresh}
        self.check(before, self.directory.replace(fresh))

    @rule(
        fresh=st.lists(
            records(st.sampled_from("ab"), st.sampled_from("xy"), st.integers(0, 2)), max_size=4
        ),
        news=records(st.sampled_from("ab"), st.sampled_from("xy"), st.integers(0, 2)),
    )
    def replace_read_across_an_event(self, fresh: list[ServerRecord], news: ServerRecord) -> None:
        """A full read that started before an event: the event's server keeps what the event
        said, the others become what the read found."""
        since = self.directory.generation
        self.up(news)
        before = dict(self.model)
        touched = {(news.agent, news.identity)} if self.directory.generation > since else set()
        found = {(r.agent, r.identity): r for r in fresh}
        self.model = {k: r for k, r in found.items() if k not in touched}
        for key in touched:
            if key in before:
                self.model[key] = before[key]
        self.check(before, self.directory.replace(fresh, since))

    @rule(alive=st.sets(nodes))
    def nodes_alive(self, alive: set[str]) -> None:
        before = dict(self.model)
        self.model = {k: r for k, r in self.model.items() if r.node in alive}
        live = {n: NodeRecord(n, "h", 0.0) for n in alive}
        self.check(before, self.directory.nodes_alive(live))

    @invariant()
    def same(self) -> None:
        assert self.directory.records == self.model
        for agent in {a for a, _ in self.model} | {"a", "b"}:
            mine = {r.identity: r for (a, _), r in self.model.items() if a == agent}
            assert {r.identity: r for r in self.directory.of_agent(agent)} == mine


DirectoryMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=10)
test_the_directory_follows_the_newest_news = DirectoryMachine.TestCase


class RecordingBus:
    """The bus a link is given: records what it is asked to send."""

    node = "B"

    def __init__(self) -> None:
        self.sent: list[tuple[str, BusMessage]] = []
        self.wanted: list[Any] = []
        self.up = True
        self.down_reason = "the cluster bus is unreachable (Redis at redis://r: refused)"

    async def send(
        self, to: str, message: BusMessage, failed: Any = None, wanted: Any = None
    ) -> None:
        self.sent.append((to, message))
        self.wanted.append(wanted)

    def lost(self, link: Any) -> None:
        raise AssertionError("only caller links are lost")


def calc(node: str = "A", version: int = 1, tools: tuple[str, ...] = ("add",)) -> ServerRecord:
    items = {k.value: () for k in Kind}
    items["tools"] = tuple({"name": t, "inputSchema": {"type": "object"}} for t in tools)
    init = {"capabilities": {"tools": {}}, "serverInfo": {"name": "calc", "version": "1"}}
    return ServerRecord("ag", "calc", node, version, None, init, items)


async def frames(link: ServerLink) -> list[Any]:
    """What the link has for the relay now (the clock jumps when nothing more comes)."""
    out = []
    with trio.move_on_after(1):
        while True:
            out.append(orjson.loads(await link.receive()))
    return out


async def test_a_server_link_answers_initialize_and_lists_from_the_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(5):
        bus = RecordingBus()
        link = ServerLink(bus, calc(), tunnel=7)
        init = {"protocolVersion": "2025-06-18", "capabilities": {}}
        await link.send_many(
            [
                dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}),
                dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
                dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
                dumps({"jsonrpc": "2.0", "id": 3, "method": "ping"}),
            ]
        )
        got = await frames(link)
        assert got[0]["result"]["protocolVersion"] == "2025-06-18"
        assert got[0]["result"]["serverInfo"]["name"] == "calc"
        assert got[1] == {
            "jsonrpc": "2.0",
            "id": 2,
            "result": {"tools": list(calc().items["tools"])},
        }
        assert got[2] == {"jsonrpc": "2.0", "id": 3, "result": {}}
        assert bus.sent == []


async def test_a_server_link_forwards_the_rest_and_answers_it_itself_when_the_bus_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(5):
        bus = RecordingBus()
        link = ServerLink(bus, calc(), tunnel=7)
        call = dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "add"}})
        other = dumps(
            {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "add"}}
        )
        cancel = dumps(
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 6}}
        )
        await link.send_many([call, other, cancel])
        assert [(to, m.kind, m.tunnel, m.frame) for to, m in bus.sent] == [
            ("A", TO_SERVER, 7, call),
            ("A", TO_SERVER, 7, other),
            ("A", TO_SERVER, 7, cancel),
        ]
        assert list(link.inflight) == [5]
        # Request 6 was cancelled before it left: it is not sent at all (its cancellation is).
        assert [w() for w in bus.wanted] == [True, False, True]
        # The bus goes down: what is in flight is answered here, -32002 with the cause,
        # and a request still queued then is not wanted any more (it must not run).
        link.fail_inflight(bus.down_reason)
        assert [w() for w in bus.wanted] == [False, False, True]
        (failed,) = await frames(link)
        assert failed["id"] == 5 and failed["error"]["code"] == -32002
        assert "Redis" in failed["error"]["data"]
        # While it is down, a new request is answered at once, and nothing is sent.
        bus.up = False
        await link.send_many([dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/call"})])
        (refused,) = await frames(link)
        assert refused["id"] == 9 and refused["error"]["code"] == -32002
        assert len(bus.sent) == 3


async def test_a_server_link_lets_a_response_clear_its_request_and_relists_on_news(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(5):
        bus = RecordingBus()
        link = ServerLink(bus, calc(), tunnel=7)
        await link.send_many([dumps({"jsonrpc": "2.0", "id": 2**70, "method": "tools/call"})])
        assert list(link.inflight) == [2**70]
        link.deliver(b'{"jsonrpc":"2.0","id":1180591620717411303424,"result":{}}')
        assert link.inflight == {}
        link.update(calc(version=2, tools=("add", "mul")))
        got = await frames(link)
        assert got[-1] == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        link.update(calc(version=3, tools=("add", "mul")))  # same lists: nothing to say
        assert await frames(link) == []


async def test_a_server_link_closing_tells_the_other_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(5):
        bus = RecordingBus()
        link = ServerLink(bus, calc(), tunnel=7)
        await link.close(1000, "bye")
        ((to, message),) = bus.sent
        assert (to, message.kind, message.tunnel) == ("A", "x", 7)
        assert link.closed
        assert MISSING is not None and CLOSE_FROM_SERVER == "X"
