"""Start a relay, connect several agents, servers and callers, keep calls flowing, and print
the status page's URL; optionally screenshot the page in headless Chromium meanwhile.

    python scripts/status_demo.py                       # runs until interrupted
    python scripts/status_demo.py --duration 20 --screenshot docs/status.png

What runs (all real sockets on 127.0.0.1): four agents with two or three servers each, two
callers per agent each keeping four ``tools/call`` in flight (servers answer after 0-40 ms),
plus failures of known kinds so the page has errors to show: the ``kiosk`` agent's ``slow``
server never answers ``wait`` (the relay answers ``-32006`` after ``request_timeout``), and
its ``flaky`` server reconnects every few seconds under the same name (the old connection is
closed ``4001``). One server's name and tool names are HTML, to show that the page escapes
what peers send.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import shutil
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import trio
from trio_websocket import ConnectionClosed

from trio_mcp_relay import RelayConfig, serve_relay
from trio_mcp_relay._auth import caller_url, tool_url
from trio_mcp_relay.client import RpcError, connect_websocket, open_caller

KEY = "status-demo-key-0123456789abcdef"

#: agent -> server name -> tool names
AGENTS: dict[str, dict[str, list[str]]] = {
    "kitchen": {"calculator": ["add", "multiply", "sqrt"], "timer": ["start", "stop"]},
    "living-room": {
        "lights": ["on", "off", "dim"],
        "music": ["play", "pause", "next", "volume"],
        "weather": ["forecast"],
    },
    "garage": {"door": ["open", "close", "state"], '<script>alert("x")</script>': ["<img>"]},
    "kiosk": {"slow": ["wait"], "flaky": ["maybe"]},
}
#: A tool whose calls are never answered (the relay times them out).
SILENT = ("kiosk", "wait")
FLAKY = ("kiosk", "flaky")


async def tool_server(url: str, name: str, tools: Sequence[str], silent: set[str]) -> None:
    """A minimal MCP server on a tool connection: answers the relay's initialization and
    lists, and each ``tools/call`` after a short delay (never, for a tool in ``silent``)."""
    async with connect_websocket(url) as ws, trio.open_nursery() as nursery:

        async def answer(frame: dict[str, Any]) -> None:
            await trio.sleep(random.uniform(0, 0.04))
            text = f"{frame['params']['name']} done"
            result = {"content": [{"type": "text", "text": text}]}
            with contextlib.suppress(ConnectionClosed):  # replaced meanwhile
                await ws.send_message(
                    json.dumps({"jsonrpc": "2.0", "id": frame["id"], "result": result})
                )

        try:
            while True:
                frame = json.loads(await ws.get_message())
                method, rid = frame.get("method"), frame.get("id")
                if rid is None:
                    continue
                if method == "initialize":
                    value: Any = {
                        "protocolVersion": frame["params"]["protocolVersion"],
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": name, "version": "1.0"},
                    }
                elif method == "tools/list":
                    value = {
                        "tools": [
                            {"name": t, "description": t, "inputSchema": {"type": "object"}}
                            for t in tools
                        ]
                    }
                elif method == "tools/call":
                    if frame["params"]["name"] not in silent:
                        nursery.start_soon(answer, frame)
                    continue
                elif method == "ping":
                    value = {}
                else:
                    continue
                await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": rid, "result": value}))
        except ConnectionClosed:
            nursery.cancel_scope.cancel()


async def keep_server(url: str, name: str, tools: Sequence[str], silent: set[str]) -> None:
    """A server that comes back when it is closed."""
    while True:
        await tool_server(url, name, tools, silent)
        await trio.sleep(0.2)


async def flaky_server(url: str, name: str, tools: Sequence[str], period: float) -> None:
    """A server that reconnects under the same name every ``period`` seconds: the relay
    closes the older connection ``4001`` each time."""
    async with trio.open_nursery() as nursery:
        while True:
            nursery.start_soon(tool_server, url, name, tools, set())
            await trio.sleep(period)


async def caller_load(url: str, tools: list[str], window: int, counts: dict[str, int]) -> None:
    """One caller keeping ``window`` calls in flight until cancelled."""
    async with open_caller(url, timeout=30) as caller, trio.open_nursery() as nursery:

        async def loop() -> None:
            while True:
                try:
                    await caller.call_tool(random.choice(tools), {})
                    counts["ok"] += 1
                except RpcError as exc:
                    counts[str(exc.code)] = counts.get(str(exc.code), 0) + 1

        for _ in range(window):
            nursery.start_soon(loop)


async def screenshot(url: str, path: str, size: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install -y chromium)")
    command = [
        chromium,
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={size}",
        f"--screenshot={path}",
        url,
    ]
    await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    print(f"screenshot: {path}", flush=True)


async def main(args: argparse.Namespace) -> None:
    config = RelayConfig(host="127.0.0.1", port=args.port, key=KEY, request_timeout=2.0)
    counts: dict[str, int] = {"ok": 0}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_relay, config)
        base = f"ws://127.0.0.1:{port}"
        for agent, servers in AGENTS.items():
            for name, tools in servers.items():
                url = tool_url(base, KEY, agent)
                if (agent, name) == FLAKY:
                    nursery.start_soon(flaky_server, url, name, tools, 4.0)
                else:
                    silent = {SILENT[1]} if agent == SILENT[0] else set()
                    nursery.start_soon(keep_server, url, name, tools, silent)
        await trio.sleep(0.5)  # servers initialized: callers see the whole catalog
        for agent, servers in AGENTS.items():
            names = [t for tools in servers.values() for t in tools]
            for _ in range(2):
                nursery.start_soon(caller_load, caller_url(base, KEY, agent), names, 4, counts)
        status = f"http://127.0.0.1:{port}/mcp_endpoint/status?key={quote(KEY, safe='')}"
        print(f"status page: {status}", flush=True)
        print(f"as JSON:     {status}&format=json", flush=True)
        if args.screenshot:
            await trio.sleep(args.warmup)
            for spec in args.screenshot:
                path, _, size = spec.partition("@")
                await screenshot(status, path, size or "1280,1500")
        if args.duration:
            await trio.sleep(max(0.0, args.duration - (args.warmup if args.screenshot else 0)))
            print("calls:", json.dumps(counts, sort_keys=True), flush=True)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--duration", type=float, default=0, help="seconds; 0 runs forever")
    parser.add_argument(
        "--screenshot",
        action="append",
        metavar="PATH[@W,H]",
        help="screenshot the page to PATH (window W,H, default 1280,1500); repeatable",
    )
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds before screenshots")
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, parser.parse_args())
