"""Benchmark the aggregator: one agent with N tool servers, one caller, over real sockets.

A benchmark run by hand, not a test. The relay (``serve_relay`` on 127.0.0.1 port 0) runs in a
subprocess of its own, so its CPU is not shared with the load generator's event loop; the load
generator is asyncio with the raw WebSocket client of ``loadgen.py`` (uvloop when installed).
For each N (default 1, 5, 20) it connects N minimal tool servers to one fresh agent, each
answering ``initialize`` (``serverInfo.name`` = ``srvI``, so they join rather than replace one
another), ``tools/list`` (``--tools-per-server`` tools ``srvI_t0``..., default 3) and
``tools/call`` at once, then measures with one caller:

* merged ``tools/list``: median and p99 latency of ``--requests`` sequential requests;
* the manager-api sequence: a new caller WebSocket, ``initialize``,
  ``notifications/initialized``, ``tools/list``, close (``--requests`` times, sequential): what
  manager-api does to show an agent's tools;
* ``tools/call``: calls/s over ``--seconds`` with ``--concurrency`` calls in flight, spread
  round-robin over all 3N tools (every answer checked: right id, answered by the server owning
  the tool), with p50/p99 latency and the CPU per call of the relay and of the load
  generator (both share the machine's cores: when the generator's CPU per call approaches the
  relay's, the figure is partly the generator's).

There is no relay-free floor here (a caller talking to N servers without the relay would need an
aggregator of its own): N=1 is the baseline, and the last table gives N=5 and N=20 relative to it.

    python scripts/bench_aggregate.py
    python scripts/bench_aggregate.py --servers 1,5,20,50 --seconds 10 --concurrency 32 --runs 5
    python scripts/bench_aggregate.py --servers 3 --tools-per-server 20   # manager-api: 60 tools
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

sys.path.insert(0, str(Path(__file__).parent))

from loadgen import WsClient, connect, proc_cpu_seconds, run

from trio_mcp_relay import encrypt_token

HOST = "127.0.0.1"
TOOLS_PER_SERVER = 3


# ---- the relay, in a subprocess ----------------------------------------------------------------
def serve_forever(key: str, data_dir: str) -> None:
    """``--serve`` mode: run serve_relay on port 0 and print the bound port on stdout."""
    import trio

    from trio_mcp_relay import RelayConfig
    from trio_mcp_relay.server import serve_relay

    async def main() -> None:
        config = RelayConfig(
            host=HOST, port=0, key=key, data_dir=Path(data_dir), log_level="WARNING"
        )
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_relay, config)
            print(port, flush=True)

    trio.run(main)


def start_relay(key: str, data_dir: str) -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", key, data_dir], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"the relay did not start (exit code {process.wait()})")
    return process, int(line)


def url_target(path: str, key: str, agent: str) -> str:
    return f"/mcp_endpoint/{path}/?token={quote(encrypt_token(key, agent), safe='')}"


# ---- tool servers -------------------------------------------------------------------------------
def tool_names(index: int) -> list[str]:
    return [f"srv{index}_t{k}" for k in range(TOOLS_PER_SERVER)]


def tool_server(index: int, ref: list[WsClient]) -> Callable[[bytes], None]:
    """A minimal MCP server over the relay's tool WebSocket: answers everything at once."""
    name = f"srv{index}"
    listing = {
        "tools": [
            {"name": t, "description": f"tool {t}", "inputSchema": {"type": "object"}}
            for t in tool_names(index)
        ]
    }

    def on_message(data: bytes) -> None:
        frame = orjson.loads(data)
        method = frame.get("method")
        if "id" not in frame or method is None:
            return  # notifications (initialized) and responses: nothing to answer
        value: Any
        if method == "initialize":
            value = {
                "protocolVersion": frame["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": name, "version": "1"},
            }
        elif method == "tools/list":
            value = listing
        elif method == "tools/call":
            text = f"{name}:{frame['params']['name']}"
            value = {"content": [{"type": "text", "text": text}], "isError": False}
        elif method == "ping":
            value = {}
        else:
            reply = {"code": -32601, "message": f"no {method}"}
            ref[0].send(orjson.dumps({"jsonrpc": "2.0", "id": frame["id"], "error": reply}))
            return
        ref[0].send(orjson.dumps({"jsonrpc": "2.0", "id": frame["id"], "result": value}))

    return on_message


async def connect_tool(port: int, key: str, agent: str, index: int) -> WsClient:
    # The relay's initialize can come with the 101: the server must know its WebSocket first.
    ref: list[WsClient] = []

    def factory() -> WsClient:
        ref.append(WsClient(HOST, port, url_target("mcp", key, agent), tool_server(index, ref)))
        return ref[0]

    _, client = await asyncio.get_running_loop().create_connection(factory, HOST, port)
    await client.opened
    return client


# ---- the caller ---------------------------------------------------------------------------------
class Caller:
    """A caller WebSocket with request/response correlation by id."""

    def __init__(self) -> None:
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)
        self.ws: WsClient | None = None

    @classmethod
    async def open(cls, port: int, key: str, agent: str) -> Caller:
        caller = cls()
        caller.ws = await connect(HOST, port, url_target("call", key, agent), caller.on_message)
        return caller

    def on_message(self, data: bytes) -> None:
        frame = orjson.loads(data)
        future = self.pending.pop(frame.get("id"), None) if "method" not in frame else None
        if future is not None and not future.done():
            future.set_result(frame)

    async def request(self, method: str, params: Any = None) -> Any:
        assert self.ws is not None
        rid = next(self.ids)
        frame: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            frame["params"] = params
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        self.ws.send(orjson.dumps(frame))
        answer = await future
        if "result" not in answer:
            raise RuntimeError(f"{method}: {answer}")
        return answer["result"]

    def notify(self, method: str) -> None:
        assert self.ws is not None
        self.ws.send(orjson.dumps({"jsonrpc": "2.0", "method": method}))

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


INITIALIZE = {
    "protocolVersion": "2024-11-05",
    "capabilities": {},
    "clientInfo": {"name": "bench-manager-api", "version": "1"},
}


# ---- measurements -------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def measure_list(caller: Caller, requests: int, expected: int) -> list[float]:
    latencies = []
    for i in range(requests + 20):
        start = time.perf_counter()
        listing = await caller.request("tools/list")
        elapsed = time.perf_counter() - start
        assert len(listing["tools"]) == expected, len(listing["tools"])
        if i >= 20:  # the first 20 warm up
            latencies.append(elapsed)
    return latencies


async def measure_manager_api(
    port: int, key: str, agent: str, requests: int, expected: int
) -> list[float]:
    latencies = []
    for i in range(requests + 5):
        start = time.perf_counter()
        caller = await Caller.open(port, key, agent)
        await caller.request("initialize", INITIALIZE)
        caller.notify("notifications/initialized")
        listing = await caller.request("tools/list")
        if i >= 5:  # the first 5 warm up
            latencies.append(time.perf_counter() - start)
        assert len(listing["tools"]) == expected
        caller.close()
        assert caller.ws is not None
        await caller.ws.closed
    return latencies


async def measure_calls(
    caller: Caller, tools: list[str], concurrency: int, seconds: float, relay_pid: int
) -> dict[str, float]:
    cycle = itertools.cycle(tools)
    latencies: list[float] = []
    timing = False
    deadline = 0.0

    async def worker() -> None:
        while True:
            tool = next(cycle)
            start = time.perf_counter()
            answer = await caller.request("tools/call", {"name": tool, "arguments": {}})
            elapsed = time.perf_counter() - start
            text = answer["content"][0]["text"]
            assert text == f"{tool.split('_')[0]}:{tool}", (tool, text)
            if timing:
                latencies.append(elapsed)
                if time.perf_counter() >= deadline:
                    return

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.5)  # warm-up
    cpu0, own0, wall0 = proc_cpu_seconds(relay_pid), time.process_time(), time.perf_counter()
    deadline = wall0 + seconds
    timing = True
    done, running = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
    wall = time.perf_counter() - wall0
    cpu = proc_cpu_seconds(relay_pid) - cpu0
    own = time.process_time() - own0
    if running:
        await asyncio.wait(running)
    for task in done:
        task.result()
    return {
        "rate": len(latencies) / wall,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "cpu_us": cpu / len(latencies) * 1e6,
        "gen_us": own / len(latencies) * 1e6,
    }


async def bench_one(
    port: int, key: str, n: int, args: argparse.Namespace, relay_pid: int
) -> dict[str, float]:
    agent = f"bench-aggregate-{n}-{secrets.token_hex(4)}"
    tools = [await connect_tool(port, key, agent, i) for i in range(n)]
    expected = n * TOOLS_PER_SERVER
    caller = await Caller.open(port, key, agent)
    # Ready once every server is initialized: the merged list has all their tools.
    for _ in range(1000):
        try:
            if len((await caller.request("tools/list"))["tools"]) == expected:
                break
        except RuntimeError:  # -32001 until the first tool connection is registered
            pass
        await asyncio.sleep(0.01)
    else:
        raise RuntimeError(f"N={n}: the servers did not all become ready")
    listed = await measure_list(caller, args.requests, expected)
    manager = await measure_manager_api(port, key, agent, args.requests, expected)
    names = [t for i in range(n) for t in tool_names(i)]
    calls = await measure_calls(caller, names, args.concurrency, args.seconds, relay_pid)
    caller.close()
    for tool in tools:
        tool.close()
    await asyncio.sleep(0.2)
    return {
        "list_p50": statistics.median(listed) * 1e3,
        "list_p99": percentile(listed, 99) * 1e3,
        "mgr_p50": statistics.median(manager) * 1e3,
        "mgr_p99": percentile(manager, 99) * 1e3,
        "call_rate": calls["rate"],
        "call_p50": calls["p50"] * 1e3,
        "call_p99": calls["p99"] * 1e3,
        "cpu_us": calls["cpu_us"],
        "gen_us": calls["gen_us"],
    }


async def bench(args: argparse.Namespace, port: int, key: str, relay_pid: int) -> None:
    counts = [int(x) for x in args.servers.split(",")]
    print(
        f"relay pid {relay_pid} on {HOST}:{port}; {os.cpu_count()} CPUs; tools/list x"
        f"{args.requests}; tools/call {args.concurrency} in flight for {args.seconds:g} s\n"
    )
    header = (
        f"{'N':>3} {'tools':>5} | {'list p50':>8} {'p99':>7} | {'mgr-api p50':>11} {'p99':>7} |"
        f" {'calls/s':>8} {'p50':>6} {'p99':>6} | {'CPU/call relay':>14} {'loadgen':>7}"
    )
    print(header)
    print("-" * len(header))
    # A round not shown first: the relay's first few hundred connections and calls are slower
    # (imports, caches, allocator), which would otherwise be charged to the first N.
    warmup = argparse.Namespace(**{**vars(args), "requests": 50, "seconds": 1.0})
    await bench_one(port, key, max(counts), warmup, relay_pid)
    # Rounds interleave the Ns (1, 5, 20, 1, 5, 20, ...) so that a load change on a shared
    # machine hits every N alike; each figure is the median over the rounds.
    rounds: list[list[dict[str, float]]] = [[] for _ in counts]
    for _ in range(args.runs):
        for i, n in enumerate(counts):
            rounds[i].append(await bench_one(port, key, n, args, relay_pid))
    results = [{k: statistics.median(r[k] for r in runs) for k in runs[0]} for runs in rounds]
    for n, r in zip(counts, results, strict=True):
        print(
            f"{n:>3} {n * TOOLS_PER_SERVER:>5} | {r['list_p50']:>6.2f}ms {r['list_p99']:>5.2f}ms"
            f" | {r['mgr_p50']:>9.2f}ms {r['mgr_p99']:>5.2f}ms | {r['call_rate']:>8.0f}"
            f" {r['call_p50']:>4.2f}ms {r['call_p99']:>4.2f}ms | {r['cpu_us']:>12.0f}us"
            f" {r['gen_us']:>5.0f}us"
        )
    print(f"(each figure: the median of {args.runs} interleaved rounds)")
    if len(counts) < 2:
        return
    base = results[0]
    print(f"\nrelative to the baseline N={counts[0]} (calls/s: higher is better; latency: lower)")
    for n, r in zip(counts[1:], results[1:], strict=True):
        print(
            f"  N={n:<3} calls/s x{r['call_rate'] / base['call_rate']:.2f}"
            f"   tools/list p50 x{r['list_p50'] / base['list_p50']:.2f}"
            f"   manager-api p50 x{r['mgr_p50'] / base['mgr_p50']:.2f}"
            f"   relay CPU/call x{r['cpu_us'] / base['cpu_us']:.2f}"
        )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve_forever(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--servers", default="1,5,20", help="the Ns, comma-separated")
    parser.add_argument("--requests", type=int, default=200, help="tools/list requests per N")
    parser.add_argument("--seconds", type=float, default=5.0, help="tools/call phase length")
    parser.add_argument("--concurrency", type=int, default=16, help="tools/call in flight")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds per N")
    parser.add_argument(
        "--tools-per-server", type=int, default=3, help="tools each server lists (3 x 20 = 60)"
    )
    args = parser.parse_args()
    global TOOLS_PER_SERVER
    TOOLS_PER_SERVER = args.tools_per_server
    key = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-aggregate-") as data_dir:
        process, port = start_relay(key, data_dir)
        try:
            run(bench(args, port, key, process.pid))
        finally:
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
