"""The outbox as a unit, and the fast path's ordering guard on memory streams."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import notification, request
from tests.test_faults import masked_frame
from tests.test_shell import GUARD, memory_relay
from trio_mcp_relay.server.outbox import BATCH_BYTES, PING, ByteBudget, Outbox


def in_trio(test: Callable[[], None]) -> Callable[[], None]:
    """Run a test that never waits inside Trio (the outbox stamps items with its clock)."""

    @functools.wraps(test)
    def run() -> None:
        async def main() -> None:
            test()

        trio.run(main)

    return run


def outbox(capacity: int = 4, max_bytes: int = 100, budget: int = 1000) -> Outbox:
    return Outbox(capacity, max_bytes, ByteBudget(budget))


@in_trio
def test_bounds_in_frames_and_bytes_and_one_item_always_fits() -> None:
    box = outbox(capacity=3, max_bytes=10)
    box.put_nowait(b"x" * 50)  # empty: always room for one, however large
    with pytest.raises(trio.WouldBlock):
        box.put_nowait(b"y")
    assert box.take_nowait(10) == [b"x" * 50]
    box.written()
    for item in (b"aaaa", b"bbbb"):
        box.put_nowait(item)
    with pytest.raises(trio.WouldBlock):
        box.put_nowait(b"ccc")  # 8 + 3 bytes > 10
    box.put_nowait(b"cc")
    with pytest.raises(trio.WouldBlock):
        box.put_nowait(b"")  # 3 frames
    assert (len(box), box.nbytes) == (3, 10)


@in_trio
def test_the_budget_is_shared_and_given_back() -> None:
    budget = ByteBudget(10)
    one, two = Outbox(10, 100, budget), Outbox(10, 100, budget)
    one.put_nowait(b"a" * 6)
    two.put_nowait(b"b" * 3)
    one.put_nowait(b"a")
    with pytest.raises(trio.WouldBlock):
        two.put_nowait(b"bb")
    assert budget.used == 10
    assert one.clear() == []
    assert budget.used == 3
    assert two.take_nowait(5) == [b"b" * 3]
    assert budget.used == 3  # counted until written
    two.written()
    assert budget.used == 0


@in_trio
def test_a_ping_goes_first_and_never_counts() -> None:
    box = outbox(capacity=2, max_bytes=10)
    box.put_nowait(b"one")
    box.put_nowait(b"two")
    box.put_control(PING)
    assert box.take_nowait(10) == [PING, b"one", b"two"]


async def test_expire_gives_back_request_tags_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(100):
        box = outbox(capacity=10, max_bytes=1000)
        box.put_nowait(b"r1", request=1)
        box.put_nowait(b"n")
        await trio.sleep(5)
        box.put_nowait(b"r2", request=2)
        box.put_control(PING)  # stamped like the head: the queue stays in time order
        assert box.expire(trio.current_time() - 5) == [1]
        assert len(box) == 1 and box.oldest() == trio.current_time()
        assert box.clear() == [2]
        assert box.oldest() is None and box.nbytes == 0


@in_trio
def test_idle_only_when_nothing_is_queued_or_being_written() -> None:
    box = outbox()
    assert box.idle
    box.put_nowait(b"a")
    assert not box.idle
    box.take_nowait(1)
    assert not box.idle  # the writer holds a batch
    box.written()
    assert box.idle
    box.close()
    assert not box.idle
    with pytest.raises(trio.ClosedResourceError):
        box.put_nowait(b"b")
    assert box.take_nowait(1) is None


@in_trio
def test_a_batch_stops_growing_past_its_byte_size() -> None:
    box = outbox(capacity=100, max_bytes=10 * BATCH_BYTES, budget=10 * BATCH_BYTES)
    for _ in range(8):
        box.put_nowait(b"z" * (BATCH_BYTES // 4))
    assert len(box.take_nowait(100) or []) == 4
    box.written()
    assert len(box.take_nowait(100) or []) == 4


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=60))
def test_what_is_taken_is_what_was_put_in_order(ops: list[tuple[bool, int]]) -> None:
    @in_trio
    def check() -> None:
        box = outbox(capacity=8, max_bytes=200, budget=10_000)
        put: list[bytes] = []
        taken: list[bytes] = []
        for n, (is_put, size) in enumerate(ops):
            if is_put:
                item = bytes([n % 256]) * (size + 1)
                try:
                    box.put_nowait(item)
                except trio.WouldBlock:
                    continue
                put.append(item)
            elif len(box):
                taken.extend(box.take_nowait(3) or [])
                box.written()
            assert box.nbytes == sum(map(len, put)) - sum(map(len, taken))
            assert box.budget.used == box.nbytes
        box.close()
        while (batch := box.take_nowait(3)) is not None:
            taken.extend(batch)
            box.written()
        assert taken == put

    check()


async def test_the_fast_path_never_overtakes_queued_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A caller that reads slowly, in small bites: the relay's writes to it are partial, so
    # frames queue behind a direct write that the socket did not take whole, and later
    # frames find the writer between batches. Every frame must arrive once, in order.
    def frames(first: int, count: int) -> bytes:
        return b"".join(
            masked_frame(
                0x1,
                json.dumps(notification("notifications/n", {"n": n, "pad": "p" * 700})).encode(),
            )
            for n in range(first, first + count)
        )

    with trio.fail_after(GUARD):
        async with (
            memory_relay(outbox_size=10_000) as (net, _),
            net.raw_tool("order") as tool,
            net.raw("caller", "order", capacity=1500) as caller,
        ):
            await caller.send(request("hi", "ping"))
            assert (await caller.receive())["id"] == "hi"  # the relay answers ping itself
            seen: list[int] = []
            async with trio.open_nursery() as nursery:

                async def produce() -> None:
                    sent = 0
                    for burst in (1, 3, 1, 7, 2, 1, 5, 1, 1, 9):
                        await tool.stream.send_all(frames(sent, burst))
                        sent += burst
                        await trio.sleep(0.003)

                nursery.start_soon(produce)
                while len(seen) < 31:
                    seen.append((await caller.receive())["params"]["n"])
                    await trio.sleep(0.001)
            assert seen == list(range(31)), seen


async def test_frames_queued_during_the_handshake_are_not_overtaken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Frames routed to a caller between its registration and its 101 wait in its outbox;
    # once it is open, a frame that finds them still queued must not take the fast path
    # past them. Each new caller must see a gapless, ordered run of the tool's stream.
    def frames(first: int, count: int) -> bytes:
        return b"".join(
            masked_frame(0x1, json.dumps(notification("n", {"n": n})).encode())
            for n in range(first, first + count)
        )

    with trio.fail_after(GUARD):
        async with (
            memory_relay(outbox_size=10_000) as (net, _),
            net.raw_tool("stream") as tool,
            trio.open_nursery() as nursery,
        ):

            async def produce() -> None:
                sent = 0
                while True:
                    await tool.stream.send_all(frames(sent, 3))
                    sent += 3
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(produce)
            for _ in range(30):
                async with net.raw("caller", "stream") as caller:
                    seen = [(await caller.receive())["params"]["n"] for _ in range(20)]
                    assert seen == list(range(seen[0], seen[0] + 20)), seen
            nursery.cancel_scope.cancel()


async def test_an_idle_connection_is_pinged_without_a_writer_task() -> None:
    # Thousands of idle connections are pinged every interval: each ping that the socket
    # takes at once must not leave a writer task (and its memory) behind.
    from tests.memnet import Pipe, PipeStream
    from trio_mcp_relay._routing import Role
    from trio_mcp_relay._transport import ServerWebSocket
    from trio_mcp_relay.server.peer import Peer

    with trio.fail_after(5):
        up, down = Pipe(1000), Pipe(1000)
        ws = ServerWebSocket(PipeStream(down, up, ("x", 1)), remote="x", max_message_size=100)
        async with trio.open_nursery() as nursery:
            peer = Peer(1, Role.CALLER, "a", ws, outbox(), nursery, 0.0)
            peer.opened()
            peer.ping_nowait()
            assert down.buffer == b"\x89\x00"  # the ping frame, on the wire at once
            assert not peer.writer_started
            down.capacity = 0  # a full socket: now the ping must be queued for a writer
            down.buffer.clear()
            peer.ping_nowait()
            assert peer.writer_started
            nursery.cancel_scope.cancel()


async def test_the_writer_and_the_watchdog_end_when_nothing_is_queued_and_start_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A connection that was busy once must go back to costing no task: the writer ends when
    # the outbox is empty (and stops the watchdog), and both start again when the socket
    # next keeps a frame, which still arrives whole and in order.
    from tests.memnet import Pipe, PipeStream
    from trio_mcp_relay._routing import Role
    from trio_mcp_relay._transport import ServerWebSocket
    from trio_mcp_relay.server.peer import Peer

    watched: list[float] = []

    async def watchdog(peer: Peer) -> None:
        watched.append(trio.current_time())
        await trio.sleep_forever()

    async def drain(pipe: Pipe, size: int) -> bytes:
        got = b""
        while len(got) < size:
            got += await pipe.read(None)
        return got

    with trio.fail_after(60):
        up, down = Pipe(1000), Pipe(16)
        ws = ServerWebSocket(PipeStream(down, up, ("x", 1)), remote="x", max_message_size=1000)
        async with trio.open_nursery() as nursery:
            peer = Peer(1, Role.CALLER, "a", ws, outbox(max_bytes=1000), nursery, 0.0)
            peer.watchdog = watchdog
            peer.opened()
            for round_ in range(2):
                first, second = (b'{"n":%d,"x":"%s"}' % (round_ * 2 + i, b"x" * 40) for i in (0, 1))
                peer.send_nowait(first)  # the socket keeps most of it: the writer sends the rest
                peer.send_nowait(second)  # queued behind it
                assert peer.writer_started
                await trio.testing.wait_all_tasks_blocked()
                assert len(nursery.child_tasks) == 2  # the writer (waiting) and the watchdog
                assert len(watched) == round_ + 1
                got = await drain(down, 2 * (len(first) + 2))
                assert (
                    got
                    == b"\x81"
                    + bytes([len(first)])
                    + first
                    + b"\x81"
                    + bytes([len(second)])
                    + second
                )
                await trio.testing.wait_all_tasks_blocked()
                assert not peer.writer_started
                assert not nursery.child_tasks  # both ended: an idle connection has no task
                await trio.sleep(10)
            nursery.cancel_scope.cancel()
