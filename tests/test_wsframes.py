"""The lean frame codec against wsproto as the client-side frame writer and reader."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from trio_mcp_relay import _wsframes
from trio_mcp_relay._wsframes import (
    Close,
    FrameParser,
    Message,
    Ping,
    Pong,
    ProtocolError,
    close_payload,
    frame,
)


def client() -> FrameProtocol:
    return FrameProtocol(client=True, extensions=[])


def parse_all(data: bytes, chunks: list[int] | None = None, limit: int = 1 << 20) -> list[object]:
    parser = FrameParser(limit)
    events: list[object] = []
    pos = 0
    for size in chunks or []:
        parser.feed(data[pos : pos + size])
        events += parser.events()
        pos += size
    parser.feed(data[pos:])
    events += parser.events()
    return events


messages = st.one_of(st.text(max_size=300), st.binary(max_size=300))


def message(data: str | bytes) -> Message:
    """What the parser makes of a message: text as its UTF-8 bytes, binary flagged."""
    if isinstance(data, str):
        return Message(data.encode())
    return Message(data, binary=True)


def encode(proto: FrameProtocol, message: str | bytes, pieces: int) -> bytes:
    """The message as ``pieces`` fragments written by wsproto's client side."""
    if pieces <= 1 or not message:
        return bytes(proto.send_data(message, fin=True))
    step = max(1, len(message) // pieces)
    parts = [message[i : i + step] for i in range(0, len(message), step)]
    out = b""
    for i, part in enumerate(parts):
        out += bytes(proto.send_data(part, fin=i == len(parts) - 1))
    return out


@given(
    st.lists(st.tuples(messages, st.integers(1, 4)), max_size=6),
    st.lists(st.integers(1, 50), max_size=30),
)
def test_messages_round_trip_whatever_the_fragmentation_and_reads(
    batch: list[tuple[str | bytes, int]], chunks: list[int]
) -> None:
    proto = client()
    data = b"".join(encode(proto, message, pieces) for message, pieces in batch)
    assert parse_all(data, chunks) == [message(m) for m, _ in batch]


@given(st.binary(max_size=125))
def test_control_frames_between_fragments(payload: bytes) -> None:
    proto = client()
    data = (
        bytes(proto.send_data("hel", fin=False))
        + bytes(proto.ping(payload))
        + bytes(proto.pong(payload))
        + bytes(proto.send_data("lo", fin=True))
    )
    assert parse_all(data) == [Ping(payload), Pong(payload), Message(b"hello")]


def test_close_frames() -> None:
    assert parse_all(bytes(client().close(1000, "bye"))) == [Close(1000, "bye")]
    assert parse_all(bytes(client().close(4001, ""))) == [Close(4001, "")]
    assert parse_all(bytes(client().close())) == [Close(1005, "")]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_server_frames_decode_in_wsproto(size: int) -> None:
    payload = bytes(range(256)) * (size // 256 + 1)
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(frame(0x2, payload[:size]))
    (decoded,) = list(reader.received_frames())
    assert decoded.opcode is Opcode.BINARY and bytes(decoded.payload) == payload[:size]


def test_close_payload_cuts_the_reason_on_a_character_boundary() -> None:
    payload = close_payload(1001, "é" * 100)
    assert len(payload) <= 125
    assert payload[:2] == struct.pack("!H", 1001)
    payload[2:].decode("utf-8")


def masked(
    b0: int, payload: bytes, *, length_bytes: bytes | None = None, mask: bool = True
) -> bytes:
    key = b"\x01\x02\x03\x04"
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload
    if length_bytes is None:
        length_bytes = bytes((len(payload) | (0x80 if mask else 0),))
    return bytes((b0,)) + length_bytes + (key if mask else b"") + body


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (masked(0x81, b"hi", mask=False), 1002),  # unmasked client frame
        (masked(0xC1, b"hi"), 1002),  # RSV1 set: no extension was agreed
        (masked(0x83, b"hi"), 1002),  # reserved data opcode
        (masked(0x8B, b""), 1002),  # reserved control opcode
        (masked(0x09, b""), 1002),  # fragmented ping
        (
            masked(0x89, b"x" * 126, length_bytes=bytes((0x80 | 126,)) + struct.pack("!H", 126)),
            1002,
        ),
        (masked(0x80, b"x"), 1002),  # continuation with nothing started
        (masked(0x01, b"a") + masked(0x81, b"b"), 1002),  # new message inside a fragmented one
        (masked(0x81, b"x", length_bytes=bytes((0x80 | 126,)) + struct.pack("!H", 1)), 1002),
        (masked(0x81, b"\xff\xfe"), 1007),  # invalid UTF-8 text
        (masked(0x01, b"\xc3") + masked(0x80, b"\x28"), 1007),  # split, still invalid
        (masked(0x88, b"\x03"), 1002),  # 1-byte close payload
        (masked(0x88, struct.pack("!H", 1005)), 1002),  # a code a peer may not send
        (masked(0x88, struct.pack("!H", 2000)), 1002),
        (masked(0x88, struct.pack("!H", 1000) + b"\xff"), 1007),  # bad UTF-8 reason
    ],
)
def test_protocol_violations_carry_the_close_code(data: bytes, code: int) -> None:
    with pytest.raises(ProtocolError) as error:
        parse_all(data)
    assert error.value.code == code


def test_64_bit_length_with_top_bit_is_refused_before_any_payload() -> None:
    data = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 63)
    with pytest.raises(ProtocolError) as error:
        parse_all(data)
    assert error.value.code == 1002


def test_oversized_message_refused_as_soon_as_its_length_is_known() -> None:
    parser = FrameParser(max_message_size=1000)
    parser.feed(bytes((0x82, 0x80 | 126)) + struct.pack("!H", 1001))  # no payload yet
    with pytest.raises(ProtocolError) as error:
        parser.events()
    assert error.value.code == 1009


def test_oversized_fragmented_message_counts_every_fragment() -> None:
    proto = client()
    data = bytes(proto.send_data(b"x" * 600, fin=False)) + bytes(proto.send_data(b"y" * 600))
    with pytest.raises(ProtocolError) as error:
        parse_all(data, limit=1000)
    assert error.value.code == 1009
    assert parse_all(data, limit=1200) == [Message(b"x" * 600 + b"y" * 600, binary=True)]


@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4))
def test_the_c_unmasking_and_the_python_one_agree(payload: bytes, mask: bytes) -> None:
    """websockets' C apply_mask, and the XOR used where it is missing, undo RFC 6455 masking."""
    masked_payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert _wsframes._apply_mask is not None  # the C one is installed here
    assert _wsframes._unmask(memoryview(masked_payload), mask) == payload
    c_mask = _wsframes._apply_mask
    try:
        _wsframes._apply_mask = None  # type: ignore[assignment]
        assert _wsframes._unmask(memoryview(masked_payload), mask) == payload
    finally:
        _wsframes._apply_mask = c_mask
