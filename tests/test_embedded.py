"""Embedded tools: a tool served in-process for an agent, with no socket hop."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from tests.helpers import (
    CUSTOM,
    peer,
    recv,
    send,
    start_relay,
    tool_peer,
    tool_spec,
    wait_for_counts,
)
from trio_mcp_relay._transport import ConnectionClosed, WebSocket, memory_websocket_pair

#: The embedded tool's serverInfo name: its identity among the agent's servers.
EMBEDDED = "kitchen-echo"


async def echo_tool(ws: WebSocket) -> None:
    """An MCP server with one tool, ``echo``: answers the relay's initialize and tools/list,
    and every other request with its method and params; ends when the connection closes."""
    try:
        while True:
            frame = json.loads(await ws.receive())
            if "id" in frame and "method" in frame:
                result: dict[str, Any]
                if frame["method"] == "initialize":
                    result = {
                        "protocolVersion": frame["params"]["protocolVersion"],
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": EMBEDDED, "version": "1"},
                    }
                elif frame["method"] == "tools/list":
                    result = {"tools": [tool_spec("echo")]}
                else:
                    result = {
                        "embedded": True,
                        "method": frame["method"],
                        "params": frame.get("params"),
                    }
                await ws.send_many(
                    [json.dumps({"jsonrpc": "2.0", "id": frame["id"], "result": result}).encode()]
                )
    except ConnectionClosed:
        return


async def test_embedded_tool_answers_callers_without_a_socket(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        relay = await start_relay(nursery, embedded_tools={"kitchen": echo_tool})
        await wait_for_counts(relay, tools=1, callers=0)
        async with peer(relay.caller_url("kitchen")) as caller:
            call = {"name": "echo", "arguments": {"x": 1}}
            await send(caller, {"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": call})
            answer = await recv(caller)
            # The relay initialized it like any tool: its tool is in the catalog.
            await send(caller, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            listed = await recv(caller)
        assert answer == {
            "jsonrpc": "2.0",
            "id": 0,
            "result": {"embedded": True, "method": "tools/call", "params": call},
        }
        assert listed["result"]["tools"] == [tool_spec("echo")]


async def test_network_tool_replaces_embedded_one_which_comes_back_after(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trio_mcp_relay.server.lifecycle.EMBEDDED_RESTART_DELAY", 0.05)
    with trio.fail_after(10):
        relay = await start_relay(nursery, embedded_tools={"kitchen": echo_tool})
        await wait_for_counts(relay, tools=1, callers=0)
        async with peer(relay.caller_url("kitchen")) as caller:
            # Same identity as the embedded server: it replaces it.
            async with tool_peer(relay.tool_url("kitchen"), name=EMBEDDED) as tool:
                await wait_for_counts(relay, tools=1, callers=1)
                await send(caller, {"jsonrpc": "2.0", "id": 1, "method": CUSTOM})
                forwarded = await recv(tool)  # the network tool got it, not the embedded one
                await send(tool, {"jsonrpc": "2.0", "id": forwarded["id"], "result": {"net": 1}})
                assert (await recv(caller))["result"] == {"net": 1}
            # The network tool left: the embedded one is connected again.
            while True:
                await send(caller, {"jsonrpc": "2.0", "id": 2, "method": CUSTOM})
                answer = await recv(caller)
                if "result" in answer:
                    break
                assert answer["error"]["code"] in (-32001, -32003)
                await trio.sleep(0.02)
            assert answer["result"]["embedded"] is True


async def test_memory_pair_delivers_text_and_close_codes() -> None:
    with trio.fail_after(5):
        a, b = memory_websocket_pair()
        await a.send_many([b'{"x":1}', "plain"])
        await a.send_binary(b"\x00\x01")
        assert await b.receive() == '{"x":1}'
        assert await b.receive() == "plain"
        assert await b.receive() == b"\x00\x01"
        await b.ping()
        assert b.last_pong is not None
        await a.close(4001, "replaced")
        with pytest.raises(ConnectionClosed) as closed:
            await b.receive()
        assert (closed.value.code, closed.value.reason) == (4001, "replaced")
        with pytest.raises(ConnectionClosed):
            await a.receive()  # the close was echoed back
        with pytest.raises(ConnectionClosed):
            await b.send_many([b"{}"])


async def test_memory_pair_abrupt_close_is_1006() -> None:
    with trio.fail_after(5):
        a, b = memory_websocket_pair()
        await a.aclose()
        with pytest.raises(ConnectionClosed) as closed:
            await b.receive()
        assert closed.value.code == 1006


async def test_a_failing_embedded_connection_does_not_take_the_relay_down(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug that raises while routing the embedded tool's frames ends that connection only."""
    from trio_mcp_relay._routing import Router

    original = Router.received

    def broken(self: Router, conn: int, data: str | bytes, now: float) -> list[object]:
        if b"boom" in (data.encode() if isinstance(data, str) else data):
            raise RuntimeError("routing bug")
        return original(self, conn, data, now)  # type: ignore[return-value]

    async def noisy_tool(ws: WebSocket) -> None:
        await ws.send_many([b'{"jsonrpc":"2.0","method":"notifications/message","params":"boom"}'])
        await echo_tool(ws)

    monkeypatch.setattr(Router, "received", broken)
    monkeypatch.setattr("trio_mcp_relay.server.lifecycle.EMBEDDED_RESTART_DELAY", 60)
    with trio.fail_after(10):
        relay = await start_relay(nursery, embedded_tools={"noisy": noisy_tool})
        async with (
            tool_peer(relay.tool_url("other")) as tool,
            peer(relay.caller_url("other")) as caller,
        ):
            await wait_for_counts(
                relay, tools=1, callers=1
            )  # the noisy one is gone, the relay is up
            await send(caller, {"jsonrpc": "2.0", "id": 1, "method": CUSTOM})
            forwarded = await recv(tool)
            await send(tool, {"jsonrpc": "2.0", "id": forwarded["id"], "result": {}})
            assert (await recv(caller))["id"] == 1
    assert "embedded tool connection failed" in caplog.text


async def test_a_network_server_of_another_identity_joins_the_embedded_one(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        relay = await start_relay(nursery, embedded_tools={"kitchen": echo_tool})
        await wait_for_counts(relay, tools=1, callers=0)
        async with (
            tool_peer(relay.tool_url("kitchen"), name="weather", tools=["forecast"]),
            peer(relay.caller_url("kitchen")) as caller,
        ):
            await wait_for_counts(relay, tools=2, callers=1)
            await send(caller, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            names = [t["name"] for t in (await recv(caller))["result"]["tools"]]
            assert sorted(names) == ["echo", "forecast"]


async def test_an_embedded_tool_that_crashes_comes_back_beside_other_servers(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trio_mcp_relay.server.lifecycle.EMBEDDED_RESTART_DELAY", 0.05)
    runs: list[int] = []

    async def crashes_once(ws: WebSocket) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("embedded tool bug")
        await echo_tool(ws)

    with trio.fail_after(10):
        relay = await start_relay(nursery, embedded_tools={"kitchen": crashes_once})
        async with tool_peer(relay.tool_url("kitchen"), name="weather", tools=["forecast"]):
            while len(runs) < 2:  # noqa: ASYNC110 (the restart delay is real time)
                await trio.sleep(0.02)
            await wait_for_counts(relay, tools=2, callers=0)
