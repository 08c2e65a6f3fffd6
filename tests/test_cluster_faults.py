"""Cluster nodes as real processes behind nginx (``hash $arg_route consistent``), killed and
drained mid-request, with a real redis-server and real clients: our ``pipe`` bridging an
official-SDK stdio server, xiaozhi-server's caller code and the official SDK's client.

Skipped without nginx (``test_nginx.py`` does the same).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from trio_websocket import WebSocketConnection

from tests.helpers import KEY, http_get, initialize_tool, peer, recv, request, send
from tests.redis import RedisServer, free_port
from tests.test_cluster import INIT
from tests.test_http_clients import exercise
from tests.test_real_clients import CALLER, child_env, expect_ready, spawn, write_config
from trio_mcp_relay._auth import caller_url, tool_url, with_route

README = (Path(__file__).parent.parent / "README.md").read_text()
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = [
    # Under CI (.ci/run installs nginx) a missing nginx fails the tests instead.
    pytest.mark.skipif(NGINX is None and not os.environ.get("CI"), reason="nginx is not installed"),
    # The SDK's HTTP client leaves its SSE iterators to the garbage collector (as in
    # test_http_clients.py): a ResourceWarning of the client, not of the relay.
    pytest.mark.filterwarnings("ignore:Async generator 'httpx2.:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore2.:ResourceWarning"),
]

LEASE = 2.0
AGENT = "faults-agent"
#: The SDK server takes about 1.5 s to start; a loaded machine gets room.
INIT_TIMEOUT = "30"


class Node:
    """``trio-mcp-relay serve --cluster`` in a process of its own."""

    def __init__(self, name: str, redis: RedisServer, directory: Path, lease: float) -> None:
        self.name = name
        self.port = 0  # the node binds port 0; :meth:`started` reads the port from its log
        self.log = directory / f"node-{name}.log"
        self.command = [
            *[sys.executable, "-m", "trio_mcp_relay", "serve", "--host", "127.0.0.1"],
            *["--port", "0", "--key", KEY, "--data-dir", str(directory / name)],
            *["--cluster", redis.url, "--cluster-lease", str(lease), "--cluster-node", name],
            *["--init-timeout", INIT_TIMEOUT, "--shutdown-grace", "10"],
        ]
        self.process: trio.Process | None = None

    def tool_url(self, agent: str = AGENT) -> str:
        return tool_url(f"ws://127.0.0.1:{self.port}", KEY, agent)

    def caller_url(self, agent: str = AGENT) -> str:
        return caller_url(f"ws://127.0.0.1:{self.port}", KEY, agent)

    async def health(self) -> dict[str, Any]:
        response = await http_get(self.port, f"/mcp_endpoint/health?key={KEY}")
        return response.json()["result"]["connections"]  # type: ignore[no-any-return]

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    async def started(self) -> None:
        """Wait until the node listens (its port, from its log) and its bus is up."""
        assert self.process is not None
        while not self.port:
            if found := re.search(r"listening on 127\.0\.0\.1:(\d+)", self.stderr()):
                self.port = int(found.group(1))
            else:
                assert self.process.returncode is None, f"node {self.name}: {self.stderr()}"
                await trio.sleep(0.05)
        while True:
            with trio.move_on_after(2):  # one slow answer is retried, not waited on for ever
                if (await self.health())["cluster"]["bus"] == "up":
                    return
            await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def nodes(
    nursery: trio.Nursery, redis: RedisServer, tmp_path: Path, names: list[str], lease: float
) -> AsyncIterator[dict[str, Node]]:
    started: dict[str, Node] = {}
    try:
        for name in names:
            node = Node(name, redis, tmp_path, lease)
            with node.log.open("wb") as err:
                node.process = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        node.command,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                        check=False,
                    )
                )
            started[name] = node
        for node in started.values():
            try:
                with trio.fail_after(30):
                    await node.started()
            except trio.TooSlowError:
                raise AssertionError(f"node {node.name} did not start: {node.stderr()}") from None
        yield started
    finally:
        for node in started.values():
            if node.process is not None and node.process.returncode is None:
                node.process.kill()


@contextlib.asynccontextmanager
async def nginx(nursery: trio.Nursery, tmp_path: Path, ports: list[int]) -> AsyncIterator[int]:
    """nginx in front of the nodes with the README's cluster configuration (its addresses
    replaced by the nodes', TLS left out); yields its port."""
    assert NGINX is not None
    listen = free_port()
    match = re.search(r"```nginx-cluster\n(.*?)```", README, re.S)
    assert match, "README lost its cluster nginx configuration"
    config = match.group(1)
    servers = re.findall(r"^\s*server 10\.0\.0\.\d+:8004 .*$", config, re.M)
    assert len(servers) == 2, config
    config = config.replace(servers[1] + "\n", "")
    config = config.replace(
        servers[0],
        "\n".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in ports),
    )
    config = config.replace("listen 443 ssl;", f"listen 127.0.0.1:{listen};")
    assert "hash $arg_route consistent;" in config
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{\n access_log {tmp_path}/access.log;\n"
        f" client_body_temp_path {tmp_path}/body;\n proxy_temp_path {tmp_path}/proxy;\n"
        f"{config}}}\n"
    )
    command = [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    process = await nursery.start(
        functools.partial(trio.run_process, command, check=False, stderr=subprocess.DEVNULL)
    )
    try:
        with trio.fail_after(10):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", listen)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        yield listen
    finally:
        process.kill()


async def answer_of(ws: WebSocketConnection, rid: Any, seen: list[Any] | None = None) -> Any:
    while True:
        message = await recv(ws)
        if message.get("id") == rid and "method" not in message:
            return message
        if seen is not None:
            seen.append(message)


async def server_node(all_nodes: dict[str, Node]) -> Node:
    """The node the tool bridge landed on (through nginx's hash)."""
    with trio.fail_after(60):
        while True:
            for node in all_nodes.values():
                servers = (await node.health())["servers_by_agent"].get(AGENT, [])
                if any(s["ready"] for s in servers):
                    return node
            await trio.sleep(0.05)


async def tools_of(ws: WebSocketConnection, rid: Any) -> list[str]:
    await send(ws, request(rid, "tools/list", {}))
    answer = await answer_of(ws, rid)
    if "result" not in answer:
        return []  # -32001: no server known yet
    return [t["name"] for t in answer["result"]["tools"]]


def bridge(tmp_path: Path, url: str) -> list[str]:
    config = write_config(tmp_path / "mcp_config.json", ["alpha"])
    return [
        *[sys.executable, "-m", "trio_mcp_relay", "pipe", "--config", str(config)],
        *["--endpoint", url, "--backoff-initial", "0.2", "--backoff-max", "0.5"],
    ]


async def test_a_killed_node_answers_its_requests_minus_32003_and_its_tool_comes_back_elsewhere(
    nursery: trio.Nursery, redis: RedisServer, tmp_path: Path
) -> None:
    """A tool bridge (through nginx) and a raw tool on node A, a caller on B with a request in
    flight to each; A is killed. The raw tool never comes back: its request is answered
    ``-32003`` when A's lease lapses, and its tools leave the catalog (``list_changed``). The
    bridge reconnects through nginx to B: its tool works again."""
    with trio.fail_after(120):
        async with (
            nodes(nursery, redis, tmp_path, ["A", "B"], LEASE) as cluster,
            nginx(nursery, tmp_path, [n.port for n in cluster.values()]) as lb,
        ):
            url = with_route(tool_url(f"ws://127.0.0.1:{lb}", KEY, AGENT), AGENT)
            log = tmp_path / "pipe.log"
            async with spawn(bridge(tmp_path, url), child_env(), log, cwd=tmp_path):
                doomed = await server_node(cluster)
                survivor = next(n for n in cluster.values() if n is not doomed)
                async with peer(doomed.tool_url()) as raw, peer(survivor.caller_url()) as caller:
                    await initialize_tool(raw, name="raw", tools=["raw_stuck"])
                    with trio.fail_after(10):
                        while (await survivor.health())["cluster"]["servers_elsewhere"] != 2:  # noqa: ASYNC110
                            await trio.sleep(0.05)
                    await send(caller, request(0, "initialize", INIT))
                    await answer_of(caller, 0)
                    assert {"alpha_wait_for", "raw_stuck"} <= set(await tools_of(caller, 1))
                    path = tmp_path / "never"
                    args = {"name": "alpha_wait_for", "arguments": {"path": str(path)}}
                    await send(caller, request("bridged", "tools/call", args))
                    await send(caller, request("raw", "tools/call", {"name": "raw_stuck"}))
                    with trio.fail_after(20):
                        while not Path(f"{path}.started").exists():  # noqa: ASYNC110, ASYNC240
                            await trio.sleep(0.02)
                    assert (await raw.get_message()).find("raw_stuck") > 0
                    assert doomed.process is not None
                    doomed.process.send_signal(signal.SIGKILL)
                    killed = trio.current_time()
                    seen: list[Any] = []
                    answers = {}
                    while len(answers) < 2:
                        message = await recv(caller)
                        if message.get("id") in ("bridged", "raw"):
                            answers[message["id"]] = (message, trio.current_time() - killed)
                        else:
                            seen.append(message)
                    for rid, (answer, waited) in answers.items():
                        assert answer["error"]["code"] == -32003, answer
                        assert waited <= LEASE + 1, f"{rid}: answered {waited:.2f} s after the kill"
                    # The bridge reconnects through nginx to the survivor; its tool works.
                    with trio.fail_after(LEASE + 5):
                        rid = 10
                        while True:
                            rid += 1
                            add = {"name": "alpha_add", "arguments": {"a": 2, "b": 3}}
                            await send(caller, request(rid, "tools/call", add))
                            result = await answer_of(caller, rid, seen)
                            if "result" in result:
                                break
                            await trio.sleep(0.1)
                    resumed = trio.current_time() - killed
                    assert result["result"]["content"][0]["text"] == "5"
                    assert resumed <= LEASE + 5, f"traffic resumed {resumed:.2f} s after the kill"
                    # The raw tool's tools left the catalog: callers were told.
                    with trio.fail_after(2):  # within the relay's coalescing delay
                        while not any(
                            m.get("method") == "notifications/tools/list_changed" for m in seen
                        ):
                            seen.append(await recv(caller))
                    assert "raw_stuck" not in await tools_of(caller, 2)
            assert "Traceback" not in survivor.stderr(), survivor.stderr()


async def test_a_drained_node_finishes_its_requests_and_releases_its_leases_at_once(
    nursery: trio.Nursery, redis: RedisServer, tmp_path: Path
) -> None:
    lease = 10.0  # long: the release must not wait for it
    with trio.fail_after(120):
        async with nodes(nursery, redis, tmp_path, ["A", "B"], lease) as cluster:
            a, b = cluster["A"], cluster["B"]
            log = tmp_path / "pipe.log"
            async with spawn(bridge(tmp_path, a.tool_url()), child_env(), log, cwd=tmp_path):
                await server_node({"A": a})
                async with peer(b.caller_url()) as caller:
                    await send(caller, request(0, "initialize", INIT))
                    await answer_of(caller, 0)
                    with trio.fail_after(10):
                        while "alpha_wait_for" not in await tools_of(caller, 1):  # noqa: ASYNC110
                            await trio.sleep(0.05)
                    path = tmp_path / "release"
                    args = {"name": "alpha_wait_for", "arguments": {"path": str(path)}}
                    await send(caller, request("inflight", "tools/call", args))
                    with trio.fail_after(20):
                        while not Path(f"{path}.started").exists():  # noqa: ASYNC110, ASYNC240
                            await trio.sleep(0.02)
                    assert a.process is not None
                    a.process.send_signal(signal.SIGTERM)
                    await trio.sleep(0.5)
                    path.write_text("finished during the drain")
                    answer = await answer_of(caller, "inflight")
                    assert "result" in answer, (answer, a.stderr()[-3000:], b.stderr()[-2000:])
                    assert answer["result"]["content"][0]["text"] == "finished during the drain"
                    drained = trio.current_time()
                    # The server leaves B's catalog at once, not after the 10 s lease.
                    with trio.fail_after(lease - 4):
                        while True:
                            health = await b.health()
                            if health["cluster"]["servers_elsewhere"] == 0:
                                break
                            await trio.sleep(0.05)
                    assert trio.current_time() - drained < 3
                    with trio.fail_after(15):
                        await a.process.wait()
                    assert a.process.returncode == 0, a.stderr()


async def test_xiaozhi_and_the_official_sdk_on_one_node_use_a_bridged_tool_on_another(
    nursery: trio.Nursery, redis: RedisServer, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        async with nodes(nursery, redis, tmp_path, ["A", "B"], LEASE) as cluster:
            a, b = cluster["A"], cluster["B"]
            log = tmp_path / "pipe.log"
            async with spawn(bridge(tmp_path, a.tool_url()), child_env(), log, cwd=tmp_path):
                await server_node({"A": a})
                with trio.fail_after(10):
                    while (await b.health())["cluster"]["servers_elsewhere"] != 1:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                # xiaozhi-server's own caller code, on B.
                command = [sys.executable, str(CALLER), b.caller_url()]
                xlog = tmp_path / "xiaozhi.log"
                async with spawn(command, child_env(), xlog, cwd=tmp_path, pipes=True) as xiaozhi:
                    tools = await expect_ready(xiaozhi)
                    assert {"alpha_add", "alpha_count", "alpha_whoami"} <= tools
                    await xiaozhi.send_json(
                        {"tag": "t", "tool": "alpha_add", "args": {"a": 40, "b": 2}}
                    )
                    assert await xiaozhi.read_json() == {"tag": "t", "result": "42"}
                # The official SDK's Streamable HTTP client, on B, with progress (its
                # session exercise, as against one relay).
                token = caller_url("ws://x", KEY, AGENT).split("token=", 1)[1]
                url = f"http://127.0.0.1:{b.port}/mcp_endpoint/call/?token={token}"
                async with (
                    streamable_http_client(url) as (read, write, *_),
                    ClientSession(read, write) as session,
                ):
                    await exercise(session, log)
