"""The aggregator against real third-party clients, over loopback sockets and real processes.

* Tool side: the real ``mcp_pipe.py`` of 78/mcp-calculator (vendored unchanged in
  tests/data/real/) and our own ``trio-mcp-relay pipe``, each bridging TWO stdio servers of the
  official MCP SDK (tests/data/real/mcp_server.py) from one mcp_config.json to the tool URL of
  one token, without server_id (as mcp_pipe does): the relay tells them apart by
  ``serverInfo.name`` and aggregates them.
* Caller side: xiaozhi-server's own MCP endpoint caller (a verbatim excerpt, vendored in
  tests/data/real/xiaozhi_mcp_endpoint.py, driven by xiaozhi_caller.py): initialize,
  notifications/initialized, tools/list (following nextCursor), tools/call.
* Upstream-style ``&server_id=`` URLs: a and b join, a second a replaces the first (4001), and
  a request in flight on b is answered through both.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.helpers import (
    RunningRelay,
    initialize_tool,
    peer,
    recv,
    request,
    result,
    send,
    start_relay,
    wait_for_counts,
)

REAL = Path(__file__).parent / "data" / "real"
MCP_PIPE = REAL / "mcp_pipe.py"
SERVER = REAL / "mcp_server.py"
CALLER = REAL / "xiaozhi_caller.py"
#: The upstream git blob of mcp_pipe.py at the vendored commit (see its header).
MCP_PIPE_BLOB = "028f319d9c3703639632f1839862f1868948f3cc"
HEADER_END = b"# --- end of vendoring header ---\n"
AGENT = "real-clients-agent"
TIMEOUT = 60
#: The SDK servers start in about 1.5 s, after their pipe connected; a loaded CI machine is
#: given room (this file tests aggregation, not the init timeout).
INIT_TIMEOUT = 30.0


def tail(log: Path) -> str:
    """The end of a child's log, for assertion messages."""
    return log.read_text(errors="replace")[-6000:]


async def wait_for_file(path: Path) -> None:
    """Until another process has created ``path``."""
    target = trio.Path(path)
    while not await target.exists():  # noqa: ASYNC110 (no event crosses the process boundary)
        await trio.sleep(0.02)


def release(flag: Path) -> None:
    """Let the SDK server's ``wait_for(flag)`` answer (with ``released``). The file appears
    whole (written aside, then renamed): the server may read it the moment it exists."""
    aside = flag.with_name(flag.name + ".tmp")
    aside.write_text("released")
    aside.replace(flag)


def tools_of(name: str) -> set[str]:
    return {f"{name}_add", f"{name}_whoami", f"{name}_count", f"{name}_wait_for"}


def child_env(**extra: str) -> dict[str, str]:
    """Our environment without endpoint settings a developer may have exported, plus ``extra``;
    a no-op ``dotenv`` on PYTHONPATH when python-dotenv is missing (mcp_pipe.py imports it)."""
    drop = {"MCP_ENDPOINT", "MCP_CONFIG", "LOG_LEVEL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    if importlib.util.find_spec("dotenv") is None:
        paths = [str(REAL / "nodotenv"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return {**env, **extra}


def write_config(path: Path, names: list[str]) -> Path:
    """An mcp_config.json (mcp_pipe.py's format) running one SDK server per name."""
    servers = {n: {"command": sys.executable, "args": [str(SERVER), n]} for n in names}
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


class Child:
    """A child process whose stdout is read as JSON lines and whose stderr goes to a file."""

    def __init__(self, process: trio.Process, log: Path) -> None:
        self.process = process
        self.log = log
        self._buffer = bytearray()

    def stderr(self) -> str:
        return tail(self.log)

    async def send_json(self, value: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(value).encode() + b"\n")

    async def read_json(self) -> Any:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            assert chunk, f"{self.process.args!r} ended its output; stderr:\n{self.stderr()}"
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return json.loads(line)


@asynccontextmanager
async def spawn(
    command: list[str], env: dict[str, str], log: Path, *, cwd: Path, pipes: bool = False
) -> AsyncIterator[Child]:
    """Run ``command`` for the block; then SIGTERM it, and SIGKILL it after 5 s."""
    stdio = subprocess.PIPE if pipes else subprocess.DEVNULL
    with log.open("wb") as err:
        handle: BinaryIO = err
        process = await trio.lowlevel.open_process(
            command, stdin=stdio, stdout=stdio, stderr=handle, env=env, cwd=cwd
        )
        try:
            yield Child(process, log)
        finally:
            with trio.CancelScope(shield=True):
                if process.stdin is not None:
                    await process.stdin.aclose()
                process.terminate()
                with trio.move_on_after(5):
                    await process.wait()
                process.kill()
                await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()


@asynccontextmanager
async def xiaozhi_caller(relay: RunningRelay, tmp_path: Path) -> AsyncIterator[Child]:
    """The xiaozhi-server caller connected to the agent's caller URL, once it is ready."""
    command = [sys.executable, str(CALLER), relay.caller_url(AGENT)]
    async with spawn(command, child_env(), tmp_path / "xiaozhi.log", cwd=tmp_path, pipes=True) as c:
        yield c


async def expect_ready(caller: Child) -> set[str]:
    ready = await caller.read_json()
    assert ready.get("event") == "ready", f"{ready}; stderr:\n{caller.stderr()}"
    return set(ready["tools"])


async def call(caller: Child, tag: str, tool: str, **args: Any) -> Any:
    """One tools/call through the xiaozhi caller; the answer (its ``result`` text)."""
    await caller.send_json({"tag": tag, "tool": tool, "args": args})
    answer = await caller.read_json()
    assert answer == {"tag": tag, "result": answer.get("result")}, (answer, caller.stderr())
    return answer["result"]


async def check_xiaozhi_sees_both(relay: RunningRelay, tmp_path: Path, tool_log: Path) -> None:
    """With alpha and beta connected: xiaozhi lists both servers' tools and calls one of each."""
    await wait_for_counts(relay, tools=2, callers=0)
    async with xiaozhi_caller(relay, tmp_path) as caller:
        tools = await expect_ready(caller)
        assert tools == tools_of("alpha") | tools_of("beta"), tail(tool_log)
        assert await call(caller, "1", "alpha_add", a=2, b=3) == "5"
        assert (await call(caller, "2", "beta_whoami")).startswith("beta pid=")
        assert (await call(caller, "3", "alpha_whoami")).startswith("alpha pid=")
        assert await call(caller, "4", "beta_add", a=40, b=2) == "42"


def test_vendored_mcp_pipe_is_the_upstream_file() -> None:
    body = MCP_PIPE.read_bytes().split(HEADER_END, 1)[1]
    blob = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
    assert blob == MCP_PIPE_BLOB


async def test_mcp_pipe_with_two_servers_serves_the_xiaozhi_caller(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery, init_timeout=INIT_TIMEOUT)
        config = write_config(tmp_path / "mcp_config.json", ["alpha", "beta"])
        env = child_env(MCP_ENDPOINT=relay.tool_url(AGENT), MCP_CONFIG=str(config))
        log = tmp_path / "mcp_pipe.log"
        async with spawn([sys.executable, str(MCP_PIPE)], env, log, cwd=tmp_path):
            await check_xiaozhi_sees_both(relay, tmp_path, log)


async def test_our_pipe_with_two_servers_serves_the_xiaozhi_caller(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery, init_timeout=INIT_TIMEOUT)
        config = write_config(tmp_path / "mcp_config.json", ["alpha", "beta"])
        command = [
            *[sys.executable, "-m", "trio_mcp_relay", "pipe"],
            *["--config", str(config), "--endpoint", relay.tool_url(AGENT)],
        ]
        log = tmp_path / "pipe.log"
        async with spawn(command, child_env(), log, cwd=tmp_path):
            await check_xiaozhi_sees_both(relay, tmp_path, log)


async def nursery_peer(nursery: trio.Nursery, url: str) -> WebSocketConnection:
    """A tool connection that stays open until the test's nursery ends."""

    async def hold(task_status: trio.TaskStatus[WebSocketConnection]) -> None:
        async with peer(url) as ws:
            task_status.started(ws)
            await trio.sleep_forever()

    ws: WebSocketConnection = await nursery.start(hold)
    return ws


async def list_tool_names(ws: Any, rid: int) -> set[str]:
    await send(ws, request(rid, "tools/list"))
    answer = await recv_answer(ws, rid)
    return {tool["name"] for tool in answer["result"]["tools"]}


async def recv_answer(ws: Any, rid: int) -> Any:
    """The response to ``rid``, skipping notifications."""
    while True:
        frame = await recv(ws)
        if "method" not in frame:
            assert frame.get("id") == rid, frame
            return frame


async def call_raw(raw: Any, rid: int, tool: str, server: Any) -> Any:
    """tools/call ``tool`` from the raw caller; ``server`` (a test tool) must get it and
    answers; the caller's answer."""
    await send(raw, request(rid, "tools/call", {"name": tool}))
    forwarded = await recv(server)
    assert forwarded["method"] == "tools/call" and forwarded["params"]["name"] == tool, forwarded
    await send(server, result(forwarded["id"], {"content": [], "answeredBy": tool}))
    return (await recv_answer(raw, rid))["result"]


async def test_server_ids_join_replace_and_leave_a_request_in_flight_alone(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await start_relay(nursery, init_timeout=INIT_TIMEOUT)
        url = relay.tool_url(AGENT)
        # b: the real mcp_pipe.py with an upstream-style server_id, bridging the SDK server beta.
        config = write_config(tmp_path / "mcp_config.json", ["beta"])
        env = child_env(MCP_ENDPOINT=url + "&server_id=b", MCP_CONFIG=str(config))
        log = tmp_path / "mcp_pipe.log"
        async with spawn([sys.executable, str(MCP_PIPE)], env, log, cwd=tmp_path):
            await wait_for_counts(relay, tools=1, callers=0)
            async with xiaozhi_caller(relay, tmp_path) as caller:
                assert await expect_ready(caller) == tools_of("beta")
                # A request in flight on b: its tool answers once the flag file exists.
                flag = tmp_path / "flag"
                slow = {"tag": "slow", "tool": "beta_wait_for", "args": {"path": str(flag)}}
                await caller.send_json(slow)
                await wait_for_file(tmp_path / "flag.started")  # in flight at b's server
                async with peer(relay.caller_url(AGENT)) as raw:
                    # a joins b (server_id given: serverInfo.name does not matter).
                    a1 = await nursery_peer(nursery, url + "&server_id=a")
                    await initialize_tool(a1, name="a-first", tools=["a_tool"])
                    assert await list_tool_names(raw, 1) == tools_of("beta") | {"a_tool"}
                    assert (await call_raw(raw, 2, "a_tool", a1))["answeredBy"] == "a_tool"
                    # A second a (another serverInfo.name) replaces the first: 4001.
                    a2 = await nursery_peer(nursery, url + "&server_id=a")
                    await initialize_tool(a2, name="a-second", tools=["a_tool2"])
                    with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
                        while True:
                            await a1.get_message()
                    reason = closed.value.reason
                    assert reason is not None and reason.code == 4001, reason
                    assert await list_tool_names(raw, 3) == tools_of("beta") | {"a_tool2"}
                    assert (await call_raw(raw, 4, "a_tool2", a2))["answeredBy"] == "a_tool2"
                    await wait_for_counts(relay, tools=2, callers=2)
                    # b's request was in flight through both, and is answered.
                    release(flag)
                    answer = await caller.read_json()
                    assert answer == {"tag": "slow", "result": "released"}, (
                        answer,
                        caller.stderr(),
                        tail(log),
                    )
                    assert await call(caller, "after", "beta_add", a=1, b=1) == "2"
