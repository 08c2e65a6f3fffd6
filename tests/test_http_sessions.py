"""HTTP sessions on the in-memory network, on Trio's clock: idle expiry, DELETE, resumption of
dropped SSE streams with ``Last-Event-ID``, a client that stops reading, and shutdown."""

from __future__ import annotations

import functools
import gc
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trio_mcp_relay import RelayConfig, serve_relay
from trio_mcp_relay.server.mcp_http.events import EventLog
from trio_mcp_relay.server.mcp_http.session import HttpSession
from trio_mcp_relay.server.mcp_http.sessions import mint_session_id

from .helpers import KEY
from .httpmem import ACCEPT_BOTH, HttpClient, initialize
from .memnet import MemoryNet, RawPeer

GUARD = 600
AGENT = "http-agent"


@asynccontextmanager
async def relay(**overrides: Any) -> AsyncIterator[tuple[MemoryNet, trio.Event]]:
    """A relay on a memory network (the event shuts it down gracefully)."""
    net = MemoryNet(KEY)
    settings = {"host": "memory", "port": 0, "key": KEY, "ping_interval": 0, **overrides}
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve_relay, RelayConfig(**settings), listeners=[net.listener], shutdown=shutdown
            )
        )
        yield net, shutdown
        nursery.cancel_scope.cancel()


def headers(session: str, **more: str) -> dict[str, str]:
    return {**ACCEPT_BOTH, "mcp-session-id": session, "mcp-protocol-version": "2025-11-25", **more}


def call(rid: Any, name: str = "slow", token: Any = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": {}}
    if token is not None:
        params["_meta"] = {"progressToken": token}
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}


async def health(net: MemoryNet) -> dict[str, Any]:
    client = HttpClient(net)
    assert await client.send("GET", f"/mcp_endpoint/health?key={KEY}") == 200
    answer = await client.json()
    await client.close()
    connections: dict[str, Any] = answer["result"]["connections"]
    return connections


async def next_request(tool: RawPeer, method: str = "tools/call") -> dict[str, Any]:
    while True:
        frame = await tool.receive()
        if frame.get("method") == method:
            assert isinstance(frame, dict)
            return frame


async def test_abandoned_sessions_expire_and_their_requests_are_cancelled_at_the_tool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """1,000 sessions each leave a request in flight and vanish: after the idle timeout they
    are all gone, and the tool was told to cancel every one of those requests."""
    sessions = 1000
    with trio.fail_after(GUARD):
        async with (
            relay(session_idle_timeout=120, max_callers_per_agent=sessions) as (net, _),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            target = net.target("caller", AGENT)
            started = trio.current_time()
            seen: list[int] = []
            for number in range(sessions):
                session = await initialize(net, AGENT)
                client = HttpClient(net)
                assert (
                    await client.send("POST", target, headers=headers(session), body=call(number))
                    == 200
                )
                seen.append((await next_request(tool))["id"])
                await client.close()  # gone without reading the answer
                await trio.sleep(0.05)  # they come and go over time, as clients do
            assert (await health(net))["http_sessions"] == sessions
            assert trio.current_time() - started < 119
            await trio.sleep(119 - (trio.current_time() - started))
            # None has been idle for the whole timeout yet (the oldest for 119 s).
            assert (await health(net))["http_sessions"] == sessions
            cancelled: set[int] = set()
            with trio.move_on_after(130):
                while len(cancelled) < sessions:
                    frame = await next_request(tool, "notifications/cancelled")
                    cancelled.add(frame["params"]["requestId"])
            assert cancelled == set(seen)
            await trio.sleep(1)
            connections = await health(net)
            assert connections["http_sessions"] == 0
            assert connections["robot_connections"] == 0
            gc.collect()
            assert not [o for o in gc.get_objects() if isinstance(o, HttpSession | EventLog)]


async def test_a_session_lives_while_its_get_stream_is_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with relay(session_idle_timeout=10) as (net, _), net.raw_tool(AGENT):
            session = await initialize(net, AGENT)
            stream = HttpClient(net)
            assert (
                await stream.send("GET", net.target("caller", AGENT), headers=headers(session))
                == 200
            )
            assert stream.headers["content-type"] == "text/event-stream"
            priming = await stream.event()
            assert priming is not None and priming.id == "0-0" and priming.data == ""
            assert priming.retry == 1000
            await trio.sleep(100)  # ten idle timeouts, with the stream open
            assert (await health(net))["http_sessions"] == 1
            await stream.close()
            await trio.sleep(10.5)
            assert (await health(net))["http_sessions"] == 0
            client = HttpClient(net)
            status = await client.send(
                "POST", net.target("caller", AGENT), headers=headers(session), body=call(1)
            )
            assert status == 404


async def test_delete_ends_the_session_and_cancels_its_requests_at_the_tool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with relay() as (net, _), net.raw_tool(AGENT, tools=["slow"]) as tool:
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            waiting = HttpClient(net)
            assert (
                await waiting.send("POST", target, headers=headers(session), body=call("c1")) == 200
            )
            forwarded = await next_request(tool)
            client = HttpClient(net)
            assert await client.send("DELETE", target, headers=headers(session)) == 204
            cancel = await next_request(tool, "notifications/cancelled")
            assert cancel["params"]["requestId"] == forwarded["id"]
            # The stream of the request in flight ends (no answer will come).
            while (await waiting.event()) is not None:
                pass
            assert await client.send("POST", target, headers=headers(session), body=call(2)) == 404
            body = await client.json()
            assert body["error"]["code"] == -32600 and body["id"] is None


async def log_message(tool: RawPeer, n: int) -> None:
    await tool.send(
        {
            "jsonrpc": "2.0",
            "method": "notifications/message",
            "params": {"level": "info", "data": n},
        }
    )


async def test_a_dropped_get_stream_resumes_with_last_event_id_exactly_once_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Events written to a connection that dropped before the client read them, and events
    sent while no stream was open, arrive on the resumed stream once each, in order."""
    with trio.fail_after(GUARD):
        async with relay() as (net, _), net.raw_tool(AGENT, tools=["slow"]) as tool:
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            first = HttpClient(net)
            assert await first.send("GET", target, headers=headers(session)) == 200
            assert (await first.event()) is not None  # priming
            for n in range(1, 4):
                await log_message(tool, n)
            got = [await first.event() for _ in range(2)]
            assert [e.json()["params"]["data"] for e in got if e] == [1, 2]
            last = got[-1]
            assert last is not None and last.id == "0-2"
            await trio.sleep(1)  # the third has been written too, but is never read
            await first.close()
            await trio.sleep(1)
            for n in range(4, 8):
                await log_message(tool, n)  # nobody is listening now
            await trio.sleep(1)
            second = HttpClient(net)
            resume = headers(session, **{"last-event-id": last.id})
            assert await second.send("GET", target, headers=resume) == 200
            await log_message(tool, 8)
            events = [await second.event() for _ in range(6)]
            assert [e.json()["params"]["data"] for e in events if e] == [3, 4, 5, 6, 7, 8]
            assert [e.id for e in events if e] == [f"0-{n}" for n in range(3, 9)]
            # A fresh GET (no Last-Event-ID) takes over and starts after what was written.
            third = HttpClient(net)
            assert await third.send("GET", target, headers=headers(session)) == 200
            assert (await second.event()) is None  # the old stream ended
            priming = await third.event()
            assert priming is not None and priming.id == "0-8"
            await log_message(tool, 9)
            ninth = await third.event()
            assert ninth is not None and ninth.json()["params"]["data"] == 9


async def test_a_dropped_post_stream_is_not_a_cancellation_and_resumes_on_get(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with relay() as (net, _), net.raw_tool(AGENT, tools=["slow"]) as tool:
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            post = HttpClient(net)
            assert (
                await post.send("POST", target, headers=headers(session), body=call(7, token="p"))
                == 200
            )
            priming = await post.event()
            assert priming is not None and priming.data == ""
            number = priming.id.split("-")[0] if priming.id else "?"
            assert priming.id == f"{number}-0" and number != "0"
            forwarded = await next_request(tool)
            token = forwarded["params"]["_meta"]["progressToken"]

            async def progress(n: int) -> None:
                params = {"progressToken": token, "progress": n, "total": 3}
                await tool.send(
                    {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}
                )

            await progress(1)
            one = await post.event()
            assert (
                one is not None
                and one.id == f"{number}-1"
                and one.json()["params"]["progressToken"] == "p"
            )
            await post.close()
            await progress(2)
            await tool.send({"jsonrpc": "2.0", "id": forwarded["id"], "result": {"content": []}})
            await trio.sleep(1)
            resumed = HttpClient(net)
            assert (
                await resumed.send(
                    "GET", target, headers=headers(session, **{"last-event-id": f"{number}-1"})
                )
                == 200
            )
            rest = [await resumed.event() for _ in range(2)]
            assert [e.id for e in rest if e] == [f"{number}-2", f"{number}-3"]
            assert rest[0] is not None and rest[0].json()["params"]["progress"] == 2
            assert rest[1] is not None and rest[1].json() == {
                "jsonrpc": "2.0",
                "id": 7,
                "result": {"content": []},
            }
            assert (await resumed.event()) is None  # the request's stream is done
            # The tool never heard of a cancellation.
            heard: list[Any] = []
            with trio.move_on_after(5):
                while True:
                    heard.append(await tool.receive())
            assert not [f for f in heard if f.get("method") == "notifications/cancelled"], heard


async def test_a_client_that_stops_reading_ends_its_session_not_the_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A POST stream nobody reads: once what the relay holds for it is over the bounds, the
    session ends (its request is cancelled at the tool) and another session is unaffected."""
    with trio.fail_after(GUARD):
        async with (
            relay(outbox_size=32, outbox_bytes=64 * 1024, slow_caller_grace=5) as (net, _),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            target = net.target("caller", AGENT)
            deaf = await initialize(net, AGENT)
            healthy = await initialize(net, AGENT)
            stuck = HttpClient(net)
            assert (
                await stuck.send("POST", target, headers=headers(deaf), body=call(1, token=1))
                == 200
            )
            forwarded = await next_request(tool)
            token = forwarded["params"]["_meta"]["progressToken"]
            big = "x" * 4096
            for n in range(200):
                params = {"progressToken": token, "progress": n, "message": big}
                await tool.send(
                    {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}
                )
            cancel = await next_request(tool, "notifications/cancelled")
            assert cancel["params"]["requestId"] == forwarded["id"]
            assert (await health(net))["http_sessions"] == 1
            client = HttpClient(net)
            assert await client.send("POST", target, headers=headers(healthy), body=call(2)) == 200
            second = await next_request(tool)
            await tool.send({"jsonrpc": "2.0", "id": second["id"], "result": {"content": []}})
            events = []
            while (event := await client.event()) is not None:
                events.append(event)
            assert events[-1].json()["id"] == 2


async def test_shutdown_answers_requests_in_flight_on_their_streams(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            relay(shutdown_grace=2) as (net, shutdown),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            client = HttpClient(net)
            assert await client.send("POST", target, headers=headers(session), body=call(5)) == 200
            await next_request(tool)
            shutdown.set()
            events = []
            while (event := await client.event()) is not None:
                events.append(event)
            answer = events[-1].json()
            assert answer["id"] == 5 and answer["error"]["code"] == -32003


async def test_idle_sessions_make_room_for_new_callers_and_busy_ones_do_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Clients that never DELETE do not lock an agent out: at the caller limit, the longest
    idle session ends for a new caller (HTTP or WebSocket); a session with a request in flight
    is never ended for it, and then the new caller is refused."""
    with trio.fail_after(GUARD):
        async with (
            relay(max_callers_per_agent=2) as (net, _),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            target = net.target("caller", AGENT)
            oldest = await initialize(net, AGENT)
            await trio.sleep(1)
            newer = await initialize(net, AGENT)
            await trio.sleep(1)
            third = await initialize(net, AGENT)  # the limit is 2: the oldest made room
            client = HttpClient(net)
            assert await client.send("POST", target, headers=headers(oldest), body=call(1)) == 404
            assert (await health(net))["http_sessions"] == 2
            # A WebSocket caller (the device) gets in the same way.
            async with net.websocket("caller", AGENT):
                assert (
                    await client.send("POST", target, headers=headers(newer), body=call(2)) == 404
                )
                # Now: the WebSocket caller and `third`; with a request in flight, `third` stays.
                busy = HttpClient(net)
                status = await busy.send("POST", target, headers=headers(third), body=call(3))
                assert status == 200
                await next_request(tool)
                refused = HttpClient(net)
                init = {
                    "jsonrpc": "2.0",
                    "id": 0,
                    "method": "initialize",
                    "params": {"protocolVersion": "2025-11-25", "capabilities": {}},
                }
                status = await refused.send("POST", target, headers=ACCEPT_BOTH, body=init)
                assert status == 429
                assert (await refused.json())["error"]["code"] == -32007


async def test_behind_a_trusted_proxy_each_request_is_its_own_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A proxy's kept-alive connection carries requests of several clients: a failed
    authentication counts against the client that sent it, not the connection's first."""
    with trio.fail_after(GUARD):
        proxied = {"trusted_proxies": ("127.0.0.1",), "auth_failures": 1, "auth_delay": 0}
        async with relay(**proxied) as (net, _), net.raw_tool(AGENT):
            target = net.target("caller", AGENT)
            good, bad = "198.51.100.1", "198.51.100.2"
            proxy = HttpClient(net)  # from 127.0.0.1, the trusted proxy
            init = {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {}},
            }
            first = {"accept": "application/json", "x-forwarded-for": good}
            assert await proxy.send("POST", target, headers=first, body=init) == 200
            wrong = "/mcp_endpoint/call/?token=wrong"
            second = {"accept": "application/json", "x-forwarded-for": bad}
            assert await proxy.send("POST", wrong, headers=second, body=init) == 401

            async def status_from(client: str) -> int:
                fresh = HttpClient(net)
                headers = {"accept": "application/json", "x-forwarded-for": client}
                status = await fresh.send("POST", wrong, headers=headers, body=init)
                await fresh.close()
                return status

            assert await status_from(bad) == 429  # its second failure
            assert await status_from(good) == 401  # its first


async def test_a_cancelled_request_ends_its_stream_and_is_cancelled_at_the_tool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with relay() as (net, _), net.raw_tool(AGENT, tools=["slow"]) as tool:
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            waiting = HttpClient(net)
            assert await waiting.send("POST", target, headers=headers(session), body=call(9)) == 200
            forwarded = await next_request(tool)
            cancel = {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": 9, "reason": "the user gave up"},
            }
            client = HttpClient(net)
            assert await client.send("POST", target, headers=headers(session), body=cancel) == 202
            told = await next_request(tool, "notifications/cancelled")
            assert told["params"]["requestId"] == forwarded["id"]
            events = []
            while (event := await waiting.event()) is not None:
                events.append(event)
            # The stream ends with the cancellation's answer (a stream that ended with none
            # would make an SDK client resume it for ever).
            answer = events[-1].json()
            assert answer["id"] == 9 and answer["error"]["code"] == -32800
            # The tool answering anyway reaches nobody, and the id can be used again.
            await tool.send({"jsonrpc": "2.0", "id": forwarded["id"], "result": {"content": []}})
            again = HttpClient(net)
            assert await again.send("POST", target, headers=headers(session), body=call(9)) == 200


async def test_a_json_client_that_leaves_lets_its_session_expire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client of plain JSON answers that goes while its request is in flight: the answer,
    which it cannot resume, is dropped when it comes, and the session expires as any other."""
    with trio.fail_after(GUARD):
        async with (
            relay(session_idle_timeout=10) as (net, _),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            client = HttpClient(net)
            json_only = {**headers(session), "accept": "application/json"}
            await client.stream.send_all(b"")  # connected
            sending = trio.Event()

            async def post() -> None:
                sending.set()
                await client.send("POST", target, headers=json_only, body=call(4))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(post)
                await sending.wait()
                forwarded = await next_request(tool)
                nursery.cancel_scope.cancel()  # the client gives up waiting
            await client.close()
            cancel = await next_request(tool, "notifications/cancelled")  # the session expired
            assert cancel["params"]["requestId"] == forwarded["id"]
            assert trio.current_time() < 15
            await tool.send({"jsonrpc": "2.0", "id": forwarded["id"], "result": {"content": []}})
            assert (await health(net))["http_sessions"] == 0


async def test_a_stream_nobody_reads_is_dropped_after_the_grace_and_the_session_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A POST stream whose client stops reading (its receive buffer full): the write gives up
    after slow_caller_grace, the connection is dropped, and the idle session then expires."""
    with trio.fail_after(GUARD):
        async with (
            relay(session_idle_timeout=10, slow_caller_grace=5) as (net, _),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            stuck = HttpClient(net, capacity=1024)
            assert (
                await stuck.send("POST", target, headers=headers(session), body=call(1, token=1))
                == 200
            )
            forwarded = await next_request(tool)
            token = forwarded["params"]["_meta"]["progressToken"]
            for n in range(8):  # far more than the client's buffer, far less than the bounds
                params = {"progressToken": token, "progress": n, "message": "x" * 2000}
                await tool.send(
                    {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}
                )
            started = trio.current_time()
            cancel = await next_request(tool, "notifications/cancelled")
            assert cancel["params"]["requestId"] == forwarded["id"]
            assert trio.current_time() - started <= 5 + 10 + 1


async def test_resuming_a_stream_whose_answer_is_gone_is_answered_with_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request stream answered whole is forgotten; a client resuming it later gets an error
    for its request (an empty stream would make SDK clients resume it for ever)."""
    with trio.fail_after(GUARD):
        async with relay() as (net, _), net.raw_tool(AGENT, tools=["slow"]) as tool:
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            post = HttpClient(net)
            assert await post.send("POST", target, headers=headers(session), body=call(5)) == 200
            priming = await post.event()
            assert priming is not None and priming.id is not None
            forwarded = await next_request(tool)
            await tool.send({"jsonrpc": "2.0", "id": forwarded["id"], "result": {"content": []}})
            answer = await post.event()
            assert answer is not None and answer.json()["id"] == 5
            assert await post.event() is None
            late = HttpClient(net)
            resume = headers(session, **{"last-event-id": priming.id})
            assert await late.send("GET", target, headers=resume) == 200
            gone = await late.event()
            assert gone is not None
            assert gone.json()["id"] == 5 and gone.json()["error"]["code"] == -32603
            assert await late.event() is None


def test_session_ids_are_unguessable_and_visible_ascii() -> None:
    ids = {mint_session_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)


async def test_a_tools_request_to_the_caller_travels_over_http_and_its_answer_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A tool's sampling/createMessage while an HTTP request of the caller is in flight: it
    arrives on that request's stream (on the GET stream once one is open), with the relay's
    id; the client POSTs the answer (202) and the tool gets it under its own id, results and
    errors alike."""
    with trio.fail_after(GUARD):
        async with relay() as (net, _), net.raw_tool(AGENT, tools=["slow"]) as tool:
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT, capabilities={"sampling": {}})
            post = HttpClient(net)
            assert await post.send("POST", target, headers=headers(session), body=call(1)) == 200
            assert (await post.event()) is not None  # priming
            await next_request(tool)
            ask = {"messages": [], "maxTokens": 5}
            await tool.send(
                {"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": ask}
            )
            asked = await post.event()
            assert asked is not None and asked.id is not None and not asked.id.startswith("0-")
            request = asked.json()
            assert request["method"] == "sampling/createMessage" and request["params"] == ask
            answer = {"jsonrpc": "2.0", "id": request["id"], "result": {"content": "hi"}}
            client = HttpClient(net)
            assert await client.send("POST", target, headers=headers(session), body=answer) == 202
            assert await client.body() == b""
            assert await tool.receive() == {
                "jsonrpc": "2.0",
                "id": "s1",
                "result": {"content": "hi"},
            }
            # With a GET stream open, the next one goes there; an error answer travels too.
            stream = HttpClient(net)
            assert await stream.send("GET", target, headers=headers(session)) == 200
            assert (await stream.event()) is not None  # priming
            await tool.send(
                {"jsonrpc": "2.0", "id": "s2", "method": "sampling/createMessage", "params": ask}
            )
            asked = await stream.event()
            assert asked is not None and asked.id is not None and asked.id.startswith("0-")
            second = asked.json()
            refusal = {"code": -1, "message": "the user said no"}
            error = {"jsonrpc": "2.0", "id": second["id"], "error": refusal}
            assert await client.send("POST", target, headers=headers(session), body=error) == 202
            assert await tool.receive() == {"jsonrpc": "2.0", "id": "s2", "error": refusal}


async def test_the_legacy_message_endpoint_takes_only_legacy_session_ids(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with relay() as (net, _), net.raw_tool(AGENT, tools=["slow"]) as tool:
            streamable = await initialize(net, AGENT)
            legacy = HttpClient(net)
            assert (
                await legacy.send(
                    "GET",
                    f"/mcp_endpoint/sse/?token={net.target('caller', AGENT).split('token=')[1]}",
                )
                == 200
            )
            endpoint = await legacy.event()
            assert endpoint is not None and endpoint.event == "endpoint"
            assert endpoint.data.startswith("/mcp_endpoint/messages/?session_id=")
            client = HttpClient(net)
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            for session_id in (streamable, "unknown", ""):
                target = f"/mcp_endpoint/messages/?session_id={session_id}"
                assert await client.send("POST", target, body=ping) == 404
                assert (await client.json())["error"]["code"] == -32600
            cases = [
                (b"{not json", {}, 400, -32700),
                (b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', {}, 400, -32600),
                (
                    b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}',
                    {"content-type": "text/plain"},
                    415,
                    -32600,
                ),
            ]
            for body, extra, status, code in cases:
                fresh = HttpClient(net)
                assert await fresh.send("POST", endpoint.data, headers=extra, body=body) == status
                assert (await fresh.json())["error"]["code"] == code
            # The good one works, and nothing of the refused ones reached the tool.
            good = HttpClient(net)
            assert await good.send("POST", endpoint.data, body=ping) == 202
            pong = await legacy.event()
            assert pong is not None and pong.json() == {"jsonrpc": "2.0", "id": 1, "result": {}}
            heard: list[Any] = []
            with trio.move_on_after(1):
                while True:
                    heard.append(await tool.receive())
            assert heard == []


async def test_a_long_call_on_an_open_post_stream_keeps_its_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            relay(session_idle_timeout=10) as (net, _),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            post = HttpClient(net)
            assert await post.send("POST", target, headers=headers(session), body=call(3)) == 200
            forwarded = await next_request(tool)
            heard: list[Any] = []
            with trio.move_on_after(100):  # ten idle timeouts, the stream open all along
                while True:
                    heard.append(await tool.receive())
            assert heard == []
            assert (await health(net))["http_sessions"] == 1
            await tool.send({"jsonrpc": "2.0", "id": forwarded["id"], "result": {"content": []}})
            events = []
            while (event := await post.event()) is not None:
                events.append(event)
            assert events[-1].json() == {"jsonrpc": "2.0", "id": 3, "result": {"content": []}}


async def test_an_older_session_gets_no_priming_and_its_quiet_stream_still_answers_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 2025-06-18 session: no priming events; the head of a GET stream with nothing to say
    leaves anyway, and comments keep it alive every 15 s."""
    with trio.fail_after(GUARD):
        async with relay() as (net, _), net.raw_tool(AGENT, tools=["slow"]) as tool:
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT, version="2025-06-18")
            stream = HttpClient(net)
            older = headers(session, **{"mcp-protocol-version": "2025-06-18"})
            with trio.fail_after(1):
                assert await stream.send("GET", target, headers=older) == 200
            await trio.sleep(31)
            await log_message(tool, 1)
            first = await stream.event()
            assert first is not None and first.json()["params"]["data"] == 1
            assert stream.comments >= 2


async def test_failed_authentications_are_delayed_exactly_and_a_good_token_never(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The failed-authentication policy on the HTTP front: no delay for the first failure,
    then cap/64 doubling up to the cap from the eighth on; a good token is never delayed."""
    with trio.fail_after(GUARD):
        async with relay(auth_delay=6.4, auth_failures=0) as (net, _), net.raw_tool(AGENT):
            init = {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {}},
            }
            took = []
            for _ in range(9):
                client = HttpClient(net)
                started = trio.current_time()
                wrong = "/mcp_endpoint/call/?token=wrong"
                assert await client.send("POST", wrong, headers=ACCEPT_BOTH, body=init) == 401
                took.append(round(trio.current_time() - started, 6))
                await client.close()
            assert took == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 6.4]
            started = trio.current_time()
            await initialize(net, AGENT)
            assert trio.current_time() == started


async def test_notifications_nobody_listens_for_are_dropped_not_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With no GET stream open, what the relay sends on its own waits for one, within the
    session's bounds: beyond them the oldest go (counted), and the session stays."""
    with trio.fail_after(GUARD):
        async with (
            relay(outbox_size=8) as (net, _),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            for n in range(30):
                await log_message(tool, n)
            await trio.sleep(1)
            stream = HttpClient(net)
            assert await stream.send("GET", target, headers=headers(session)) == 200
            got = []
            for _ in range(12):
                event = await stream.event()
                assert event is not None
                if event.data:
                    got.append(event.json()["params"]["data"])
                if got and got[-1] == 29:
                    break
            assert got == list(range(22, 30))  # the newest 8 (--outbox-size): in order, once
            client = HttpClient(net)
            assert await client.send("POST", target, headers=headers(session), body=call(1)) == 200
            await next_request(tool)


async def test_a_session_that_fails_inside_ends_alone(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error in one HTTP session (here, filing its outgoing messages) is logged
    and ends that session; the relay and everyone else go on."""
    original = HttpSession._file

    def broken(self: HttpSession, message: bytes) -> None:
        if self.agent == "doomed" and b'"tools":[' in message:
            raise RuntimeError("a bug in the session")
        original(self, message)

    monkeypatch.setattr(HttpSession, "_file", broken)
    with trio.fail_after(GUARD):
        async with (
            relay() as (net, _),
            net.raw_tool("doomed", tools=["slow"]),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            doomed = await initialize(net, "doomed")
            client = HttpClient(net)
            listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
            target = net.target("caller", "doomed")
            assert await client.send("POST", target, headers=headers(doomed), body=listing) == 200
            while (await client.event()) is not None:
                pass
            assert await client.send("POST", target, headers=headers(doomed), body=listing) == 404
            session = await initialize(net, AGENT)
            other = HttpClient(net)
            target = net.target("caller", AGENT)
            assert await other.send("POST", target, headers=headers(session), body=call(1)) == 200
            forwarded = await next_request(tool)
            await tool.send({"jsonrpc": "2.0", "id": forwarded["id"], "result": {"content": []}})
            events = []
            while (event := await other.event()) is not None:
                events.append(event)
            assert events[-1].json()["id"] == 1


async def test_the_in_flight_limit_holds_for_an_http_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """--max-inflight-per-caller counts a session's requests like a WebSocket caller's: one
    more is answered -32007 on its own stream, and never reaches the tool."""
    with trio.fail_after(GUARD):
        async with (
            relay(max_inflight_per_caller=2) as (net, _),
            net.raw_tool(AGENT, tools=["slow"]) as tool,
        ):
            target = net.target("caller", AGENT)
            session = await initialize(net, AGENT)
            waiting = [HttpClient(net) for _ in range(2)]
            for rid, client in enumerate(waiting, start=1):
                assert (
                    await client.send("POST", target, headers=headers(session), body=call(rid))
                    == 200
                )
                await next_request(tool)
            over = HttpClient(net)
            assert await over.send("POST", target, headers=headers(session), body=call(3)) == 200
            events = []
            while (event := await over.event()) is not None:
                events.append(event)
            answer = events[-1].json()
            assert answer["id"] == 3 and answer["error"]["code"] == -32007
            heard: list[Any] = []
            with trio.move_on_after(1):
                while True:
                    heard.append(await tool.receive())
            assert heard == []
