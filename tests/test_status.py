"""The status page over real sockets: every agent and server shown, peer strings escaped, the
JSON shape, the admin key, masked tokens, and the ring of recent errors and closes."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import quote

import pytest
import trio

from trio_mcp_relay._auth import encrypt_token
from trio_mcp_relay._frames import error_frame
from trio_mcp_relay.server.recent import CAPACITY, RecentErrors

from .helpers import (
    KEY,
    HttpResponse,
    RunningRelay,
    http_get,
    peer,
    recv,
    relay_in_thread,
    request,
    send,
    start_relay,
    tool_peer,
)

GUARD = 20
EVIL_AGENT = "<script>alert('agent')</script>"
EVIL_SERVER = '<script>alert("server")</script>'
EVIL_TOOL = "<img src=x onerror=alert(1)>"
#: agent -> server name -> tool names
LAYOUT = {
    "kitchen": {"calculator": ["add", "multiply"], "timer": ["start"]},
    "garage": {"door": ["open", "close"], EVIL_SERVER: [EVIL_TOOL]},
    EVIL_AGENT: {"lights": ["on"]},
}


def status_target(key: str = KEY, extra: str = "") -> str:
    return f"/mcp_endpoint/status?key={quote(key, safe='')}{extra}"


async def status_json(relay: RunningRelay, extra: str = "") -> dict[str, Any]:
    response = await http_get(relay.port, status_target(extra="&format=json" + extra))
    assert response.status == 200, response
    return response.json()  # type: ignore[no-any-return]


async def wait_for_status(
    relay: RunningRelay, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the JSON until ``ready`` holds (the relay registers peers asynchronously)."""
    while True:
        data = await status_json(relay)
        if ready(data):
            return data
        await trio.sleep(0.01)


def servers_ready(data: dict[str, Any]) -> int:
    return sum(s["ready"] for a in data["agents"] for s in a["servers"])


@asynccontextmanager
async def layout_peers(relay: RunningRelay) -> AsyncIterator[dict[str, Any]]:
    """Every server of LAYOUT connected, and one caller per agent; yields the callers."""
    async with AsyncExitStack() as stack:
        for agent, servers in LAYOUT.items():
            for name, tools in servers.items():
                await stack.enter_async_context(
                    tool_peer(relay.tool_url(agent), name=name, tools=tools)
                )
        callers = {
            agent: await stack.enter_async_context(peer(relay.caller_url(agent)))
            for agent in LAYOUT
        }
        await wait_for_status(relay, lambda d: servers_ready(d) == 5)
        yield callers


async def test_the_page_shows_every_agent_and_server_and_escapes_what_peers_named() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            async with layout_peers(relay):
                response = await http_get(relay.port, status_target())
            nursery.cancel_scope.cancel()
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    page = response.body.decode()
    for agent, servers in LAYOUT.items():
        assert f"<h2>{_escaped(agent)}</h2>" in page
        for name, tools in servers.items():
            assert _escaped(name) in page
            for tool in tools:
                assert _escaped(tool) in page
    # Nothing a peer sent is markup on the page: the only tags are the page's own.
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;server&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert '<meta http-equiv="refresh" content="10">' in page


def _escaped(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#x27;")
    )


async def test_the_json_has_agents_servers_tools_callers_and_requests_in_flight() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            async with (
                tool_peer(relay.tool_url("kitchen"), name="calculator", tools=["add"]) as tool,
                peer(relay.caller_url("kitchen")) as caller,
                peer(relay.caller_url("kitchen")),
            ):
                await send(caller, request(1, params={"name": "add", "arguments": {}}))
                assert (await recv(tool))["method"] == "tools/call"  # held: in flight
                data = await wait_for_status(
                    relay, lambda d: bool(d["agents"]) and d["agents"][0]["callers"] == 2
                )
                by_accept = await http_get(
                    relay.port, status_target(), headers={"Accept": "application/json"}
                )
            nursery.cancel_scope.cancel()
    assert by_accept.headers["content-type"] == "application/json"
    assert by_accept.json()["agents"][0]["agent"] == "kitchen"
    assert set(data) == {
        "version",
        "generated_at",
        "started_at",
        "uptime_seconds",
        "connections",
        "agent_count",
        "in_flight",
        "tokens",
        "agents",
        "error_window_seconds",
        "errors",
    }
    assert data["connections"] == {"tools": 1, "callers": 2, "total": 3}
    assert data["agent_count"] == 1 and data["in_flight"] == 1
    assert data["tokens"] == "masked"
    [agent] = data["agents"]
    assert agent["agent"] == "kitchen"
    assert agent["callers"] == 2 and agent["in_flight"] == 1
    assert agent["tool_requests"] == 0 and agent["parked"] == 0
    [server] = agent["servers"]
    assert server["server"] == "calculator" and server["server_id"] is None
    assert server["ready"] is True
    assert server["tools"] == 1 and server["tool_names"] == ["add"]
    assert server["connected_since"].endswith("Z") and server["connected_seconds"] >= 0
    assert set(agent["urls"]) == {"tool", "caller"}


async def test_tokens_are_masked_unless_revealed_and_a_placeholder_when_not_derivable() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            scoped_only = await start_relay(nursery, reference_tokens=False)
            async with (
                tool_peer(relay.tool_url("kitchen"), tools=["add"]),
                tool_peer(_scoped_tool_url(scoped_only, "kitchen"), tools=["add"]),
            ):
                masked = await wait_for_status(relay, lambda d: servers_ready(d) == 1)
                page = (await http_get(relay.port, status_target())).body.decode()
                revealed = await status_json(relay, "&reveal=1")
                placeholder = await wait_for_status(scoped_only, lambda d: servers_ready(d) == 1)
            nursery.cancel_scope.cancel()
    token = quote(encrypt_token(KEY, "kitchen"), safe="")
    assert token not in json.dumps(masked) and token not in page
    assert masked["agents"][0]["urls"]["tool"].startswith(
        f"ws://127.0.0.1:{relay.port}/mcp_endpoint/mcp/?token="
    )
    assert masked["agents"][0]["urls"]["tool"].endswith("…")
    assert revealed["tokens"] == "revealed"
    assert revealed["agents"][0]["urls"] == {
        "tool": f"ws://127.0.0.1:{relay.port}/mcp_endpoint/mcp/?token={token}",
        "caller": f"ws://127.0.0.1:{relay.port}/mcp_endpoint/call/?token={token}",
    }
    assert placeholder["tokens"] == "unavailable"
    assert placeholder["agents"][0]["urls"]["caller"].endswith("/mcp_endpoint/call/?token=<token>")
    assert KEY not in page and KEY not in json.dumps(revealed)


def _scoped_tool_url(relay: RunningRelay, agent: str) -> str:
    from trio_mcp_relay import scoped_token
    from trio_mcp_relay._auth import TokenRole

    token = scoped_token(KEY, agent, TokenRole.TOOL)
    return f"{relay.base}/mcp_endpoint/mcp/?token={token}"


async def test_the_admin_key_is_required_by_query_or_bearer() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, admin_key="admin-key-for-the-status-page")
            port = relay.port
            results: dict[str, HttpResponse] = {
                "none": await http_get(port, "/mcp_endpoint/status"),
                "wrong": await http_get(port, status_target("nope")),
                "server key": await http_get(port, status_target(KEY)),
                "query": await http_get(port, status_target("admin-key-for-the-status-page")),
                "bearer": await http_get(
                    port,
                    "/mcp_endpoint/status?format=json",
                    headers={"Authorization": "Bearer admin-key-for-the-status-page"},
                ),
                "wrong bearer": await http_get(
                    port, "/mcp_endpoint/status", headers={"Authorization": "Bearer nope"}
                ),
            }
            nursery.cancel_scope.cancel()
    statuses = {name: response.status for name, response in results.items()}
    assert statuses == {
        "none": 403,
        "wrong": 403,
        "server key": 403,
        "query": 200,
        "bearer": 200,
        "wrong bearer": 403,
    }
    assert results["wrong"].json()["error"]["code"] == -32004
    assert results["bearer"].json()["agents"] == []


async def test_the_page_lists_recent_relay_errors_and_closes() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            async with peer(relay.caller_url("lonely")) as caller:
                await send(caller, request(7, params={"name": "add", "arguments": {}}))
                assert (await recv(caller))["error"]["code"] == -32001
                async with (
                    tool_peer(relay.tool_url("lonely"), name=EVIL_SERVER),
                    tool_peer(relay.tool_url("lonely"), name=EVIL_SERVER),
                ):
                    data = await wait_for_status(relay, lambda d: len(d["errors"]) == 2)
                    page = (await http_get(relay.port, status_target())).body.decode()
            nursery.cancel_scope.cancel()
    replaced, no_tool = data["errors"]  # newest first
    assert no_tool["agent"] == "lonely" and no_tool["role"] == "caller"
    assert (no_tool["kind"], no_tool["code"]) == ("error", -32001)
    assert no_tool["reason"].startswith("Tool not connected")
    assert replaced["agent"] == "lonely" and replaced["role"] == "tool"
    assert (replaced["kind"], replaced["code"]) == ("close", 4001)
    assert EVIL_SERVER in replaced["reason"]
    assert no_tool["at"].endswith("Z")
    assert "4001" in page and "-32001" in page and "<script" not in page


def test_the_ring_keeps_only_relay_codes_and_stays_bounded() -> None:
    clock = iter(range(1000))
    ring = RecentErrors(clock=lambda: float(next(clock)))

    def frame(code: int, rid: Any = 1) -> bytes:
        return error_frame(rid, code, "m", {"why": "x"})

    for code in (-32000, -32008, -32601, -32602, -320011):
        ring.sent("a", "caller", frame(code))
    ring.sent("a", "caller", b'{"jsonrpc":"2.0","id":1,"result":{"text":",\\"error\\":"}}')
    assert ring.since(0) == []
    ring.sent("a", "caller", frame(-32006, "a string id"))
    ring.sent("b", "tool", frame(-32005))
    [latest, first] = ring.since(0)
    assert (first.agent, first.code, first.reason) == ("a", -32006, 'm: {"why": "x"}')
    assert (latest.agent, latest.role, latest.code) == ("b", "tool", -32005)
    for _ in range(CAPACITY + 10):
        ring.closed("c", "caller", 1013, "x" * 500)
    events = ring.since(0)
    assert len(events) == CAPACITY
    assert all(e.code == 1013 and len(e.reason) == 200 for e in events)
    assert ring.since(events[0].at + 1) == []


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_headless_chromium_renders_every_agent_and_server() -> None:
    assert CHROMIUM is not None
    with relay_in_thread() as relay:
        trio.run(_connect_and_render, relay, CHROMIUM)


async def _connect_and_render(relay: RunningRelay, chromium: str) -> None:
    with trio.fail_after(60):
        async with layout_peers(relay):
            url = f"{relay.http}{status_target()}"
            done = await trio.run_process(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
                capture_stdout=True,
                capture_stderr=True,
            )
    dom = done.stdout.decode()
    # The DOM after parsing: peer strings are text nodes, so they serialize escaped again.
    for agent, servers in LAYOUT.items():
        assert _dom_text(agent) in dom, agent
        for name in servers:
            assert _dom_text(name) in dom, name
    assert "<script" not in dom and "<img" not in dom


def _dom_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
