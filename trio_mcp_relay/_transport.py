"""The WebSocket layer: a small interface, and its server implementation.

The relay only needs four verbs of a WebSocket (:class:`WebSocket`): receive a message, send
messages, ping, close. :class:`ServerWebSocket` implements them on a Trio stream once wsproto
has done the opening handshake, with the lean frame codec of :mod:`._wsframes`, no extra task
and no queue between the socket and the caller of :meth:`~ServerWebSocket.receive`: control
frames (ping, close) are answered inside ``receive``, so a connection whose reader is running
always answers pings. :class:`MemoryWebSocket` is an in-process pair, for embedded tools.

Outgoing text frames are an unmasked header plus the payload, and the relay's payloads are
already UTF-8 bytes, so no decode/encode round trip is needed and several frames leave in one
``send_all``. No extension (permessage-deflate) is ever negotiated, so RSV bits are zero.

Errors: every transport failure (reset, EOF, protocol violation) surfaces as
:class:`ConnectionClosed` with the close code, 1006 when the peer vanished without one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import deque
from collections.abc import Sequence
from typing import Final, Protocol

import trio

from . import _wsframes as wsframes
from ._wsframes import FrameParser

__all__ = [
    "ConnectionClosed",
    "MemoryWebSocket",
    "ServerWebSocket",
    "WebSocket",
    "encode_text_frame",
    "memory_websocket_pair",
]

ABNORMAL_CLOSURE: Final = 1006
MESSAGE_TOO_BIG: Final = 1009
_READ_SIZE: Final = 65536
#: Reads that found bytes at once, in a row, between two checkpoints (see receive).
_READS_PER_CHECKPOINT: Final = 16


class ConnectionClosed(Exception):
    """The WebSocket is closed; ``code`` and ``reason`` are the close frame's (1006: none)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class WebSocket(Protocol):
    """What the relay needs of a WebSocket connection. Swap the implementation here."""

    remote: str

    async def receive(self) -> str | bytes:
        """The next whole message. Raises ConnectionClosed when the connection ends."""
        ...

    async def send_many(self, messages: Sequence[bytes]) -> None:
        """Send UTF-8 JSON messages as text frames, in order. Raises ConnectionClosed."""
        ...

    @property
    def last_pong(self) -> float | None:
        """``trio.current_time()`` when the last pong arrived (None: none yet)."""
        ...

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping frame (the pong is seen by ``receive``; see ``last_pong``)."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake; ``receive`` then ends with ConnectionClosed."""
        ...

    async def aclose(self) -> None:
        """Drop the underlying stream at once."""
        ...


def encode_text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame (server to client, RFC 6455 section 5.2)."""
    return wsframes.frame(wsframes.OP_TEXT, payload)


_OPEN, _LOCAL_CLOSING, _CLOSED = range(3)


class ServerWebSocket:
    """A server-side WebSocket on a Trio stream, past its opening handshake.

    Incoming frames are parsed by :class:`~trio_mcp_relay._wsframes.FrameParser` inside
    :meth:`receive` (no reader task, no queue); pings are answered and the close handshake is
    completed there too, so a connection whose reader runs always answers them.

    Args:
        stream: the byte stream (already past the HTTP upgrade).
        remote: the peer's address, for logs.
        max_message_size: larger messages close the connection with 1009.
        initial: bytes the client sent after its handshake request, already read.
    """

    # Slots: an idle relay holds one of these per connection, thousands of them.
    __slots__ = (
        "_closed",
        "_direct",
        "_drained",
        "_events",
        "_parser",
        "_ready_reads",
        "_rest",
        "_socket",
        "_state",
        "_stream",
        "_write_done",
        "_writing",
        "last_pong",
        "remote",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        remote: str,
        max_message_size: int,
        initial: bytes = b"",
    ) -> None:
        self._stream = stream
        self.remote = remote
        self._parser = FrameParser(max_message_size)
        self._parser.feed(initial)
        # Created while a read yields events: an idle connection holds no deque.
        self._events: deque[wsframes.Event | wsframes.ProtocolError] | None = None
        self._writing = False
        self._write_done: trio.Event | None = None
        self._state = _OPEN
        self._closed: ConnectionClosed | None = None
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        # Whether writes can be partial and resumed (a socket, or a stream with try_write).
        self._direct = self._socket is not None or hasattr(stream, "try_write")
        # What a direct write (send_now) left of a frame: written ahead of anything else.
        self._rest = b""
        self._ready_reads = 0
        self._drained = False
        #: trio.current_time() of the last pong received (None: none yet).
        self.last_pong: float | None = None

    @property
    def closed(self) -> ConnectionClosed | None:
        """How the connection ended, once it has."""
        return self._closed

    async def _send_raw(self, data: bytes, ends: Sequence[int] = ()) -> None:
        """Write ``data``: whole frames, ending at the offsets ``ends`` (empty: one frame).

        One write at a time (the writer's batches, the reader's pongs and close replies). Not
        a ``trio.Lock``: thousands of idle connections would each hold one (and its parking
        lot); an event exists only while a write waits for another.
        """
        await trio.lowlevel.checkpoint()
        while self._writing:
            if self._write_done is None:
                self._write_done = trio.Event()
            await self._write_done.wait()
        self._writing = True
        try:
            begun = bool(self._rest)
            if begun:
                # The rest of a frame send_now began goes first: nothing (a pong, a close
                # frame) may land inside it.
                rest = len(self._rest)
                data, self._rest = self._rest + data, b""
                ends = [rest, *(rest + end for end in ends)] if ends else [rest, len(data)]
            if not self._direct:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._state = _CLOSED
                    raise ConnectionClosed(ABNORMAL_CLOSURE, "connection lost") from exc
            else:
                await self._write_some(data, ends, begun=begun)
        finally:
            self._writing = False
            if self._write_done is not None:
                self._write_done.set()
                self._write_done = None

    def _try_write(self, data: memoryview) -> int:
        """Write what the stream takes now, without waiting; how many bytes it took."""
        if self._socket is None:
            written: int = self._stream.try_write(data)  # type: ignore[attr-defined]
            return written
        fd = self._socket.fileno()  # asked each time: -1 once closed, never a reused number
        if fd < 0:
            raise OSError("socket closed")
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0

    async def _wait_writable(self) -> None:
        if self._socket is None:
            await self._stream.wait_writable()  # type: ignore[attr-defined]
        else:
            await trio.lowlevel.wait_writable(self._socket)

    async def _write_some(self, data: bytes, ends: Sequence[int], *, begun: bool) -> None:
        """Write all of ``data``; if cancelled, keep the rest of the frame being written.

        So a write can be abandoned (a peer that stopped reading is being closed): frames
        not begun are dropped, and the one begun is finished before anything else (the close
        frame) goes, so no frame is left half written. Works on a socket, or on any stream
        with ``try_write(data) -> int`` and ``wait_writable()`` (the in-memory streams of the
        tests). ``begun``: the first frame was begun by an earlier write.
        """
        view = memoryview(data)
        try:
            while True:
                view = view[self._try_write(view) :]
                if not view:
                    return
                await self._wait_writable()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._state = _CLOSED
            raise ConnectionClosed(ABNORMAL_CLOSURE, "connection lost") from exc
        except trio.Cancelled:
            sent = len(data) - len(view)
            end = next((end for end in ends if end > sent), len(data))
            self._rest = data[sent:end] if sent or begun else b""
            raise

    @property
    def unsent(self) -> int:
        """Bytes of a started write still waiting for the socket."""
        return len(self._rest)

    async def receive(self) -> str | bytes:
        """The next whole message, as bytes (a text message's are valid UTF-8)."""
        while True:
            if self._closed is not None:
                raise self._closed
            while self._events:
                event = self._events.popleft()
                if type(event) is wsframes.Message:
                    return event.data
                if type(event) is wsframes.Ping:
                    # Once our close frame has left, no pong may follow it.
                    if self._state == _OPEN:
                        await self._send_raw(wsframes.frame(wsframes.OP_PONG, event.payload))
                elif type(event) is wsframes.Pong:
                    self.last_pong = trio.current_time()
                elif type(event) is wsframes.Close:
                    await self._on_close(event)
                else:
                    assert isinstance(event, wsframes.ProtocolError)
                    await self._fail(event.code, event.reason)
            self._events = None  # drained: an idle connection holds no deque while it waits
            # Awaited here, not in a helper: each coroutine level is memory every idle
            # connection holds while it waits.
            data: bytes | bytearray | None
            sock = self._socket
            if sock is not None:
                # ``SocketStream.receive_some`` yields to the scheduler even when the bytes
                # are there already, and its wrappers cost more than the read itself. Here
                # a read that filled the buffer is followed by a read at once (more is likely
                # there); a shorter one by a wait first (the peer most likely awaits an
                # answer: a read now would fail). After ``_READS_PER_CHECKPOINT`` reads in a
                # row that did not wait, a checkpoint comes before the next one (before: a
                # cancellation there loses no bytes), so a peer that always has bytes ready
                # cannot keep the other tasks from running.
                waited = False
                while True:
                    if self._drained or waited:
                        self._drained = False
                        try:
                            await trio.lowlevel.wait_readable(sock)
                        except trio.ClosedResourceError:
                            data = b""
                            break
                        waited = True
                    if self._ready_reads >= _READS_PER_CHECKPOINT:
                        self._ready_reads = 0
                        await trio.lowlevel.checkpoint()
                    data = self._read_now(sock, waited)
                    if data is not None:
                        break
                    waited = True
            else:
                try:
                    data = await self._stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            self._feed(data)
            del data  # not held while the next read waits

    def ready_message(self) -> bytes | None:
        """The next message if it is already read and parsed (no I/O, no wait); None when
        nothing is, or when a control frame comes first (:meth:`receive` handles those)."""
        events = self._events
        if events and type(events[0]) is wsframes.Message:
            message: bytes = events.popleft().data  # type: ignore[union-attr]
            return message
        return None

    def _feed(self, data: bytes | bytearray) -> None:
        """Parse what was read (``b""``: the connection ended) into :attr:`_events`."""
        if not data:
            self._state = _CLOSED
            self._closed = ConnectionClosed(ABNORMAL_CLOSURE, "")
            raise self._closed
        self._parser.feed(data)
        try:
            events = self._parser.events()
        except wsframes.ProtocolError as exc:
            # Handle what came before the violation first, then close with its code.
            self._events = deque([*exc.events_before, exc])
        else:
            self._events = deque(events) if events else None

    def _read_now(self, sock: trio.socket.SocketType, waited: bool) -> bytes | None:
        """Read what the socket holds, without waiting: None when it holds nothing yet,
        ``b""`` when it ended (:meth:`receive` waits, see there)."""
        fd = sock.fileno()  # asked each time: -1 once closed, never a reused number
        if fd < 0:
            return b""
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return b""
        self._drained = len(data) < _READ_SIZE
        if waited:
            self._ready_reads = 0
        else:
            self._ready_reads += 1
        return data

    async def _on_close(self, event: wsframes.Close) -> None:
        if self._state == _OPEN:
            # The peer started the close: answer it (same code), then we are done.
            reply = b"" if event.code == 1005 else wsframes.close_payload(event.code, "")
            with contextlib.suppress(ConnectionClosed):
                await self._send_raw(wsframes.frame(wsframes.OP_CLOSE, reply))
        self._state = _CLOSED
        self._closed = ConnectionClosed(event.code, event.reason)
        raise self._closed

    async def _fail(self, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.close(code, reason)
        self._state = _CLOSED
        self._closed = ConnectionClosed(code, reason)
        raise self._closed

    async def send_many(self, messages: Sequence[bytes]) -> None:
        """Send each message as one text frame; all in one write."""
        if self._state != _OPEN:
            raise ConnectionClosed(ABNORMAL_CLOSURE, "connection is closing")
        if len(messages) == 1:
            await self._send_raw(encode_text_frame(messages[0]))
        else:
            await self._send_raw(b"".join([encode_text_frame(m) for m in messages]))

    async def send_encoded(self, frames: Sequence[bytes]) -> None:
        """Write WebSocket frames, already encoded, in one write (after what
        :meth:`send_now` kept). If the write is cancelled, the frames it had not begun are
        dropped and the one it had begun is finished by the next write."""
        if self._state != _OPEN:
            raise ConnectionClosed(ABNORMAL_CLOSURE, "connection is closing")
        if len(frames) == 1:
            await self._send_raw(frames[0])
            return
        ends = list(itertools.accumulate(len(frame) for frame in frames))
        await self._send_raw(b"".join(frames), ends)

    def send_now(self, data: bytes) -> bytes | None:
        """Write framed bytes at once if the socket takes them, without blocking or yielding.

        For the relay's fast path: the caller guarantees nothing else is queued for this
        connection. Returns the bytes the socket did not take (``b""`` when it took all):
        this WebSocket keeps them and writes them ahead of whatever it sends next (a pong
        from :meth:`receive` included), so the caller must make sure a write follows soon
        (``send_encoded([b""])`` will do); or None when no attempt was made (a write is in
        progress or owed, the connection is closing, or the stream cannot take partial writes).
        """
        if not self._direct or self._state != _OPEN or self._rest or self._writing:
            return None
        sock = self._socket
        try:
            if sock is not None:  # _try_write, inlined for the socket: every frame comes here
                fd = sock.fileno()
                if fd < 0:
                    raise OSError("socket closed")
                written = os.write(fd, data)
            else:
                written = self._try_write(memoryview(data))
        except BlockingIOError:
            written = 0
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            written = 0  # the next write will meet the error and end the connection
        if written == len(data):
            return b""
        self._rest = data[written:]
        return self._rest

    def send_now_many(self, frames: Sequence[bytes]) -> int | None:
        """:meth:`send_now` for several encoded frames, in one write: how many frames the
        socket began (took whole, or in part: this WebSocket keeps the rest of that one, as
        send_now does); those after it are the caller's to queue. None: no attempt."""
        data = b"".join(frames)
        rest = self.send_now(data)
        if rest is None:
            return None
        if not rest:
            return len(frames)
        written = len(data) - len(rest)
        start = 0
        for index, frame in enumerate(frames):
            end = start + len(frame)
            if written < end:
                self._rest = data[written:end] if written > start else b""
                return index + 1 if written > start else index
            start = end
        raise AssertionError("unreachable: the socket did not take it all")

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping frame."""
        if self._state != _OPEN:
            raise ConnectionClosed(ABNORMAL_CLOSURE, "connection is closing")
        await self._send_raw(wsframes.frame(wsframes.OP_PING, payload))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame if the connection is still open (no wait for the reply)."""
        if self._state == _OPEN:
            self._state = _LOCAL_CLOSING
            payload = wsframes.close_payload(code, reason)
            await self._send_raw(wsframes.frame(wsframes.OP_CLOSE, payload))

    async def aclose(self) -> None:
        """Close the TCP stream."""
        self._state = _CLOSED
        await trio.aclose_forcefully(self._stream)


class _CloseMarker:
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class MemoryWebSocket:
    """One end of an in-process WebSocket (see :func:`memory_websocket_pair`).

    Messages keep their kind: ``str`` arrives as text, ``bytes`` sent with :meth:`send_many`
    arrive as text too (they are UTF-8 JSON, as on the wire), ``bytes`` sent with
    :meth:`send_binary` as binary. Sends block while the other end's queue is full, as a
    socket would.
    """

    def __init__(
        self,
        send: trio.MemorySendChannel[str | bytes | _CloseMarker],
        receive: trio.MemoryReceiveChannel[str | bytes | _CloseMarker],
        remote: str,
    ) -> None:
        self._send = send
        self._receive = receive
        self.remote = remote
        self.last_pong: float | None = None
        self._closed: ConnectionClosed | None = None

    @property
    def close_code(self) -> int | None:
        """The close code this end received (or gave), once closed."""
        return None if self._closed is None else self._closed.code

    async def receive(self) -> str | bytes:
        """The next message; ConnectionClosed once either end has closed."""
        if self._closed is not None:
            raise self._closed
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._closed = ConnectionClosed(ABNORMAL_CLOSURE, "connection lost")
            raise self._closed from None
        if isinstance(item, _CloseMarker):
            self._closed = ConnectionClosed(item.code, item.reason)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                self._send.send_nowait(_CloseMarker(item.code, item.reason))
            raise self._closed
        return item

    async def _put(self, item: str | bytes | _CloseMarker) -> None:
        if self._closed is not None:
            raise ConnectionClosed(ABNORMAL_CLOSURE, "connection is closing")
        try:
            await self._send.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(ABNORMAL_CLOSURE, "connection lost") from exc

    async def send_many(self, messages: Sequence[bytes | str]) -> None:
        """Send UTF-8 JSON messages (or str) as text messages."""
        for message in messages:
            await self._put(message.decode() if isinstance(message, bytes) else message)

    async def send_binary(self, message: bytes) -> None:
        """Send one binary message."""
        await self._put(bytes(message))

    async def ping(self, payload: bytes = b"") -> None:
        """An in-process peer is always alive: the pong is immediate."""
        self.last_pong = trio.current_time()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Tell the other end; ``receive`` there ends with ConnectionClosed(code)."""
        if self._closed is None:
            with contextlib.suppress(ConnectionClosed):
                await self._put(_CloseMarker(code, wsframes.cut_reason(reason)))

    async def aclose(self) -> None:
        """Drop both directions at once."""
        self._closed = self._closed or ConnectionClosed(ABNORMAL_CLOSURE, "closed")
        await self._send.aclose()
        await self._receive.aclose()


def memory_websocket_pair(
    buffer: int = 256, *, names: tuple[str, str] = ("memory", "memory")
) -> tuple[MemoryWebSocket, MemoryWebSocket]:
    """Two connected in-process WebSocket ends, for embedded tools and tests."""
    a_send, b_receive = trio.open_memory_channel[str | bytes | _CloseMarker](buffer)
    b_send, a_receive = trio.open_memory_channel[str | bytes | _CloseMarker](buffer)
    return MemoryWebSocket(a_send, a_receive, names[1]), MemoryWebSocket(
        b_send, b_receive, names[0]
    )
