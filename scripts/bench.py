"""Benchmark the relay: calls/s, latency and relay CPU per call, on the reference scenarios.

Starts ``trio-mcp-relay serve`` on a loopback port, runs each scenario ``--runs`` times with
the load generator of ``loadgen.py`` (asyncio, raw protocols: cheap next to the relay) and
prints the median of each figure, next to the reference server's figures measured on this
machine class. A "floor" row runs the same load against a direct echo over the same
transport (no relay): one frame in, one out, so the relay's own overhead is the difference.

    python scripts/bench.py                      # every scenario, 3 runs each
    python scripts/bench.py --only w1-a10 --runs 5
    python scripts/bench.py --cross-check ../shared/bench/bench_relay.py

``--cross-check`` also runs that generator (the one that measured the reference) against the
same relay, so the two generators' figures can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from loadgen import free_port, relay_command, run, run_load, start


@dataclass(frozen=True)
class Scenario:
    name: str
    agents: int
    callers: int
    window: int
    size: int
    n: int
    reference: tuple[int, float, float, int]  # calls/s, p50 ms, p99 ms, CPU us per call


SCENARIOS = [
    Scenario("w1-a10", 10, 2, 1, 200, 500, (7600, 2.0, 4.3, 132)),
    Scenario("w1-c20", 1, 20, 1, 200, 500, (6600, 3.2, 5.5, 148)),
    Scenario("w1-a100", 100, 2, 1, 200, 50, (6700, 25.6, 49.9, 150)),
    Scenario("w8-a10", 10, 2, 8, 200, 1000, (13800, 11.2, 18.7, 72)),
    Scenario("20k-a10", 10, 2, 1, 20000, 200, (3700, 5.9, 7.3, 270)),
]

ECHO_SERVER = Path(__file__).parent / "echo_server.py"


def measure(port: int, key: str, pid: int, s: Scenario) -> dict[str, float]:
    stats = run(
        run_load(
            host="127.0.0.1",
            port=port,
            key=key,
            agents=s.agents,
            callers=s.callers,
            window=s.window,
            n=s.n,
            size=s.size,
            pid=pid,
            tag=f"{s.name}-{secrets.token_hex(3)}",
        )
    )
    return {
        "calls_per_s": stats.calls / stats.wall,
        "p50_ms": stats.percentile(50) * 1000,
        "p99_ms": stats.percentile(99) * 1000,
        "cpu_us_per_call": stats.cpu / max(1, stats.calls) * 1e6,
        "errors": float(len(stats.errors)),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def row(name: str, m: dict[str, float], ref: tuple[int, float, float, int] | None) -> str:
    text = (
        f"| {name:<8} | {m['calls_per_s']:>8,.0f} | {m['p50_ms']:>6.1f} / {m['p99_ms']:>5.1f} "
        f"| {m['cpu_us_per_call']:>6.0f} µs | {m['errors']:>3.0f} |"
    )
    if ref is not None:
        calls, _, p99, cpu = ref
        text += (
            f" {m['calls_per_s'] / calls:>4.2f}× | {m['cpu_us_per_call'] / cpu:>4.2f}× |"
            f" {'yes' if m['p99_ms'] <= p99 else 'no':>3} |"
        )
    else:
        text += "      |       |     |"
    return text


def cross_check(script: str, port: int, key: str, pid: int, s: Scenario) -> str:
    result = subprocess.run(
        [
            sys.executable,
            script,
            "--port",
            str(port),
            "--key",
            key,
            "--pid",
            str(pid),
            "--agents",
            str(s.agents),
            "--callers",
            str(s.callers),
            "--window",
            str(s.window),
            "--n",
            str(s.n),
            "--size",
            str(s.size),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        return f"cross-check failed: {result.stderr.strip()[-300:]}"
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return (
        f"  cross-check ({Path(script).name}): {data['calls_per_s']:,} calls/s, "
        f"p50/p99 {data['p50_us'] / 1000:.1f}/{data['p99_us'] / 1000:.1f} ms, "
        f"{data['relay_cpu_us_per_call']} µs CPU/call, errors {len(data['errors'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (median reported)")
    parser.add_argument("--only", action="append", help="scenario name(s) to run")
    parser.add_argument("--no-floor", action="store_true", help="skip the direct-echo floor row")
    parser.add_argument("--cross-check", metavar="BENCH_RELAY_PY", help="also run this generator")
    args = parser.parse_args()
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]

    key = secrets.token_hex(16)
    port = free_port()
    relay = start(relay_command(port, key), port)
    header = (
        "| scenario | calls/s  | p50 / p99 ms   | relay CPU/call | err | calls vs ref | CPU vs ref "
        "| p99 ≤ ref |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    try:
        for s in scenarios:
            runs = [measure(port, key, relay.pid, s) for _ in range(args.runs)]
            lines.append(row(s.name, median_of(runs), s.reference))
            print(lines[-1], flush=True)
            if args.cross_check:
                print(cross_check(args.cross_check, port, key, relay.pid, s), flush=True)
    finally:
        relay.terminate()
        relay.wait(timeout=15)
    if not args.no_floor:
        echo_port = free_port()
        echo = start([sys.executable, str(ECHO_SERVER), str(echo_port)], echo_port)
        try:
            s = SCENARIOS[0]
            runs = [measure(echo_port, key, echo.pid, s) for _ in range(args.runs)]
            lines.append(row("floor", median_of(runs), None))
            print(lines[-1], "(direct echo over the same transport, 10×2 callers, window 1)")
        finally:
            echo.terminate()
            echo.wait(timeout=15)
    print()
    print("\n".join(lines))
    cores = os.cpu_count()
    print(f"\nmedian of {args.runs} runs; reference: README 'Performance'; {cores} cores")


if __name__ == "__main__":
    main()
