"""End to end: a real relay on a loopback port, real WebSocket clients on both sides.

Most peers are trio-websocket clients; a few tests use the ``websockets`` library's sync
client in worker threads instead, an independent WebSocket implementation.

"Nothing else arrived" is never checked with a sleep. The relay handles one peer's frames in
order and each connection's outbox is FIFO, so a test sends a *sentinel* after the frames
under test (a broadcast notification, another response) and checks that the sentinel is the
next thing the peer sees: anything wrongly routed would have been queued before it.
"""

from __future__ import annotations

import base64
import functools
import json
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import quote

import pytest
import trio
import websockets.exceptions
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from trio_websocket import ConnectionClosed, WebSocketConnection
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from tests.helpers import (
    CUSTOM,
    KEY,
    TOOL_NAME,
    RunningRelay,
    health,
    http_get,
    initialize_sync_tool,
    notification,
    peer,
    recv,
    request,
    result,
    same_id,
    send,
    tool_peer,
    tool_spec,
    wait_for_counts,
)
from trio_mcp_relay._auth import AuthError, Endpoint, encrypt_token, pad_key
from trio_mcp_relay._config import RelayConfig
from trio_mcp_relay.server import serve_relay

TIMEOUT = 5
#: A tool notification the relay passes to every caller: what a test sends after the frames
#: under test, to check that nothing else reached a caller before it.
SENTINEL = notification("notifications/message", {"level": "info", "data": "sentinel"})

# ----------------------------------------------------------------------------- helpers


@asynccontextmanager
async def tool_and_callers(
    relay: RunningRelay, agent: str, n_callers: int
) -> AsyncIterator[tuple[WebSocketConnection, list[WebSocketConnection]]]:
    """A tool and ``n_callers`` callers for ``agent``, all registered at the relay."""
    async with AsyncExitStack() as stack:
        tool = await stack.enter_async_context(tool_peer(relay.tool_url(agent)))
        callers = [
            await stack.enter_async_context(peer(relay.caller_url(agent))) for _ in range(n_callers)
        ]
        await wait_for_counts(relay, tools=1, callers=n_callers)
        yield tool, callers


async def expect_close(ws: WebSocketConnection) -> tuple[int, str]:
    """Read until the relay closes ``ws``; return the close code and reason."""
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            await ws.get_message()
    assert caught.value.reason is not None
    return caught.value.reason.code, caught.value.reason.reason or ""


# ----------------------------------------------------------------------------- round trips

ODD_IDS: list[Any] = [0, "", -5, 2**70, 1.5, "unicode ☃"]


async def test_odd_ids_round_trip_exactly(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "ids", 1) as (tool, [caller]):
            for index, rid in enumerate(ODD_IDS):
                await send(caller, request(rid, CUSTOM, params={"index": index}))
            seen = [await recv(tool) for _ in ODD_IDS]
            tool_ids = [(type(f["id"]), f["id"]) for f in seen]
            assert len(set(tool_ids)) == len(ODD_IDS), "tool-side ids must be unique"
            # Answer in reverse order: the relay must route by table, not by arrival order.
            for frame in reversed(seen):
                await send(tool, result(frame["id"], {"echo": frame["params"]["index"]}))
            answers = [await recv(caller) for _ in ODD_IDS]
            assert [a["result"]["echo"] for a in answers] == list(reversed(range(len(ODD_IDS))))
            for answer in answers:
                original = ODD_IDS[answer["result"]["echo"]]
                assert same_id(answer["id"], original), (answer["id"], original)
                assert "error" not in answer


async def test_huge_integer_id_is_not_rounded_on_the_wire(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "huge", 1) as (tool, [caller]):
            await send(caller, request(2**70 + 1, CUSTOM))
            frame = await recv(tool)
            await send(tool, result(frame["id"], {}))
            raw = await caller.get_message()
            assert str(2**70 + 1) in raw
            assert json.loads(raw)["id"] == 2**70 + 1


async def test_same_id_from_two_callers_at_once(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "dup", 2) as (tool, [alice, bob]):
            await send(alice, request(1, CUSTOM, params={"who": "alice"}))
            await send(bob, request(1, CUSTOM, params={"who": "bob"}))
            first, second = await recv(tool), await recv(tool)
            assert not same_id(first["id"], second["id"])
            by_who = {f["params"]["who"]: f for f in (first, second)}
            # Bob's answer first: if it leaked to Alice she would see it before her own.
            await send(tool, result(by_who["bob"]["id"], {"for": "bob"}))
            await send(tool, result(by_who["alice"]["id"], {"for": "alice"}))
            await send(tool, SENTINEL)
            for ws, who in ((alice, "alice"), (bob, "bob")):
                answer = await recv(ws)
                assert answer == result(1, {"for": who})
                assert await recv(ws) == SENTINEL


async def test_frames_reach_the_tool_compact_and_single_line(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "compact", 1) as (tool, [caller]):
            pretty = json.dumps(
                request(3, CUSTOM, params={"name": "add", "arguments": {"a": 1, "b": [2, 3]}}),
                indent=2,
            )
            assert "\n" in pretty
            await caller.send_message(pretty)
            raw = await tool.get_message()
            assert isinstance(raw, str)
            assert "\n" not in raw
            parsed = json.loads(raw)
            assert raw == json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
            assert parsed["params"] == {"name": "add", "arguments": {"a": 1, "b": [2, 3]}}


async def test_tool_frame_ending_in_newline_is_accepted(relay: RunningRelay) -> None:
    # mcp_pipe.py forwards each line its stdio server prints, newline included.
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "newline", 1) as (tool, [caller]):
            await send(caller, request("n", CUSTOM))
            frame = await recv(tool)
            await tool.send_message(json.dumps(result(frame["id"], {"ok": True})) + "\n")
            assert await recv(caller) == result("n", {"ok": True})


# ----------------------------------------------------------------------------- notifications


async def test_progress_reaches_only_the_owning_caller(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "progress", 2) as (tool, [alice, bob]):
            # Both use id 7; the SDK uses the request id as the progress token.
            await send(
                alice, request(7, CUSTOM, params={"_meta": {"progressToken": "tok-a"}, "w": "a"})
            )
            await send(bob, request(7, CUSTOM, params={"_meta": {"progressToken": 7}, "w": "b"}))
            seen = {f["params"]["w"]: f for f in [await recv(tool), await recv(tool)]}
            tool_tokens = {w: f["params"]["_meta"]["progressToken"] for w, f in seen.items()}
            assert tool_tokens["a"] != tool_tokens["b"]
            progress = notification(
                "notifications/progress",
                {"progressToken": tool_tokens["a"], "progress": 1, "total": 2},
            )
            await send(tool, progress)
            assert await recv(alice) == notification(
                "notifications/progress", {"progressToken": "tok-a", "progress": 1, "total": 2}
            )
            # Bob's next frame is his own answer, not Alice's progress.
            await send(tool, result(seen["b"]["id"], {"done": "b"}))
            assert await recv(bob) == result(7, {"done": "b"})
            await send(
                tool,
                notification(
                    "notifications/progress", {"progressToken": tool_tokens["b"], "progress": 5}
                ),
            )
            # Bob's request is finished: progress for it is dropped, not misrouted.
            await send(tool, result(seen["a"]["id"], {"done": "a"}))
            assert await recv(alice) == result(7, {"done": "a"})


async def test_tool_notifications_reach_every_caller_of_that_agent_only(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with AsyncExitStack() as stack:
            tool_a = await stack.enter_async_context(tool_peer(relay.tool_url("agent-a")))
            tool_b = await stack.enter_async_context(tool_peer(relay.tool_url("agent-b")))
            a1 = await stack.enter_async_context(peer(relay.caller_url("agent-a")))
            a2 = await stack.enter_async_context(peer(relay.caller_url("agent-a")))
            b1 = await stack.enter_async_context(peer(relay.caller_url("agent-b")))
            await wait_for_counts(relay, tools=2, callers=3)
            changed = notification("notifications/message", {"level": "info", "data": "a"})
            await send(tool_a, changed)
            assert await recv(a1) == changed
            assert await recv(a2) == changed
            sentinel = notification("notifications/message", {"level": "info", "data": "b"})
            await send(tool_b, sentinel)
            assert await recv(b1) == sentinel


async def test_tool_notification_with_no_caller_is_tolerated(relay: RunningRelay) -> None:
    # xiaozhi-mcphub sends tools/list_changed as soon as it connects.
    with trio.fail_after(TIMEOUT):
        async with tool_peer(relay.tool_url("lonely")) as tool:
            await wait_for_counts(relay, tools=1, callers=0)
            await send(tool, notification("notifications/tools/list_changed"))
            await send(tool, notification("notifications/message", {"level": "info"}))
            # The relay lists the tool again (its catalog changed), for nobody yet.
            frame = await recv(tool)
            assert frame["method"] == "tools/list"
            await send(tool, result(frame["id"], {"tools": [tool_spec("late")]}))
            async with peer(relay.caller_url("lonely")) as caller:
                # The relay answers from its catalog, with the tool's new list.
                while True:
                    await send(caller, request(1, "tools/list"))
                    answer = await recv(caller)
                    if answer["result"]["tools"]:
                        break
                    await trio.sleep(0.01)
                assert answer == result(1, {"tools": [tool_spec("late")]})


async def test_caller_cancellation_reaches_the_tool_with_the_rewritten_id(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "cancel", 1) as (tool, [caller]):
            await send(caller, request("slow", CUSTOM, params={"name": "sleep"}))
            forwarded = await recv(tool)
            await send(
                caller,
                notification("notifications/cancelled", {"requestId": "slow", "reason": "bored"}),
            )
            cancelled = await recv(tool)
            assert cancelled == notification(
                "notifications/cancelled", {"requestId": forwarded["id"], "reason": "bored"}
            )
            # A late answer to the cancelled request is dropped; the next one still routes.
            await send(tool, result(forwarded["id"], {"late": True}))
            await send(caller, request("next", CUSTOM))
            nxt = await recv(tool)
            await send(tool, result(nxt["id"], {"late": False}))
            assert await recv(caller) == result("next", {"late": False})


# ----------------------------------------------------------------------------- tool requests


async def test_tool_ping_is_answered_by_the_relay(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "ping", 1) as (tool, [caller]):
            await send(tool, request("p-1", "ping"))
            assert await recv(tool) == result("p-1", {})
            # The caller never saw it: its next frame is the broadcast sentinel.
            await send(tool, SENTINEL)
            assert await recv(caller) == SENTINEL


async def test_tool_sampling_request_round_trips_through_a_caller(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "sampling", 2) as (tool, [caller, idle]):
            params = {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}
            # Nothing in flight to the tool: no caller is asked, the tool gets -32005 at once.
            await send(tool, request("s-0", "sampling/createMessage", params))
            refused = await recv(tool)
            assert refused["id"] == "s-0"
            assert refused["error"]["code"] == -32005
            # A caller with a request in flight to the tool is the one asked.
            await send(caller, request("work", CUSTOM))
            work = await recv(tool)
            await send(tool, request("s-1", "sampling/createMessage", params))
            asked = await recv(caller)
            assert asked["method"] == "sampling/createMessage"
            assert asked["params"] == params
            assert "id" in asked
            answer = {"role": "assistant", "content": {"type": "text", "text": "hello"}}
            await send(caller, result(asked["id"], answer))
            assert await recv(tool) == result("s-1", answer)
            await send(tool, result(work["id"], "done"))
            assert await recv(caller) == result("work", "done")
            # The idle caller was never asked: its next frame is the sentinel.
            await send(tool, SENTINEL)
            assert await recv(idle) == SENTINEL


async def test_tool_request_with_no_caller_gets_an_error(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_peer(relay.tool_url("nobody")) as tool:
            await wait_for_counts(relay, tools=1, callers=0)
            await send(tool, request(11, "sampling/createMessage", {"messages": []}))
            answer = await recv(tool)
            assert answer["id"] == 11
            assert answer["error"]["code"] == -32005
            assert "result" not in answer


# ----------------------------------------------------------------------------- failures


async def test_request_with_no_tool_gets_tool_not_connected(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with peer(relay.caller_url("toolless")) as caller:
            for rid in (9, "nine", 0):
                await send(caller, request(rid, "tools/list"))
                answer = await recv(caller)
                assert same_id(answer["id"], rid)
                assert answer["error"]["code"] == -32001
                assert "result" not in answer


async def test_tool_disconnect_fails_in_flight_requests_promptly(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with AsyncExitStack() as stack:
            callers = [
                await stack.enter_async_context(peer(relay.caller_url("flaky"))) for _ in range(3)
            ]
            ids: list[Any] = [0, "x", 2**70]
            async with tool_peer(relay.tool_url("flaky")) as tool:
                await wait_for_counts(relay, tools=1, callers=3)
                for caller, rid in zip(callers, ids, strict=True):
                    await send(caller, request(rid, CUSTOM))
                for _ in ids:
                    await recv(tool)
            with trio.fail_after(2):
                for caller, rid in zip(callers, ids, strict=True):
                    answer = await recv(caller)
                    assert same_id(answer["id"], rid)
                    assert answer["error"]["code"] == -32003
                    assert "result" not in answer
            await wait_for_counts(relay, tools=0, callers=3)


async def test_caller_disconnect_cancels_its_requests_at_the_tool(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_peer(relay.tool_url("leaver")) as tool:
            await wait_for_counts(relay, tools=1, callers=0)
            async with peer(relay.caller_url("leaver")) as caller:
                await send(caller, request(1, CUSTOM))
                await send(caller, request(1, CUSTOM))  # a reused id, still two requests
                tool_ids = {(await recv(tool))["id"], (await recv(tool))["id"]}
                assert len(tool_ids) == 2
            cancelled = [await recv(tool), await recv(tool)]
            assert {c["method"] for c in cancelled} == {"notifications/cancelled"}
            assert {c["params"]["requestId"] for c in cancelled} == tool_ids
            await wait_for_counts(relay, tools=1, callers=0)


def _websockets_tool_until_closed(
    url: str, frames: trio.MemorySendChannel[Any]
) -> tuple[int | None, str]:
    """A tool on the websockets sync client that reports what it receives until it is closed.

    websockets' ``recv`` raises only once the TCP connection is gone, and the relay closes a
    connection's socket only after that connection's handler has finished: when this returns,
    the relay has completely torn the connection down.
    """
    with connect(url, proxy=None, open_timeout=5, close_timeout=5) as ws:
        initialize_sync_tool(ws)
        try:
            while True:
                frame = json.loads(ws.recv(timeout=5))
                trio.from_thread.run_sync(frames.send_nowait, frame)
        except websockets.exceptions.ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


async def test_a_new_tool_connection_replaces_the_old_one(relay: RunningRelay) -> None:
    old_frames, old_received = trio.open_memory_channel[Any](10)
    old_closed: list[tuple[int | None, str]] = []
    old_gone = trio.Event()

    async def run_old_tool() -> None:
        url = relay.tool_url("replace")
        old_closed.append(
            await trio.to_thread.run_sync(
                _websockets_tool_until_closed, url, old_frames, abandon_on_cancel=True
            )
        )
        old_gone.set()

    with trio.fail_after(TIMEOUT):
        async with peer(relay.caller_url("replace")) as caller, trio.open_nursery() as nursery:
            nursery.start_soon(run_old_tool)
            await wait_for_counts(relay, tools=1, callers=1)
            await send(caller, request("before", CUSTOM))
            assert (await old_received.receive())["method"] == CUSTOM
            async with tool_peer(relay.tool_url("replace")) as new:
                await old_gone.wait()
                # The old connection is completely torn down now.
                assert old_closed == [
                    (4001, f"replaced by a newer connection of server {TOOL_NAME}")
                ]
                # The request in flight on the old tool failed; it was not lost.
                answer = await recv(caller)
                assert answer["id"] == "before"
                assert answer["error"]["code"] == -32003
                # Reference bug: the old handler's teardown unregistered the new tool.
                assert (await health(relay))["tool_connections"] == 1
                await send(caller, request("after", CUSTOM))
                frame = await recv(new)
                await send(new, result(frame["id"], {"by": "new"}))
                assert await recv(caller) == result("after", {"by": "new"})
            await wait_for_counts(relay, tools=0, callers=1)


# ----------------------------------------------------------------------------- tokens


def _token_for_payload(key: str, payload: bytes) -> str:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(payload) + padder.finalize()
    encryptor = Cipher(algorithms.AES(pad_key(key)), modes.ECB()).encryptor()
    return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()


BAD_TOKENS = {
    "missing": None,
    "empty": "",
    "garbage": "this is not a token!",
    "wrong-key": encrypt_token("another server's key, 32 bytes!", "agent"),
    "no-agent-id": _token_for_payload(KEY, b'{"name": "agent"}'),
    "empty-agent-id": encrypt_token(KEY, ""),
}


@pytest.mark.parametrize("path", ["/mcp_endpoint/mcp/", "/mcp_endpoint/call/"])
@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_are_closed_with_1008(relay: RunningRelay, path: str, case: str) -> None:
    token = BAD_TOKENS[case]
    url = relay.base + path + ("" if token is None else "?token=" + quote(token, safe=""))
    with trio.fail_after(TIMEOUT):
        async with peer(url) as ws:  # the handshake is accepted...
            code, reason = await expect_close(ws)  # ...then the relay closes
        assert code == 1008
        assert reason
        if token:
            assert token not in reason
            assert quote(token, safe="") not in reason
        assert KEY not in reason
        counts = await health(relay)
        assert counts["total_connections"] == 0


# ----------------------------------------------------------------------------- bad frames


async def test_invalid_caller_frames_get_errors_and_the_connection_survives(
    relay: RunningRelay,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "garbage", 1) as (tool, [caller]):
            await caller.send_message("this is not JSON {")
            answer = await recv(caller)
            assert answer["id"] is None
            assert answer["error"]["code"] == -32700
            assert "result" not in answer
            await caller.send_message(json.dumps([request(1, CUSTOM), request(2, CUSTOM)]))
            answer = await recv(caller)
            assert answer["id"] is None
            assert answer["error"]["code"] == -32600
            await send(caller, request("still-here", CUSTOM))
            frame = await recv(tool)
            await send(tool, result(frame["id"], "yes"))
            assert await recv(caller) == result("still-here", "yes")


async def test_binary_frame_with_utf8_json_is_treated_as_text(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        async with tool_and_callers(relay, "binary", 1) as (tool, [caller]):
            await caller.send_message(json.dumps(request("b", CUSTOM, params={"s": "☃"})).encode())
            raw = await tool.get_message()
            assert isinstance(raw, str)  # forwarded as a text frame
            frame = json.loads(raw)
            assert frame["params"] == {"s": "☃"}
            await tool.send_message(json.dumps(result(frame["id"], "ok")).encode())
            raw = await caller.get_message()
            assert isinstance(raw, str)
            assert json.loads(raw) == result("b", "ok")


# ----------------------------------------------------------------------------- HTTP


async def test_http_root_redirects(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        response = await http_get(relay.port, "/")
        assert response.status == 307
        assert response.headers["location"] == "/mcp_endpoint/"


async def test_http_status_page(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        response = await http_get(relay.port, "/mcp_endpoint/")
        assert response.status == 200
        body = response.json()
        assert body["jsonrpc"] == "2.0"
        assert body["id"] is None
        assert body["result"]["status"] == "running"
        assert body["result"]["message"] == "MCP Endpoint Server"


async def test_http_health_counts_match_the_connections(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        response = await http_get(relay.port, f"/mcp_endpoint/health?key={KEY}")
        assert response.status == 200
        assert response.json()["result"] == {
            "status": "success",
            "connections": {
                "tool_connections": 0,
                "robot_connections": 0,
                "total_connections": 0,
                "robot_connections_by_agent": {},
                "http_sessions": 0,
                "servers_by_agent": {},
            },
        }
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(tool_peer(relay.tool_url("a"), tools=["t1", "t2"]))
            for agent in ("a", "a", "b"):
                await stack.enter_async_context(peer(relay.caller_url(agent)))
            await wait_for_counts(relay, tools=1, callers=3)
            response = await http_get(relay.port, f"/mcp_endpoint/health?key={KEY}")
            assert response.status == 200
            body = response.json()
            assert body["result"]["status"] == "success"
            servers = body["result"]["connections"].pop("servers_by_agent")
            assert body["result"]["connections"] == {
                "tool_connections": 1,
                "robot_connections": 3,
                "total_connections": 4,
                "robot_connections_by_agent": {"a": 2, "b": 1},
                "http_sessions": 0,
            }
            [row] = servers.pop("a")
            assert servers == {}
            assert {k: row[k] for k in ("server", "ready", "tools")} == {
                "server": TOOL_NAME,
                "ready": True,
                "tools": 2,
            }
            assert row["connected_since"].endswith("+00:00")
        await wait_for_counts(relay, tools=0, callers=0)
        assert (await health(relay))["robot_connections_by_agent"] == {}


@pytest.mark.parametrize(
    "target",
    ["/mcp_endpoint/health", "/mcp_endpoint/health?key=", "/mcp_endpoint/health?key=wrong"],
)
async def test_http_health_with_a_bad_key_is_an_auth_error(
    relay: RunningRelay, target: str
) -> None:
    with trio.fail_after(TIMEOUT):
        response = await http_get(relay.port, target)
        # xiaozhi manager-api treats "HTTP 200 and the body says success" as healthy.
        assert b"success" not in response.body
        body = response.json()
        assert body["error"]["code"] == -32004
        assert "result" not in body
        assert KEY.encode() not in response.body


async def test_http_unknown_path_is_404(relay: RunningRelay) -> None:
    with trio.fail_after(TIMEOUT):
        response = await http_get(relay.port, "/no/such/page")
        assert response.status == 404


@pytest.mark.parametrize("slash", ["", "/"])
async def test_websocket_paths_work_with_or_without_trailing_slash(
    relay: RunningRelay, slash: str
) -> None:
    token = quote(relay.token("slash"), safe="")
    tool_url = f"{relay.base}/mcp_endpoint/mcp{slash}?token={token}"
    caller_url = f"{relay.base}/mcp_endpoint/call{slash}?token={token}"
    with trio.fail_after(TIMEOUT):
        async with tool_peer(tool_url) as tool, peer(caller_url) as caller:
            await wait_for_counts(relay, tools=1, callers=1)
            await send(caller, request(1, CUSTOM))
            frame = await recv(tool)
            await send(tool, result(frame["id"], slash))
            assert await recv(caller) == result(1, slash)


async def test_unknown_websocket_path_is_refused_with_404(relay: RunningRelay) -> None:
    # A raw upgrade request: trio-websocket's client leaks its socket on a refused handshake.
    # http_get reads until the relay closes the connection, which it must do after refusing.
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
    }
    token = quote(relay.token("x"), safe="")
    with trio.fail_after(TIMEOUT):
        response = await http_get(relay.port, f"/mcp_endpoint/other/?token={token}", upgrade)
        assert response.status == 404
        assert "sec-websocket-accept" not in response.headers
        assert (await health(relay))["total_connections"] == 0


@pytest.mark.parametrize(
    ("offered", "selected"),
    [(None, None), (["mcp"], "mcp"), (["other", "mcp"], "mcp"), (["other"], None)],
)
async def test_subprotocol_mcp_is_echoed_when_offered(
    relay: RunningRelay, offered: list[str] | None, selected: str | None
) -> None:
    with trio.fail_after(TIMEOUT):
        async with peer(relay.caller_url("sub"), subprotocols=offered) as ws:
            assert ws.subprotocol == selected
            await send(ws, request(1, CUSTOM))
            assert (await recv(ws))["error"]["code"] == -32001


# ----------------------------------------------------------------------------- load


async def test_many_callers_with_interleaved_requests(relay: RunningRelay) -> None:
    n_callers, per_caller = 20, 5
    rng = random.Random(1959)
    with trio.fail_after(10):
        async with tool_and_callers(relay, "crowd", n_callers) as (tool, callers):

            async def call_all(index: int, ws: WebSocketConnection) -> None:
                # Every caller uses the same ids 1..5, as xiaozhi-server's counters do.
                for n in range(1, per_caller + 1):
                    await send(ws, request(n, CUSTOM, params={"caller": index, "n": n}))
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                for index, ws in enumerate(callers):
                    nursery.start_soon(call_all, index, ws)
                frames = [await recv(tool) for _ in range(n_callers * per_caller)]
            assert len({f["id"] for f in frames}) == len(frames)
            rng.shuffle(frames)
            for frame in frames:
                await send(tool, result(frame["id"], frame["params"]))
            await send(tool, SENTINEL)

            async def check(index: int, ws: WebSocketConnection) -> None:
                answers = [await recv(ws) for _ in range(per_caller)]
                assert sorted(a["id"] for a in answers) == list(range(1, per_caller + 1))
                for answer in answers:
                    assert answer["result"] == {"caller": index, "n": answer["id"]}
                assert await recv(ws) == SENTINEL

            async with trio.open_nursery() as nursery:
                for index, ws in enumerate(callers):
                    nursery.start_soon(check, index, ws)


# ----------------------------------------------------------------------------- embedding


def _sync_authenticator(token: str, endpoint: Endpoint) -> str:
    if token == "alice-secret":
        return "alice"
    if token == "bob-secret":
        return "bob"
    if token == "caller-only" and endpoint is Endpoint.CALLER:
        return "alice"
    raise AuthError(f"unknown token on the {endpoint.value} endpoint")


async def _async_authenticator(token: str, endpoint: Endpoint) -> str:
    await trio.lowlevel.checkpoint()
    return _sync_authenticator(token, endpoint)


@pytest.mark.parametrize(
    "authenticator", [_sync_authenticator, _async_authenticator], ids=["sync", "async"]
)
async def test_custom_authenticator(nursery: trio.Nursery, authenticator: Any) -> None:
    # No key: an embedding application brings its own authentication.
    config = RelayConfig(host="127.0.0.1", port=0)
    with trio.fail_after(TIMEOUT):
        port = await nursery.start(
            functools.partial(serve_relay, config, authenticator=authenticator)
        )
        base = f"ws://127.0.0.1:{port}"
        async with (
            tool_peer(f"{base}/mcp_endpoint/mcp/?token=alice-secret") as tool,
            peer(f"{base}/mcp_endpoint/call/?token=caller-only") as alice,
            peer(f"{base}/mcp_endpoint/call/?token=bob-secret") as bob,
        ):
            # caller-only maps to alice on the caller endpoint.
            await send(alice, request(1, CUSTOM))
            frame = await recv(tool)
            await send(tool, result(frame["id"], "for alice"))
            assert await recv(alice) == result(1, "for alice")
            # Bob is another agent, which has no tool.
            await send(bob, request(1, CUSTOM))
            assert (await recv(bob))["error"]["code"] == -32001
        async with peer(f"{base}/mcp_endpoint/mcp/?token=caller-only") as refused:
            code, reason = await expect_close(refused)
        assert code == 1008
        assert reason == "unknown token on the tool endpoint"


# ----------------------------------------------------------------------------- websockets


def _websockets_tool(url: str, n_requests: int) -> list[Any]:
    """A tool on the websockets sync client: answer ``n_requests`` requests, then leave."""
    seen = []
    with connect(url, subprotocols=[Subprotocol("mcp")], proxy=None, open_timeout=5) as ws:
        assert ws.subprotocol == "mcp"
        initialize_sync_tool(ws)
        for _ in range(n_requests):
            raw = ws.recv(timeout=5)
            assert isinstance(raw, str)
            frame = json.loads(raw)
            seen.append(frame)
            # A large answer: the relay re-frames it with a 64-bit length towards the caller.
            answer = {"echo": frame["params"]["n"], "blob": "y" * 100_000}
            ws.send(json.dumps(result(frame["id"], answer)) + "\n")
    return seen


def _websockets_caller(url: str, ids: list[Any]) -> list[Any]:
    """A caller on the websockets sync client: send every request, collect every answer."""
    with connect(url, proxy=None, open_timeout=5) as ws:
        assert ws.subprotocol is None
        for n, rid in enumerate(ids):
            # 70 000 bytes: the relay forwards it to the tool with a 64-bit length header.
            ws.send(json.dumps(request(rid, CUSTOM, params={"n": n, "blob": "x" * 70_000})))
        return [json.loads(ws.recv(timeout=5)) for _ in ids]


async def test_websockets_library_peers_on_both_sides(relay: RunningRelay) -> None:
    ids: list[Any] = [0, 2**70, 1.5, "☃", 300]
    tool_frames: list[Any] = []

    async def run_tool() -> None:
        tool_frames.extend(
            await trio.to_thread.run_sync(
                _websockets_tool, relay.tool_url("ws-lib"), len(ids), abandon_on_cancel=True
            )
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_tool)
            await wait_for_counts(relay, tools=1, callers=0)
            answers = await trio.to_thread.run_sync(
                _websockets_caller, relay.caller_url("ws-lib"), ids, abandon_on_cancel=True
            )
        assert [f["params"]["blob"] for f in tool_frames] == ["x" * 70_000] * len(ids)
        assert len({f["id"] for f in tool_frames}) == len(ids)
        assert len(answers) == len(ids)
        for answer in answers:
            original = ids[answer["result"]["echo"]]
            assert same_id(answer["id"], original)
            assert answer["result"]["blob"] == "y" * 100_000
        await wait_for_counts(relay, tools=0, callers=0)


def _websockets_bad_token(url: str) -> tuple[int, str]:
    with connect(url, proxy=None, open_timeout=5) as ws:
        try:
            ws.recv(timeout=5)
        except websockets.exceptions.ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("the relay did not close the connection")  # pragma: no cover


async def test_websockets_library_sees_1008_for_a_bad_token(relay: RunningRelay) -> None:
    token = encrypt_token("not the key", "agent")
    url = f"{relay.base}/mcp_endpoint/call/?token={quote(token, safe='')}"
    with trio.fail_after(TIMEOUT):
        code, reason = await trio.to_thread.run_sync(
            _websockets_bad_token, url, abandon_on_cancel=True
        )
    assert code == 1008
    assert reason
    assert token not in reason


def _websockets_conformance(tool_url: str, caller_url: str) -> dict[str, Any]:
    """Fragmented messages, client pings and the close handshake, by the websockets library."""
    seen: dict[str, Any] = {}
    with connect(tool_url) as tool:
        initialize_sync_tool(tool)
        with connect(caller_url) as caller:
            # A request sent as three fragments (websockets sends an iterable that way).
            request = json.dumps(
                {"jsonrpc": "2.0", "id": "frag", "method": "m", "params": {"x": "é" * 50}}
            )
            third = len(request) // 3
            caller.send([request[:third], request[third : 2 * third], request[2 * third :]])
            forwarded = json.loads(tool.recv(timeout=5))
            seen["forwarded_params"] = forwarded["params"]
            tool.send(json.dumps({"jsonrpc": "2.0", "id": forwarded["id"], "result": {"ok": True}}))
            seen["answer"] = json.loads(caller.recv(timeout=5))
            # The client's ping is answered with a pong carrying its payload.
            seen["pong"] = caller.ping(b"payload").wait(timeout=5)
            caller.close(code=1000, reason="done")
            seen["caller_close"] = caller.close_code  # the relay echoes the code (RFC 6455 5.5.1)
    return seen


async def test_websockets_library_fragments_ping_and_close(relay: RunningRelay) -> None:
    with trio.fail_after(15):
        seen = await trio.to_thread.run_sync(
            _websockets_conformance,
            relay.tool_url("conformance"),
            relay.caller_url("conformance"),
            abandon_on_cancel=True,
        )
    assert seen["forwarded_params"] == {"x": "é" * 50}
    assert seen["answer"] == {"jsonrpc": "2.0", "id": "frag", "result": {"ok": True}}
    assert seen["pong"] is True
    assert seen["caller_close"] == 1000
