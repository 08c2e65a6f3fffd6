"""Micro-benchmark of the routing core's hot path: ``Router.received`` per frame, no I/O.

One agent, one tool, one caller. ``request`` times a caller's ``tools/call`` going through
``received`` (``n`` of them in flight at the end); ``response`` then times the tool's ``n``
answers coming back, in order. ``round trip`` times both, one request in flight at a time.
Each figure is the best of ``--repeat`` runs on a fresh router, in nanoseconds per frame.

    python scripts/bench_core.py                  # 100,000 frames, best of 5
    python scripts/bench_core.py -n 200000 --repeat 7
"""

from __future__ import annotations

import argparse
import json
import time

from trio_mcp_relay._routing import Router

TOOL, CALLER = 1, 2


def request_frame(rid: int) -> bytes:
    params = {"name": "add", "arguments": {"a": rid, "b": 2}}
    frame = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}
    return json.dumps(frame).encode()


def response_frame(tool_id: int) -> bytes:
    result = {"content": [{"type": "text", "text": "3"}], "isError": False}
    return json.dumps({"jsonrpc": "2.0", "id": tool_id, "result": result}).encode()


#: The relay's own requests to the tool at connection (initialize, tools/list) use ids 1, 2.
FIRST_CALL_ID = 3


def fresh_router() -> Router:
    """A router whose tool is initialized and lists ``add``, with a caller."""
    router = Router()
    router.tool_connected(TOOL, "agent")
    init = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}}
    router.received(TOOL, json.dumps({"jsonrpc": "2.0", "id": 1, "result": init}), 0.0)
    tools = {"tools": [{"name": "add", "inputSchema": {"type": "object"}}]}
    router.received(TOOL, json.dumps({"jsonrpc": "2.0", "id": 2, "result": tools}), 0.0)
    router.caller_connected(CALLER, "agent")
    return router


def one_way(n: int) -> tuple[float, float]:
    """Seconds for n caller requests, then for the tool's n responses."""
    requests = [request_frame(i) for i in range(n)]
    responses = [response_frame(i + FIRST_CALL_ID) for i in range(n)]
    router = fresh_router()
    received = router.received
    start = time.perf_counter()
    for frame in requests:
        received(CALLER, frame, 0.0)
    middle = time.perf_counter()
    for frame in responses:
        received(TOOL, frame, 0.0)
    end = time.perf_counter()
    assert router.pending_count() == 0
    return middle - start, end - middle


def round_trips(n: int) -> float:
    """Seconds for n request/response pairs, one in flight at a time."""
    requests = [request_frame(i) for i in range(n)]
    responses = [response_frame(i + FIRST_CALL_ID) for i in range(n)]
    router = fresh_router()
    received = router.received
    start = time.perf_counter()
    for request, response in zip(requests, responses, strict=True):
        received(CALLER, request, 0.0)
        received(TOOL, response, 0.0)
    end = time.perf_counter()
    assert router.pending_count() == 0
    return end - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="frames per direction")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is kept")
    args = parser.parse_args()
    n = args.n
    ways = [one_way(n) for _ in range(args.repeat)]
    trips = [round_trips(n) for _ in range(args.repeat)]
    ns = 1e9 / n
    print(f"{n} frames, best of {args.repeat}, ns per frame")
    print(f"  caller request  {min(w[0] for w in ways) * ns:8.0f}")
    print(f"  tool response   {min(w[1] for w in ways) * ns:8.0f}")
    print(f"  round trip      {min(trips) * ns / 2:8.0f}  (per frame)")


if __name__ == "__main__":
    main()
