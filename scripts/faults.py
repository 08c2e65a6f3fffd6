"""Fault scenarios against a real relay process, over loopback: what each peer sees.

Run by hand; each scenario prints one JSON line and exits non-zero if its promise failed.

    python scripts/faults.py deaf-tool   # a tool stops reading; 2 callers x 100 requests
    python scripts/faults.py flood       # a caller stops reading; 300 x 4 MiB notifications
    python scripts/faults.py silent      # 10,000 silent sockets from 127.0.0.1
    python scripts/faults.py roots       # 40 fresh callers asked roots/list during their first call

The relay runs as ``trio-mcp-relay serve`` in a subprocess on a free port, with its defaults
except where a scenario says (``--outbox-size 32`` for deaf-tool, for example); timeouts can
be shortened with ``--ping-interval``, ``--ping-timeout`` and ``--forward-timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import (
    WsClient,
    free_port,
    proc_rss_bytes,
    relay_command,
    token_for,
)

KEY = "0123456789abcdef0123456789abcdef"


async def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError("the relay did not start")


def target(role: str, agent: str) -> str:
    return f"/mcp_endpoint/{'mcp' if role == 'tool' else 'call'}/?token={token_for(KEY, agent)}"


class Peer:
    """A client whose messages land in a queue (pings are answered by WsClient)."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.client: WsClient | None = None

    async def open(self, port: int, role: str, agent: str, host: str = "127.0.0.1") -> Peer:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((host, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        _, self.client = await loop.create_connection(
            lambda: WsClient("127.0.0.1", port, target(role, agent), self._on), sock=sock
        )
        await self.client.opened
        if role == "tool":
            await self.serve_initialization()
        return self

    async def serve_initialization(self) -> None:
        """Answer the relay's initialize and tools/list: this tool lists one tool, echo."""
        init = await self.recv()
        value = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}}
        self.send({"jsonrpc": "2.0", "id": init["id"], "result": value})
        await self.recv()  # notifications/initialized
        listing = await self.recv()
        echo = [{"name": "echo", "inputSchema": {"type": "object"}}]
        self.send({"jsonrpc": "2.0", "id": listing["id"], "result": {"tools": echo}})

    def _on(self, payload: bytes) -> None:
        self.messages.put_nowait(orjson.loads(payload))

    def send(self, obj: Any) -> None:
        assert self.client is not None
        self.client.send(orjson.dumps(obj))

    async def recv(self, timeout: float = 60) -> Any:
        return await asyncio.wait_for(self.messages.get(), timeout)

    def stop_reading(self) -> None:
        assert self.client is not None and self.client.transport is not None
        self.client.transport.pause_reading()

    def resume_reading(self) -> None:
        assert self.client is not None and self.client.transport is not None
        self.client.transport.resume_reading()


def request(rid: Any, method: str = "tools/call", params: Any = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        frame["params"] = params
    return frame


async def round_trip(tool: Peer, caller: Peer, rid: Any) -> float:
    started = time.perf_counter()
    caller.send(request(rid, params={"name": "echo", "arguments": {}}))
    asked = await tool.recv()
    tool.send({"jsonrpc": "2.0", "id": asked["id"], "result": {"ok": True}})
    answer = await caller.recv()
    assert answer["id"] == rid, answer
    return time.perf_counter() - started


async def deaf_tool(port: int, args: argparse.Namespace) -> dict[str, Any]:
    tool = await Peer().open(port, "tool", "deaf")
    alice = await Peer().open(port, "caller", "deaf")
    bob = await Peer().open(port, "caller", "deaf")
    other_tool = await Peer().open(port, "tool", "other")
    other = await Peer().open(port, "caller", "other")
    alice.send(request(0, "initialize", {"protocolVersion": "2025-11-25"}))
    await alice.recv()  # answered by the relay, from its catalog
    tool.stop_reading()
    blob = "d" * 20_000
    sent: dict[Any, float] = {}
    for n in range(100):
        for prefix, caller in (("a", alice), ("b", bob)):
            rid = f"{prefix}-{n}" if n % 2 else (n if prefix == "a" else n + 1000)
            sent[rid] = time.perf_counter()
            caller.send(request(rid, params={"name": "echo", "arguments": {"data": blob}}))
    other_latency = await round_trip(other_tool, other, "meanwhile")
    answered: dict[Any, tuple[float, int]] = {}
    bound = args.ping_interval + args.ping_timeout + args.forward_timeout + 2
    for caller, count in ((alice, 100), (bob, 100)):
        for _ in range(count):
            answer = await caller.recv(timeout=bound + 5)
            answered[answer["id"]] = (time.perf_counter(), answer["error"]["code"])
    worst = max(at - sent[rid] for rid, (at, _) in answered.items())
    alice.send(request("after"))
    after = await alice.recv()
    codes = sorted({code for _, code in answered.values()})
    ok = set(answered) == set(sent) and worst <= bound and after["error"]["code"] == -32001
    return {
        "scenario": "deaf-tool", "ok": ok, "answered": len(answered), "codes": codes,
        "worst_answer_s": round(worst, 2), "bound_s": bound,
        "other_agent_round_trip_ms": round(other_latency * 1000, 2),
        "tool_gone_then": after["error"]["code"], "callers_open": True,
    }  # fmt: skip


async def latencies(tool: Peer, caller: Peer, n: int) -> list[float]:
    return [await round_trip(tool, caller, i) for i in range(n)]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] * 1000


async def flood(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    tool = await Peer().open(port, "tool", "flood")
    slow = await Peer().open(port, "caller", "flood")
    others = [await Peer().open(port, r, f"other-{i}") for i in range(3) for r in ("tool",)]
    other_callers = [await Peer().open(port, "caller", f"other-{i}") for i in range(3)]
    idle = []
    for t, c in zip(others, other_callers, strict=True):
        idle += await latencies(t, c, 100)
    slow.stop_reading()
    before = proc_rss_bytes(pid)
    peak = before
    blob = "f" * (4 * 1024 * 1024 - 100)
    busy: list[float] = []
    frame = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/message", "params": blob})
    flood_start = time.perf_counter()
    assert tool.client is not None and tool.client.transport is not None
    for n in range(300):
        tool.client.send(frame)
        while tool.client.transport.get_write_buffer_size() > 8 * 1024 * 1024:
            await asyncio.sleep(0.005)
            peak = max(peak, proc_rss_bytes(pid))
        if n % 30 == 0:
            busy.append(await round_trip(others[n % 3], other_callers[n % 3], f"busy-{n}"))
        peak = max(peak, proc_rss_bytes(pid))
    while tool.client.transport.get_write_buffer_size():
        await asyncio.sleep(0.01)
        peak = max(peak, proc_rss_bytes(pid))
    for t, c in zip(others, other_callers, strict=True):
        busy += await latencies(t, c, 30)
    flood_end = time.perf_counter()
    slow.resume_reading()
    assert slow.client is not None
    code = await asyncio.wait_for(slow.client.closed, args.slow_caller_grace + 30)
    close_after = time.perf_counter() - flood_end
    growth = (peak - before) / 2**20
    ok = code == 1013 and growth <= 96 and close_after <= args.slow_caller_grace + 3
    ok = ok and (p99(busy) <= 3 * p99(idle) or p99(busy) < 250)
    return {
        "scenario": "flood", "ok": ok, "rss_growth_mib": round(growth, 1), "close_code": code,
        "close_after_flood_s": round(close_after, 2),
        "flood_s": round(flood_end - flood_start, 2), "idle_p99_ms": round(p99(idle), 2),
        "during_flood_p99_ms": round(p99(busy), 2),
    }  # fmt: skip


async def silent(port: int, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    for _ in range(args.count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
    started = time.perf_counter()
    tool = await Peer().open(port, "tool", "legit", host="127.0.0.2")
    callers = [await Peer().open(port, "caller", "legit", host="127.0.0.2") for _ in range(5)]
    times = [await round_trip(tool, c, i) for i, c in enumerate(callers) for _ in range(10)]
    elapsed = time.perf_counter() - started
    for sock in held:
        sock.close()
    return {
        "scenario": "silent", "ok": len(times) == 50, "silent_sockets_held": len(held),
        "legit_connect_and_50_calls_s": round(elapsed, 3), "p99_ms": round(p99(times), 2),
    }  # fmt: skip


async def roots(port: int, args: argparse.Namespace) -> dict[str, Any]:
    tool = await Peer().open(port, "tool", "roots")
    refused = 0
    for n in range(40):
        caller = await Peer().open(port, "caller", "roots")
        # A tool asks the caller side on behalf of a call in flight (the relay's rule).
        caller.send(request(n, params={"name": "echo", "arguments": {}}))
        call = await tool.recv()
        tool.send(request(f"r-{n}", "roots/list"))
        asked = await caller.recv()
        if asked.get("method") != "roots/list":
            refused += 1
        else:
            caller.send({"jsonrpc": "2.0", "id": asked["id"], "result": {"roots": []}})
        answer = await tool.recv()
        refused += "error" in answer
        tool.send({"jsonrpc": "2.0", "id": call["id"], "result": {"content": []}})
        await caller.recv()
        assert caller.client is not None
        caller.client.close()
    return {"scenario": "roots", "ok": refused == 0, "refused": refused, "of": 40}


async def run_scenario(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    await wait_listening(port)
    if args.scenario == "deaf-tool":
        return await deaf_tool(port, args)
    if args.scenario == "flood":
        return await flood(port, pid, args)
    if args.scenario == "silent":
        return await silent(port, args)
    return await roots(port, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["deaf-tool", "flood", "silent", "roots"])
    parser.add_argument("--ping-interval", type=float, default=20.0)
    parser.add_argument("--ping-timeout", type=float, default=20.0)
    parser.add_argument("--forward-timeout", type=float, default=10.0)
    parser.add_argument("--slow-caller-grace", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=10_000, help="silent sockets")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    command = [
        *relay_command(port, KEY),
        "--ping-interval", str(args.ping_interval), "--ping-timeout", str(args.ping_timeout),
        "--forward-timeout", str(args.forward_timeout),
        "--slow-caller-grace", str(args.slow_caller_grace),
    ]  # fmt: skip
    if args.scenario == "deaf-tool":
        command += ["--outbox-size", "32"]
    # The relay's log goes to a file: a pipe nobody reads would stall it under a flood.
    with open(f"/tmp/faults-relay-{port}.log", "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        try:
            report = asyncio.run(run_scenario(port, process.pid, args))
        finally:
            process.terminate()
            process.wait(10)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
