"""Review findings: each test shows one bug in the relay core (ordering, cancellation)."""

from __future__ import annotations

import json
import struct

import trio
from wsproto.events import Pong

from tests.helpers import request, start_relay
from tests.test_faults import TINY_RCVBUF, masked_frame, raw_client, target_of

TIMEOUT = 10
OP_PING = 0x9
OP_CLOSE = 0x8


async def test_pong_is_not_written_inside_a_partly_written_frame(nursery: trio.Nursery) -> None:
    # The caller's own request gets an answer from its own reader (-32001, no tool), written by
    # the fast path; the socket takes only part of it. A ping that came in the same read is
    # answered next, by the same task, before the writer has written the rest of the frame:
    # the pong must not land in the middle of that frame. (The close reply, below, likewise.)
    relay = await start_relay(nursery)
    big_id = "x" * 1_000_000
    with trio.fail_after(TIMEOUT):
        async with raw_client(
            relay.port, target_of(relay.caller_url("lonely")), rcvbuf=TINY_RCVBUF
        ) as caller:
            frame = masked_frame(0x1, json.dumps(request(big_id)).encode())
            # One write: the request and a ping right behind it, parsed in the same read.
            await caller.send_raw(frame + masked_frame(OP_PING, b"hi"))
            answer = json.loads(await caller.receive())
            assert answer["id"] == big_id
            assert answer["error"]["code"] == -32001
            event = await caller.next_event()
            assert isinstance(event, Pong), event
            assert event.payload == b"hi"


async def test_close_reply_is_not_written_inside_a_partly_written_frame(
    nursery: trio.Nursery,
) -> None:
    relay = await start_relay(nursery)
    big_id = "y" * 1_000_000
    with trio.fail_after(TIMEOUT):
        async with raw_client(
            relay.port, target_of(relay.caller_url("lonely")), rcvbuf=TINY_RCVBUF
        ) as caller:
            frame = masked_frame(0x1, json.dumps(request(big_id)).encode())
            close = masked_frame(OP_CLOSE, struct.pack("!H", 1000))
            await caller.send_raw(frame + close)
            answer = json.loads(await caller.receive())
            assert answer["id"] == big_id
            closed = await caller.expect_close()
            assert closed.code == 1000
