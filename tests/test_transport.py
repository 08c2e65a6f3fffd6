"""The wsproto-based server WebSocket, on in-memory streams, driven by a wsproto client.

No sockets: each test connects a :class:`ServerWebSocket` to one end of
``trio.testing.memory_stream_pair()`` (or ``lockstep_stream_pair()``, where every write waits
for the reader, to show that nothing needs unbounded buffering) and plays the client with
wsproto directly, or with hand-made frames where wsproto would refuse to send something
invalid. Time is virtual (``autojump_clock``) where it matters. The last tests use a socket
pair instead: reading a socket is a path of its own (it reads before it waits).
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from trio_mcp_relay._transport import ConnectionClosed, ServerWebSocket, encode_text_frame

TIMEOUT = 5
OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client-to-server frame (RFC 6455 5.2), for frames wsproto will not send."""
    mask = os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


@attrs.define
class Client:
    """The client end: a wsproto client connection on the other end of the stream."""

    stream: trio.abc.Stream
    ws: WSConnection
    pending: deque[Event] = attrs.Factory(deque)

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Event:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(bytes(data) or None)
            self.pending.extend(self.ws.events())
        return self.pending.popleft()

    async def next_message(self) -> str | bytes:
        """The next whole data message (wsproto may hand a large one over in pieces)."""
        parts: list[Any] = []
        while True:
            event = await self.next_event()
            assert isinstance(event, Message), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)


class RecordingStream(trio.abc.Stream):
    """Passes everything through and remembers the size of each ``send_all``."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def open_pair(
    *,
    max_message_size: int = 1 << 20,
    stream_pair: Callable[[], tuple[Any, Any]] = trio.testing.memory_stream_pair,
    wrap: Callable[[trio.abc.Stream], trio.abc.Stream] = lambda s: s,
) -> tuple[ServerWebSocket, Client]:
    """A server WebSocket past its handshake, and the client talking to it."""
    client_ws = WSConnection(ConnectionType.CLIENT)
    server_ws = WSConnection(ConnectionType.SERVER)
    server_ws.receive_data(client_ws.send(Request(host="relay", target="/mcp_endpoint/call/")))
    assert isinstance(next(server_ws.events()), Request)
    client_ws.receive_data(server_ws.send(AcceptConnection()))
    assert isinstance(next(client_ws.events()), AcceptConnection)
    server_stream, client_stream = stream_pair()
    server = ServerWebSocket(
        wrap(server_stream), remote="memory", max_message_size=max_message_size
    )
    return server, Client(client_stream, client_ws)


async def expect_closed(server: ServerWebSocket) -> ConnectionClosed:
    with pytest.raises(ConnectionClosed) as caught:
        await server.receive()
    return caught.value


# ----------------------------------------------------------------------------- messages


async def test_text_and_binary_messages() -> None:
    server, client = open_pair()
    with trio.fail_after(TIMEOUT):
        await client.send(TextMessage(data='{"jsonrpc":"2.0","method":"é☃"}'))
        await client.send(BytesMessage(data=b"\x00\xff{}"))
        await client.send(TextMessage(data=""))
        # Text arrives as its UTF-8 bytes (the relay parses JSON from bytes), like binary.
        assert await server.receive() == '{"jsonrpc":"2.0","method":"é☃"}'.encode()
        assert await server.receive() == b"\x00\xff{}"
        assert await server.receive() == b""


async def test_fragmented_messages_are_reassembled() -> None:
    server, client = open_pair()
    with trio.fail_after(TIMEOUT):
        await client.send(TextMessage(data="ab", message_finished=False))
        # Control frames may come between fragments (RFC 6455 5.4).
        await client.send(Ping(payload=b"between"))
        await client.send(TextMessage(data="c☃", message_finished=False))
        await client.send(TextMessage(data="d", message_finished=True))
        await client.send(BytesMessage(data=b"\x01", message_finished=False))
        await client.send(BytesMessage(data=b"\x02\x03", message_finished=True))
        assert await server.receive() == "abc☃d".encode()
        assert await server.receive() == b"\x01\x02\x03"
        assert await client.next_event() == Pong(payload=b"between")


async def test_a_character_split_across_fragments_and_reads() -> None:
    server, client = open_pair()
    snowman = "☃".encode()  # three bytes
    data = client_frame(OP_TEXT, b"x" + snowman[:1], fin=False) + client_frame(
        OP_CONTINUATION, snowman[1:] + b"y"
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            got: list[str | bytes] = []

            async def receive() -> None:
                got.append(await server.receive())

            nursery.start_soon(receive)
            for i in range(len(data)):  # one byte per read
                await client.send_raw(data[i : i + 1])
                await trio.testing.wait_all_tasks_blocked()
        assert got == ["x☃y".encode()]


async def test_message_over_max_size_closes_with_1009() -> None:
    server, client = open_pair(max_message_size=100)
    with trio.fail_after(TIMEOUT):
        await client.send(TextMessage(data="x" * 100))
        assert await server.receive() == b"x" * 100  # the limit itself is fine
        await client.send(TextMessage(data="x" * 101))
        closed = await expect_closed(server)
        assert closed.code == 1009
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1009
        # Later calls keep reporting the same end.
        assert (await expect_closed(server)).code == 1009


async def test_max_size_counts_bytes_of_text_not_characters() -> None:
    server, client = open_pair(max_message_size=100)
    with trio.fail_after(TIMEOUT):
        await client.send(TextMessage(data="☃" * 33))  # 99 bytes
        assert await server.receive() == ("☃" * 33).encode()
        await client.send(TextMessage(data="☃" * 34))  # 34 characters, 102 bytes
        assert (await expect_closed(server)).code == 1009


async def test_fragments_adding_up_over_max_size_close_with_1009() -> None:
    server, client = open_pair(max_message_size=100)
    with trio.fail_after(TIMEOUT):
        await client.send(BytesMessage(data=b"x" * 60, message_finished=False))
        await client.send(BytesMessage(data=b"x" * 60, message_finished=True))
        assert (await expect_closed(server)).code == 1009
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1009


async def test_invalid_utf8_in_a_text_frame_closes_with_1007() -> None:
    server, client = open_pair()
    with trio.fail_after(TIMEOUT):
        await client.send_raw(client_frame(OP_TEXT, b'{"a":"\xff\xfe"}'))
        assert (await expect_closed(server)).code == 1007
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1007


# ----------------------------------------------------------------------------- control frames


async def test_ping_is_answered_with_pong_inside_receive() -> None:
    # Lockstep: the pong can only leave while the client reads, so receive() must send it
    # itself, while it waits for a message, with no helper task.
    server, client = open_pair(stream_pair=trio.testing.lockstep_stream_pair)
    got: list[str | bytes] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                got.append(await server.receive())

            nursery.start_soon(receive)
            await client.send(Ping(payload=b"are you there"))
            assert await client.next_event() == Pong(payload=b"are you there")
            assert got == []
            await client.send(TextMessage(data="yes"))
        assert got == [b"yes"]


async def test_last_pong_records_when_the_pong_arrived(autojump_clock: Any) -> None:
    server, client = open_pair()
    with trio.fail_after(TIMEOUT):
        assert server.last_pong is None
        start = trio.current_time()
        await server.ping(b"keepalive")
        assert await client.next_event() == Ping(payload=b"keepalive")
        await trio.sleep(3)  # virtual
        await client.send(Pong(payload=b"keepalive"))
        await client.send(TextMessage(data="after the pong"))
        assert await server.receive() == b"after the pong"
        assert server.last_pong == pytest.approx(start + 3)


async def test_a_silent_peer_is_not_timed_out_by_the_transport(autojump_clock: Any) -> None:
    # Keepalive is the server's policy, not the transport's: receive() just waits.
    server, _client = open_pair()
    with trio.fail_after(2 * 3600), trio.move_on_after(3600) as scope:  # virtual time
        await server.receive()
    assert scope.cancelled_caught
    assert server.closed is None


# ----------------------------------------------------------------------------- closing


async def test_peer_initiated_close_is_answered_and_raised_with_its_code() -> None:
    server, client = open_pair(stream_pair=trio.testing.lockstep_stream_pair)
    replies: list[Event] = []

    async def close_from_client() -> None:
        await client.send(CloseConnection(code=4000, reason="bye"))
        replies.append(await client.next_event())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_from_client)
            closed = await expect_closed(server)
            assert (closed.code, closed.reason) == (4000, "bye")
        [reply] = replies
        assert isinstance(reply, CloseConnection)
        assert reply.code == 4000
        assert client.ws.state is ConnectionState.CLOSED
        assert server.closed is not None
        assert server.closed.code == 4000
        with pytest.raises(ConnectionClosed):
            await server.send_many([b"{}"])


async def test_eof_without_close_frame_is_1006() -> None:
    server, client = open_pair()
    with trio.fail_after(TIMEOUT):
        await client.send(TextMessage(data="half a mess", message_finished=False))
        await client.stream.aclose()
        closed = await expect_closed(server)
        assert closed.code == 1006
        assert (await expect_closed(server)).code == 1006


async def test_close_sends_the_code_and_a_reason_cut_to_123_bytes() -> None:
    server, client = open_pair()
    with trio.fail_after(TIMEOUT):
        await server.close(4001, "é" * 100)  # 200 bytes of UTF-8
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 4001
        # Cut at 123 bytes, then back to a whole character: 61 of them, 122 bytes.
        assert event.reason == "é" * 61
        await server.close(4002, "again")  # already closing: nothing more is sent
        await client.send(event.response())
        closed = await expect_closed(server)
        assert closed.code == 4001
        assert client.ws.state is ConnectionState.CLOSED
        assert client.pending == deque()


async def test_close_reason_of_ascii_is_cut_to_exactly_123_bytes() -> None:
    server, client = open_pair()
    with trio.fail_after(TIMEOUT):
        await server.close(1001, "x" * 500)
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1001, "x" * 123)


async def test_ping_crossing_our_close_frame_does_not_abort_the_close() -> None:
    # A peer's keepalive ping can be on the wire when we send our close frame. wsproto will
    # not send a pong once we are closing; the close handshake must still complete cleanly.
    server, client = open_pair()
    with trio.fail_after(TIMEOUT):
        await client.send(Ping(payload=b"keepalive"))
        await server.close(4001, "replaced")
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        await client.send(event.response())
        closed = await expect_closed(server)
        assert (closed.code, closed.reason) == (4001, "replaced")


# ----------------------------------------------------------------------------- sending


async def test_send_many_writes_all_frames_at_once_and_they_decode() -> None:
    recorder: list[RecordingStream] = []

    def wrap(stream: trio.abc.Stream) -> trio.abc.Stream:
        recorder.append(RecordingStream(stream))
        return recorder[0]

    server, client = open_pair(wrap=wrap)
    messages = [
        b'{"jsonrpc":"2.0","method":"a"}',
        b"x" * 125,  # the largest 7-bit length
        b"y" * 126,  # 16-bit length
        b"z" * 65535,  # the largest 16-bit length
        b"w" * 65536,  # 64-bit length
        "☃".encode() * 40_000,  # 120 000 bytes, multi-byte characters
    ]
    with trio.fail_after(TIMEOUT):
        await server.send_many(messages)
        assert recorder[0].writes == [sum(len(encode_text_frame(m)) for m in messages)]
        for message in messages:
            assert await client.next_message() == message.decode()
        await server.send_many([b'{"single":true}'])
        assert recorder[0].writes[1:] == [len(encode_text_frame(b'{"single":true}'))]
        assert await client.next_message() == '{"single":true}'


def test_encode_text_frame_headers() -> None:
    assert encode_text_frame(b"") == b"\x81\x00"
    assert encode_text_frame(b"a" * 125)[:2] == b"\x81\x7d"
    assert encode_text_frame(b"a" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert encode_text_frame(b"a" * 65535)[:4] == b"\x81\x7e\xff\xff"
    assert encode_text_frame(b"a" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")


# --- On a real socket: the read that does not wait --------------------------------------


async def test_a_peer_that_always_has_bytes_ready_cannot_keep_other_tasks_from_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a socket, receive() reads before it waits, so while bytes keep coming it may not
    yield at each read; it still checkpoints every 16 reads that did not wait, so a
    cancellation (and the scheduler) gets in long before the peer's bytes run out."""
    monkeypatch.setattr("trio_mcp_relay._transport._READ_SIZE", 1024)
    ours, theirs = trio.socket.socketpair()
    frame = client_frame(OP_TEXT, b"x" * 200)
    count = 200  # 41 KB waiting in the socket: 41 reads of 1 KB
    with trio.fail_after(TIMEOUT), theirs:
        await theirs.send(frame * count)
        server = ServerWebSocket(trio.SocketStream(ours), remote="", max_message_size=1 << 20)
        received = 0
        with trio.CancelScope() as scope:
            scope.cancel()
            while True:
                await server.receive()
                received += 1
        # Cancelled at the 16th read at the latest: 16 KB, about 80 of the 200 messages.
        assert scope.cancelled_caught
        assert 0 < received <= 16 * 1024 // len(frame) + 1, received
        # ... and before a read: no byte is lost, the rest of the messages follow intact.
        for _ in range(count - received):
            assert await server.receive() == b"x" * 200
        await server.aclose()


class Taking(trio.abc.Stream):
    """A stream that takes ``room`` bytes at once (``try_write``), then no more."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.got = b""

    def try_write(self, data: memoryview) -> int:
        n = min(self.room, len(data))
        self.got += bytes(data[:n])
        self.room -= n
        return n

    async def wait_writable(self) -> None:
        await trio.sleep_forever()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("not used")

    async def wait_send_all_might_not_block(self) -> None:
        raise AssertionError("not used")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("not used")

    async def aclose(self) -> None:
        pass


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6), st.data())
def test_send_now_many_counts_the_frames_the_socket_began(
    frames: list[bytes], data: st.DataObject
) -> None:
    """One write for several frames: the frames begun are those the socket took a byte of;
    the WebSocket keeps the rest of the last of them only (the others are the caller's)."""
    total = sum(map(len, frames))
    room = data.draw(st.integers(0, total))
    stream = Taking(room)
    ws = ServerWebSocket(stream, remote="", max_message_size=1 << 20)
    begun = ws.send_now_many(frames)
    starts = [sum(map(len, frames[:i])) for i in range(len(frames))]
    assert begun == sum(1 for start in starts if start < room) if room < total else len(frames)
    assert stream.got == b"".join(frames)[:room]
    if begun and room < total:
        end = starts[begun - 1] + len(frames[begun - 1])
        assert ws.unsent == max(0, end - room)
    else:
        assert ws.unsent == 0
