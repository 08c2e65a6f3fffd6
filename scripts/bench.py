"""Benchmark the relay side by side with the reference server, in one run.

Starts ``trio-mcp-relay serve`` and the reference server (xinnan-tech/mcp-endpoint-server,
from a checkout given on the command line, run by a venv of its own) on loopback ports, runs
every scenario against both, alternating (ours first on odd runs, the reference first on
even ones), with the load generator of ``loadgen.py`` (asyncio, raw protocols: cheap next to
the servers), and prints the median of each figure and the ratios. Each scenario gets fresh
servers. A "floor" row runs the same load against a direct echo over our transport (no
relay): one frame in, one out, so the relay's own overhead is the difference.

    git clone https://github.com/xinnan-tech/mcp-endpoint-server /tmp/reference
    python scripts/bench.py --reference /tmp/reference              # everything, 3 runs
    python scripts/bench.py --reference /tmp/reference --only w1-a10 --runs 5

The reference runs from ``--reference-venv`` (default ``CHECKOUT/.venv``); when that venv is
missing it is created and the checkout's ``requirements.txt`` installed into it. Nothing of
the reference enters this repository.

``tools-list`` measures ``tools/list`` with a real tool: the vendored ``mcp_pipe.py``
(xiaozhi's bridge) running an official-SDK stdio server. The reference forwards each request
to it; the relay answers from its catalog.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from loadgen import free_port, relay_command, run, run_load, start, token_for

ROOT = Path(__file__).parent.parent
ECHO_SERVER = Path(__file__).parent / "echo_server.py"
REAL = ROOT / "tests" / "data" / "real"


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    agents: int
    callers: int
    window: int
    size: int
    n: int  # timed calls per caller
    method: str = "tools/call"


SCENARIOS = [
    Scenario("w1-a10", "10 agents x 2 callers, window 1", 10, 2, 1, 200, 500),
    Scenario("w1-c20", "1 agent x 20 callers, window 1", 1, 20, 1, 200, 500),
    Scenario("w1-a100", "100 agents x 2 callers, window 1", 100, 2, 1, 200, 50),
    Scenario("w8-a10", "10 x 2, window 8", 10, 2, 8, 200, 1000),
    Scenario("20k-a10", "10 x 2, 20 KB frames", 10, 2, 1, 20000, 500),
    Scenario("tools-list", "tools/list, real tool (mcp_pipe.py)", 1, 4, 1, 0, 250, "tools/list"),
]
FLOORS = ["w1-a10", "20k-a10"]


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def reference_python(checkout: Path, venv: Path) -> Path:
    """The reference's interpreter: its own venv, made (with its requirements) if missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating the reference's venv {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        requirements = str(checkout / "requirements.txt")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", requirements], check=True)
    return python


def start_reference(checkout: Path, python: Path, key: str, workdir: Path) -> Server:
    """The reference server as its README runs it (``python main.py``, which reads
    ``data/.mcp-endpoint-server.cfg`` relative to its working directory), on a free port,
    logging warnings only, as ours does here."""
    port = free_port()
    cwd = Path(tempfile.mkdtemp(prefix="reference-", dir=workdir))
    (cwd / "data").mkdir()
    (cwd / "data" / ".mcp-endpoint-server.cfg").write_text(
        f"[server]\nhost = 127.0.0.1\nport = {port}\ndebug = false\nlog_level = WARNING\n"
        f"key = {key}\n\n[websocket]\nmax_connections = 100000\n\n"
        f"[logging]\nlog_file = {cwd}/logs/mcp_server.log\n"
    )
    command = [str(python), str(checkout / "main.py")]
    return Server("reference", port, start(command, port, cwd=cwd))


def start_ours(key: str) -> Server:
    port = free_port()
    return Server("ours", port, start(relay_command(port, key), port))


def start_echo() -> Server:
    port = free_port()
    return Server("floor", port, start([sys.executable, str(ECHO_SERVER), str(port)], port))


@contextmanager
def real_tool(server: Server, key: str, tag: str, workdir: Path) -> Iterator[None]:
    """``mcp_pipe.py`` bridging the official-SDK stdio server to agent 0 of ``tag``."""
    config = workdir / f"mcp_config-{tag}.json"
    servers = {"alpha": {"command": sys.executable, "args": [str(REAL / "mcp_server.py"), "a"]}}
    config.write_text(json.dumps({"mcpServers": servers}))
    token = token_for(key, f"{tag}-agent-0")
    env = {
        **os.environ,
        "MCP_ENDPOINT": f"ws://127.0.0.1:{server.port}/mcp_endpoint/mcp/?token={token}",
        "MCP_CONFIG": str(config),
    }
    pipe = subprocess.Popen(
        [sys.executable, str(REAL / "mcp_pipe.py")],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(4)  # the SDK server starts in about 1.5 s; the relay then lists it
        yield
    finally:
        pipe.terminate()
        pipe.wait(timeout=15)


def measure(server: Server, key: str, s: Scenario) -> dict[str, float]:
    # tools/list goes to the agent of the real tool; other scenarios get fresh agents per run
    tag = s.name if s.method == "tools/list" else f"{s.name}-{secrets.token_hex(3)}"
    load = run_load(
        host="127.0.0.1",
        port=server.port,
        key=key,
        agents=s.agents,
        callers=s.callers,
        window=s.window,
        n=s.n,
        size=s.size,
        pid=server.process.pid,
        tag=tag,
        method=s.method,
        echo=s.method == "tools/call",
    )
    stats = run(asyncio.wait_for(load, 120))
    return {
        "calls_per_s": stats.calls / stats.wall,
        "p50_ms": stats.percentile(50) * 1000,
        "p99_ms": stats.percentile(99) * 1000,
        "cpu_us": stats.cpu / max(1, stats.calls) * 1e6,
        "errors": float(len(stats.errors)),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_scenario(s: Scenario, runs: int, key: str, checkout: Path, python: Path, workdir: Path):
    ours, reference = start_ours(key), start_reference(checkout, python, key, workdir)
    results: dict[str, list[dict[str, float]]] = {"ours": [], "reference": []}
    try:
        with real_tools(s, (ours, reference), key, workdir):
            for i in range(runs):
                order = (ours, reference) if i % 2 == 0 else (reference, ours)
                for server in order:
                    results[server.name].append(measure(server, key, s))
    finally:
        ours.stop()
        reference.stop()
    return median_of(results["ours"]), median_of(results["reference"])


@contextmanager
def real_tools(s: Scenario, servers: tuple[Server, ...], key: str, workdir: Path):
    """For ``tools/list``: one real tool per server, for agent 0 of a fixed tag."""
    if s.method != "tools/list":
        yield
        return
    with real_tool(servers[0], key, s.name, workdir), real_tool(servers[1], key, s.name, workdir):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--reference", type=Path, required=True, help="reference checkout")
    parser.add_argument("--reference-venv", type=Path, help="its venv (default CHECKOUT/.venv)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (median reported)")
    parser.add_argument("--only", action="append", help="scenario name(s) to run")
    parser.add_argument("--no-floor", action="store_true", help="skip the direct-echo floor rows")
    args = parser.parse_args()
    checkout = args.reference.resolve()
    if not (checkout / "main.py").exists():
        parser.error(f"--reference {checkout}: no main.py there (a mcp-endpoint-server checkout?)")
    python = reference_python(checkout, (args.reference_venv or checkout / ".venv").resolve())
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    key = secrets.token_hex(16)
    lines = [
        "| scenario | calls/s: ours / reference | ratio | p50 ms | p99 ms: ours / reference "
        "| relay CPU per call: ours / reference | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        for s in scenarios:
            ours, ref = run_scenario(s, args.runs, key, checkout, python, workdir)
            lines.append(
                f"| {s.label} | {ours['calls_per_s']:,.0f} / {ref['calls_per_s']:,.0f} "
                f"| {ours['calls_per_s'] / ref['calls_per_s']:.2f}x "
                f"| {ours['p50_ms']:.2f} / {ref['p50_ms']:.2f} "
                f"| {ours['p99_ms']:.2f} / {ref['p99_ms']:.2f} "
                f"| {ours['cpu_us']:.0f} / {ref['cpu_us']:.0f} µs "
                f"| {ours['cpu_us'] / ref['cpu_us']:.2f}x |"
            )
            errors = ours["errors"] + ref["errors"]
            print(lines[-1] + (f" errors: {errors:.0f}" if errors else ""), flush=True)
        if not args.no_floor:
            for name in FLOORS:
                s = next(x for x in SCENARIOS if x.name == name)
                echo = start_echo()
                try:
                    m = median_of([measure(echo, key, s) for _ in range(args.runs)])
                finally:
                    echo.stop()
                lines.append(
                    f"| floor: direct echo, {s.label} | {m['calls_per_s']:,.0f} | | "
                    f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['cpu_us']:.0f} µs per echo | |"
                )
                print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    print(
        f"\nmedian of {args.runs} runs each, alternating; {os.cpu_count()} cores; "
        f"{time.strftime('%Y-%m-%d')}"
    )


if __name__ == "__main__":
    main()
