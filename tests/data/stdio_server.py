"""A tiny stdio MCP server for the pipe tests: JSON-RPC over stdin/stdout, stdlib only.

One JSON-RPC message per line in, one per line out. It answers ``initialize``, ``ping``,
``tools/list`` and ``tools/call``, ignores notifications, and refuses other requests until it
has been initialized (as the MCP SDK's servers do). Tools:

* ``add(a, b)``: the sum, as text.
* ``calls``: how many ``tools/call`` requests this process has handled, this one included
  (a test sees from it whether the process survived a reconnect).
* ``state``: ``{"pid": ..., "inits": ...}`` as JSON text.
* ``raw``: the exact line this request arrived as, without its newline.
* ``spam(n, delay)``: answers at once, then after ``delay`` seconds prints ``n``
  ``notifications/message`` lines (data 0 .. n-1).
* ``sleep(seconds)``: answers after ``seconds`` (other requests are served meanwhile).
* ``crash(code)``: exits at once with ``code`` (default 3), without answering.

Environment: ``STDIO_SERVER_EOL`` is the line ending it writes (default ``\\n``);
``STDIO_SERVER_STUBBORN=1`` makes it ignore SIGTERM and the end of stdin (only SIGKILL stops
it). It writes ``stdio_server ready pid=N`` to stderr at start.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

EOL = os.environ.get("STDIO_SERVER_EOL", "\n")
STUBBORN = os.environ.get("STDIO_SERVER_STUBBORN") == "1"

TOOLS = [
    {
        "name": "add",
        "description": "Add two numbers.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
    {"name": "calls", "description": "tools/call count.", "inputSchema": {"type": "object"}},
    {"name": "state", "description": "pid and inits.", "inputSchema": {"type": "object"}},
    {
        "name": "raw",
        "description": "The request line as received.",
        "inputSchema": {"type": "object"},
    },
    {
        "name": "spam",
        "description": "Later, n notifications.",
        "inputSchema": {
            "type": "object",
            "properties": {"n": {"type": "integer"}, "delay": {"type": "number"}},
        },
    },
    {"name": "sleep", "description": "Answer later.", "inputSchema": {"type": "object"}},
    {"name": "crash", "description": "Exit at once.", "inputSchema": {"type": "object"}},
]

out_lock = threading.Lock()
state = {"initialized": False, "calls": 0, "inits": 0}


def write(message: dict[str, Any]) -> None:
    with out_lock:
        sys.stdout.write(json.dumps(message) + EOL)
        sys.stdout.flush()


def result(rid: Any, value: Any) -> None:
    write({"jsonrpc": "2.0", "id": rid, "result": value})


def error(rid: Any, code: int, message: str, data: Any = None) -> None:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    write({"jsonrpc": "2.0", "id": rid, "error": err})


def text(rid: Any, value: str) -> None:
    result(rid, {"content": [{"type": "text", "text": value}], "isError": False})


def spam(n: int, delay: float) -> None:
    time.sleep(delay)
    for i in range(n):
        write({"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": i}})


def call_tool(rid: Any, params: dict[str, Any], line: str) -> None:
    state["calls"] += 1
    name = params.get("name")
    args = params.get("arguments") or {}
    if name == "add":
        text(rid, str(args["a"] + args["b"]))
    elif name == "calls":
        text(rid, str(state["calls"]))
    elif name == "state":
        text(rid, json.dumps({"pid": os.getpid(), "inits": state["inits"]}))
    elif name == "raw":
        text(rid, line)
    elif name == "spam":
        text(rid, "ok")
        thread = threading.Thread(
            target=spam, args=(int(args.get("n", 1)), float(args.get("delay", 0))), daemon=True
        )
        thread.start()
    elif name == "sleep":
        timer = threading.Timer(float(args.get("seconds", 0)), text, args=(rid, "slept"))
        timer.daemon = True
        timer.start()
    elif name == "crash":
        sys.stdout.flush()
        os._exit(int(args.get("code", 3)))
    else:
        error(rid, -32602, f"unknown tool: {name}")


def handle(line: str) -> None:
    try:
        message = json.loads(line)
    except ValueError:
        error(None, -32700, "Parse error", line)
        return
    if not isinstance(message, dict) or "method" not in message:
        return  # a response (to nothing we asked) or junk: ignore
    method = message["method"]
    if "id" not in message:
        return  # notifications are ignored
    rid = message["id"]
    params = message.get("params") or {}
    if method == "initialize":
        state["initialized"] = True
        state["inits"] += 1
        result(
            rid,
            {
                "protocolVersion": params.get("protocolVersion", "2024-11-05"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "stdio-test-server", "version": "1.0"},
            },
        )
    elif method == "ping":
        result(rid, {})
    elif not state["initialized"]:
        error(rid, -32002, "server not initialized")
    elif method == "tools/list":
        result(rid, {"tools": TOOLS})
    elif method == "tools/call":
        call_tool(rid, params, line)
    else:
        error(rid, -32601, f"method not found: {method}")


def main() -> None:
    if STUBBORN:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"stdio_server ready pid={os.getpid()}", file=sys.stderr, flush=True)
    for raw in sys.stdin.buffer:
        handle(raw.decode("utf-8").rstrip("\n"))
    while STUBBORN:
        time.sleep(60)


if __name__ == "__main__":
    main()
