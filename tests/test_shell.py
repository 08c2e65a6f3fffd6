"""The server shell on memory streams: every timeout on Trio's virtual clock.

Each test serves the relay on an in-memory listener (``tests/memnet.py``) with
``autojump_clock``: the relay's real code runs (handshake, peers, outboxes, keepalive,
watchdogs, shutdown), but time jumps ahead whenever every task waits, so a 20 s ping timeout
takes milliseconds, and assertions about time use the clock the relay itself uses.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.connection import ConnectionState

from tests.helpers import CUSTOM, KEY, notification, recv, request, result, send
from tests.memnet import MemoryNet, PeerClosed
from tests.test_faults import masked_frame
from trio_mcp_relay._config import RelayConfig
from trio_mcp_relay.server import serve_relay

#: Virtual seconds: generous, since autojump makes waiting free.
GUARD = 600


@asynccontextmanager
async def memory_relay(**overrides: Any) -> AsyncIterator[tuple[MemoryNet, trio.Event]]:
    """A relay serving a memory network; yields the network and its shutdown event."""
    net = MemoryNet(KEY)
    shutdown = trio.Event()
    config = RelayConfig(**{"host": "memory", "port": 0, "key": KEY, **overrides})
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(serve_relay, config, listeners=[net.listener], shutdown=shutdown)
        )
        yield net, shutdown
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ a tool that stops reading


async def test_a_tool_that_stops_reading_leaves_no_request_unanswered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    interval, timeout, forward = 20.0, 20.0, 10.0
    with trio.fail_after(GUARD):
        async with (
            memory_relay(
                outbox_size=32,
                ping_interval=interval,
                ping_timeout=timeout,
                forward_timeout=forward,
            ) as (net, _),
            net.raw_tool("deaf"),  # it never reads once initialized
            net.websocket("caller", "deaf") as alice,
            net.websocket("caller", "deaf") as bob,
            net.tool("other") as other_tool,
            net.websocket("caller", "other") as other_caller,
        ):
            # The relay answers initialize itself, from its catalog: the tool was not asked.
            await send(alice, request("init", "initialize", {"protocolVersion": "2025-11-25"}))
            assert (await recv(alice))["id"] == "init"
            # From now on the tool never reads. Its pipe (64 KiB) fills, then its outbox (32).
            blob = "b" * 2000
            sent_at: dict[Any, float] = {}
            answers: dict[Any, tuple[float, Any]] = {}

            async def caller(ws: Any, prefix: str) -> None:
                ids = [
                    f"{prefix}-{n}" if n % 2 else n + (1000 if prefix == "b" else 0)
                    for n in range(100)
                ]
                for rid in ids:
                    sent_at[rid] = trio.current_time()
                    await send(ws, request(rid, CUSTOM, params={"data": blob}))
                while len([r for r in answers if r in ids]) < len(ids):
                    frame = await recv(ws)
                    answers[frame["id"]] = (trio.current_time(), frame)

            async with trio.open_nursery() as callers:
                callers.start_soon(caller, alice, "a")
                callers.start_soon(caller, bob, "b")
                # Meanwhile another agent is served normally.
                await send(other_caller, request("x", CUSTOM, params={}))
                asked = await recv(other_tool)
                await send(other_tool, result(asked["id"], "fine"))
                assert await recv(other_caller) == result("x", "fine")
            assert set(answers) == set(sent_at)
            codes = {frame["error"]["code"] for _, frame in answers.values()}
            assert codes <= {-32002, -32003}, codes
            assert -32002 in codes and -32003 in codes, codes
            for rid, (at, frame) in answers.items():
                assert frame["id"] == rid and type(frame["id"]) is type(rid)
                assert at - sent_at[rid] <= interval + timeout + forward + 2, (rid, at)
            # The tool is gone: a new request finds no tool; neither caller was closed.
            for ws in (alice, bob):
                await send(ws, request("after", CUSTOM))
                assert (await recv(ws))["error"]["code"] == -32001


async def test_a_tool_that_pongs_but_reads_slowly_gets_requests_expired_after_forward_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    forward = 5.0
    with trio.fail_after(GUARD):
        async with (
            memory_relay(outbox_size=4, forward_timeout=forward, ping_interval=0) as (net, _),
            net.raw_tool("slow", capacity=4096) as tool,
            net.websocket("caller", "slow") as alice,
        ):
            blob = "s" * 3000
            started = trio.current_time()
            for n in range(12):
                await send(alice, request(n, CUSTOM, params={"n": n, "data": blob}))
            # 12 requests: what fits the pipe and the 4-frame queue waits; the rest is refused
            # at once; what waited forward_timeout in the queue is answered then.
            answered: dict[int, tuple[float, str]] = {}
            with trio.move_on_after(forward * 3):
                while True:
                    answer = await recv(alice)
                    assert answer["error"]["code"] == -32002, answer
                    at = trio.current_time() - started
                    answered[answer["id"]] = (at, answer["error"]["data"])
            refused = [n for n, (at, why) in answered.items() if "keeping up" in why]
            expired = [n for n, (at, why) in answered.items() if "within" in why]
            assert refused and expired and len(refused) + len(expired) == len(answered)
            assert all(answered[n][0] < forward for n in refused)
            assert all(forward <= answered[n][0] < forward + 1 for n in expired)
            # The tool reads at last: whole frames, in order, exactly the requests that were
            # not answered already.
            seen = []
            with trio.move_on_after(1):
                while True:
                    seen.append((await tool.receive())["params"]["n"])
            assert seen == sorted(seen)
            assert sorted(seen + list(answered)) == list(range(12))
            assert all(isinstance(i, int) for i in seen)


# ------------------------------------------------------------------ a caller that stops reading


async def test_a_caller_over_its_byte_bound_gets_1013_after_what_it_can_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(outbox_bytes=1_000_000, slow_caller_grace=10) as (net, _),
            net.tool("busy") as tool,
            net.websocket("caller", "busy") as healthy,
            net.raw("caller", "busy", capacity=65536) as stalled,
        ):
            await stalled.send(request("held", CUSTOM))
            held = await recv(tool)
            blob = "z" * 200_000
            for n in range(40):  # 8 MB towards a caller that does not read
                await send(tool, notification("notifications/message", {"n": n, "data": blob}))
                assert (await recv(healthy))["params"]["n"] == n
            # Its request is cancelled at the tool, by the id the tool saw.
            assert await recv(tool) == notification(
                "notifications/cancelled",
                {"requestId": held["id"], "reason": "caller disconnected"},
            )
            # Reading at last: whole frames in order, then the 1013 close frame.
            seen = []
            with pytest.raises(PeerClosed) as closed:
                while True:
                    seen.append((await stalled.receive())["params"]["n"])
            # Only the frame begun when it was dropped: the rest of the queue was dropped.
            assert seen == [0]
            assert closed.value.code == 1013
            assert "not reading" in closed.value.reason


async def test_frames_a_dropped_caller_has_not_begun_to_receive_are_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def frame(n: int) -> bytes:
        message = notification("notifications/message", {"n": n, "data": "w" * 30_000})
        return masked_frame(0x1, json.dumps(message).encode())

    with trio.fail_after(GUARD):
        async with (
            memory_relay(outbox_bytes=100_000) as (net, _),
            net.raw_tool("busy") as tool,
            net.raw("caller", "busy", capacity=1024) as stalled,
        ):
            await stalled.send(request("hello", CUSTOM))
            await tool.receive()
            # Four frames in one write: the relay routes them in one step, so the caller's
            # writer takes them as one batch (the first begun on the wire, three not).
            await tool.stream.send_all(b"".join(frame(n) for n in range(4)))
            await trio.testing.wait_all_tasks_blocked()
            await tool.stream.send_all(frame(4))  # over the caller's 100 KB: dropped
            seen = []
            with pytest.raises(PeerClosed) as closed:
                while True:
                    seen.append((await stalled.receive())["params"]["n"])
            assert seen == [0]
            assert closed.value.code == 1013


async def test_a_caller_that_does_not_read_for_the_grace_is_closed_1013(
    autojump_clock: trio.testing.MockClock,
) -> None:
    grace = 10.0
    with trio.fail_after(GUARD):
        async with (
            memory_relay(slow_caller_grace=grace) as (net, _),
            net.tool("busy") as tool,
            net.websocket("caller", "busy") as healthy,
            net.raw("caller", "busy", capacity=2048) as stalled,
            net.tool("other") as other_tool,
            net.websocket("caller", "other") as other_caller,
        ):
            await stalled.send(request("held", CUSTOM))
            await recv(tool)
            started = trio.current_time()
            for n in range(10):  # 10 x 1 KB: within every bound, but never read
                await send(tool, notification("notifications/message", {"n": n, "d": "q" * 1000}))
                assert (await recv(healthy))["params"]["n"] == n
            # During the stall, another caller of the agent and another agent are served.
            for ws, peer_tool in ((healthy, tool), (other_caller, other_tool)):
                await send(ws, request("meanwhile", CUSTOM))
                asked = await recv(peer_tool)
                await send(peer_tool, result(asked["id"], "ok"))
                assert await recv(ws) == result("meanwhile", "ok")
            assert trio.current_time() - started < 1
            cancelled = await recv(tool)
            assert cancelled["method"] == "notifications/cancelled"
            assert trio.current_time() - started >= grace
            assert trio.current_time() - started <= grace + 1
            with pytest.raises(PeerClosed) as closed:
                while True:
                    await stalled.receive()
            assert closed.value.code == 1013
            assert "did not read for 10 s" in closed.value.reason


async def test_the_relay_budget_for_queued_bytes_holds_across_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(outbox_bytes=10_000_000, max_queued_bytes=1_500_000) as (net, _),
            net.tool("busy") as tool,
            net.raw("caller", "busy", capacity=1024) as one,
            net.raw("caller", "busy", capacity=1024) as two,
            net.websocket("caller", "busy") as healthy,
        ):
            blob = "y" * 100_000
            for n in range(20):  # 2 MB each towards two callers: over the 1.5 MB budget
                await send(tool, notification("notifications/message", {"n": n, "data": blob}))
                assert (await recv(healthy))["params"]["n"] == n
            for stalled in (one, two):
                with pytest.raises(PeerClosed) as closed:
                    while True:
                        await stalled.receive()
                assert closed.value.code == 1013


# ------------------------------------------------------------------ keepalive


async def test_a_caller_whose_requests_wait_on_a_full_tool_still_answers_pings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(outbox_size=2, ping_interval=5, ping_timeout=5, forward_timeout=30) as (
                net,
                _,
            ),
            net.raw_tool("deaf", capacity=1024),
            net.raw("caller", "deaf") as caller,
            trio.open_nursery() as reading,
        ):
            # The tool never reads. The caller floods it, and its own reader (below) reads
            # every answer and answers every ping of the relay meanwhile.
            send_answers, answers = trio.open_memory_channel[Any](1000)
            reading.start_soon(caller.read_into, send_answers)
            for n in range(50):
                await caller.send(request(n, CUSTOM, params={"data": "c" * 500}))
            got = [await answers.receive() for _ in range(50)]
            assert sorted(a["id"] for a in got) == list(range(50))
            # The deaf tool was dropped (no pong); the caller, pinged all along, was not.
            await trio.sleep(60)
            await caller.send(request("later", CUSTOM))
            answer = await answers.receive()
            assert answer["id"] == "later" and answer["error"]["code"] == -32001
            reading.cancel_scope.cancel()


async def test_a_ping_is_owed_even_when_the_outbox_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # forward_timeout is long: only keepalive can end the deaf tool, and its outbox is full
    # from the start, so the ping must go out (ahead of the queue) all the same.
    with trio.fail_after(GUARD):
        async with (
            memory_relay(outbox_size=4, ping_interval=5, ping_timeout=5, forward_timeout=500) as (
                net,
                _,
            ),
            net.raw_tool("deaf", capacity=1024),
            net.websocket("caller", "deaf") as caller,
        ):
            started = trio.current_time()
            for n in range(8):
                await send(caller, request(n, CUSTOM, params={"data": "f" * 600}))
            codes = [(await recv(caller))["error"]["code"] for _ in range(8)]
            assert -32003 in codes and -32002 in codes, codes
            assert trio.current_time() - started <= 5 + 5 + 5, trio.current_time() - started


async def test_a_peer_that_does_not_answer_pings_is_closed_1011(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(ping_interval=20, ping_timeout=20) as (net, _),
            net.raw_tool("mute") as mute,
            net.raw_tool("polite") as polite,
            trio.open_nursery() as reading,
        ):
            reading.start_soon(polite.read_into, trio.open_memory_channel[Any](10)[0])
            mute.pongs = False
            opened = trio.current_time()
            with pytest.raises(PeerClosed) as closed:
                while True:
                    await mute.receive()
            assert closed.value.code == 1011
            assert trio.current_time() - opened >= 20
            assert trio.current_time() - opened <= 40 + 5
            # The polite one answered every ping meanwhile and is still connected.
            await trio.sleep(100)
            assert polite.ws.state is ConnectionState.OPEN
            reading.cancel_scope.cancel()


# ------------------------------------------------------------------ handshake and admission


async def test_a_silent_connection_is_dropped_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with memory_relay(handshake_timeout=7) as (net, _):
            stream = net.connect()
            opened = trio.current_time()
            assert await stream.receive_some() == b""
            assert 7 <= trio.current_time() - opened < 8


async def test_silent_sockets_from_one_address_do_not_lock_out_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with memory_relay(max_pending_per_address=5, max_connections=50) as (net, _):
            silent = [net.connect("127.0.0.1") for _ in range(200)]
            refused = 0
            for stream in silent[5:]:
                answer = await stream.receive_some()
                assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
                refused += 1
            assert refused == 195
            async with (
                net.tool("legit", host="127.0.0.2") as tool,
                net.websocket("caller", "legit", host="127.0.0.2") as caller,
            ):
                await send(caller, request(1, CUSTOM))
                frame = await recv(tool)
                await send(tool, result(frame["id"], "ok"))
                assert await recv(caller) == result(1, "ok")


async def test_a_caller_is_known_to_the_router_before_its_handshake_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay() as (net, _),
            net.tool("fresh") as tool,
        ):
            for n in range(40):
                async with net.websocket("caller", "fresh") as caller:
                    # Right after the 101: a tool notification, sent to every caller the
                    # router knows, reaches this one.
                    said = notification("notifications/message", {"level": "info", "data": n})
                    await send(tool, said)
                    assert await recv(caller) == said


async def test_a_slowloris_head_is_dropped_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    head = b"GET /mcp_endpoint/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    with trio.fail_after(GUARD):
        async with memory_relay(handshake_timeout=7) as (net, _):
            slow = net.connect()
            opened = trio.current_time()
            async with trio.open_nursery() as drip:

                async def one_byte_at_a_time() -> None:
                    for byte in head:
                        try:
                            await slow.send_all(bytes([byte]))
                        except trio.BrokenResourceError:
                            return
                        await trio.sleep(0.1)

                drip.start_soon(one_byte_at_a_time)
                assert await slow.receive_some() == b""
                drip.cancel_scope.cancel()
            # Bytes kept coming, yet the head had to be complete within the timeout.
            assert 7 <= trio.current_time() - opened < 8


# ------------------------------------------------------------------ router deadlines


async def test_a_tool_request_nobody_answers_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(tool_request_timeout=30) as (net, _),
            net.tool("asker") as tool,
            net.websocket("caller", "asker") as caller,
        ):
            # A caller with a request in flight to the tool is the one it may ask.
            await send(caller, request("work", CUSTOM))
            await recv(tool)
            started = trio.current_time()
            await send(tool, request("s-1", "sampling/createMessage", {"messages": []}))
            asked = await recv(caller)
            answer = await recv(tool)
            assert answer["id"] == "s-1" and answer["error"]["code"] == -32006
            assert 30 <= trio.current_time() - started < 31
            assert await recv(caller) == notification(
                "notifications/cancelled", {"requestId": asked["id"], "reason": "no answer in time"}
            )


async def test_request_timeout_answers_32006_and_cancels_at_the_tool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(request_timeout=15) as (net, _),
            net.tool("slow") as tool,
            net.websocket("caller", "slow") as caller,
        ):
            started = trio.current_time()
            await send(caller, request(0, CUSTOM))
            asked = await recv(tool)
            answer = await recv(caller)
            assert answer["id"] == 0 and answer["error"]["code"] == -32006
            assert 15 <= trio.current_time() - started < 16
            cancel = await recv(tool)
            assert cancel["params"]["requestId"] == asked["id"]


async def test_without_request_timeout_a_slow_answer_still_arrives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(ping_interval=0) as (net, _),
            net.tool("slow") as tool,
            net.websocket("caller", "slow") as caller,
        ):
            await send(caller, request("", CUSTOM))
            asked = await recv(tool)
            await trio.sleep(300)
            await send(tool, result(asked["id"], "late"))
            assert await recv(caller) == result("", "late")


# ------------------------------------------------------------------ shutdown


async def test_graceful_shutdown_lets_the_request_in_flight_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(shutdown_grace=30) as (net, shutdown),
            net.tool("t") as tool,
            net.raw("caller", "t") as caller,
        ):
            await caller.send(request(1, CUSTOM))
            asked = await recv(tool)
            started = trio.current_time()
            shutdown.set()
            await trio.sleep(10)
            # New requests are refused meanwhile; the one in flight may finish.
            await caller.send(request(2, CUSTOM))
            assert (await caller.receive())["error"]["code"] == -32003
            await send(tool, result(asked["id"], "done"))
            assert await caller.receive() == result(1, "done")
            with pytest.raises(PeerClosed) as closed:
                await caller.receive()
            assert closed.value.code == 1001
            assert trio.current_time() - started < 30


async def test_graceful_shutdown_answers_what_is_left_after_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(shutdown_grace=30) as (net, shutdown),
            net.tool("t") as tool,
            net.raw("caller", "t") as caller,
        ):
            await caller.send(request("never", CUSTOM))
            await recv(tool)
            started = trio.current_time()
            shutdown.set()
            answer = await caller.receive()
            assert answer["id"] == "never" and answer["error"]["code"] == -32003
            assert 30 <= trio.current_time() - started < 31
            with pytest.raises(PeerClosed) as closed:
                await caller.receive()
            assert closed.value.code == 1001


async def test_cancelling_serve_relay_answers_in_flight_requests_and_closes_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNet(KEY)
    config = RelayConfig(host="memory", port=0, key=KEY, shutdown_grace=30)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def run(*, task_status: trio.TaskStatus[int]) -> None:
                with scope:
                    await serve_relay(config, listeners=[net.listener], task_status=task_status)

            await nursery.start(run)
            async with net.raw_tool("t") as tool, net.raw("caller", "t") as caller:
                await caller.send(request("in-flight", CUSTOM))
                await tool.receive()
                started = trio.current_time()
                scope.cancel()
                # No grace period: what is in flight is answered at once, then the close.
                answer = await caller.receive()
                assert answer["id"] == "in-flight" and answer["error"]["code"] == -32003
                for peer in (caller, tool):
                    with pytest.raises(PeerClosed) as closed:
                        await peer.receive()
                    assert closed.value.code == 1001
                assert trio.current_time() - started < 1


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
         b"404 Not Found"),
        (b"POST /mcp_endpoint/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
         b"405 Method Not Allowed"),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", b"404 Not Found"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"307 Temporary Redirect"),
    ],
)  # fmt: skip
async def test_every_http_answer_has_its_reason_phrase(
    autojump_clock: trio.testing.MockClock, head: bytes, status: bytes
) -> None:
    with trio.fail_after(GUARD):
        async with memory_relay() as (net, _):
            stream = net.connect()
            await stream.send_all(head)
            answer = await stream.receive_some()
            assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n"), answer


# ------------------------------------------------------------------ the relay initializes tools


async def test_a_tool_that_never_answers_initialize_is_closed_4003_after_init_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            memory_relay(ping_interval=0) as (net, _),
            net.raw("tool", "mute") as mute,
            net.websocket("caller", "mute") as caller,
        ):
            opened = trio.current_time()
            init = await mute.receive()
            assert init["method"] == "initialize" and init["params"]["clientInfo"]
            # A caller's request waits for the initialization to end, then finds no tool.
            await send(caller, request("early", CUSTOM))
            with pytest.raises(PeerClosed) as closed:
                await mute.receive()
            assert closed.value.code == 4003
            assert "initialize" in closed.value.reason
            assert 10 <= trio.current_time() - opened < 11
            answer = await recv(caller)
            assert answer["id"] == "early" and answer["error"]["code"] == -32001
            # A tool that completes the initialization is served.
            async with net.raw_tool("mute", tools=["soup"]) as tool:
                await send(caller, request("late", "tools/call", {"name": "soup"}))
                asked = await tool.receive()
                assert asked["method"] == "tools/call" and asked["params"] == {"name": "soup"}
                await tool.send(result(asked["id"], {"content": []}))
                assert await recv(caller) == result("late", {"content": []})


# ------------------------------------------------------------------ accepting


async def test_an_accept_out_of_descriptors_is_logged_and_retried(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # accept() failing for want of descriptors (EMFILE) must not end the relay: it waits
    # and accepts again, and the connections that come then are served.
    import errno
    import os

    net = MemoryNet(KEY)

    class Starved(trio.abc.Listener[Any]):
        failures = 3

        async def accept(self) -> Any:
            await trio.lowlevel.checkpoint()
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return await net.listener.accept()

        async def aclose(self) -> None:
            await net.listener.aclose()

    config = RelayConfig(host="memory", port=0, key=KEY)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_relay, config, listeners=[Starved()]))
            started = trio.current_time()
            async with net.tool("starved") as tool, net.websocket("caller", "starved") as caller:
                await send(caller, request(1, CUSTOM))
                asked = await recv(tool)
                await send(tool, result(asked["id"], "ok"))
                assert await recv(caller) == result(1, "ok")
            assert trio.current_time() - started >= 0.3  # three retries, 0.1 s apart
            nursery.cancel_scope.cancel()
    failed = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
    assert failed == ["accept failed: Too many open files; retrying in 0.1 s"] * 3
