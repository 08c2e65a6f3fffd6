"""Standard MCP clients over HTTP, through the relay, to real tool servers.

The official MCP Python SDK's Streamable HTTP client and its legacy HTTP+SSE client reach
official-SDK stdio servers (tests/data/real/mcp_server.py) bridged to the relay by the real
``mcp_pipe.py`` and by our ``pipe``: initialize, list, call, progress notifications, the GET
stream's ``list_changed``, and the session's end (DELETE) cancelling nothing that finished.
A WebSocket caller of the same agent works beside them.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
import trio
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.helpers import (
    RunningRelay,
    health,
    peer,
    recv,
    request,
    send,
    start_relay,
    tool_peer,
    wait_for_counts,
)
from tests.test_real_clients import MCP_PIPE, child_env, spawn, tail, write_config

#: The SDK's HTTP client (httpx2) leaves the SSE iterators of finished POST answers to the
#: garbage collector; under Trio that is a ResourceWarning in the client, not the relay's.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Async generator 'httpx2.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore2.:ResourceWarning"),
]

AGENT = "http-clients-agent"
TIMEOUT = 60
INIT_TIMEOUT = 30.0


def call_url(relay: RunningRelay, agent: str = AGENT) -> str:
    return f"{relay.http}/mcp_endpoint/call/?token={relay.token(agent)}"


def sse_url(relay: RunningRelay, agent: str = AGENT) -> str:
    return f"{relay.http}/mcp_endpoint/sse/?token={relay.token(agent)}"


async def until_health(relay: RunningRelay, check: Any, seconds: float = 10) -> None:
    """Poll the health endpoint until ``check(connections)`` holds (the state is in another
    process, or behind a socket: there is no event to wait on)."""
    with trio.fail_after(seconds):
        while not check(await health(relay)):  # noqa: ASYNC110
            await trio.sleep(0.02)


def server_ready(connections: dict[str, Any]) -> bool:
    servers = connections["servers_by_agent"].get(AGENT, [])
    return bool(servers) and all(s["ready"] for s in servers)


@asynccontextmanager
async def bridged(relay: RunningRelay, tmp_path: Path, *, ours: bool) -> AsyncIterator[Path]:
    """An SDK stdio server ``alpha`` bridged to the agent's tool URL by ``mcp_pipe.py`` (or by
    our ``pipe``), once the relay has it ready; yields the bridge's log."""
    config = write_config(tmp_path / "mcp_config.json", ["alpha"])
    log = tmp_path / "bridge.log"
    if ours:
        command = [
            *[sys.executable, "-m", "trio_mcp_relay", "pipe"],
            *["--config", str(config), "--endpoint", relay.tool_url(AGENT)],
        ]
        env = child_env()
    else:
        command = [sys.executable, str(MCP_PIPE)]
        env = child_env(MCP_ENDPOINT=relay.tool_url(AGENT), MCP_CONFIG=str(config))
    async with spawn(command, env, log, cwd=tmp_path):
        await wait_for_counts(relay, tools=1, callers=0)
        await until_health(relay, server_ready, INIT_TIMEOUT)
        yield log


async def exercise(session: ClientSession, log: Path) -> None:
    """What every client does: initialize, list, call, call with progress."""
    init = await session.initialize()
    assert init.server_info.name == "alpha"
    assert init.capabilities.tools is not None
    names = {tool.name for tool in (await session.list_tools()).tools}
    assert names == {"alpha_add", "alpha_whoami", "alpha_count", "alpha_wait_for"}, tail(log)
    added = await session.call_tool("alpha_add", {"a": 20, "b": 22})
    assert isinstance(added.content[0], types.TextContent) and added.content[0].text == "42"
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    counted = await session.call_tool("alpha_count", {"n": 3}, progress_callback=on_progress)
    assert isinstance(counted.content[0], types.TextContent)
    assert counted.content[0].text == "counted 3"
    assert progress == [(1.0, 3.0, "step 1"), (2.0, 3.0, "step 2"), (3.0, 3.0, "step 3")]


@pytest.mark.parametrize(
    ("transport", "ours"),
    [
        pytest.param("streamable", False, id="streamable-http-through-mcp_pipe"),
        pytest.param("sse", True, id="legacy-sse-through-our-pipe"),
    ],
)
async def test_the_sdk_clients_through_a_bridge(
    nursery: trio.Nursery, tmp_path: Path, transport: str, ours: bool
) -> None:
    """Streamable HTTP with mcp_pipe.py, HTTP+SSE with our pipe; either way the session ends
    with the client (a DELETE, or the SSE stream closing)."""
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery, init_timeout=INIT_TIMEOUT)
        async with bridged(relay, tmp_path, ours=ours) as log:
            client = (
                streamable_http_client(call_url(relay))
                if transport == "streamable"
                else sse_client(sse_url(relay))
            )
            async with client as (read, write, *_), ClientSession(read, write) as session:
                await exercise(session, log)
                assert (await health(relay))["http_sessions"] == 1
            await until_health(relay, lambda c: c["http_sessions"] == 0)


async def test_the_sdk_client_hears_list_changed_and_sees_the_new_list_beside_a_websocket_caller(
    nursery: trio.Nursery,
) -> None:
    """A server joining the agent: the HTTP client hears ``list_changed`` (sent on the GET
    stream the SDK opens after initialize, or held for it until it opens) and sees the new
    list; a WebSocket caller of the same agent is served meanwhile."""
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery)
        changed = trio.Event()

        async def on_message(message: Any) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                changed.set()

        async with (
            tool_peer(relay.tool_url(AGENT), name="first", tools=["one"]),
            streamable_http_client(call_url(relay)) as (read, write, *_),
            ClientSession(read, write, message_handler=on_message) as session,
        ):
            await session.initialize()
            assert [t.name for t in (await session.list_tools()).tools] == ["one"]
            await until_health(relay, lambda c: c["robot_connections"] == 1)
            async with tool_peer(relay.tool_url(AGENT), name="second", tools=["two"]):
                await changed.wait()
                names = {t.name for t in (await session.list_tools()).tools}
                assert names == {"one", "two"}
                async with peer(relay.caller_url(AGENT)) as ws:
                    await send(ws, request(1, "tools/list"))
                    while "result" not in (answer := await recv(ws)):
                        pass
                    assert {t["name"] for t in answer["result"]["tools"]} == {"one", "two"}
