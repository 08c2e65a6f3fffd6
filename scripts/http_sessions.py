"""Open HTTP sessions, abandon them with a request in flight, and watch them expire.

Runs a relay in this process (real sockets on 127.0.0.1, port 0) with a WebSocket tool that
never answers, then ``--sessions`` Streamable HTTP clients each initialize, start a
``tools/call`` and vanish (no DELETE, the answer's connection dropped). It reports the
relay's memory (Python allocations, by tracemalloc, and the process RSS) at the baseline,
with every session open, and after ``--idle`` seconds (the session idle timeout) when all of
them have expired, and once more ``--settle`` seconds later; and how many of the abandoned
requests the tool was told to cancel.

    python scripts/http_sessions.py --sessions 1000 --idle 10
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
import tracemalloc
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trio_mcp_relay import RelayConfig, serve_relay
from trio_mcp_relay._auth import encrypt_token
from trio_mcp_relay.server.mcp_http.events import Stream
from trio_mcp_relay.server.mcp_http.session import HttpSession

KEY = "0123456789abcdef0123456789abcdef"
AGENT = "sessions-agent"
ACCEPT = {"accept": "application/json, text/event-stream"}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def alive(kind: type) -> int:
    """How many objects of ``kind`` the garbage collector still sees."""
    gc.collect()
    return sum(1 for thing in gc.get_objects() if isinstance(thing, kind))


def traced_mib() -> float:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / 2**20


async def tool(url: str, calls: list[int], cancels: set[int], task_status: Any) -> None:
    """A tool that answers the relay's initialization and never answers a call."""
    async with open_websocket_url(url) as ws:
        task_status.started()
        while True:
            frame = json.loads(await ws.get_message())
            method, rid = frame.get("method"), frame.get("id")
            if method == "initialize":
                result = {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "never", "version": "1"},
                }
                await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": rid, "result": result}))
            elif method == "tools/list":
                tools = [{"name": "wait", "inputSchema": {"type": "object"}}]
                answer = {"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}}
                await ws.send_message(json.dumps(answer))
            elif method == "tools/call":
                calls.append(rid)
            elif method == "notifications/cancelled":
                cancels.add(frame["params"]["requestId"])


async def abandon(client: httpx.AsyncClient, url: str) -> None:
    """One session: initialize, initialized, a call whose answer is never read."""
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "abandoner", "version": "1"},
        },
    }
    answer = await client.post(url, json=init, headers=ACCEPT)
    answer.raise_for_status()
    headers = {**ACCEPT, "mcp-session-id": answer.headers["mcp-session-id"]}
    headers["mcp-protocol-version"] = "2025-11-25"
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    (await client.post(url, json=done, headers=headers)).raise_for_status()
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "wait"}}
    async with client.stream("POST", url, json=call, headers=headers) as stream:
        stream.raise_for_status()
        async for _ in stream.aiter_bytes():
            break  # the priming event: the request is in flight; now vanish


async def main(sessions: int, idle: float, concurrency: int, settle: float) -> None:
    config = RelayConfig(
        host="127.0.0.1",
        port=0,
        key=KEY,
        session_idle_timeout=idle,
        max_callers_per_agent=sessions + 10,
        log_level="WARNING",
    )
    token = encrypt_token(KEY, AGENT)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_relay, config))
        calls: list[int] = []
        cancels: set[int] = set()
        await nursery.start(
            tool, f"ws://127.0.0.1:{port}/mcp_endpoint/mcp/?token={token}", calls, cancels
        )
        url = f"http://127.0.0.1:{port}/mcp_endpoint/call/?token={token}"
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            await abandon(client, url)  # warm up: imports, caches, first allocations
            while len(cancels) < 1:  # noqa: ASYNC110 (the warm-up's expiry: a poll is enough)
                await trio.sleep(0.1)
            await trio.sleep(0.5)
            base_traced, base_rss = traced_mib(), rss_mib()
            started = time.monotonic()
            limiter = trio.CapacityLimiter(concurrency)

            async def one() -> None:
                async with limiter:
                    await abandon(client, url)

            async with trio.open_nursery() as openers:
                for _ in range(sessions):
                    openers.start_soon(one)
            opened = time.monotonic() - started
            open_traced, open_rss = traced_mib(), rss_mib()
            in_flight = len(calls) - len(cancels)
            deadline = time.monotonic() + idle + 30
            while len(cancels) < len(calls) and time.monotonic() < deadline:  # noqa: ASYNC110
                await trio.sleep(0.2)
            expired = time.monotonic() - started - opened
            await trio.sleep(0.5)
            end_traced, end_rss = traced_mib(), rss_mib()
            # Trio drops a cancel scope from its deadline heap when the deadline passes: the
            # kept-alive connections' 60 s read deadlines hold a few hundred bytes each until then.
            await trio.sleep(settle)
            settled_traced, settled_rss = traced_mib(), rss_mib()
            left = alive(HttpSession), alive(Stream)
        print(
            f"{sessions} sessions opened in {opened:.1f} s, each leaving a request in flight "
            f"({in_flight} still in flight then)"
        )
        print(f"all expired {expired:.1f} s later (idle timeout {idle:g} s)")
        print(f"requests cancelled at the tool: {len(cancels) - 1} of {len(calls) - 1}")
        print("                 python heap (tracemalloc)   process RSS")
        print(f"baseline         {base_traced:8.2f} MiB              {base_rss:8.1f} MiB")
        print(
            f"sessions open    {open_traced:8.2f} MiB (+{open_traced - base_traced:.2f})"
            f"       {open_rss:8.1f} MiB (+{open_rss - base_rss:.1f})"
        )
        print(
            f"after expiry     {end_traced:8.2f} MiB (+{end_traced - base_traced:.2f})"
            f"       {end_rss:8.1f} MiB (+{end_rss - base_rss:.1f})"
        )
        print(
            f"{settle:g} s later     {settled_traced:8.2f} MiB"
            f" (+{settled_traced - base_traced:.2f})"
            f"       {settled_rss:8.1f} MiB (+{settled_rss - base_rss:.1f})"
        )
        print(f"sessions and streams still alive at the end: {left[0]} and {left[1]}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=10.0, help="session idle timeout, seconds")
    parser.add_argument("--concurrency", type=int, default=20, help="sessions opened at once")
    parser.add_argument(
        "--settle", type=float, default=65.0, help="seconds to wait before the last measurement"
    )
    args = parser.parse_args()
    tracemalloc.start()
    trio.run(main, args.sessions, args.idle, args.concurrency, args.settle)
