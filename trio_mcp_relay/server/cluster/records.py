"""What cluster nodes keep in Redis and send each other, as pure values (no I/O).

Keys (``P`` is the key prefix, ``trio-mcp-relay:`` by default)::

    P node:<node>                 a node's lease: its NodeRecord (JSON), PX = the lease
    P srv:<[agent, identity]>     a server's lease: "<node> <version>\\n" + ServerRecord (JSON)
    P seq                         the counter versions are drawn from (INCR)
    P events                      channel: directory events (a server up or down)
    P bus:<node>                  channel: frames for connections on that node

A server's key is renewed by its node's heartbeat together with the node's own key, so both
lapse together when the node dies. The version orders registrations of one identity: the
higher one is the newer connection, and replaces the older wherever it is.

Bus messages are one header line (a JSON array) and the frame as it travels::

    [kind, from_node, tunnel, agent, identity]\\n<frame bytes>

and what one PUBLISH carries is a batch of them, each after its length (4 bytes).

``kind`` is one of :data:`TO_SERVER` (a frame from the node of the callers to the node of
the server), :data:`TO_CALLERS` (the way back), :data:`CLOSE_FROM_CALLERS` and
:data:`CLOSE_FROM_SERVER` (the tunnel ends; no frame).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
import orjson

from ..._frames import FrameError, _loads, dumps
from ...core.catalog import Kind, ServerView

__all__ = [
    "CLOSE_FROM_CALLERS",
    "CLOSE_FROM_SERVER",
    "TO_CALLERS",
    "TO_SERVER",
    "BusMessage",
    "Directory",
    "Keys",
    "NodeRecord",
    "ServerRecord",
    "decode_batch",
    "decode_message",
    "encode_batch",
    "encode_message",
]

TO_SERVER: Final = "s"
TO_CALLERS: Final = "c"
CLOSE_FROM_CALLERS: Final = "x"
CLOSE_FROM_SERVER: Final = "X"
_KINDS: Final = frozenset({TO_SERVER, TO_CALLERS, CLOSE_FROM_CALLERS, CLOSE_FROM_SERVER})


@attrs.frozen
class Keys:
    """The Redis key and channel names under one prefix."""

    prefix: str = "trio-mcp-relay:"

    def node(self, node: str) -> bytes:
        return f"{self.prefix}node:{node}".encode()

    @property
    def node_pattern(self) -> bytes:
        return f"{self.prefix}node:*".encode()

    def server(self, agent: str, identity: str) -> bytes:
        return f"{self.prefix}srv:".encode() + orjson.dumps([agent, identity])

    @property
    def server_pattern(self) -> bytes:
        return f"{self.prefix}srv:*".encode()

    @property
    def seq(self) -> bytes:
        return f"{self.prefix}seq".encode()

    @property
    def events(self) -> bytes:
        return f"{self.prefix}events".encode()

    def bus(self, node: str) -> bytes:
        return f"{self.prefix}bus:{node}".encode()


@attrs.frozen
class ServerRecord:
    """One server of one agent, as the node hosting it published it.

    ``items`` holds each list as the server itself spelled it; every node merges them into
    its own catalog of the agent (with its own filters), as it does for a local server.
    """

    agent: str
    identity: str
    node: str
    version: int
    server_id: str | None
    initialize: Mapping[str, Any]
    items: Mapping[str, tuple[Any, ...]]
    #: Orders the records one connection publishes (it lists again): ``version`` names
    #: the connection (a newer one replaces it), ``revision`` its latest lists.
    revision: int = 0

    @property
    def order(self) -> tuple[int, int]:
        return (self.version, self.revision)

    @classmethod
    def of(
        cls,
        agent: str,
        view: ServerView,
        server_id: str | None,
        node: str,
        version: int,
        revision: int = 0,
    ) -> ServerRecord:
        """The record of a ready server from the catalog's view of it."""
        result: dict[str, Any] = {"capabilities": dict(view.capabilities)}
        if view.server_info is not None:
            result["serverInfo"] = dict(view.server_info)
        if view.instructions is not None:
            result["instructions"] = view.instructions
        items = {kind.value: tuple(view.items.get(kind, ())) for kind in Kind}
        return cls(agent, view.identity, node, version, server_id, result, items, revision)

    def owner(self) -> bytes:
        """The first line of the stored value: who holds the lease, at which version."""
        return f"{self.node} {self.version}\n".encode()

    def encode(self) -> bytes:
        body = {
            "agent": self.agent,
            "identity": self.identity,
            "node": self.node,
            "version": self.version,
            "server_id": self.server_id,
            "initialize": self.initialize,
            "items": {k: list(v) for k, v in self.items.items()},
            "revision": self.revision,
        }
        return self.owner() + dumps(body)  # exact: a schema may hold huge integers

    @classmethod
    def decode(cls, data: bytes) -> ServerRecord:
        """Raises ValueError for a value that is not a server record."""
        _, _, body = data.partition(b"\n")
        try:
            obj = _loads(body)
            items = obj["items"]
            record = cls(
                str(obj["agent"]),
                str(obj["identity"]),
                str(obj["node"]),
                int(obj["version"]),
                obj["server_id"] if isinstance(obj["server_id"], str) else None,
                dict(obj["initialize"]),
                {k: tuple(v) for k, v in items.items() if isinstance(v, list)},
                int(obj.get("revision", 0)),
            )
        except (FrameError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a server record: {exc}") from None
        return record

    def list_result(self, kind: Kind) -> dict[str, Any]:
        """The answer to this server's list of ``kind``, one page with everything."""
        return {kind.value: list(self.items.get(kind.value, ()))}

    def same_lists(self, other: ServerRecord) -> tuple[Kind, ...]:
        """The kinds whose lists differ from ``other``'s."""
        return tuple(k for k in Kind if self.items.get(k.value) != other.items.get(k.value))


@attrs.frozen
class NodeRecord:
    """A node's lease value: who it is, where, and what it serves (for cluster-wide counts
    and limits)."""

    node: str
    address: str
    started: float
    draining: bool = False
    #: Callers of its own (not standing for other nodes'), by agent.
    callers: Mapping[str, int] = attrs.field(factory=dict)
    #: Tool requests of its own servers awaiting a caller, by agent.
    tool_requests: Mapping[str, int] = attrs.field(factory=dict)
    tools: int = 0
    http_sessions: int = 0
    #: The name operators gave it (``node`` is that, and a suffix of its process).
    name: str = ""

    def encode(self) -> bytes:
        return orjson.dumps(attrs.asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> NodeRecord:
        try:
            obj = orjson.loads(data)
            return cls(
                str(obj["node"]),
                str(obj["address"]),
                float(obj["started"]),
                bool(obj.get("draining", False)),
                {str(k): int(v) for k, v in obj.get("callers", {}).items()},
                {str(k): int(v) for k, v in obj.get("tool_requests", {}).items()},
                int(obj.get("tools", 0)),
                int(obj.get("http_sessions", 0)),
                str(obj.get("name", "")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a node record: {exc}") from None


@attrs.frozen
class BusMessage:
    kind: str
    node: str  # the sender
    tunnel: int
    agent: str
    identity: str
    frame: bytes = b""


def encode_message(message: BusMessage) -> bytes:
    head = orjson.dumps(
        [message.kind, message.node, message.tunnel, message.agent, message.identity]
    )
    return head + b"\n" + message.frame


def decode_message(data: bytes) -> BusMessage:
    """Raises ValueError for a message that is not one of ours."""
    head, _, frame = data.partition(b"\n")
    try:
        kind, node, tunnel, agent, identity = orjson.loads(head)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"not a bus message: {exc}") from None
    if (
        kind not in _KINDS
        or not isinstance(node, str)
        or type(tunnel) is not int
        or not isinstance(agent, str)
        or not isinstance(identity, str)
    ):
        raise ValueError("not a bus message: bad header")
    return BusMessage(kind, node, tunnel, agent, identity, frame)


def encode_batch(messages: Iterable[BusMessage]) -> bytes:
    """Several messages for one node as one Redis message (one PUBLISH): each one's length
    (4 bytes, big-endian), then the message."""
    parts = []
    for message in messages:
        data = encode_message(message)
        parts.append(len(data).to_bytes(4, "big"))
        parts.append(data)
    return b"".join(parts)


def decode_batch(data: bytes) -> list[BusMessage]:
    """The messages of :func:`encode_batch`; raises ValueError for anything else."""
    out = []
    view = memoryview(data)
    at = 0
    while at < len(data):
        if at + 4 > len(data):
            raise ValueError("not a bus batch: cut short")
        size = int.from_bytes(view[at : at + 4], "big")
        at += 4
        if at + size > len(data):
            raise ValueError("not a bus batch: cut short")
        out.append(decode_message(bytes(view[at : at + size])))
        at += size
    return out


@attrs.frozen
class Change:
    """What a directory update did to one server of one agent."""

    agent: str
    identity: str
    #: The record now (None: the server left the cluster).
    now: ServerRecord | None
    #: The record before (None: it is new).
    before: ServerRecord | None


class Directory:
    """Every node's view of the cluster: the servers of every agent and the live nodes.

    Fed by events (:meth:`up`, :meth:`down`), by full reads of Redis (:meth:`replace`) and by
    node liveness (:meth:`nodes_alive`); each returns the :class:`Change` values it made, for
    the node to act on. A stale event (a lower version than what is known) changes nothing.
    Records are also indexed by agent: a caller's arrival looks up its agent's only.
    """

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], ServerRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self._by_agent: dict[str, dict[str, ServerRecord]] = {}
        #: Ticks on each event applied; when each server was last changed by one. A full
        #: read started before an event must not undo it.
        self.generation = 0
        self._stamps: dict[tuple[str, str], int] = {}

    def of_agent(self, agent: str) -> list[ServerRecord]:
        return list(self._by_agent.get(agent, {}).values())

    def get(self, agent: str, identity: str) -> ServerRecord | None:
        return self.records.get((agent, identity))

    def _put(self, record: ServerRecord) -> None:
        self.records[(record.agent, record.identity)] = record
        self._by_agent.setdefault(record.agent, {})[record.identity] = record

    def _drop(self, key: tuple[str, str]) -> ServerRecord:
        record = self.records.pop(key)
        servers = self._by_agent[key[0]]
        del servers[key[1]]
        if not servers:
            del self._by_agent[key[0]]
        return record

    def _stamp(self, key: tuple[str, str]) -> None:
        self.generation += 1
        self._stamps[key] = self.generation

    def _fresh(self, key: tuple[str, str], since: int | None) -> bool:
        """Whether an event changed ``key`` after generation ``since``."""
        return since is not None and self._stamps.get(key, 0) > since

    def up(self, record: ServerRecord) -> list[Change]:
        """An event: ``record`` was claimed (ignored if not newer than what is known)."""
        key = (record.agent, record.identity)
        before = self.records.get(key)
        if before is not None and before.order >= record.order:
            return []
        self._put(record)
        self._stamp(key)
        return [Change(record.agent, record.identity, record, before)]

    def down(self, agent: str, identity: str, version: int) -> list[Change]:
        """An event: the claim of this version was released."""
        key = (agent, identity)
        before = self.records.get(key)
        if before is None or before.version != version:
            return []
        self._drop(key)
        self._stamp(key)
        return [Change(agent, identity, None, before)]

    def replace(self, records: Iterable[ServerRecord], since: int | None = None) -> list[Change]:
        """Redis holds exactly ``records`` (read from generation ``since`` on): others
        leave, differing ones replace ours, except where an event applied during the read
        knows better."""
        fresh = {(r.agent, r.identity): r for r in records}
        changes: list[Change] = []
        for key in [k for k in self.records if k not in fresh and not self._fresh(k, since)]:
            changes.append(Change(key[0], key[1], None, self._drop(key)))
        for key, record in fresh.items():
            known = self.records.get(key)
            if known != record and not self._fresh(key, since):
                self._put(record)
                changes.append(Change(key[0], key[1], record, known))
        if since is not None:  # stamps older than this read are of no more use
            self._stamps = {k: g for k, g in self._stamps.items() if g > since}
        return changes

    def nodes_alive(
        self, nodes: Mapping[str, NodeRecord], since: int | None = None
    ) -> list[Change]:
        """These nodes hold a lease now (read from generation ``since`` on); the servers of
        any other node leave, unless an event brought them during the read."""
        self.nodes = dict(nodes)
        gone = [
            key
            for key, record in self.records.items()
            if record.node not in nodes and not self._fresh(key, since)
        ]
        return [Change(key[0], key[1], None, self._drop(key)) for key in gone]

    def callers_elsewhere(self, agent: str, me: str) -> int:
        return sum(n.callers.get(agent, 0) for name, n in self.nodes.items() if name != me)

    def tool_requests_elsewhere(self, agent: str, me: str) -> int:
        return sum(n.tool_requests.get(agent, 0) for name, n in self.nodes.items() if name != me)
