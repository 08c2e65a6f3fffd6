"""Benchmark cluster mode on this machine, side by side in one run.

Starts a ``redis-server`` and relay processes (``trio-mcp-relay serve``), then runs the same
load (``loadgen.py``: echo tools, callers keeping ``--window`` calls in flight) through each
layout, alternating layouts round by round, and prints the median of ``--rounds`` of:

* ``alone``        one relay without ``--cluster``: the floor the others are compared to;
* ``same-node``    two cluster nodes, every agent's tool and callers on node A (what a load
                   balancer hashing on the routing hint gives): cluster mode's cost on local
                   traffic;
* ``cross-node``   two cluster nodes, every tool on A and every caller on B: each call
                   crosses Redis twice;
* ``two-nodes``    two cluster nodes, each agent's tool and callers on one node, the agents
                   split between A and B: what a second process per machine gives.

calls/s, p50/p99 latency and relay CPU per call (all relay processes; Redis's CPU per call
is shown beside it). Run by hand; the figures go in the README.

    python scripts/bench_cluster.py
    python scripts/bench_cluster.py --agents 10 --callers 2 --window 8 --calls 500 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from loadgen import free_port, proc_cpu_seconds, relay_command, run, run_load, start

LAYOUTS = ("alone", "same-node", "cross-node", "two-nodes")


def redis_server(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", directory]
    return start(command, port), port


def node(port: int, key: str, redis_port: int, name: str) -> list[str]:
    return [
        *relay_command(port, key),
        *["--cluster", f"redis://127.0.0.1:{redis_port}/0", "--cluster-node", name],
    ]


def measure(
    layout: str,
    ports: dict[str, int],
    pids: dict[str, int],
    redis_pid: int,
    args: argparse.Namespace,
    key: str,
) -> dict[str, float]:
    a, b = ports["A"], ports["B"]
    tools, callers, relays = {
        "alone": ([ports["alone"]], [ports["alone"]], [pids["alone"]]),
        "same-node": ([a], [a], [pids["A"], pids["B"]]),
        "cross-node": ([a], [b], [pids["A"], pids["B"]]),
        "two-nodes": ([a, b], [a, b], [pids["A"], pids["B"]]),
    }[layout]
    redis0 = proc_cpu_seconds(redis_pid)
    stats = run(
        run_load(
            host="127.0.0.1",
            port=tools[0],
            key=key,
            agents=args.agents,
            callers=args.callers,
            window=args.window,
            n=args.calls,
            size=args.size,
            pids=relays,
            tool_ports=tools,
            caller_ports=callers,
            settle=1.0,
            tag=f"{layout}-{secrets.token_hex(3)}",
        )
    )
    redis_cpu = proc_cpu_seconds(redis_pid) - redis0
    if stats.errors:
        print(f"  {layout}: {len(stats.errors)} errors, e.g. {stats.errors[:2]}", file=sys.stderr)
    calls = max(1, stats.calls)
    return {
        "calls_per_s": stats.calls / stats.wall,
        "p50_ms": stats.percentile(50) * 1000,
        "p99_ms": stats.percentile(99) * 1000,
        "cpu_us_per_call": stats.cpu / calls * 1e6,
        "redis_us_per_call": redis_cpu / calls * 1e6,
        "errors": float(len(stats.errors)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--callers", type=int, default=2, help="callers per agent")
    parser.add_argument("--window", type=int, default=1, help="calls in flight per caller")
    parser.add_argument("--calls", type=int, default=500, help="timed calls per caller")
    parser.add_argument("--size", type=int, default=200, help="bytes per request frame")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    key = secrets.token_hex(16)
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as directory:
        try:
            redis, redis_port = redis_server(directory)
            processes.append(redis)
            ports = {name: free_port() for name in ("alone", "A", "B")}
            pids: dict[str, int] = {}
            for name, port in ports.items():
                command = relay_command(port, key)
                if name != "alone":
                    command = node(port, key, redis_port, name)
                process = start(command, port, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                processes.append(process)
                pids[name] = process.pid
            time.sleep(2)  # the nodes join the cluster
            results: dict[str, list[dict[str, float]]] = {layout: [] for layout in LAYOUTS}
            for round_ in range(args.rounds):
                for layout in LAYOUTS if round_ % 2 == 0 else reversed(LAYOUTS):
                    results[layout].append(measure(layout, ports, pids, redis.pid, args, key))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
    print(
        f"{args.agents} agents x {args.callers} callers, window {args.window}, "
        f"{args.size} B frames, {args.calls} calls per caller, median of {args.rounds} rounds"
    )
    header = (
        "layout",
        "calls/s",
        "vs alone",
        "p50 ms",
        "p99 ms",
        "relay CPU us/call",
        "redis us/call",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    alone = statistics.median(r["calls_per_s"] for r in results["alone"])
    for layout in LAYOUTS:
        runs = results[layout]
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        errors = sum(r["errors"] for r in runs)
        print(
            f"| {layout} | {median['calls_per_s']:,.0f} | {median['calls_per_s'] / alone:.2f}x "
            f"| {median['p50_ms']:.2f} | {median['p99_ms']:.2f} | {median['cpu_us_per_call']:.0f} "
            f"| {median['redis_us_per_call']:.0f} |" + (f" {errors:.0f} errors" if errors else "")
        )


if __name__ == "__main__":
    main()
