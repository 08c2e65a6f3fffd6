"""An HTTP/1.1 client on :class:`~tests.memnet.MemoryNet` connections (h11), with SSE parsing.

For the relay's MCP HTTP transports under ``autojump_clock``: no socket, so idle expiry and
keepalive timers run on Trio's clock.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import h11
import trio

from tests.memnet import MemoryNet, PipeStream


@attrs.frozen
class SseEvent:
    """One server-sent event."""

    event: str
    data: str
    id: str | None
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class HttpClient:
    """One client connection: requests in turn; an answer can be read whole or as SSE."""

    def __init__(self, net: MemoryNet, host: str = "127.0.0.1", *, capacity: int = 65536) -> None:
        self.stream: PipeStream = net.connect(host, capacity=capacity)
        self._h11 = h11.Connection(h11.CLIENT)
        self.status = 0
        self.headers: dict[str, str] = {}
        self._text = ""
        self._ended = False
        #: SSE comment lines seen (keepalives).
        self.comments = 0

    async def _next(self) -> Any:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                self._h11.receive_data(await self.stream.receive_some(65536))
                continue
            return event

    async def send(
        self,
        method: str,
        target: str,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> int:
        """Send a request (``body``: bytes as they are, anything else as JSON); returns the
        answer's status once its head has arrived."""
        if self.status and not self._ended:
            await self.body()  # the previous answer's rest
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        payload = (
            b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        )
        all_headers = [("host", "relay"), ("content-length", str(len(payload)))]
        if body is not None:
            all_headers.append(("content-type", "application/json"))
        all_headers += list((headers or {}).items())
        data = self._h11.send(h11.Request(method=method, target=target, headers=all_headers))
        assert data is not None
        data += self._h11.send(h11.Data(data=payload)) or b""
        data += self._h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        response = await self._next()
        assert isinstance(response, h11.Response), response
        self.status = response.status_code
        self.headers = {k.decode().lower(): v.decode() for k, v in response.headers}
        self._text = ""
        self._ended = False
        return self.status

    async def body(self) -> bytes:
        """The rest of the answer's body."""
        out = bytearray(self._text.encode())
        self._text = ""
        while not self._ended:
            event = await self._next()
            if isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._ended = True
            else:
                raise AssertionError(event)
        return bytes(out)

    async def json(self) -> Any:
        return json.loads(await self.body())

    async def event(self) -> SseEvent | None:
        """The next SSE event (comments skipped); None when the answer has ended."""
        while "\n\n" not in self._text:
            if self._ended:
                return None
            event = await self._next()
            if isinstance(event, h11.Data):
                self._text += event.data.decode()
            elif isinstance(event, h11.EndOfMessage):
                self._ended = True
            else:
                raise AssertionError(event)
        block, self._text = self._text.split("\n\n", 1)
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if not fields:
            return await self.event()
        return SseEvent(
            event=fields.get("event", ["message"])[-1],
            data="\n".join(fields.get("data", [])),
            id=fields.get("id", [None])[-1],
            retry=int(fields["retry"][-1]) if "retry" in fields else None,
        )

    async def close(self) -> None:
        """Drop the connection (the relay sees it end)."""
        await self.stream.aclose()


#: Headers of a client that accepts both answers, as MCP requires.
ACCEPT_BOTH = {"accept": "application/json, text/event-stream"}


async def initialize(
    net: MemoryNet,
    agent: str,
    *,
    version: str = "2025-11-25",
    capabilities: dict[str, Any] | None = None,
) -> str:
    """Open an MCP session for ``agent`` (initialize, then initialized); its id."""
    client = HttpClient(net)
    target = net.target("caller", agent)
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": capabilities or {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    assert (
        await client.send("POST", target, headers={"accept": "application/json"}, body=init) == 200
    )
    session = client.headers["mcp-session-id"]
    answer = await client.json()
    assert answer["result"]["protocolVersion"] == version
    headers = {"accept": "application/json", "mcp-session-id": session}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert await client.send("POST", target, headers=headers, body=initialized) == 202
    await client.body()
    await client.close()
    await trio.lowlevel.checkpoint()
    return session
