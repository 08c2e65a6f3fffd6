"""Test helpers: start a relay on port 0 and open WebSocket peers to it."""

from __future__ import annotations

import functools
import json
import queue
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import quote

import attrs
import trio
from trio_websocket import WebSocketConnection

from trio_mcp_relay._auth import caller_url, encrypt_token, tool_url
from trio_mcp_relay._config import RelayConfig
from trio_mcp_relay.client import connect_websocket
from trio_mcp_relay.server import serve_relay

KEY = "0123456789abcdef0123456789abcdef"
#: The longest delay before a failed authentication is answered, in relays tests start.
TEST_AUTH_DELAY = 0.05


def request(rid: Any, method: str = "tools/call", params: Any = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        frame["params"] = params
    return frame


def notification(method: str, params: Any = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        frame["params"] = params
    return frame


def result(rid: Any, value: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": value}


#: The serverInfo name test tools answer the relay's ``initialize`` with: two tools of one agent
#: that keep it have the same identity, so the later replaces the earlier.
TOOL_NAME = "test-tool"
#: A method no MCP rule routes: the relay passes it to the agent's default server unchanged.
CUSTOM = "test/relay"


def tool_spec(tool: str | dict[str, Any]) -> dict[str, Any]:
    """A ``tools/list`` entry: a name becomes a tool taking any object."""
    if isinstance(tool, dict):
        return tool
    return {"name": tool, "description": f"the {tool} tool", "inputSchema": {"type": "object"}}


def _initialize_answer(
    init: Any, name: str | None, capabilities: dict[str, Any] | None
) -> dict[str, Any]:
    assert init.get("method") == "initialize", f"expected the relay's initialize, got {init}"
    assert init["params"]["clientInfo"]["name"] == "trio-mcp-relay", init
    value: dict[str, Any] = {
        "protocolVersion": init["params"]["protocolVersion"],
        "capabilities": {"tools": {}} if capabilities is None else capabilities,
    }
    if name is not None:
        value["serverInfo"] = {"name": name, "version": "1.0"}
    return result(init["id"], value)


#: What a list request of the relay's is answered with, by method, besides ``tools/list``.
_EMPTY_LISTS = {
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
    "prompts/list": "prompts",
}


def _lists_expected(capabilities: dict[str, Any] | None) -> set[str]:
    """The list requests the relay sends a server that declared ``capabilities``."""
    caps = {"tools": {}} if capabilities is None else capabilities
    expected = {"tools/list"}
    if "resources" in caps:
        expected |= {"resources/list", "resources/templates/list"}
    if "prompts" in caps:
        expected.add("prompts/list")
    return expected


def _list_answer(listing: Any, tools: Iterable[str | dict[str, Any]]) -> dict[str, Any]:
    method = listing.get("method")
    if method == "tools/list":
        return result(listing["id"], {"tools": [tool_spec(t) for t in tools]})
    assert method in _EMPTY_LISTS, f"expected a list request, got {listing}"
    return result(listing["id"], {_EMPTY_LISTS[method]: []})


def initialize_sync_tool(
    ws: Any,
    *,
    name: str | None = TOOL_NAME,
    tools: Iterable[str | dict[str, Any]] = (),
    capabilities: dict[str, Any] | None = None,
    timeout: float = 5,
) -> dict[str, Any]:
    """:func:`complete_initialization` on a ``websockets`` sync client connection."""
    init = json.loads(ws.recv(timeout=timeout))
    ws.send(json.dumps(_initialize_answer(init, name, capabilities)))
    initialized = json.loads(ws.recv(timeout=timeout))
    assert initialized == notification("notifications/initialized"), initialized
    tools = list(tools)
    expected = _lists_expected(capabilities)
    while expected:
        listing = json.loads(ws.recv(timeout=timeout))
        ws.send(json.dumps(_list_answer(listing, tools)))
        expected.discard(listing["method"])
    return init  # type: ignore[no-any-return]


async def complete_initialization(
    send_frame: Callable[[Any], Awaitable[None]],
    receive_frame: Callable[[], Awaitable[Any]],
    *,
    name: str | None = TOOL_NAME,
    tools: Iterable[str | dict[str, Any]] = (),
    capabilities: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Play a tool server through the relay's initialization of it, over any transport.

    Answers the relay's ``initialize`` (with ``serverInfo.name`` = ``name``, none if ``None``),
    checks that ``notifications/initialized`` comes next, and answers ``tools/list`` with
    ``tools`` (and the other lists ``capabilities`` declare, empty); the tool is ready
    afterwards. Returns the relay's ``initialize`` request.
    """
    init = await receive_frame()
    await send_frame(_initialize_answer(init, name, capabilities))
    initialized = await receive_frame()
    assert initialized == notification("notifications/initialized"), initialized
    tools = list(tools)
    expected = _lists_expected(capabilities)
    while expected:
        listing = await receive_frame()
        await send_frame(_list_answer(listing, tools))
        expected.discard(listing["method"])
    return init  # type: ignore[no-any-return]


async def initialize_tool(
    ws: WebSocketConnection,
    *,
    name: str | None = TOOL_NAME,
    tools: Iterable[str | dict[str, Any]] = (),
    capabilities: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`complete_initialization` on a trio-websocket tool connection."""
    return await complete_initialization(
        functools.partial(send, ws),
        functools.partial(recv, ws),
        name=name,
        tools=tools,
        capabilities=capabilities,
    )


@asynccontextmanager
async def tool_peer(
    url: str,
    *,
    name: str | None = TOOL_NAME,
    tools: Iterable[str | dict[str, Any]] = (),
    capabilities: dict[str, Any] | None = None,
    **kwargs: Any,
) -> AsyncIterator[WebSocketConnection]:
    """A tool connection the relay has initialized (``kwargs`` go to :func:`peer`)."""
    async with peer(url, **kwargs) as ws:
        await initialize_tool(ws, name=name, tools=tools, capabilities=capabilities)
        yield ws


def same_id(a: Any, b: Any) -> bool:
    """JSON-RPC id equality: same JSON type and value (``1`` is not ``1.0`` nor ``"1"``)."""
    return type(a) is type(b) and a == b


@attrs.frozen
class RunningRelay:
    """A relay started for a test."""

    port: int
    config: RelayConfig

    @property
    def base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tool_url(self, agent: str) -> str:
        return tool_url(self.base, KEY, agent)

    def caller_url(self, agent: str) -> str:
        return caller_url(self.base, KEY, agent)

    def token(self, agent: str) -> str:
        return encrypt_token(KEY, agent)


async def start_relay(
    nursery: trio.Nursery,
    *,
    embedded_tools: Any = None,
    shutdown: trio.Event | None = None,
    **overrides: Any,
) -> RunningRelay:
    """Start serve_relay in ``nursery`` on 127.0.0.1:0 and return where it listens.

    ``overrides`` are RelayConfig fields; ``embedded_tools`` and ``shutdown`` go to serve_relay.
    Failed authentications are delayed at most ``TEST_AUTH_DELAY`` unless ``auth_delay`` says
    otherwise, so that tests refusing tokens on purpose stay fast.
    """
    defaults = {"host": "127.0.0.1", "port": 0, "key": KEY, "auth_delay": TEST_AUTH_DELAY}
    config = RelayConfig(**{**defaults, **overrides})
    port = await nursery.start(
        functools.partial(serve_relay, config, embedded_tools=embedded_tools, shutdown=shutdown)
    )
    return RunningRelay(port=port, config=config)


@asynccontextmanager
async def peer(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection (``kwargs`` go to ``open_websocket_url``)."""
    async with connect_websocket(url, **kwargs) as ws:
        yield ws


async def start_command(
    nursery: trio.Nursery,
    command: list[str],
    *,
    env: dict[str, str],
    cwd: Any = None,
    stderr: int = subprocess.DEVNULL,
) -> trio.Process:
    """Run ``command`` (a CLI under test) in ``nursery``, stdin and stdout closed; its
    stderr is discarded unless ``stderr=subprocess.PIPE``. Returns the running process."""
    process: trio.Process = await nursery.start(
        functools.partial(
            trio.run_process,
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            check=False,
            cwd=cwd,
            env=env,
        )
    )
    return process


async def send(ws: WebSocketConnection, obj: Any) -> None:
    await ws.send_message(json.dumps(obj))


async def recv(ws: WebSocketConnection) -> Any:
    return json.loads(await ws.get_message())


@attrs.frozen
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def open_tcp_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` from ``source``, any 127/8 address (Linux
    routes all of 127/8 locally): a client with an address of its own."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def http_get(
    port: int,
    target: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    *,
    source: str = "127.0.0.1",
) -> HttpResponse:
    """One plain HTTP/1.1 request to the relay (from ``source``), read until it closes."""
    stream = await open_tcp_from(source, port)
    async with stream:
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return HttpResponse(int(status_line.split()[1]), parsed, body)


async def health(relay: RunningRelay) -> dict[str, Any]:
    """The health endpoint's ``connections`` counts, asked with the admin key if one is set."""
    key = quote(relay.config.admin_key or KEY, safe="")
    response = await http_get(relay.port, f"/mcp_endpoint/health?key={key}")
    return response.json()["result"]["connections"]  # type: ignore[no-any-return]


async def wait_for_counts(relay: RunningRelay, *, tools: int, callers: int) -> None:
    """Poll the health endpoint until the relay has registered these connections."""
    while True:
        counts = await health(relay)
        if counts["tool_connections"] == tools and counts["robot_connections"] == callers:
            return
        await trio.sleep(0.01)


@contextmanager
def relay_in_thread(**overrides: Any) -> Iterator[RunningRelay]:
    """A relay running in its own thread and Trio loop, for tests of blocking CLI commands.

    ``overrides`` as for :func:`start_relay`.
    """
    ready: queue.Queue[tuple[RunningRelay, trio.lowlevel.TrioToken, trio.CancelScope]] = (
        queue.Queue()
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, **overrides)
            ready.put((relay, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    relay, token, scope = ready.get(timeout=10)
    try:
        yield relay
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=10)
