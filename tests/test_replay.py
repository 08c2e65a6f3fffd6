"""Replay real client traffic (tests/data/*.jsonl, copied from captures) through the relay.

The traces' tool->relay frames carry ids that some relay had written there
(``<conn>_n_<original id>``); the replay substitutes the id our relay actually sent for the
request with that original id, then checks what reaches each side.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import peer, recv, wait_for_counts
from trio_mcp_relay._routing import Close, Router, Send

DATA = Path(__file__).parent / "data"
PLACEHOLDER = re.compile(r"^[0-9a-f]{32}_n_(-?\d+)$")

TOOL, CALLER = 1, 2


def load(name: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [row for row in rows if "frame" in row]


class Replayer:
    """Feeds a trace to a Router with one tool and one caller, recording what each side got."""

    def __init__(self) -> None:
        self.router = Router()
        self.router.tool_connected(TOOL, "agent")
        self.router.caller_connected(CALLER, "agent")
        self.tool_seen: dict[Any, Any] = {}  # original caller id -> id the tool saw
        self.to_caller: list[dict[str, Any]] = []
        self.to_tool: list[dict[str, Any]] = []

    def _apply(self, actions: list[Send | Close]) -> None:
        for action in actions:
            assert isinstance(action, Send)
            assert b"\n" not in action.data, "frames must be single-line"
            frame = json.loads(action.data)
            (self.to_tool if action.conn == TOOL else self.to_caller).append(frame)

    def caller_sends(self, text: str) -> None:
        before = len(self.to_tool)
        self._apply(self.router.received(CALLER, text, 0.0))
        original = json.loads(text)
        for frame in self.to_tool[before:]:
            if "id" in frame and "method" in frame:
                self.tool_seen[original["id"]] = frame["id"]

    def substitute(self, value: Any) -> Any:
        if isinstance(value, str) and (match := PLACEHOLDER.match(value)):
            return self.tool_seen[int(match.group(1))]
        return value

    def tool_sends(self, text: str) -> None:
        frame = json.loads(text)
        if "id" in frame:
            frame["id"] = self.substitute(frame["id"])
        params = frame.get("params")
        if isinstance(params, dict) and "progressToken" in params:
            params["progressToken"] = self.substitute(params["progressToken"])
        self._apply(self.router.received(TOOL, json.dumps(frame) + "\n", 0.0))


@pytest.mark.parametrize("trace", ["xiaozhi-server-caller.jsonl", "mcp-sdk-caller.jsonl"])
def test_captured_trace_round_trips(trace: str) -> None:
    replay = Replayer()
    expected_to_caller = []
    for row in load(trace):
        if row["dir"] == "caller->relay":
            replay.caller_sends(row["frame"])
        else:
            replay.tool_sends(row["frame"])
            expected_to_caller.append(json.loads(row["frame"]))
    # Every tool frame reached the caller, with the caller's own ids and tokens restored.
    assert len(replay.to_caller) == len(expected_to_caller)
    caller_ids = [
        json.loads(r["frame"]).get("id") for r in load(trace) if r["dir"] == "caller->relay"
    ]
    for got, sent in zip(replay.to_caller, expected_to_caller, strict=True):
        if "id" in sent:
            assert type(got["id"]) is int and got["id"] in caller_ids
            assert got["result"] == sent["result"]
        else:
            assert got["method"] == sent["method"]
            assert got["params"]["progressToken"] == 3  # the SDK's token is its request id
    # Ids the tool saw were unique among in-flight requests (xiaozhi reuses 1 and 2).
    tool_ids = [f["id"] for f in replay.to_tool if "id" in f]
    assert len(tool_ids) == len(set(tool_ids))
    assert list(replay.router.check_invariants()) == []
    assert replay.router.pending_count() == 0


def test_sdk_initialize_with_id_zero_completes() -> None:
    replay = Replayer()
    rows = load("mcp-sdk-caller.jsonl")
    replay.caller_sends(rows[0]["frame"])
    replay.tool_sends(rows[1]["frame"])
    assert replay.to_caller[0]["id"] == 0
    assert type(replay.to_caller[0]["id"]) is int
    assert replay.to_caller[0]["result"]["serverInfo"]["name"] == "acceptance-calc"


def test_xiaozhi_duplicate_ids_in_flight_route_to_the_right_request() -> None:
    replay = Replayer()
    rows = load("xiaozhi-server-caller.jsonl")
    for row in rows[:3]:
        replay.caller_sends(row["frame"])  # initialize id 1, initialized, tools/list id 2
    # tools/list answered first, then initialize: order is the tool's, ids still right.
    replay.tool_sends(rows[4]["frame"])
    replay.tool_sends(rows[3]["frame"])
    assert [f["id"] for f in replay.to_caller] == [2, 1]
    assert "tools" in replay.to_caller[0]["result"]
    assert "protocolVersion" in replay.to_caller[1]["result"]


def other(client_prefix: str) -> list[str]:
    return [
        r["frame"] for r in load("other-clients.jsonl") if r["client"].startswith(client_prefix)
    ]


def test_manager_api_frames_forward_with_integer_ids() -> None:
    replay = Replayer()
    for frame in other("xiaozhi manager-api"):
        replay.caller_sends(frame)
    assert [f.get("method") for f in replay.to_tool] == [
        "initialize",
        "notifications/initialized",
        "tools/list",
    ]
    assert replay.to_tool[2]["params"] is None  # null params pass through untouched
    for original in (1, 2):
        replay.tool_sends(
            json.dumps({"jsonrpc": "2.0", "id": replay.tool_seen[original], "result": {}})
        )
    assert [f["id"] for f in replay.to_caller] == [1, 2]


def test_cloud_broker_initialize_id_zero() -> None:
    replay = Replayer()
    (frame,) = other("xiaozhi.me cloud broker")
    replay.caller_sends(frame)
    replay.tool_sends(json.dumps({"jsonrpc": "2.0", "id": replay.tool_seen[0], "result": {}}))
    assert replay.to_caller == [{"jsonrpc": "2.0", "id": 0, "result": {}}]


def test_xiaozhi_client_idless_result_is_dropped_quietly() -> None:
    replay = Replayer()
    (frame,) = other("xiaozhi-client")
    replay.tool_sends(frame)
    assert replay.to_caller == [] and replay.to_tool == []


def test_mcphub_list_changed_before_any_caller_is_tolerated() -> None:
    router = Router()
    router.tool_connected(TOOL, "agent")
    (frame,) = other("xiaozhi-mcphub")
    assert router.received(TOOL, frame, 0.0) == []
    router.caller_connected(CALLER, "agent")
    (action,) = router.received(TOOL, frame, 0.0)
    assert isinstance(action, Send) and action.conn == CALLER


def test_sdk_server_sampling_request_with_id_zero_round_trips() -> None:
    replay = Replayer()
    (frame,) = other("mcp_pipe.py")
    replay.tool_sends(frame)
    (request,) = replay.to_caller
    assert request["method"] == "sampling/createMessage"
    answer = {"jsonrpc": "2.0", "id": request["id"], "result": {"role": "assistant"}}
    replay.caller_sends(json.dumps(answer))
    assert replay.to_tool[-1] == {"jsonrpc": "2.0", "id": 0, "result": {"role": "assistant"}}


def test_late_error_after_cancel_is_dropped() -> None:
    replay = Replayer()
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "count"}}
    replay.caller_sends(json.dumps(call))
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7}}
    replay.caller_sends(json.dumps(cancel))
    assert replay.to_tool[-1]["params"]["requestId"] == replay.tool_seen[7]
    (late,) = other("official SDK stdio server after")
    late = late.replace('"<rewritten id>"', json.dumps(replay.tool_seen[7]))
    replay.tool_sends(late)
    assert replay.to_caller == []
    assert replay.router.pending_count() == 0


async def test_xiaozhi_trace_over_real_sockets(relay: Any) -> None:
    """The captured xiaozhi-server session, replayed byte-exact over WebSockets."""
    rows = load("xiaozhi-server-caller.jsonl")
    with trio.fail_after(10):
        async with peer(relay.tool_url("agent")) as tool, peer(relay.caller_url("agent")) as caller:
            await wait_for_counts(relay, tools=1, callers=1)
            seen: dict[Any, Any] = {}
            inflight: list[Any] = []
            for row in rows:
                if row["dir"] == "caller->relay":
                    await caller.send_message(row["frame"])
                    sent = json.loads(row["frame"])
                    forwarded = await recv(tool)
                    assert forwarded["method"] == sent["method"]
                    if "id" in sent:
                        seen[sent["id"]] = forwarded["id"]
                        inflight.append(sent["id"])
                    else:
                        assert "id" not in forwarded
                else:
                    frame = json.loads(row["frame"])
                    original = int(PLACEHOLDER.match(frame["id"]).group(1))  # type: ignore[union-attr]
                    frame["id"] = seen[original]
                    await tool.send_message(json.dumps(frame, separators=(",", ":")) + "\n")
                    answer = await recv(caller)
                    assert answer["id"] == original and type(answer["id"]) is int
                    assert answer["result"] == json.loads(row["frame"])["result"]
                    inflight.remove(original)
            assert inflight == []
