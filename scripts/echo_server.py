"""The benchmark floor: a direct WebSocket echo over the relay's own transport, no relay.

Every request is answered at once, as a tool would (one JSON parse, one dump), by the task
that read it: one frame in, one frame out, the least a relayed call can cost.

    python scripts/echo_server.py PORT
"""

from __future__ import annotations

import contextlib
import sys

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection

from trio_mcp_relay._http import BadRequest, read_request_head
from trio_mcp_relay._transport import ConnectionClosed, ServerWebSocket


async def handle(stream: trio.SocketStream) -> None:
    # A port probe, or a client gone mid-handshake: only this connection ends.
    with contextlib.suppress(BadRequest, trio.BrokenResourceError):
        await echo(stream)


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        request = await read_request_head(stream)
        head_end = request.raw.index(b"\r\n\r\n") + 4
        handshake = WSConnection(ConnectionType.SERVER)
        handshake.receive_data(request.raw[:head_end])
        list(handshake.events())
        await stream.send_all(handshake.send(AcceptConnection()))
        ws = ServerWebSocket(
            stream, remote="", max_message_size=1 << 24, initial=request.raw[head_end:]
        )
        try:
            while True:
                frame = orjson.loads(await ws.receive())
                if "id" in frame and "method" in frame:
                    who = frame["params"]["arguments"]["who"]
                    result = {"content": [{"type": "text", "text": who}], "isError": False}
                    answer = {"jsonrpc": "2.0", "id": frame["id"], "result": result}
                    await ws.send_many([orjson.dumps(answer)])
        except ConnectionClosed:
            pass


async def main(port: int) -> None:
    await trio.serve_tcp(handle, port, host="127.0.0.1")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
