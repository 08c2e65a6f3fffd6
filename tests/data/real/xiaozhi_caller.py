"""Drive the vendored xiaozhi-server MCP endpoint caller from a test, over stdin/stdout.

Not vendored: written for this project (MIT, as the rest of it); the protocol code it runs is
the verbatim excerpt in xiaozhi_mcp_endpoint.py. Run as ``python xiaozhi_caller.py CALLER_URL``.

It does what xiaozhi-server does with a configured endpoint: ``connect_mcp_endpoint(url)``
(initialize, notifications/initialized, tools/list following nextCursor), then, once the
client is ready, prints one JSON line ``{"event": "ready", "tools": {name: description}}``.
Then each stdin line ``{"tag": T, "tool": NAME, "args": {...}}`` becomes a concurrent
``call_mcp_endpoint_tool(client, NAME, json.dumps(args))`` (what MCPEndpointExecutor does)
answered by a line ``{"tag": T, "result": TEXT}`` or ``{"tag": T, "error": "Type: message"}``.
At the end of stdin it closes the WebSocket and exits. If connecting fails it prints
``{"event": "failed"}`` and exits 1; if the client is not ready within 20 s,
``{"event": "not ready"}`` and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from xiaozhi_mcp_endpoint import (  # type: ignore[import-not-found]
    call_mcp_endpoint_tool,
    connect_mcp_endpoint,
)


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line, ensure_ascii=False), flush=True)


async def call(client: Any, request: dict[str, Any]) -> None:
    try:
        text = await call_mcp_endpoint_tool(
            client, request["tool"], json.dumps(request.get("args") or {})
        )
    except Exception as exc:
        emit({"tag": request.get("tag"), "error": f"{type(exc).__name__}: {exc}"})
    else:
        emit({"tag": request.get("tag"), "result": text})


async def main(url: str) -> int:
    client = await connect_mcp_endpoint(url)
    if client is None:
        emit({"event": "failed"})
        return 1
    for _ in range(2000):
        if await client.is_ready():
            break
        await asyncio.sleep(0.01)
    else:
        emit({"event": "not ready"})
        return 1
    emit(
        {
            "event": "ready",
            "tools": {name: tool["description"] for name, tool in client.tools.items()},
        }
    )
    tasks = set()
    while line := await asyncio.to_thread(sys.stdin.readline):
        if line.strip():
            task = asyncio.create_task(call(client, json.loads(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    await client.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(asyncio.run(main(sys.argv[1])))
