"""Cluster mode under faults, as the README reports it: 4 agents, 3 nodes, 8 callers.

Starts a ``redis-server``, three nodes (``trio-mcp-relay serve --cluster``, processes), nginx
in front of them (one port per node, the other nodes as its backups, so that a bridge that
loses its node reconnects to another), and for each agent our ``pipe`` bridging an
official-SDK stdio server (``tests/data/real/mcp_server.py``) through nginx: agents 0 and 3
on node A, 1 on B, 2 on C. Two callers per agent connect straight to nodes (caller ``i``
of all eight to node ``i % 3``), so most calls cross nodes. Each caller keeps one
``tools/call`` in flight, with ids of every JSON type (huge integers included). Then:

1. ``--traffic`` seconds (default 30) of traffic: every request must be answered exactly
   once, with its own id;
2. node A is killed (SIGKILL): each request routed to A must be answered ``-32003`` within
   the lease + 1 s, and the agents whose server was on A must work again (the bridge
   through nginx on another node) within the lease + 5 s; callers on A reconnect elsewhere;
3. Redis is stopped for ``--outage`` seconds (default 10): calls whose caller and server
   share a node must go on; cross-node calls are answered ``-32002``; after Redis returns,
   cross-node calls must work again within 5 s.

    python scripts/cluster_faults.py                 # lease 10 s (the default)
    python scripts/cluster_faults.py --lease 3 --traffic 10 --outage 5

Prints what it measured and exits 1 if any of it failed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coredis
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(Path(__file__).parent))

from loadgen import free_port, relay_command, start  # noqa: E402

from trio_mcp_relay._auth import caller_url, tool_url  # noqa: E402

SERVER = ROOT / "tests" / "data" / "real" / "mcp_server.py"
NAMES = ("alpha", "beta", "gamma", "delta")
HOME = {0: "A", 1: "B", 2: "C", 3: "A"}  # which node each agent's bridge goes to first
NODES = ("A", "B", "C")
INIT = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "f", "version": "1"},
}


@dataclass
class Outcome:
    agent: int
    caller: int
    node: str  # the caller's node when it sent the request
    sent: float
    answered: float | None = None
    kind: str = ""  # "result", or the error code


@dataclass
class Run:
    key: str
    ports: dict[str, int]
    lease: float
    outcomes: list[Outcome] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    lost: int = 0  # in flight on a caller connection that died with its node
    dead: set[str] = field(default_factory=set)
    stop: bool = False

    def first_result(self, where: Callable[[Outcome], bool]) -> float | None:
        """When the first of the calls ``where`` picks got a result (None: none did)."""
        return min(
            (o.answered for o in self.outcomes if o.kind == "result" and o.answered and where(o)),
            default=None,
        )


def ids() -> Any:
    for n in itertools.count(1):
        yield (n, f"s-{n}", 2**70 + n, n + 0.5)[n % 4]


async def caller(run: Run, agent: int, index: int) -> None:
    """One caller: calls in a loop, reconnecting to the next live node when its own dies."""
    order = [NODES[(index + k) % 3] for k in range(3)]
    source = ids()
    while not run.stop:
        node = next((n for n in order if n not in run.dead), None)
        if node is None:
            return
        url = caller_url(f"ws://127.0.0.1:{run.ports[node]}", run.key, f"agent-{agent}")
        try:
            async with open_websocket_url(url) as ws:
                await ws.send_message(
                    json.dumps(
                        {"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": INIT}
                    )
                )
                while json.loads(await ws.get_message()).get("id") != "init":
                    pass
                while not run.stop:
                    rid = next(source)
                    outcome = Outcome(agent, index, node, time.monotonic())
                    run.outcomes.append(outcome)
                    call = {"name": f"{NAMES[agent]}_add", "arguments": {"a": 1, "b": 2}}
                    await ws.send_message(
                        json.dumps(
                            {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": call}
                        )
                    )
                    while True:
                        message = json.loads(await ws.get_message())
                        if "method" in message:
                            continue  # list_changed and the like
                        got = message.get("id")
                        if type(got) is not type(rid) or got != rid:
                            run.wrong.append(f"caller {index}: sent {rid!r}, got {got!r}")
                            continue
                        if outcome.answered is not None:
                            run.duplicates.append(f"caller {index}: {rid!r} answered twice")
                        outcome.answered = time.monotonic()
                        if "result" in message:
                            outcome.kind = "result"
                        else:
                            outcome.kind = str(message["error"]["code"])
                        break
                    if outcome.kind != "result":
                        await trio.sleep(0.05)
        except (ConnectionClosed, HandshakeError, OSError):
            if run.outcomes and run.outcomes[-1].caller == index:
                pass
            for outcome in run.outcomes:
                if outcome.caller == index and outcome.agent == agent and outcome.answered is None:
                    outcome.kind = "lost"
                    outcome.answered = time.monotonic()
                    run.lost += 1
            await trio.sleep(0.2)


async def one_call(
    run: Run, node: str, agent: int, call: dict[str, Any], outcome: Outcome, sent: trio.Event
) -> None:
    """From ``node``, one call that the tool holds: ``outcome`` records its answer."""
    url = caller_url(f"ws://127.0.0.1:{run.ports[node]}", run.key, f"agent-{agent}")
    async with open_websocket_url(url) as ws:
        outcome.sent = time.monotonic()
        request = {"jsonrpc": "2.0", "id": "held", "method": "tools/call", "params": call}
        await ws.send_message(json.dumps(request))
        sent.set()
        while True:
            message = json.loads(await ws.get_message())
            if message.get("id") == "held":
                outcome.answered = time.monotonic()
                outcome.kind = "result" if "result" in message else str(message["error"]["code"])
                return


def wait_for_call(agent: int, directory: Path) -> dict[str, Any]:
    """A call the agent's SDK server holds until a file appears (it never does)."""
    path = directory / f"stuck-{agent}"
    return {"name": f"{NAMES[agent]}_wait_for", "arguments": {"path": str(path)}}


async def held_tool(run: Run, ready: trio.Event, got_call: trio.Event) -> None:
    """A second server of agent 0 on node A that never comes back once A dies: it holds every
    call it gets (so its callers' answers can only come from A's lease lapsing)."""
    url = tool_url(f"ws://127.0.0.1:{run.ports['A']}", run.key, "agent-0") + "&server_id=held"
    with contextlib.suppress(ConnectionClosed, OSError):
        async with open_websocket_url(url) as ws:
            while True:
                frame = json.loads(await ws.get_message())
                if frame.get("method") == "initialize":
                    result: Any = {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": "held", "version": "1"},
                    }
                elif frame.get("method") == "tools/list":
                    result = {
                        "tools": [{"name": "held_forever", "inputSchema": {"type": "object"}}]
                    }
                elif frame.get("method") == "tools/call":
                    got_call.set()
                    continue
                else:
                    continue
                await ws.send_message(
                    json.dumps({"jsonrpc": "2.0", "id": frame["id"], "result": result})
                )
                if frame["method"] == "tools/list":
                    ready.set()


async def servers_by_agent(redis_port: int) -> dict[int, str]:
    """Which node holds each agent's server now, as Redis says."""
    client: coredis.Redis[bytes] = coredis.Redis(port=redis_port, decode_responses=False)
    out: dict[int, str] = {}
    async with client:
        async for key in client.scan_iter(match=b"trio-mcp-relay:srv:*"):
            value = await client.get(key)
            if value:
                record = json.loads(value.partition(b"\n")[2])
                # A node's id is its name and a suffix of its process.
                out[int(record["agent"].split("-")[1])] = record["node"].partition("~")[0]
    return out


def nginx_config(directory: Path, ports: dict[str, int], front: dict[str, int]) -> str:
    blocks = []
    for node, listen in front.items():
        servers = [f"  server 127.0.0.1:{ports[node]} max_fails=1 fail_timeout=60s;"]
        servers += [f"  server 127.0.0.1:{ports[o]} backup;" for o in NODES if o != node]
        blocks.append(
            f" upstream to_{node} {{\n" + "\n".join(servers) + "\n }\n"
            f" server {{\n  listen 127.0.0.1:{listen};\n  location /mcp_endpoint/ {{\n"
            f"   proxy_pass http://to_{node};\n   proxy_http_version 1.1;\n"
            "   proxy_set_header Upgrade $http_upgrade;\n"
            '   proxy_set_header Connection "upgrade";\n'
            "   proxy_read_timeout 3600s;\n   proxy_connect_timeout 1s;\n  }\n }\n"
        )
    return (
        f"daemon off;\npid {directory}/nginx.pid;\nerror_log {directory}/error.log;\n"
        f"events {{}}\nhttp {{\n access_log off;\n client_body_temp_path {directory}/b;\n"
        f" proxy_temp_path {directory}/p;\n" + "".join(blocks) + "}\n"
    )


def summary(outcomes: list[Outcome], since: float, until: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        if since <= o.sent < until:
            counts[o.kind or "unanswered"] = counts.get(o.kind or "unanswered", 0) + 1
    return counts


async def main(args: argparse.Namespace) -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        key = "0123456789abcdef0123456789abcdef"
        redis_port = free_port()
        redis_cmd = [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp,
        ]
        processes: dict[str, subprocess.Popen[bytes]] = {"redis": start(redis_cmd, redis_port)}
        ports = {n: free_port() for n in NODES}
        front = {n: free_port() for n in NODES}
        try:
            for n in NODES:
                command = [
                    *relay_command(ports[n], key),  # on 127.0.0.1, quiet, a data dir of its own
                    *["--cluster", f"redis://127.0.0.1:{redis_port}/0", "--cluster-node", n],
                    *["--cluster-lease", str(args.lease), "--init-timeout", "30"],
                ]
                log = (directory / f"node-{n}.log").open("wb")
                processes[n] = subprocess.Popen(  # noqa: ASYNC220 (before any traffic)
                    command, stdout=subprocess.DEVNULL, stderr=log
                )
            (directory / "nginx.conf").write_text(nginx_config(directory, ports, front))
            processes["nginx"] = subprocess.Popen(  # noqa: ASYNC220
                [nginx, "-p", tmp, "-c", str(directory / "nginx.conf")], stderr=subprocess.DEVNULL
            )
            for n in NODES:
                start(["true"], ports[n])
                start(["true"], front[n])
            for agent, name in enumerate(NAMES):
                config = directory / f"mcp_config_{agent}.json"
                config.write_text(
                    json.dumps(
                        {
                            "mcpServers": {
                                name: {"command": sys.executable, "args": [str(SERVER), name]}
                            }
                        }
                    )
                )
                url = tool_url(f"ws://127.0.0.1:{front[HOME[agent]]}", key, f"agent-{agent}")
                processes[f"bridge-{agent}"] = subprocess.Popen(  # noqa: ASYNC220
                    [
                        sys.executable,
                        "-m",
                        "trio_mcp_relay",
                        "pipe",
                        "--config",
                        str(config),
                        "--endpoint",
                        url,
                        "--backoff-initial",
                        "0.2",
                        "--backoff-max",
                        "1",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=(directory / f"bridge-{agent}.log").open("wb"),
                )
            print("waiting for the 4 servers to be ready on their nodes ...")
            with trio.fail_after(60):
                while len(await servers_by_agent(redis_port)) < len(NAMES):  # noqa: ASYNC110
                    await trio.sleep(0.2)
            await trio.sleep(1)  # every node's directory has them
            run = Run(key, ports, args.lease)
            async with trio.open_nursery() as nursery:
                for index in range(8):
                    nursery.start_soon(caller, run, index % 4, index)
                t0 = time.monotonic()
                await trio.sleep(args.traffic)
                # 1. steady traffic
                steady = summary(run.outcomes, t0, time.monotonic() - 1)  # answered by now
                print(f"1. {args.traffic:g} s of traffic: {steady}")
                if set(steady) - {"result"} or run.duplicates or run.wrong:
                    failures.append(
                        f"steady traffic: {steady}, {run.duplicates[:3]}, {run.wrong[:3]}"
                    )
                # 2. kill node A, with a request that cannot finish in flight to each of its
                # servers from a caller on B (the tool waits for a file that never appears).
                routed_to_a = {0, 3}
                stuck: dict[int, Outcome] = {}
                for agent in sorted(routed_to_a):
                    stuck[agent] = Outcome(agent, 100 + agent, "B", time.monotonic())
                    call = wait_for_call(agent, directory)
                    nursery.start_soon(one_call, run, "B", agent, call, stuck[agent], trio.Event())
                held_ready, held_called = trio.Event(), trio.Event()
                nursery.start_soon(held_tool, run, held_ready, held_called)
                held = [Outcome(0, 200, "C", time.monotonic())]
                held_sent = trio.Event()
                with trio.fail_after(10):
                    await held_ready.wait()
                    await trio.sleep(1)  # C's directory has it
                    forever = {"name": "held_forever", "arguments": {}}
                    nursery.start_soon(one_call, run, "C", 0, forever, held[0], held_sent)
                    await held_called.wait()
                with trio.fail_after(10):
                    while not all(  # noqa: ASYNC110 (files of another process)
                        (directory / f"stuck-{a}.started").exists() for a in routed_to_a
                    ):
                        await trio.sleep(0.02)
                processes["A"].send_signal(signal.SIGKILL)
                killed = time.monotonic()
                run.dead.add("A")
                print("2. node A killed (SIGKILL)")
                await trio.sleep(args.lease + 6)
                in_flight = [
                    o
                    for o in run.outcomes
                    if o.sent <= killed
                    and o.node != "A"
                    and o.agent in routed_to_a
                    and (o.answered is None or o.answered > killed)
                    # not an answer that was already on its way
                    and not (o.kind == "result" and (o.answered or 0) - killed < 0.05)
                ]
                in_flight += list(stuck.values())
                late = [
                    o
                    for o in in_flight
                    if o.kind != "-32003"
                    or o.answered is None
                    or o.answered - killed > args.lease + 1
                ]
                waits = [o.answered - killed for o in in_flight if o.answered is not None]
                print(
                    f"   {len(in_flight)} requests in flight to A from other nodes: "
                    f"{sorted({o.kind for o in in_flight})}, answered "
                    f"{min(waits, default=0):.2f}-{max(waits, default=0):.2f} s after the kill"
                )
                if late or not in_flight:
                    failures.append(
                        "requests routed to A: "
                        + repr([(o.kind, o.answered and o.answered - killed) for o in late])
                    )
                for agent in sorted(routed_to_a):
                    back = run.first_result(lambda o, a=agent: o.agent == a and o.sent > killed)
                    took = None if back is None else back - killed
                    print(
                        f"   agent {agent} (server was on A): calls succeed again "
                        f"{took if took is None else round(took, 2)} s after the kill"
                    )
                    if took is None or took > args.lease + 5:
                        failures.append(f"agent {agent} did not resume within lease + 5 s")
                took = held[0].answered - killed if held[0].answered else None
                print(
                    "   a request to a server of A that never comes back: "
                    f"{held[0].kind or 'unanswered'} {took if took is None else round(took, 2)} s"
                    f" after the kill (lease {args.lease:g} s)"
                )
                if held[0].kind != "-32003" or took is None or took > args.lease + 1:
                    failures.append("the held request was not answered -32003 within lease + 1 s")
                print(f"   requests lost with their caller's connection to A: {run.lost}")
                # 3. Redis outage (where each agent's server is now, from Redis itself)
                server_node = await servers_by_agent(redis_port)
                print(f"   servers now on: {server_node}")
                t3 = time.monotonic()
                processes["redis"].kill()
                processes["redis"].wait()
                print(f"3. Redis stopped for {args.outage:g} s")
                await trio.sleep(args.outage)
                processes["redis"] = start(redis_cmd, redis_port)
                back = time.monotonic()
                await trio.sleep(6)
                run.stop = True
                stopped = time.monotonic()
                nursery.cancel_scope.cancel()
            during = [o for o in run.outcomes if t3 + 1 <= o.sent < back]
            local = [o for o in during if o.node == server_node[o.agent]]
            cross = [o for o in during if o.node != server_node[o.agent]]
            print(
                f"   during the outage: same-node calls {summary(local, 0, 1e18)},"
                f" cross-node calls {summary(cross, 0, 1e18)}"
            )
            gaps = []
            for index in range(8):
                mine = sorted(
                    o.answered
                    for o in local
                    if o.caller == index and o.kind == "result" and o.answered
                )
                gaps += [b - a for a, b in itertools.pairwise(mine)]
            print(
                f"   longest pause of a same-node caller during"
                f" the outage: {max(gaps, default=0):.2f} s"
            )
            if not local or any(o.kind != "result" for o in local) or max(gaps, default=0) > 1:
                failures.append("same-node traffic stopped during the Redis outage")
            if (
                not cross
                or any(o.kind not in ("-32002", "result") for o in cross)
                or "-32002" not in {o.kind for o in cross}
            ):
                failures.append(f"cross-node calls during the outage: {summary(cross, 0, 1e18)}")
            resumed = run.first_result(lambda o: o.sent >= back and o.node != server_node[o.agent])
            took = None if resumed is None else resumed - back
            print(
                f"   cross-node calls succeed again {took if took is None else round(took, 2)}"
                f" s after Redis returned"
            )
            if took is None or took > 5:
                failures.append("cross-node traffic did not resume within 5 s")
            total = len([o for o in run.outcomes if o.kind != "lost"])
            unanswered = [o for o in run.outcomes if o.answered is None and o.sent < stopped - 1]
            print(
                f"requests: {total} answered, {len(unanswered)} unanswered, {len(run.duplicates)}"
                f" answered twice, {len(run.wrong)} with another id"
            )
            for o in unanswered:
                print(
                    f"   unanswered: agent {o.agent} caller {o.caller} on {o.node}, sent at "
                    f"{o.sent - t0:.2f} s"
                )
            if run.duplicates or run.wrong or unanswered:
                failures.append("an answer was duplicated or carried another id")
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.terminate()
            for process in processes.values():
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
    for failure in failures:
        print(f"FAILED: {failure}")
    print("all checks passed" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--traffic", type=float, default=30.0)
    parser.add_argument("--outage", type=float, default=10.0)
    sys.exit(trio.run(main, parser.parse_args()))
