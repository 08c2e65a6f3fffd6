"""An in-memory network for the relay's shell: listeners, bounded pipes, WebSocket clients.

``serve_relay(config, listeners=[net.listener])`` serves connections that
:meth:`MemoryNet.connect` opens, with no socket, so every timeout runs on Trio's clock and
``autojump_clock`` turns minutes into milliseconds. Each direction of a connection is a pipe
with a small capacity (a kernel buffer): a peer that stops reading really stops the relay's
writes to it after ``capacity`` bytes, as on a socket. The relay-side stream takes partial
writes (``try_write``/``wait_writable``), so its fast path and its abandoned writes behave as
on a socket too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    TextMessage,
)
from wsproto.events import Request as WsRequest
from wsproto.utilities import LocalProtocolError

from tests.helpers import TOOL_NAME, complete_initialization, initialize_tool
from trio_mcp_relay._auth import encrypt_token

DEFAULT_CAPACITY = 65536


class Pipe:
    """One direction of a connection: a byte buffer of bounded size."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.eof = False  # the writer is done
        self.broken = False  # the reader is gone
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def try_write(self, data: bytes | memoryview) -> int:
        if self.broken or self.eof:
            raise trio.BrokenResourceError("pipe closed")
        n = min(len(data), self.capacity - len(self.buffer))
        if n > 0:
            self.buffer += data[:n]
            self._wake()
        return max(n, 0)

    async def wait_writable(self) -> None:
        while len(self.buffer) >= self.capacity and not (self.broken or self.eof):
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    async def read(self, max_bytes: int | None) -> bytes:
        while not self.buffer and not self.eof and not self.broken:
            await self._changed.wait()
        await trio.lowlevel.checkpoint()
        n = len(self.buffer) if max_bytes is None else min(max_bytes, len(self.buffer))
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        self._wake()
        return data


class PipeStream(trio.abc.HalfCloseableStream):
    """One end of a connection: writes go to ``out``, reads come from ``into``."""

    def __init__(self, out: Pipe, into: Pipe, remote_address: tuple[str, int]) -> None:
        self.out = out
        self.into = into
        self.remote_address = remote_address
        self.closed = False

    def try_write(self, data: bytes | memoryview) -> int:
        if self.closed:
            raise trio.ClosedResourceError
        return self.out.try_write(data)

    async def wait_writable(self) -> None:
        await self.out.wait_writable()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(bytes(data))
        await trio.lowlevel.checkpoint()
        while view:
            view = view[self.try_write(view) :]
            if view:
                await self.wait_writable()

    async def wait_send_all_might_not_block(self) -> None:
        await self.wait_writable()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self.out.eof = True
        self.out._wake()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError
        return await self.into.read(max_bytes)

    async def aclose(self) -> None:
        self.closed = True
        self.out.eof = True
        self.into.broken = True
        self.out._wake()
        self.into._wake()
        await trio.lowlevel.checkpoint()


class MemoryListener(trio.abc.Listener[PipeStream]):
    """Hands the relay the server ends of connections opened with :meth:`MemoryNet.connect`."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[PipeStream](1000)

    async def accept(self) -> PipeStream:
        return await self.receive.receive()

    async def aclose(self) -> None:
        await self.receive.aclose()


class MemoryNet:
    """Open connections to a relay served on :attr:`listener`."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.listener = MemoryListener()
        self._ports = iter(range(40000, 65000))

    def connect(self, host: str = "127.0.0.1", *, capacity: int = DEFAULT_CAPACITY) -> PipeStream:
        """A new connection from ``host``; the relay's side is accepted in the background."""
        up, down = Pipe(capacity), Pipe(capacity)
        remote = (host, next(self._ports))
        server = PipeStream(down, up, remote)
        self.listener.send.send_nowait(server)
        return PipeStream(up, down, ("relay", 8004))

    def target(self, role: str, agent: str) -> str:
        token = encrypt_token(self.key, agent)
        from urllib.parse import quote

        path = "mcp" if role == "tool" else "call"
        return f"/mcp_endpoint/{path}/?token={quote(token, safe='')}"

    @asynccontextmanager
    async def websocket(
        self, role: str, agent: str, host: str = "127.0.0.1"
    ) -> AsyncIterator[WebSocketConnection]:
        """A trio-websocket client (it reads all the time and answers pings).

        trio-websocket's reader fails when a ping arrives while it is closing (its open bug
        #184): that failure, at teardown only, is not the relay's and is ignored.
        """
        try:
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(
                    nursery, self.connect(host), "relay", self.target(role, agent)
                )
                try:
                    yield ws
                finally:
                    await ws.aclose()
                    nursery.cancel_scope.cancel()
        except* LocalProtocolError as group:
            closing = ("LOCAL_CLOSING", "CLOSED", "REMOTE_CLOSING")
            if not all(any(c in str(e) for c in closing) for e in group.exceptions):
                raise

    @asynccontextmanager
    async def tool(
        self,
        agent: str,
        host: str = "127.0.0.1",
        *,
        name: str | None = TOOL_NAME,
        tools: Iterable[str | dict[str, Any]] = (),
        capabilities: dict[str, Any] | None = None,
    ) -> AsyncIterator[WebSocketConnection]:
        """A trio-websocket tool of ``agent`` the relay has initialized (see
        :func:`tests.helpers.initialize_tool`)."""
        async with self.websocket("tool", agent, host) as ws:
            await initialize_tool(ws, name=name, tools=tools, capabilities=capabilities)
            yield ws

    @asynccontextmanager
    async def raw_tool(
        self,
        agent: str,
        host: str = "127.0.0.1",
        *,
        capacity: int = DEFAULT_CAPACITY,
        name: str | None = TOOL_NAME,
        tools: Iterable[str | dict[str, Any]] = (),
        capabilities: dict[str, Any] | None = None,
    ) -> AsyncIterator[RawPeer]:
        """A :class:`RawPeer` tool of ``agent`` the relay has initialized."""
        async with self.raw("tool", agent, host, capacity=capacity) as peer:
            await peer.initialize(name=name, tools=tools, capabilities=capabilities)
            yield peer

    @asynccontextmanager
    async def raw(
        self, role: str, agent: str, host: str = "127.0.0.1", *, capacity: int = DEFAULT_CAPACITY
    ) -> AsyncIterator[RawPeer]:
        """A client that reads only when asked (so it can stop reading, or never pong)."""
        stream = self.connect(host, capacity=capacity)
        peer = RawPeer(stream)
        try:
            await peer.handshake(self.target(role, agent))
            yield peer
        finally:
            await stream.aclose()


class PeerClosed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class RawPeer:
    """wsproto driven by hand over a :class:`PipeStream`."""

    def __init__(self, stream: PipeStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []
        self.pongs = True

    async def handshake(self, target: str) -> None:
        await self.stream.send_all(self.ws.send(WsRequest(host="relay", target=target)))
        event = await self.next_event()
        if isinstance(event, RejectConnection):
            raise PeerClosed(event.status_code, "rejected")
        assert isinstance(event, AcceptConnection), event

    async def next_event(self) -> Event:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def receive(self) -> Any:
        """The next message, as JSON; answers pings when :attr:`pongs`; PeerClosed on close."""
        parts: list[str | bytes] = []
        while True:
            event = await self.next_event()
            if isinstance(event, Ping):
                if self.pongs and self.ws.state is ConnectionState.OPEN:
                    await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise PeerClosed(event.code, event.reason)
            elif isinstance(event, Message):
                parts.append(event.data)
                if event.message_finished:
                    text = "".join(p if isinstance(p, str) else p.decode() for p in parts)
                    return json.loads(text)

    async def read_into(self, channel: trio.MemorySendChannel[Any]) -> None:
        """Read (and answer pings) all the time, passing messages on; ends on close."""
        with contextlib.suppress(PeerClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await channel.send(await self.receive())

    async def send(self, obj: Any) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(obj))))

    async def initialize(
        self,
        *,
        name: str | None = TOOL_NAME,
        tools: Iterable[str | dict[str, Any]] = (),
        capabilities: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """As a tool: complete the relay's initialization of this peer (see
        :func:`tests.helpers.complete_initialization`); the relay's initialize request."""
        return await complete_initialization(
            self.send, self.receive, name=name, tools=tools, capabilities=capabilities
        )
