"""Several servers per agent over real sockets: the official SDK client, health, scoped
server ids, filters from the config, and 4003 for a server that fails its initialization."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types as types
import trio
import trio.testing
from mcp.client.session import ClientSession
from mcp.shared.message import SessionMessage
from trio_websocket import ConnectionClosed, WebSocketConnection

from trio_mcp_relay import RelayConfig, ToolFilter, scoped_token, serve_relay
from trio_mcp_relay._auth import TokenRole
from trio_mcp_relay.core.session import AgentFilters

from .helpers import KEY, health, initialize_tool, peer, recv, request, result, send, start_relay
from .memnet import MemoryNet

GUARD = 20


@asynccontextmanager
async def sdk_session(
    ws: WebSocketConnection, message_handler: Any
) -> AsyncIterator[ClientSession]:
    """The official SDK's ClientSession over a relay caller WebSocket (the SDK has no WebSocket
    client of its own: two pumps carry its JSON-RPC messages to and from the socket)."""
    incoming_send, incoming = anyio.create_memory_object_stream[SessionMessage | Exception](64)
    outgoing, outgoing_receive = anyio.create_memory_object_stream[SessionMessage](64)

    async def pump_in() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                data = await ws.get_message()
                message = types.jsonrpc_message_adapter.validate_json(data, by_name=False)
                await incoming_send.send(SessionMessage(message))

    async def pump_out() -> None:
        async for message in outgoing_receive:
            await ws.send_message(
                message.message.model_dump_json(by_alias=True, exclude_unset=True)
            )

    async with incoming_send, incoming, outgoing, outgoing_receive, trio.open_nursery() as nursery:
        nursery.start_soon(pump_in)
        nursery.start_soon(pump_out)
        async with ClientSession(incoming, outgoing, message_handler=message_handler) as session:
            yield session
        nursery.cancel_scope.cancel()


async def test_the_official_sdk_client_sees_list_changed_and_the_new_list() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            async with peer(relay.tool_url("sdk")) as tool:
                await initialize_tool(tool, name="calc", tools=["add"])
                changed = trio.Event()

                async def on_message(message: Any) -> None:
                    if isinstance(message, types.ToolListChangedNotification):
                        changed.set()

                async with (
                    peer(relay.caller_url("sdk")) as caller,
                    sdk_session(caller, on_message) as session,
                ):
                    init = await session.initialize()
                    assert init.capabilities.tools is not None
                    assert init.capabilities.tools.list_changed is True
                    assert [t.name for t in (await session.list_tools()).tools] == ["add"]
                    # The tool grows a tool and says so; the relay lists it again and tells
                    # the SDK client, whose next list is the new one.
                    await send(
                        tool, {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
                    )
                    relist = await recv(tool)
                    assert relist["method"] == "tools/list"
                    grown = [{"name": n, "inputSchema": {"type": "object"}} for n in ("add", "mul")]
                    await send(tool, result(relist["id"], {"tools": grown}))
                    await changed.wait()
                    assert [t.name for t in (await session.list_tools()).tools] == ["add", "mul"]
            nursery.cancel_scope.cancel()


async def test_health_lists_each_agents_servers() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            async with (
                peer(relay.tool_url("h") + "&server_id=calc") as calc,
                peer(relay.tool_url("h")) as weather,
            ):
                await initialize_tool(calc, name="whatever", tools=["add", "sub"])
                await initialize_tool(weather, name="weather", tools=["forecast"])
                connections = await health(relay)
                assert connections["tool_connections"] == 2
                rows = connections["servers_by_agent"]["h"]
                assert [(r["server"], r["tools"], r["ready"]) for r in rows] == [
                    ("calc", 2, True),
                    ("weather", 1, True),
                ]
                assert all(r["connected_since"].endswith("+00:00") for r in rows)
            nursery.cancel_scope.cancel()


async def test_a_scoped_token_fixes_the_server_id() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            token = scoped_token(KEY, "s", TokenRole.TOOL, server_id="calc")
            url = f"{relay.base}/mcp_endpoint/mcp/?token={token}"
            async with peer(url + "&server_id=other") as refused:
                try:
                    await refused.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason.code == 1008
                    assert exc.reason.reason == "this token is for another server_id"
                else:
                    raise AssertionError("a token bound to calc served as other")
            async with peer(url) as tool:
                await initialize_tool(tool, name="not-calc", tools=["add"])
                rows = (await health(relay))["servers_by_agent"]["s"]
                assert [r["server"] for r in rows] == ["calc"]
            nursery.cancel_scope.cancel()


async def test_filters_from_the_config_hide_tools() -> None:
    filters = {"*": AgentFilters(ToolFilter(deny=("secret_*",)))}
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, tool_filters=filters)
            async with (
                peer(relay.tool_url("f")) as tool,
                peer(relay.caller_url("f")) as caller,
            ):
                await initialize_tool(tool, tools=["open", "secret_door"])
                await send(caller, request(1, "tools/list"))
                assert [t["name"] for t in (await recv(caller))["result"]["tools"]] == ["open"]
                await send(caller, request(2, "tools/call", {"name": "secret_door"}))
                assert (await recv(caller))["error"]["code"] == -32602
            nursery.cancel_scope.cancel()


async def test_a_server_that_never_answers_initialize_is_closed_4003(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNet(KEY)
    config = RelayConfig(host="memory", port=0, key=KEY, init_timeout=5.0, ping_interval=0)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_relay, config, listeners=[net.listener]))
            async with (
                net.websocket("tool", "mute") as mute,
                net.websocket("caller", "mute") as caller,
            ):
                init = json.loads(await mute.get_message())
                assert init["method"] == "initialize"
                started = trio.current_time()
                await send(caller, request(1, "tools/list"))
                try:
                    await mute.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason.code == 4003
                    assert "initialize" in (exc.reason.reason or "")
                assert trio.current_time() - started == 5.0
                # The caller's request waited for it, and is answered now: no server left.
                assert (await recv(caller))["error"]["code"] == -32001
            nursery.cancel_scope.cancel()
