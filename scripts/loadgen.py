"""A cheap WebSocket load generator for MCP endpoint relays (used by bench.py and soak.py).

It runs on asyncio (uvloop when installed) with raw protocols and a minimal RFC 6455 client
codec, so that it costs the machine far less CPU than the relay it measures: the generator and
the relay share the same cores.

Model: for each agent, one tool connection that answers every ``tools/call`` at once, and
``callers`` caller connections that each keep ``window`` requests in flight, with ids
deliberately equal across callers. Each response is checked: it must reach the caller that sent
it, with that caller's own id.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import orjson

from trio_mcp_relay import encrypt_token


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (RFC 6455 section 5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    if not n:
        return head + mask
    repeated = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )
    return head + mask + masked


class WsClient(asyncio.Protocol):
    """A WebSocket client connection calling ``on_message(bytes)`` for each text frame."""

    def __init__(self, host: str, port: int, target: str, on_message: Callable[[bytes], None]):
        self.request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
        self.on_message = on_message
        self.buffer = bytearray()
        self.upgraded = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(payload))

    def send_many(self, payloads: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(client_frame(p) for p in payloads))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(struct.pack("!H", 1000), opcode=0x8))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(1006)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[:end]).split(b"\r\n", 1)[0]
            del self.buffer[: end + 4]
            if b" 101 " not in status + b" ":
                self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            self.upgraded = True
            self.opened.set_result(None)
        self._frames()

    def _frames(self) -> None:
        buf = self.buffer
        i = 0
        while len(buf) - i >= 2:
            b0, b1 = buf[i], buf[i + 1]
            n = b1 & 0x7F
            j = i + 2
            if n == 126:
                if len(buf) - j < 2:
                    break
                (n,) = struct.unpack_from("!H", buf, j)
                j += 2
            elif n == 127:
                if len(buf) - j < 8:
                    break
                (n,) = struct.unpack_from("!Q", buf, j)
                j += 8
            if len(buf) - j < n:
                break
            opcode = b0 & 0x0F
            payload = bytes(buf[j : j + n])
            i = j + n
            if opcode in (0x1, 0x2):
                self.on_message(payload)
            elif opcode == 0x9 and self.transport is not None:  # ping -> pong
                self.transport.write(client_frame(payload, opcode=0xA))
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if not self.closed.done():
                    self.closed.set_result(code)
                self.close()
        del buf[:i]


async def connect(
    host: str, port: int, target: str, on_message: Callable[[bytes], None]
) -> WsClient:
    """Open a WebSocket and wait for the upgrade."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: WsClient(host, port, target, on_message), host, port
    )
    await proto.opened
    return proto


def token_for(key: str, agent: str) -> str:
    """The URL-quoted reference token for an agent (manager-api style: md5 agent id)."""
    return quote(encrypt_token(key, agent, md5=True), safe="")


@dataclass
class Stats:
    """What a run measured (the timed phase only)."""

    calls: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0  # seconds of the relay process, when its pid was given
    timing: bool = False  # false during the warm-up

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


#: What the echo tool answers the relay's initialization with (the relay lists it first).
ECHO_INITIALIZE: Final = {
    "protocolVersion": "2025-06-18",
    "capabilities": {"tools": {}},
    "serverInfo": {"name": "echo", "version": "1"},
}
ECHO_TOOLS: Final = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}


def echo_tool(proto_ref: list[WsClient]) -> Callable[[bytes], None]:
    """A tool that answers every call with a small text result: the caller's name (and the
    relay's initialize and tools/list, so it is listed)."""

    def on_message(data: bytes) -> None:
        frame = orjson.loads(data)
        if "id" in frame and "method" in frame:
            method = frame["method"]
            if method == "tools/call":
                who = frame["params"]["arguments"]["who"]
                result: Any = {"content": [{"type": "text", "text": who}], "isError": False}
            elif method == "initialize":
                result = ECHO_INITIALIZE
            else:
                result = ECHO_TOOLS
            reply = orjson.dumps({"jsonrpc": "2.0", "id": frame["id"], "result": result})
            if proto_ref:
                proto_ref[0].send(reply)
            else:  # the relay's initialize came with the upgrade, before connect() returned
                early.append(reply)

    early: list[bytes] = []
    on_message.early = early  # type: ignore[attr-defined]
    return on_message


INITIALIZE: Final = {
    "jsonrpc": "2.0",
    "id": "initialize",
    "method": "initialize",
    "params": {
        "protocolVersion": "2024-11-05",
        "capabilities": {},
        "clientInfo": {"name": "loadgen", "version": "1"},
    },
}
INITIALIZED: Final = {"jsonrpc": "2.0", "method": "notifications/initialized"}


class Caller:
    """A caller keeping ``window`` calls in flight, with ids equal across callers."""

    def __init__(
        self, stats: Stats, window: int, size: int, name: str, method: str = "tools/call"
    ) -> None:
        self.stats, self.window, self.name, self.method = stats, window, name, method
        self.text = "x" * max(0, size - 100)
        self.sent: dict[int, float] = {}
        self.next_id = 1
        self.limit = 0
        self.proto: WsClient | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.initialized: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def initialize(self) -> asyncio.Future[None]:
        """The MCP handshake, as xiaozhi-server makes it (a real tool behind a forwarding relay
        answers nothing before it); the future is done when ``initialize`` is answered."""
        assert self.proto is not None
        self.proto.send_many([orjson.dumps(INITIALIZE), orjson.dumps(INITIALIZED)])
        return self.initialized

    def request(self, rid: int) -> bytes:
        if self.method == "tools/list":
            return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/list"})
        arguments = {"who": self.name, "text": self.text}
        return orjson.dumps(
            {
                "jsonrpc": "2.0",
                "id": rid,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": arguments},
            }
        )

    def run(self, calls: int) -> asyncio.Future[None]:
        """Make ``calls`` more calls; the future is done when all are answered."""
        self.limit = self.next_id - 1 + calls
        self.finished = asyncio.get_running_loop().create_future()
        batch = [self._next() for _ in range(min(self.window, calls))]
        assert self.proto is not None
        self.proto.send_many(batch)
        return self.finished

    def _next(self) -> bytes:
        rid = self.next_id
        self.next_id += 1
        self.sent[rid] = time.perf_counter()
        return self.request(rid)

    def on_message(self, data: bytes) -> None:
        frame: dict[str, Any] = orjson.loads(data)
        rid = frame.get("id")
        if rid == INITIALIZE["id"] and not self.initialized.done():
            self.initialized.set_result(None)
            return
        started = self.sent.pop(rid, None) if type(rid) is int else None
        if started is None or "result" not in frame:
            self.stats.errors.append(f"{self.name}: unexpected {data[:120]!r}")
            return
        if self.method == "tools/list":
            if not frame["result"].get("tools"):
                self.stats.errors.append(f"{self.name}: no tools listed: {data[:120]!r}")
        elif frame["result"]["content"][0]["text"] != self.name:
            self.stats.errors.append(f"{self.name}: got another caller's response")
        if self.stats.timing:
            self.stats.latencies.append(time.perf_counter() - started)
            self.stats.calls += 1
        if self.next_id <= self.limit:
            assert self.proto is not None
            self.proto.send(self._next())
        elif not self.sent and not self.finished.done():
            self.finished.set_result(None)


async def run_load(
    *,
    host: str,
    port: int,
    key: str,
    agents: int,
    callers: int,
    window: int,
    n: int,
    size: int,
    pid: int = 0,
    warm: int = 20,
    tag: str = "bench",
    tool_ports: list[int] | None = None,
    caller_ports: list[int] | None = None,
    pids: list[int] | None = None,
    settle: float = 0.2,
    method: str = "tools/call",
    echo: bool = True,
) -> Stats:
    """Connect each agent's tool and callers, warm up, then time ``n`` calls per caller.

    Connection set-up and the ``warm`` calls per caller are not counted; the relay's CPU
    (``pid``, or the sum over ``pids``: several relay processes) is read from /proc around
    the timed phase only. Agent ``a``'s tool connects to ``tool_ports[a % len]`` and its
    callers to ``caller_ports[a % len]`` (default: ``port``), so that a cluster's nodes can
    share the agents, or an agent's tool and callers sit on different nodes; ``settle``
    seconds are left between the tools and the callers for the relays to register them.
    ``method`` is what the callers call (``tools/call`` or ``tools/list``); without ``echo``
    no echo tool connects (agent 0's tool is already there, a real one).
    """
    stats = Stats()
    tools: list[WsClient] = []
    all_callers: list[Caller] = []
    tool_ports = tool_ports or [port]
    caller_ports = caller_ports or [port]
    processes = pids if pids is not None else ([pid] if pid else [])
    for a in range(agents if echo else 0):
        token = token_for(key, f"{tag}-agent-{a}")
        ref: list[WsClient] = []
        target = f"/mcp_endpoint/mcp/?token={token}"
        answer = echo_tool(ref)
        tool = await connect(host, tool_ports[a % len(tool_ports)], target, answer)
        ref.append(tool)
        for reply in answer.early:  # type: ignore[attr-defined]
            tool.send(reply)
        tools.append(tool)
    await asyncio.sleep(settle)  # let the relays register the tools
    for a in range(agents):
        token = token_for(key, f"{tag}-agent-{a}")
        for c in range(callers):
            caller = Caller(stats, window, size, f"a{a}c{c}", method)
            caller.proto = await connect(
                host,
                caller_ports[a % len(caller_ports)],
                f"/mcp_endpoint/call/?token={token}",
                caller.on_message,
            )
            all_callers.append(caller)
    if method != "tools/call":
        await asyncio.gather(*(c.initialize() for c in all_callers))
    await asyncio.gather(*(c.run(warm) for c in all_callers))
    stats.timing = True
    cpu0 = sum(proc_cpu_seconds(p) for p in processes)
    started = time.perf_counter()
    await asyncio.gather(*(c.run(n) for c in all_callers))
    stats.wall = time.perf_counter() - started
    stats.cpu = sum(proc_cpu_seconds(p) for p in processes) - cpu0
    for caller in all_callers:
        assert caller.proto is not None
        caller.proto.close()
    for tool in tools:
        tool.close()
    return stats


def proc_cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and its waited-for children, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def md5_hex(text: str) -> str:
    """manager-api's agent id form."""
    return hashlib.md5(text.encode()).hexdigest()


def run(coroutine: Any) -> Any:
    """Run a coroutine on uvloop when it is installed (cheaper), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(command: list[str], port: int, **popen: Any) -> subprocess.Popen[bytes]:
    """Run ``command`` and wait until something listens on ``port`` (127.0.0.1). Its stderr
    goes to a temporary file, never a pipe: a pipe nobody reads would stop the relay the
    moment it logs more than the pipe holds."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the process's life
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, **popen)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    log.seek(0)
    raise RuntimeError(f"{command[0]} did not start: {log.read()[-2000:].decode(errors='replace')}")


def relay_command(port: int, key: str) -> list[str]:
    """``trio-mcp-relay serve`` on 127.0.0.1:``port`` with ``key``, quiet."""
    return [
        sys.executable,
        "-m",
        "trio_mcp_relay",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--key",
        key,
        "--data-dir",
        f"/tmp/bench-relay-{port}",
        "--log-level",
        "WARNING",
    ]
