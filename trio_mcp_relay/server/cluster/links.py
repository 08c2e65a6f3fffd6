"""The two ends of a tunnel between nodes, each a connection the dispatcher runs.

A *tunnel* joins the callers of one agent on one node to one server of that agent on
another. Each end implements the relay's :class:`~trio_mcp_relay._transport.WebSocket`
interface, as an HTTP session does, so the routing core and the dispatcher treat it as one
more connection and every rule (ids, progress, cancellation, tool-to-caller requests,
``-32003`` when a side leaves) is the same code as on one node:

* :class:`ServerLink`, on the node of the callers, is a *server* of the agent (marked remote).
  It answers ``initialize`` and the lists from the server's record in Redis, so callers on
  this node are served the merged catalog without a frame to the other node; everything
  else goes over the bus. It remembers the requests it sent until they are answered, so
  that when the bus fails they are answered ``-32002`` here, never left waiting.
* :class:`CallerLink`, on the node of the server, is a *caller* of the agent that stands for
  the other node's callers of that one server (:attr:`~trio_mcp_relay.core.session.Caller.target`).

Frames cross in order: each node sends through one connection to Redis, in the order the
dispatcher wrote them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import orjson
import trio

from ..._frames import (
    FORWARD_FAILED,
    MISSING,
    FrameError,
    Notification,
    Request,
    error_frame,
    parse_frame,
)
from ..._transport import ConnectionClosed
from ...core.catalog import Kind
from ...core.upstream import RELAY_PROTOCOL_VERSION
from ...core.wire import CANCELLED, notification, result_frame
from .records import (
    CLOSE_FROM_CALLERS,
    CLOSE_FROM_SERVER,
    TO_CALLERS,
    TO_SERVER,
    BusMessage,
    ServerRecord,
)

__all__ = ["Bus", "CallerLink", "ServerLink"]

log = logging.getLogger("trio_mcp_relay.cluster")

_LISTS: Final = {kind.list_method: kind for kind in Kind}
#: Messages from the bus a link holds before its connection reads them; more ends it.
INBOX_SIZE: Final = 4096
CLOSE_OVERFLOW: Final = 1013


class Bus(Protocol):
    """What a link needs of its node."""

    node: str

    @property
    def up(self) -> bool: ...

    @property
    def down_reason(self) -> str: ...

    async def send(
        self,
        to: str,
        message: BusMessage,
        failed: Callable[[str], None] | None = None,
        wanted: Callable[[], bool] | None = None,
    ) -> None: ...

    def lost(self, link: CallerLink) -> None: ...


def _peek(data: bytes) -> tuple[str | None, Any, Any]:
    """``(method, id, params)`` of a frame (``MISSING`` where absent); exact for huge
    integers (the parser's slow path), cheap otherwise."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            frame = parse_frame(data)
        except FrameError:
            return None, MISSING, MISSING
        if isinstance(frame, Request):
            return frame.method, frame.id, frame.params
        if isinstance(frame, Notification):
            return frame.method, MISSING, frame.params
        return None, frame.id, MISSING
    if not isinstance(obj, dict):
        return None, MISSING, MISSING
    method = obj.get("method")
    return (
        method if isinstance(method, str) else None,
        obj.get("id", MISSING),
        obj.get("params", MISSING),
    )


class _Inbox:
    """Messages from the bus, until the link ends."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes](INBOX_SIZE)
        self.closed: tuple[int, str] | None = None

    def put(self, data: bytes) -> bool:
        try:
            self._send.send_nowait(data)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return True
        return True

    async def get(self) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            code, reason = self.closed or (1000, "")
            raise ConnectionClosed(code, reason) from None

    def end(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)
            self._send.close()


class _Link:
    """What both ends share: the WebSocket interface over an inbox."""

    def __init__(self, bus: Bus, tunnel: int, agent: str, identity: str) -> None:
        self.bus = bus
        self.tunnel = tunnel
        self.agent = agent
        self.identity = identity
        self.inbox = _Inbox()
        self.remote = "cluster"
        #: Called once when the link ends, whoever ends it (the node forgets it).
        self.on_end: Callable[[], None] | None = None
        #: The other end knows this end is gone: it closed the tunnel, or was told.
        self.settled = False

    @property
    def closed(self) -> bool:
        return self.inbox.closed is not None

    async def receive(self) -> bytes:
        return await self.inbox.get()

    @property
    def last_pong(self) -> float | None:
        """Always now: a link's liveness is its node's lease, not pings."""
        return trio.current_time()

    async def ping(self, payload: bytes = b"") -> None:
        """Nothing to do: see :attr:`last_pong`."""

    async def aclose(self) -> None:
        self.end(1006, "dropped")

    def end(self, code: int, reason: str) -> None:
        if self.inbox.closed is None:
            self.inbox.end(code, reason)
            if self.on_end is not None:
                self.on_end()

    def answer(self, frame: bytes) -> None:
        """A frame for the relay made here; a full inbox ends the link (what is in flight
        on it is then answered ``-32003`` by the relay: nothing goes unanswered)."""
        _Link.deliver(self, frame)

    def deliver(self, frame: bytes) -> None:
        """A frame from the other end."""
        if not self.inbox.put(frame):
            log.warning(
                "agent %s: cluster tunnel %d (%s): %d frames not yet read; ending it",
                self.agent,
                self.tunnel,
                self.identity,
                INBOX_SIZE,
            )
            self.end(CLOSE_OVERFLOW, "cluster tunnel overflowed")


class ServerLink(_Link):
    """A server on another node, as a server of the agent here.

    Args:
        bus: this node's bus.
        record: the server as its node published it.
        tunnel: this tunnel's number (unique on this node).
    """

    def __init__(self, bus: Bus, record: ServerRecord, tunnel: int) -> None:
        super().__init__(bus, tunnel, record.agent, record.identity)
        self.record = record
        #: Ids (ours) of the requests sent over the bus and not answered yet.
        self.inflight: dict[Any, None] = {}
        self.sent = 0  # frames that crossed to the other node (for tests and the status)

    @property
    def node(self) -> str:
        return self.record.node

    def _message(self, kind: str, frame: bytes = b"") -> BusMessage:
        return BusMessage(kind, self.bus.node, self.tunnel, self.agent, self.identity, frame)

    async def send_many(self, messages: Sequence[bytes]) -> None:
        """Frames the relay sends this server: answered here, or sent to its node."""
        if self.closed:
            raise ConnectionClosed(*(self.inbox.closed or (1000, "")))
        for data in messages:
            await self._send_one(data)

    async def _send_one(self, data: bytes) -> None:
        method, rid, params = _peek(data)
        if method is not None and rid is not MISSING:
            if method == "initialize":
                asked = params.get("protocolVersion") if isinstance(params, dict) else None
                result = {
                    "protocolVersion": asked if isinstance(asked, str) else RELAY_PROTOCOL_VERSION,
                    **self.record.initialize,
                }
                self.answer(result_frame(rid, result))
                return
            kind = _LISTS.get(method)
            if kind is not None:
                self.answer(result_frame(rid, self.record.list_result(kind)))
                return
            if method == "ping":
                self.answer(result_frame(rid, {}))
                return
        elif method == "notifications/initialized":
            return
        if not self.bus.up:
            if method is not None and rid is not MISSING:
                self._fail(rid, f"cross-node request failed: {self.bus.down_reason}")
            return
        if method is not None and rid is not MISSING:
            self.inflight[rid] = None
        elif method == CANCELLED and isinstance(params, dict):
            self.inflight.pop(params.get("requestId"), None)

        request = method is not None and rid is not MISSING
        tunnel = self.tunnel

        def failed(why: str) -> None:
            if request and rid in self.inflight:
                del self.inflight[rid]
                self._fail(rid, f"cross-node request failed: {why}")

        def wanted() -> bool:
            # Not on a tunnel renumbered meanwhile (its other end is gone), and not a
            # request answered here meanwhile (it must not run at the tool any more).
            return self.tunnel == tunnel and (not request or rid in self.inflight)

        self.sent += 1
        await self.bus.send(self.record.node, self._message(TO_SERVER, data), failed, wanted)

    def _fail(self, rid: Any, why: str, code: int = FORWARD_FAILED) -> None:
        message = "Forward failed" if code == FORWARD_FAILED else "Connection error"
        self.answer(error_frame(rid, code, message, why))

    def deliver(self, frame: bytes) -> None:
        """A frame from the server's node: a response clears its request."""
        if self.inflight:
            method, rid, _ = _peek(frame)
            if method is None and rid is not MISSING:
                self.inflight.pop(rid, None)
        super().deliver(frame)

    def fail_inflight(self, why: str, code: int = FORWARD_FAILED) -> None:
        """The requests sent over the bus will not be answered (the bus failed, or the other
        end closed the tunnel): answer each here."""
        inflight, self.inflight = self.inflight, {}
        for rid in inflight:
            self._fail(rid, why, code)

    def update(self, record: ServerRecord) -> None:
        """The server listed again: the relay lists it again, from the new record."""
        changed = record.same_lists(self.record)
        self.record = record
        seen: set[str] = set()
        for kind in changed:
            method = (Kind.RESOURCE_TEMPLATES if kind is Kind.RESOURCES else kind).list_changed
            if method not in seen:
                seen.add(method)
                self.answer(notification(method))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The relay closes this server (replaced, shut down, the agent left this node):
        the other end is told, and cancels what it still runs for us."""
        if not self.closed and not self.settled and self.bus.up:
            self.settled = True
            await self.bus.send(self.record.node, self._message(CLOSE_FROM_CALLERS))
        self.end(code, reason)


class CallerLink(_Link):
    """Another node's callers of one server here, as one caller of the agent.

    Args:
        bus: this node's bus.
        node: the node of the callers.
        tunnel: the tunnel's number there.
    """

    def __init__(self, bus: Bus, node: str, tunnel: int, agent: str, identity: str) -> None:
        super().__init__(bus, tunnel, agent, identity)
        self.node = node

    def _message(self, kind: str, frame: bytes = b"") -> BusMessage:
        return BusMessage(kind, self.bus.node, self.tunnel, self.agent, self.identity, frame)

    async def send_many(self, messages: Sequence[bytes]) -> None:
        if self.closed:
            raise ConnectionClosed(*(self.inbox.closed or (1000, "")))
        if not self.bus.up:
            # Dropped: this tunnel ends, and its other end is told when the bus is up (it
            # answers what it awaits), unless its node saw the bus fail too and did already.
            self.bus.lost(self)
            return
        for data in messages:
            await self.bus.send(self.node, self._message(TO_CALLERS, data), self._unheard)

    def _unheard(self, why: str) -> None:
        """The callers' node did not get a frame (it is not listening): end the tunnel, so
        that what ran for it is cancelled at the tools and nothing waits for it."""
        log.info("agent %s: cluster tunnel from %s ends: %s", self.agent, self.node, why)
        self.end(1011, "the callers' node is not listening")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The relay closes this caller (shutdown, the bus lost): the other end answers
        what it still awaits."""
        if not self.closed and not self.settled and self.bus.up:
            self.settled = True
            await self.bus.send(self.node, self._message(CLOSE_FROM_SERVER, reason.encode()))
        self.end(code, reason)
