"""Cluster mode end to end: two or three relay nodes in one test, a real redis-server, real
sockets on port 0.

An agent's tool and callers on different nodes: listing (from Redis, no frame to the tool's
node), calls with progress, tool-to-caller requests, cancellation, list_changed; a server
moving between nodes; Redis stopped and started again mid-traffic; the cluster-wide caller
limit. Killing and draining node processes is in ``test_cluster_faults.py``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import coredis
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.helpers import (
    KEY,
    RunningRelay,
    http_get,
    initialize_tool,
    peer,
    recv,
    request,
    send,
    start_relay,
)
from tests.redis import RedisServer
from tests.test_metrics import scrape, value

GUARD = 30
LEASE = 2.0
AGENT = "cluster-agent"
INIT = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "t", "version": "1"},
}


async def start_node(
    nursery: trio.Nursery, redis: RedisServer, name: str, **overrides: Any
) -> RunningRelay:
    return await start_relay(
        nursery, cluster=redis.url, cluster_lease=LEASE, cluster_node=name, **overrides
    )


async def two_nodes(nursery: trio.Nursery, redis: RedisServer) -> tuple[RunningRelay, RunningRelay]:
    """Nodes A and B of one cluster, in this process."""
    return await start_node(nursery, redis, "A"), await start_node(nursery, redis, "B")


async def connections(relay: RunningRelay) -> dict[str, Any]:
    response = await http_get(relay.port, f"/mcp_endpoint/health?key={KEY}")
    return response.json()["result"]["connections"]  # type: ignore[no-any-return]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 10) -> float:
    """Poll ``check`` until it holds; how long that took."""
    start = trio.current_time()
    with trio.fail_after(within):
        while not await check():  # noqa: ASYNC110 (a state of other processes, polled)
            await trio.sleep(0.02)
    return trio.current_time() - start


async def knows_servers(relay: RunningRelay, count: int) -> None:
    async def check() -> bool:
        cluster = (await connections(relay))["cluster"]
        return bool(cluster["bus"] == "up" and cluster["servers_elsewhere"] == count)

    await eventually(check, f"{count} servers known elsewhere")


async def answer_of(ws: WebSocketConnection, rid: Any) -> dict[str, Any]:
    """Read until the response to ``rid`` (other messages are skipped)."""
    while True:
        message = await recv(ws)
        if message.get("id") == rid and "method" not in message:
            return message  # type: ignore[no-any-return]


async def initialized_caller(ws: WebSocketConnection) -> dict[str, Any]:
    await send(ws, request(0, "initialize", INIT))
    return await answer_of(ws, 0)


@contextlib.asynccontextmanager
async def bus_spy(redis: RedisServer, node: str) -> AsyncIterator[list[bytes]]:
    """Every frame published to ``node``'s bus channel while the block runs."""
    seen: list[bytes] = []
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis.url, decode_responses=False)
    async with client, trio.open_nursery() as nursery:
        subscribed = trio.Event()

        async def listen() -> None:
            async with client.pubsub(channels=[f"trio-mcp-relay:bus:{node}".encode()]) as ps:
                async for message in ps:
                    if message["type"] == "subscribe":
                        subscribed.set()
                    elif message["type"] == "message":
                        seen.append(message["data"])  # type: ignore[arg-type]

        nursery.start_soon(listen)
        await subscribed.wait()
        yield seen
        await trio.sleep(0.2)  # what was on its way arrives
        nursery.cancel_scope.cancel()


async def tool_answers(tool: WebSocketConnection, handle: Callable[[dict[str, Any]], Any]) -> None:
    """Answer each request the relay forwards to ``tool`` with ``handle(frame)`` (a result)."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            frame = json.loads(await tool.get_message())
            if "id" in frame and "method" in frame:
                await send(tool, {"jsonrpc": "2.0", "id": frame["id"], "result": handle(frame)})


async def test_a_caller_on_one_node_lists_and_calls_a_tool_on_another_with_progress(
    redis: RedisServer,
) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            a, b = await two_nodes(nursery, redis)
            async with peer(a.tool_url(AGENT)) as tool:
                await initialize_tool(tool, name="calc", tools=["add", "mul"])
                await knows_servers(b, 1)
                node_a = (await connections(a))["cluster"]["node"]
                assert node_a.startswith("A~")  # the name, and this process's own suffix
                async with bus_spy(redis, node_a) as to_a, peer(b.caller_url(AGENT)) as caller:
                    init = await initialized_caller(caller)
                    assert init["result"]["serverInfo"]["name"] == "calc"
                    await send(caller, request(1, "tools/list", {}))
                    listed = await answer_of(caller, 1)
                    assert [t["name"] for t in listed["result"]["tools"]] == ["add", "mul"]
                    await trio.sleep(0.3)
                    assert to_a == [], "initialize and tools/list must not reach node A"
                    # A call with progress, answered with the caller's own (huge) id.
                    huge = 2**70
                    params = {"name": "add", "arguments": {"a": 1}, "_meta": {"progressToken": "p"}}
                    await send(caller, request(huge, "tools/call", params))
                    frame = json.loads(await tool.get_message())
                    assert frame["method"] == "tools/call"
                    assert frame["params"]["name"] == "add"
                    token = frame["params"]["_meta"]["progressToken"]
                    for step in (1, 2):
                        progress = {"progressToken": token, "progress": step, "total": 2}
                        await send(
                            tool,
                            {
                                "jsonrpc": "2.0",
                                "method": "notifications/progress",
                                "params": progress,
                            },
                        )
                    await send(
                        tool,
                        {
                            "jsonrpc": "2.0",
                            "id": frame["id"],
                            "result": {"content": [], "isError": False},
                        },
                    )
                    got = [await recv(caller) for _ in range(3)]
                    assert [g.get("params", {}).get("progress") for g in got[:2]] == [1, 2]
                    assert all(g["params"]["progressToken"] == "p" for g in got[:2])
                    assert got[2] == {
                        "jsonrpc": "2.0",
                        "id": huge,
                        "result": {"content": [], "isError": False},
                    }
                    assert len(to_a) == 1  # the call, and nothing else
                    metrics = await scrape(b)
                    assert value(metrics, "cluster_bus_up") == 1
                    assert value(metrics, "cluster_nodes") == 2
                    assert value(metrics, "cluster_tunnels", direction="to_servers") == 1
                    assert value(metrics, "cluster_bus_frames_total", direction="sent") == 1
                    assert value(metrics, "cluster_bus_frames_total", direction="received") == 3
                counts = await connections(b)
                assert counts["tool_connections"] == 1  # the cluster's: the tool is on A
                nodes = counts["cluster"]["nodes"]
                assert nodes[node_a]["name"] == "A" and nodes[node_a]["tool_connections"] == 1
            nursery.cancel_scope.cancel()


async def test_tool_requests_cancellation_and_list_changed_cross_nodes(redis: RedisServer) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            a, b = await two_nodes(nursery, redis)
            async with peer(a.tool_url(AGENT)) as tool:
                await initialize_tool(tool, name="calc", tools=["slow"])
                await knows_servers(b, 1)
                async with peer(b.caller_url(AGENT)) as caller:
                    caps = {**INIT, "capabilities": {"sampling": {}}}
                    await send(caller, request(0, "initialize", caps))
                    await answer_of(caller, 0)
                    # A call in flight; the tool asks the caller to sample.
                    await send(
                        caller, request("c1", "tools/call", {"name": "slow", "arguments": {}})
                    )
                    call = json.loads(await tool.get_message())
                    await send(tool, request("s1", "sampling/createMessage", {"messages": []}))
                    asked = await recv(caller)
                    assert asked["method"] == "sampling/createMessage"
                    await send(
                        caller,
                        {"jsonrpc": "2.0", "id": asked["id"], "result": {"role": "assistant"}},
                    )
                    assert json.loads(await tool.get_message()) == {
                        "jsonrpc": "2.0",
                        "id": "s1",
                        "result": {"role": "assistant"},
                    }
                    # The caller cancels: the tool hears it with the id it saw.
                    cancel = {"requestId": "c1", "reason": "user"}
                    await send(
                        caller,
                        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel},
                    )
                    cancelled = json.loads(await tool.get_message())
                    assert cancelled["method"] == "notifications/cancelled"
                    assert cancelled["params"]["requestId"] == call["id"]
                    # The tool's list changes: the caller on B is told, and sees the new list.
                    await send(
                        tool, {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
                    )
                    relist = json.loads(await tool.get_message())
                    assert relist["method"] == "tools/list"
                    tools = [
                        {"name": n, "inputSchema": {"type": "object"}} for n in ("slow", "fast")
                    ]
                    await send(
                        tool, {"jsonrpc": "2.0", "id": relist["id"], "result": {"tools": tools}}
                    )
                    changed = await recv(caller)
                    assert changed == {
                        "jsonrpc": "2.0",
                        "method": "notifications/tools/list_changed",
                    }
                    await send(caller, request(5, "tools/list", {}))
                    listed = await answer_of(caller, 5)
                    assert [t["name"] for t in listed["result"]["tools"]] == ["slow", "fast"]
                    # A notification of the tool reaches the caller once.
                    log = {"level": "info", "data": "hello"}
                    await send(
                        tool, {"jsonrpc": "2.0", "method": "notifications/message", "params": log}
                    )
                    assert (await recv(caller))["params"] == log
            nursery.cancel_scope.cancel()


async def test_a_caller_leaving_cancels_its_requests_at_a_tool_on_another_node(
    redis: RedisServer,
) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            a, b = await two_nodes(nursery, redis)
            async with peer(a.tool_url(AGENT)) as tool:
                await initialize_tool(tool, name="calc", tools=["slow"])
                await knows_servers(b, 1)
                async with peer(b.caller_url(AGENT)) as caller:
                    await initialized_caller(caller)
                    await send(caller, request(1, "tools/call", {"name": "slow", "arguments": {}}))
                    call = json.loads(await tool.get_message())
                cancelled = json.loads(await tool.get_message())
                assert cancelled["method"] == "notifications/cancelled"
                assert cancelled["params"]["requestId"] == call["id"]

                async def tunnel_closed() -> bool:
                    return (await connections(a))["cluster"]["tunnels"]["from_callers"] == 0

                await eventually(tunnel_closed, "the tunnel on A is closed")
            nursery.cancel_scope.cancel()


async def test_a_server_connecting_on_another_node_replaces_the_older_connection(
    redis: RedisServer,
) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            a, b = await two_nodes(nursery, redis)
            async with peer(a.tool_url(AGENT)) as old, peer(a.caller_url(AGENT)) as caller:
                await initialize_tool(old, name="calc", tools=["add"])
                await initialized_caller(caller)
                async with peer(b.tool_url(AGENT)) as new:
                    await initialize_tool(new, name="calc", tools=["add"])
                    with trio.fail_after(5):
                        try:
                            while True:
                                await old.get_message()
                        except ConnectionClosed as exc:
                            assert exc.reason.code == 4001, exc.reason
                            assert "on node B" in (exc.reason.reason or ""), exc.reason
                    # The caller on A now reaches the server on B.
                    nursery.start_soon(tool_answers, new, lambda f: {"content": [], "node": "B"})

                    async def routed_to_b() -> bool:
                        await send(
                            caller, request("r", "tools/call", {"name": "add", "arguments": {}})
                        )
                        answer = await answer_of(caller, "r")
                        return answer.get("result", {}).get("node") == "B"

                    await eventually(routed_to_b, "the call reaches B")
            nursery.cancel_scope.cancel()


async def test_redis_stopped_keeps_local_traffic_and_fails_cross_node_requests_then_recovers(
    redis: RedisServer,
) -> None:
    with trio.fail_after(GUARD + 20):
        async with trio.open_nursery() as nursery:
            a, b = await two_nodes(nursery, redis)
            async with (
                peer(a.tool_url(AGENT)) as tool,
                peer(a.caller_url(AGENT)) as local,
            ):
                await initialize_tool(tool, name="calc", tools=["add"])
                nursery.start_soon(tool_answers, tool, lambda f: {"content": []})
                await knows_servers(b, 1)
                async with peer(b.caller_url(AGENT)) as remote:
                    await initialized_caller(local)
                    await initialized_caller(remote)
                    await send(remote, request(1, "tools/call", {"name": "add", "arguments": {}}))
                    assert "result" in await answer_of(remote, 1)
                    redis.stop()
                    started = trio.current_time()
                    failed: dict[str, Any] = {}
                    rid = 1
                    # Local traffic never stops, cross-node requests get -32002 naming Redis.
                    while trio.current_time() - started < 4:
                        rid += 1
                        await send(
                            local, request(rid, "tools/call", {"name": "add", "arguments": {}})
                        )
                        with trio.fail_after(1):
                            assert "result" in await answer_of(local, rid)
                        await send(
                            remote, request(rid, "tools/call", {"name": "add", "arguments": {}})
                        )
                        with trio.fail_after(LEASE + 3):
                            answer = await answer_of(remote, rid)
                        if "error" in answer:
                            failed = answer["error"]
                        await trio.sleep(0.05)
                    assert failed["code"] == -32002, failed
                    assert "Redis" in failed["data"], failed
                    redis.start()
                    back = trio.current_time()

                    last: list[Any] = []

                    async def cross_node_works() -> bool:
                        nonlocal rid
                        rid += 1
                        await send(
                            remote, request(rid, "tools/call", {"name": "add", "arguments": {}})
                        )
                        last[:] = [await answer_of(remote, rid)]
                        return "result" in last[0]

                    try:
                        await eventually(cross_node_works, "cross-node calls resume", within=5)
                    except trio.TooSlowError:
                        raise AssertionError(f"cross-node calls did not resume: {last}") from None
                    assert trio.current_time() - back < 5
            nursery.cancel_scope.cancel()


async def test_a_node_started_while_redis_is_down_serves_locally_and_joins_later(
    redis: RedisServer,
) -> None:
    with trio.fail_after(GUARD):
        redis.stop()
        async with trio.open_nursery() as nursery:
            a = await start_node(nursery, redis, "A")
            async with peer(a.tool_url(AGENT)) as tool, peer(a.caller_url(AGENT)) as caller:
                await initialize_tool(tool, name="calc", tools=["add"])
                nursery.start_soon(tool_answers, tool, lambda f: {"content": []})
                await initialized_caller(caller)
                await send(caller, request(1, "tools/call", {"name": "add", "arguments": {}}))
                assert "result" in await answer_of(caller, 1)
                cluster = (await connections(a))["cluster"]
                assert cluster["bus"] == "down" and "Redis" in cluster["down_reason"]
                redis.start()
                b = await start_node(nursery, redis, "B")
                await knows_servers(b, 1)
            nursery.cancel_scope.cancel()


async def test_the_callers_per_agent_limit_holds_for_the_cluster(redis: RedisServer) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            a = await start_node(nursery, redis, "A", max_callers_per_agent=2)
            b = await start_node(nursery, redis, "B", max_callers_per_agent=2)
            async with peer(a.caller_url(AGENT)) as one, peer(a.caller_url(AGENT)) as two:

                async def b_counts_them() -> bool:
                    counts = await connections(b)
                    return bool(counts["robot_connections_by_agent"].get(AGENT) == 2)

                await eventually(b_counts_them, "B counts A's callers")
                async with peer(b.caller_url(AGENT)) as third:
                    with trio.fail_after(5):
                        try:
                            await third.get_message()
                            raise AssertionError("a third caller was served")
                        except ConnectionClosed as exc:
                            assert exc.reason.code == 4002
                del one, two
            nursery.cancel_scope.cancel()


async def test_each_node_serves_its_own_embedded_tools_and_a_restart_is_a_new_node(
    redis: RedisServer,
) -> None:
    """``serve --tools`` runs on every node: each node's callers use its own copy (never
    claimed, so the copies do not replace each other); two processes of one name are two
    nodes (nothing meant for one reaches the other)."""
    from tests.test_embedded import echo_tool

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            a = await start_node(nursery, redis, "A", embedded_tools={AGENT: echo_tool})
            b = await start_node(nursery, redis, "B", embedded_tools={AGENT: echo_tool})
            again = await start_node(nursery, redis, "A")
            ids = [(await connections(r))["cluster"] for r in (a, again)]
            assert [c["name"] for c in ids] == ["A", "A"] and ids[0]["node"] != ids[1]["node"]
            await trio.sleep(2 * LEASE)  # heartbeats and full reads have run meanwhile
            for relay in (a, b):
                cluster = (await connections(relay))["cluster"]
                assert cluster["servers_elsewhere"] == 0
                async with peer(relay.caller_url(AGENT)) as caller:
                    await initialized_caller(caller)
                    await send(caller, request(1, "tools/call", {"name": "echo"}))
                    assert (await answer_of(caller, 1))["result"]["embedded"] is True
                assert (await connections(relay))["cluster"]["tunnels"]["to_servers"] == 0
            nursery.cancel_scope.cancel()


async def test_the_tool_requests_limit_holds_for_the_cluster(redis: RedisServer) -> None:
    """``max_tool_requests`` (requests of an agent's servers awaiting a caller) counts those
    awaiting on every node: one waits on A, so a second, on B, is refused -32007."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            a = await start_node(nursery, redis, "A", max_tool_requests=1)
            b = await start_node(nursery, redis, "B", max_tool_requests=1)
            sampling = {**INIT, "capabilities": {"sampling": {}}}
            async with (
                peer(a.tool_url(AGENT) + "&server_id=one") as one,
                peer(b.tool_url(AGENT) + "&server_id=two") as two,
                peer(a.caller_url(AGENT)) as on_a,
                peer(b.caller_url(AGENT)) as on_b,
            ):
                await initialize_tool(one, name="one", tools=["one_wait"])
                await initialize_tool(two, name="two", tools=["two_wait"])
                await knows_servers(a, 1)
                await knows_servers(b, 1)
                for caller in (on_a, on_b):
                    await send(caller, request(0, "initialize", sampling))
                    await answer_of(caller, 0)
                await send(on_a, request("a", "tools/call", {"name": "one_wait"}))
                await one.get_message()
                await send(one, request("s1", "sampling/createMessage", {"messages": []}))
                assert (await recv(on_a))["method"] == "sampling/createMessage"  # unanswered

                await trio.sleep(2 * LEASE / 3)  # A's next heartbeats carry its count
                await send(on_b, request("b", "tools/call", {"name": "two_wait"}))
                await two.get_message()
                await send(two, request("s2", "sampling/createMessage", {"messages": []}))
                refused = json.loads(await two.get_message())
                assert refused["id"] == "s2" and refused["error"]["code"] == -32007, refused
            nursery.cancel_scope.cancel()
