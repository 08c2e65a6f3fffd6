"""A lean RFC 6455 frame codec for the server side, with no I/O.

Theory of operation: wsproto performs the opening handshake; after it, every byte the client
sends goes to :meth:`FrameParser.feed`, which yields whole events: :class:`Message` (a complete
text or binary message, reassembled from fragments), :class:`Ping`, :class:`Pong` and
:class:`Close`. Outgoing frames are built by :func:`frame` (server frames are never masked).

It exists because the relay's hot path is one small frame in and one out per message, and a
general-purpose state machine costs more per frame than the relay's own work. What it checks
is what RFC 6455 requires of a server, each violation a :class:`ProtocolError` carrying the
close code to answer with:

* client frames must be masked; RSV bits must be zero (no extension is ever negotiated);
  unknown opcodes are refused (1002);
* control frames are final and at most 125 bytes; a continuation needs a message in progress,
  and a new data frame may not start inside one (1002);
* lengths use the minimal encoding and the 64-bit form has its top bit clear (1002);
* text messages are valid UTF-8, checked when the message is complete (1007), and close
  reasons too (1007); close codes must be ones a peer may send (1002);
* messages larger than ``max_message_size`` bytes are refused (1009) as soon as the length
  is known, before the payload is buffered.
"""

from __future__ import annotations

import struct
from typing import Final, TypeAlias

import attrs

try:
    # websockets' C unmasking: about 100x the pure-Python XOR below on a 20 KB frame.
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - a websockets without its C extension
    _apply_mask = None  # type: ignore[assignment]

__all__ = [
    "Close",
    "FrameParser",
    "Message",
    "Ping",
    "Pong",
    "ProtocolError",
    "frame",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
MESSAGE_TOO_BIG: Final = 1009

_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")


class ProtocolError(Exception):
    """The client broke RFC 6455; close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        #: The events complete before the violation, to be handled first.
        self.events_before: list[Event] = []


@attrs.frozen
class Message:
    """A complete data message, as bytes: a text message's are valid UTF-8 (checked), and
    stay bytes (the relay parses JSON from bytes: no decode and encode back)."""

    data: bytes
    binary: bool = False


@attrs.frozen
class Ping:
    """A ping; answer with a pong carrying the same payload."""

    payload: bytes


@attrs.frozen
class Pong:
    """A pong."""

    payload: bytes


@attrs.frozen
class Close:
    """A close frame (code 1005 when it carried none)."""

    code: int
    reason: str


Event: TypeAlias = Message | Ping | Pong | Close


def _valid_close_code(code: int) -> bool:
    # RFC 6455 7.4: 1000-1003, 1007-1011 (and 1012-1014, registered since) and 3000-4999.
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _unmask(payload: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    if _apply_mask is not None:
        return _apply_mask(payload, mask)
    n = len(payload)
    if not n:
        return b""
    key = int.from_bytes((bytes(mask) * ((n >> 2) + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """One final, unmasked server frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + _U16.pack(n) + payload
    return bytes((0x80 | opcode, 127)) + _U64.pack(n) + payload


def cut_reason(reason: str) -> str:
    """A close reason cut to the 123 bytes a close frame has room for, on a character edge."""
    return reason.encode()[:123].decode("utf-8", "ignore")


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code and the reason, cut to fit 125 bytes."""
    return _U16.pack(code) + cut_reason(reason).encode()


class FrameParser:
    """Turns client bytes into events. Feed bytes, then iterate :meth:`events`.

    Args:
        max_message_size: the largest message accepted, in bytes.
    """

    __slots__ = ("_buffer", "_opcode", "_parts", "_size", "max_message_size")

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        #: What was read and not parsed yet: a read's bytes as they came, or a bytearray
        #: holding the start of a frame, which later reads complete.
        self._buffer: bytes | bytearray = b""
        self._parts: list[bytes] = []
        self._size = 0
        self._opcode: int | None = None  # of the fragmented message in progress

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes read from the client."""
        if self._buffer:
            self._buffer += data
        else:
            # Parsed where they are: most reads hold whole frames and leave nothing over.
            self._buffer = data

    def events(self) -> list[Event]:
        """Every complete event in what was fed so far.

        Raises:
            ProtocolError: the client broke the protocol (stop reading; close with the code).
        """
        out: list[Event] = []
        try:
            self._parse(out)
        except ProtocolError as exc:
            exc.events_before = out
            raise
        return out

    def _parse(self, out: list[Event]) -> None:
        buf = self._buffer
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                opcode = b0 & 0x0F
                length = b1 & 0x7F
                head = pos + 2
                if length == 126:
                    if end - head < 2:
                        break
                    (length,) = _U16.unpack_from(buf, head)
                    head += 2
                    if length < 126:
                        raise ProtocolError(PROTOCOL_ERROR, "length not minimally encoded")
                elif length == 127:
                    if end - head < 8:
                        break
                    (length,) = _U64.unpack_from(buf, head)
                    head += 8
                    if length >> 63:
                        raise ProtocolError(PROTOCOL_ERROR, "64-bit length with the top bit set")
                    if length < 65536:
                        raise ProtocolError(PROTOCOL_ERROR, "length not minimally encoded")
                self._check_header(b0, b1, opcode, length)
                if end - head < 4 + length:
                    break
                start = head + 4
                with memoryview(buf) as view:
                    payload = _unmask(view[start : start + length], buf[head:start])
                pos = start + length
                event = self._frame(b0 & 0x80, opcode, payload)
                if event is not None:
                    out.append(event)
        finally:
            # Keep what is left (the start of a frame) for the next read; at most one copy.
            if pos == end:
                self._buffer = b""
            elif pos:
                self._buffer = bytearray(memoryview(buf)[pos:])
            elif type(buf) is bytes:
                self._buffer = bytearray(buf)

    def _check_header(self, b0: int, b1: int, opcode: int, length: int) -> None:
        if b0 & 0x70:
            raise ProtocolError(PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        if not b1 & 0x80:
            raise ProtocolError(PROTOCOL_ERROR, "client frames must be masked")
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
            if not b0 & 0x80:
                raise ProtocolError(PROTOCOL_ERROR, "fragmented control frame")
            if length > 125:
                raise ProtocolError(PROTOCOL_ERROR, "control frame longer than 125 bytes")
            return
        if opcode > OP_BINARY:
            raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if opcode == OP_CONTINUATION:
            if self._opcode is None:
                raise ProtocolError(PROTOCOL_ERROR, "continuation frame with no message started")
        elif self._opcode is not None:
            raise ProtocolError(PROTOCOL_ERROR, "new message inside a fragmented one")
        if self._size + length > self.max_message_size:
            raise ProtocolError(
                MESSAGE_TOO_BIG, f"message larger than {self.max_message_size} bytes"
            )

    def _frame(self, fin: int, opcode: int, payload: bytes) -> Event | None:
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        if opcode == OP_CLOSE:
            return self._close(payload)
        if opcode != OP_CONTINUATION:
            self._opcode = opcode
        if not fin:
            self._parts.append(payload)
            self._size += len(payload)
            return None
        if self._parts:
            self._parts.append(payload)
            payload = b"".join(self._parts)
            self._parts = []
            self._size = 0
        message_opcode, self._opcode = self._opcode, None
        if message_opcode == OP_BINARY:
            return Message(payload, binary=True)
        if not payload.isascii():  # ASCII is valid UTF-8; isascii() is far cheaper than decode
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(INVALID_DATA, "text message is not valid UTF-8") from None
        return Message(payload)

    @staticmethod
    def _close(payload: bytes) -> Close:
        if not payload:
            return Close(1005, "")
        if len(payload) == 1:
            raise ProtocolError(PROTOCOL_ERROR, "close frame with a 1-byte payload")
        (code,) = _U16.unpack_from(payload)
        if not _valid_close_code(code):
            raise ProtocolError(PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(INVALID_DATA, "close reason is not valid UTF-8") from None
        return Close(code, reason)
