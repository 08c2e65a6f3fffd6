"""MCP over HTTP against MCP over WebSocket, side by side, through the same relay in one run.

A benchmark run by hand, not a test. The relay runs in a subprocess of its own
(``trio-mcp-relay serve`` on a free loopback port with the bundled calculator served
in-process as agent ``bench``, so no tool socket is in the way), and one client at a time
makes sequential requests, in rounds that alternate the transports:

* ``tools/call`` (``calculate``): over a WebSocket caller, over Streamable HTTP answered as
  ``application/json``, and over Streamable HTTP answered as an SSE stream;
* ``tools/list`` (from the relay's catalog), over each of the same;
* a whole session as manager-api-like clients make it: WebSocket connect, ``initialize``,
  ``notifications/initialized``, ``tools/list``, close; against HTTP ``initialize``,
  ``notifications/initialized``, ``tools/list``, ``DELETE``.

It prints p50 and p99 latency and the relay's CPU per request for each, and the HTTP figures
relative to the WebSocket ones. The clients (trio-websocket, httpx) share the machine's
cores with the relay; their own cost is part of the latency, not of the relay's CPU figure.

    python scripts/bench_http.py
    python scripts/bench_http.py --requests 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).parent))

from loadgen import free_port, proc_cpu_seconds, start

from trio_mcp_relay import encrypt_token

AGENT = "bench"
JSON = {"accept": "application/json"}
BOTH = {"accept": "application/json, text/event-stream"}
CALL = {"name": "calculate", "arguments": {"expression": "6 * 7"}}
INIT = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "bench", "version": "1"},
}


def frame(rid: int | None, method: str, params: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rid is not None:
        out["id"] = rid
    if params is not None:
        out["params"] = params
    return out


def sse_answer(body: str) -> dict[str, Any]:
    """The JSON-RPC response in an SSE answer's body (the event with a result or an error)."""
    for block in body.split("\n\n"):
        data = "\n".join(
            line[6:] for line in block.split("\n") if line.startswith("data: ") and line[6:]
        )
        if data:
            message = json.loads(data)
            if "result" in message or "error" in message:
                return dict(message)
    raise AssertionError(f"no answer in {body!r}")


class WsCaller:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = 0

    async def request(self, method: str, params: Any = None) -> dict[str, Any]:
        self.ids += 1
        await self.ws.send_message(json.dumps(frame(self.ids, method, params)))
        while True:
            message = json.loads(await self.ws.get_message())
            if message.get("id") == self.ids and "method" not in message:
                assert "result" in message, message
                return dict(message)


class HttpCaller:
    def __init__(self, client: httpx.AsyncClient, url: str, accept: dict[str, str]) -> None:
        self.client, self.url, self.accept = client, url, accept
        self.ids = 0
        self.headers: dict[str, str] = {}

    async def request(self, method: str, params: Any = None) -> dict[str, Any]:
        self.ids += 1
        headers = {**self.accept, **self.headers}
        answer = await self.client.post(
            self.url, json=frame(self.ids, method, params), headers=headers
        )
        assert answer.status_code == 200, answer.text
        if method == "initialize":
            self.headers = {
                "mcp-session-id": answer.headers["mcp-session-id"],
                "mcp-protocol-version": "2025-11-25",
            }
        if answer.headers["content-type"].startswith("text/event-stream"):
            message = sse_answer(answer.text)
        else:
            message = answer.json()
        assert message.get("id") == self.ids and "result" in message, message
        return dict(message)

    async def notify(self, method: str) -> None:
        answer = await self.client.post(
            self.url, json=frame(None, method), headers={**self.accept, **self.headers}
        )
        assert answer.status_code == 202, answer.text

    async def delete(self) -> None:
        answer = await self.client.delete(self.url, headers={**self.accept, **self.headers})
        assert answer.status_code == 204, answer.text
        self.headers = {}


async def timed(
    work: Callable[[], Awaitable[Any]], count: int, pid: int
) -> tuple[list[float], float]:
    """Latencies of ``count`` sequential ``work()`` and the relay's CPU seconds meanwhile."""
    latencies = []
    cpu = proc_cpu_seconds(pid)
    for _ in range(count):
        started = time.perf_counter()
        await work()
        latencies.append(time.perf_counter() - started)
    return latencies, proc_cpu_seconds(pid) - cpu


async def bench(port: int, key: str, pid: int, requests: int, rounds: int) -> None:
    token = quote(encrypt_token(key, AGENT), safe="")
    ws_url = f"ws://127.0.0.1:{port}/mcp_endpoint/call/?token={token}"
    http_url = f"http://127.0.0.1:{port}/mcp_endpoint/call/?token={token}"
    results: dict[str, list[tuple[list[float], float]]] = {}
    async with httpx.AsyncClient(timeout=30) as client, open_websocket_url(ws_url) as ws:
        caller = WsCaller(ws)
        await caller.request("initialize", INIT)
        await ws.send_message(json.dumps(frame(None, "notifications/initialized")))
        callers: dict[str, Any] = {"WebSocket": caller}
        for name, accept in (("HTTP, JSON answers", JSON), ("HTTP, SSE answers", BOTH)):
            http = HttpCaller(client, http_url, accept)
            await http.request("initialize", INIT)
            await http.notify("notifications/initialized")
            callers[name] = http

        async def ws_session() -> None:
            async with open_websocket_url(ws_url) as fresh:
                session = WsCaller(fresh)
                await session.request("initialize", INIT)
                await fresh.send_message(json.dumps(frame(None, "notifications/initialized")))
                await session.request("tools/list")

        async def http_session(accept: dict[str, str]) -> None:
            session = HttpCaller(client, http_url, accept)
            await session.request("initialize", INIT)
            await session.notify("notifications/initialized")
            await session.request("tools/list")
            await session.delete()

        for _ in range(rounds):
            for transport, each in callers.items():
                for what, method, params in (
                    ("tools/call", "tools/call", CALL),
                    ("tools/list", "tools/list", None),
                ):

                    async def one(
                        each: Any = each, method: str = method, params: Any = params
                    ) -> None:
                        await each.request(method, params)

                    results.setdefault(f"{what}|{transport}", []).append(
                        await timed(one, requests, pid)
                    )
            sessions = max(requests // 5, 20)
            results.setdefault("session|WebSocket", []).append(
                await timed(ws_session, sessions, pid)
            )
            for name, accept in (("HTTP, JSON answers", JSON), ("HTTP, SSE answers", BOTH)):

                async def session_once(accept: dict[str, str] = accept) -> None:
                    await http_session(accept)

                results.setdefault(f"session|{name}", []).append(
                    await timed(session_once, sessions, pid)
                )

    print(
        f"{rounds} rounds; {requests} sequential requests per kind and round "
        f"(sessions: {max(requests // 5, 20)})"
    )
    print(
        f"{'':12} {'transport':20} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'relay CPU/req':>14} {'p50 vs WS':>10}"
    )
    for what in ("tools/call", "tools/list", "session"):
        base = None
        for transport in ("WebSocket", "HTTP, JSON answers", "HTTP, SSE answers"):
            runs = results[f"{what}|{transport}"]
            latencies = sorted(x for run in runs for x in run[0])
            cpu = sum(run[1] for run in runs) / len(latencies)
            p50 = statistics.median(latencies) * 1000
            p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
            base = base or p50
            print(
                f"{what:12} {transport:20} {p50:8.2f} {p99:8.2f}"
                f" {cpu * 1e6:11.0f} us {p50 / base:9.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    key = secrets.token_hex(16)
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        command = [
            *[sys.executable, "-m", "trio_mcp_relay", "serve", "--host", "127.0.0.1"],
            *["--port", str(port), "--key", key, "--data-dir", data_dir, "--log-level", "WARNING"],
            *["--tools", f"{AGENT}=trio_mcp_relay.examples.calculator:Calculator"],
        ]
        relay = start(command, port)
        try:
            time.sleep(0.5)  # the embedded tool's initialization
            trio.run(bench, port, key, relay.pid, args.requests, args.rounds)
        finally:
            relay.terminate()
            relay.wait(10)


if __name__ == "__main__":
    main()
