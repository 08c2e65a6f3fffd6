"""Soak the relay: hold many connections, idle and busy, and watch memory and errors over time.

Starts ``trio-mcp-relay serve`` on a loopback port (or uses ``--port`` of a relay you started,
with ``--pid`` for its memory), opens ``--idle`` idle connections (half tools, half callers, on
distinct agents), measures the relay's RSS per idle connection, then runs ``--busy-agents``
agents with busy callers for ``--duration`` seconds, printing one line per ``--interval``:
calls/s, errors, RSS, connections. Traffic goes to 127.0.0.1 only; the run is bounded in time.

    python scripts/soak.py --idle 4000 --busy-agents 10 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from loadgen import (
    Caller,
    Stats,
    WsClient,
    connect,
    echo_tool,
    free_port,
    proc_rss_bytes,
    relay_command,
    start,
    token_for,
)


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def wait_listening(port: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def open_idle(port: int, key: str, count: int) -> list[WsClient]:
    """Half tools, half callers, one of each per agent. A tool answers the relay's
    initialize and tools/list, as a real one does, then stays silent; a caller says nothing."""
    conns: list[WsClient] = []
    for i in range(count):
        token = token_for(key, f"idle-{i // 2}")
        if i % 2 == 0:
            ref: list[WsClient] = []
            answer = echo_tool(ref)
            tool = await connect("127.0.0.1", port, f"/mcp_endpoint/mcp/?token={token}", answer)
            ref.append(tool)
            for reply in answer.early:  # type: ignore[attr-defined]
                tool.send(reply)
            conns.append(tool)
        else:
            target = f"/mcp_endpoint/call/?token={token}"
            conns.append(await connect("127.0.0.1", port, target, lambda _: None))
    return conns


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0, help="use a running relay on this port")
    parser.add_argument("--pid", type=int, default=0, help="the running relay's pid (with --port)")
    parser.add_argument("--key", default="", help="the running relay's key (with --port)")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections to hold")
    parser.add_argument("--busy-agents", type=int, default=10)
    parser.add_argument("--callers", type=int, default=2, help="busy callers per agent")
    parser.add_argument("--window", type=int, default=4, help="requests in flight per caller")
    parser.add_argument("--size", type=int, default=200, help="request frame size in bytes")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of busy traffic")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between reports")
    args = parser.parse_args()
    raise_fd_limit()

    relay: subprocess.Popen[bytes] | None = None
    key, port, pid = args.key, args.port, args.pid
    if not port:
        key = secrets.token_hex(16)
        port = free_port()
        relay = start(relay_command(port, key), port, preexec_fn=raise_fd_limit)
        pid = relay.pid
    try:
        await wait_listening(port)
        await asyncio.sleep(0.5)
        base_rss = proc_rss_bytes(pid)
        started = time.perf_counter()
        idle = await open_idle(port, key, args.idle)
        await asyncio.sleep(1.0)
        idle_rss = proc_rss_bytes(pid)
        per_conn = (idle_rss - base_rss) / max(1, args.idle)
        print(
            f"idle: {args.idle} connections opened in {time.perf_counter() - started:.1f} s; "
            f"relay RSS {base_rss / 2**20:.1f} MiB -> {idle_rss / 2**20:.1f} MiB, "
            f"{per_conn / 1024:.1f} KiB per idle connection",
            flush=True,
        )

        stats = Stats()
        callers: list[Caller] = []
        for a in range(args.busy_agents):
            token = token_for(key, f"busy-{a}")
            ref: list[WsClient] = []
            answer = echo_tool(ref)
            target = f"/mcp_endpoint/mcp/?token={token}"
            ref.append(await connect("127.0.0.1", port, target, answer))
            for reply in answer.early:  # type: ignore[attr-defined]
                ref[0].send(reply)
            for c in range(args.callers):
                caller = Caller(stats, args.window, args.size, f"b{a}c{c}")
                caller.proto = await connect(
                    "127.0.0.1", port, f"/mcp_endpoint/call/?token={token}", caller.on_message
                )
                callers.append(caller)
        await asyncio.sleep(0.2)
        stats.timing = True
        for caller in callers:
            caller.run(10**12)
        t0 = time.perf_counter()
        last_calls, last_t = 0, t0
        print("t_s  calls/s  p99_ms  errors  rss_MiB  idle_alive", flush=True)
        while time.perf_counter() - t0 < args.duration:
            await asyncio.sleep(min(args.interval, args.duration - (time.perf_counter() - t0)))
            now = time.perf_counter()
            rate = (stats.calls - last_calls) / (now - last_t)
            window = stats.latencies[-5000:]
            p99 = sorted(window)[int(0.99 * (len(window) - 1))] * 1000 if window else 0.0
            alive = sum(1 for c in idle if not c.closed.done())
            print(
                f"{now - t0:5.1f}  {rate:7.0f}  {p99:6.2f}  {len(stats.errors):6d}  "
                f"{proc_rss_bytes(pid) / 2**20:7.1f}  {alive:10d}",
                flush=True,
            )
            last_calls, last_t = stats.calls, now
        for caller in callers:
            caller.limit = 0  # stop issuing
        await asyncio.sleep(0.5)
        total = time.perf_counter() - t0
        print(
            f"total: {stats.calls} calls in {total:.1f} s ({stats.calls / total:.0f}/s), "
            f"{len(stats.errors)} errors; final RSS {proc_rss_bytes(pid) / 2**20:.1f} MiB",
            flush=True,
        )
        for line in stats.errors[:5]:
            print("  error:", line)
        for conn in idle:
            conn.close()
    finally:
        if relay is not None:
            relay.send_signal(signal.SIGTERM)
            try:
                relay.wait(timeout=10)
            except subprocess.TimeoutExpired:
                relay.kill()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
