"""Replay real client traffic (tests/data/*.jsonl, copied from captures) through the relay.

The traces' tool->relay frames carry ids that some relay had written there
(``<conn>_n_<original id>``); the replay substitutes the id our relay actually sent for the
request with that original id, then checks what reaches each side.

The relay initializes the tool itself (answered as the trace's tool answered its own
initialize and tools/list) and answers the callers' ``initialize`` and ``tools/list`` from its
catalog: those never reach the tool, and the trace's tool answers to them are checked against
the relay's answers instead of being sent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import peer, recv, tool_peer, wait_for_counts
from trio_mcp_relay._routing import Close, Router, Send

DATA = Path(__file__).parent / "data"
PLACEHOLDER = re.compile(r"^[0-9a-f]{32}_n_(-?\d+)$")

TOOL, CALLER = 1, 2
#: What the relay answers callers itself, from its catalog: never forwarded to the tool.
RELAY_ANSWERS = {"initialize", "tools/list", "ping"}


def load(name: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [row for row in rows if "frame" in row]


def traced_server(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The trace's tool, as it answered its own initialize and tools/list there."""
    init: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    for row in load(name):
        answer = json.loads(row["frame"]).get("result")
        if row["dir"] == "tool->relay" and isinstance(answer, dict):
            if "protocolVersion" in answer and init is None:
                init = answer
            elif "tools" in answer and tools is None:
                tools = answer["tools"]
    assert init is not None and tools is not None
    return init, tools


def assert_consistent(relay_answer: dict[str, Any], tool_answer: dict[str, Any]) -> None:
    """The relay's own answer to a caller's initialize or tools/list says what the trace's
    tool said to the same request, when it was forwarded to it."""
    got, traced = relay_answer["result"], tool_answer["result"]
    if "protocolVersion" in traced:
        assert got["protocolVersion"] == traced["protocolVersion"]
        assert got["serverInfo"]["name"] == traced["serverInfo"]["name"]
        for capability in ("tools", "prompts", "resources"):
            assert capability in got["capabilities"], (capability, got)
    else:
        assert got["tools"] == traced["tools"]


class Replayer:
    """Feeds a trace to a Router with one tool and one caller, recording what each side got.

    The tool is first initialized by the relay, answering as the trace's tool did (its
    initialize result, its tools, empty lists for the other capabilities it declared).
    """

    def __init__(self, server: str = "mcp-sdk-caller.jsonl") -> None:
        self.router = Router()
        self.to_caller: list[dict[str, Any]] = []
        self.to_tool: list[dict[str, Any]] = []
        self.init_result, self.tools = traced_server(server)
        self._apply(self.router.tool_connected(TOOL, "agent"))
        self._initialize()
        self.router.caller_connected(CALLER, "agent")
        self.tool_seen: dict[Any, Any] = {}  # original caller id -> id the tool saw
        #: original caller id -> the relay's own answer, for requests it did not forward.
        self.relay_answered: dict[Any, dict[str, Any]] = {}

    def _initialize(self) -> None:
        """Play the trace's tool through the relay's initialization of it."""
        empty = {"resources/list": "resources", "resources/templates/list": "resourceTemplates"}
        empty["prompts/list"] = "prompts"
        (init,) = self.to_tool
        assert init["method"] == "initialize"
        self.to_tool = []
        self._apply(
            self.router.received(
                TOOL,
                json.dumps({"jsonrpc": "2.0", "id": init["id"], "result": self.init_result}),
                0.0,
            )
        )
        assert self.to_tool[0] == {"jsonrpc": "2.0", "method": "notifications/initialized"}
        asked = self.to_tool[1:]
        # The trace's tool declared prompts and resources: the relay lists those too.
        assert sorted(f["method"] for f in asked) == sorted(["tools/list", *empty])
        self.to_tool = []
        for frame in asked:
            value = (
                {"tools": self.tools}
                if frame["method"] == "tools/list"
                else {empty[frame["method"]]: []}
            )
            self.tool_answers(frame["id"], value)
        assert self.to_tool == [] and self.to_caller == []
        assert self.router.servers()["agent"][0]["ready"]

    def tool_answers(self, rid: Any, value: Any) -> None:
        self._apply(
            self.router.received(
                TOOL, json.dumps({"jsonrpc": "2.0", "id": rid, "result": value}), 0.0
            )
        )

    def _apply(self, actions: list[Send | Close]) -> None:
        for action in actions:
            assert isinstance(action, Send)
            assert b"\n" not in action.data, "frames must be single-line"
            frame = json.loads(action.data)
            (self.to_tool if action.conn == TOOL else self.to_caller).append(frame)

    def caller_sends(self, text: str) -> None:
        before, answered = len(self.to_tool), len(self.to_caller)
        self._apply(self.router.received(CALLER, text, 0.0))
        original = json.loads(text)
        forwarded = [f for f in self.to_tool[before:] if "id" in f and "method" in f]
        for frame in forwarded:
            self.tool_seen[original["id"]] = frame["id"]
        if original.get("method") in RELAY_ANSWERS:
            assert forwarded == [], "the relay answers this itself"
            (answer,) = self.to_caller[answered:]
            self.relay_answered[original["id"]] = answer
            self.tool_seen.pop(original["id"], None)

    def substitute(self, value: Any) -> Any:
        if isinstance(value, str) and (match := PLACEHOLDER.match(value)):
            return self.tool_seen[int(match.group(1))]
        return value

    def tool_sends(self, text: str) -> None:
        """A tool frame of the trace; the trace's answer to a request the relay answered
        itself is checked against the relay's answer instead of being sent."""
        frame = json.loads(text)
        if "id" in frame and isinstance(frame["id"], str):
            match = PLACEHOLDER.match(frame["id"])
            original = int(match.group(1)) if match else None
            if original in self.relay_answered and original not in self.tool_seen:
                assert_consistent(self.relay_answered.pop(original), frame)
                return
        if "id" in frame:
            frame["id"] = self.substitute(frame["id"])
        params = frame.get("params")
        if isinstance(params, dict) and "progressToken" in params:
            params["progressToken"] = self.substitute(params["progressToken"])
        self._apply(self.router.received(TOOL, json.dumps(frame) + "\n", 0.0))


@pytest.mark.parametrize("trace", ["xiaozhi-server-caller.jsonl", "mcp-sdk-caller.jsonl"])
def test_captured_trace_round_trips(trace: str) -> None:
    replay = Replayer(trace)
    expected_to_caller = []
    for row in load(trace):
        if row["dir"] == "caller->relay":
            replay.caller_sends(row["frame"])
        else:
            replay.tool_sends(row["frame"])
            expected_to_caller.append(json.loads(row["frame"]))
    # Every request the relay answered itself was matched with the trace's tool answer.
    assert replay.relay_answered == {}
    # Every tool frame's answer reached the caller (the relay's own, for initialize and
    # tools/list, consistent with the trace's tool), with the caller's ids and tokens restored.
    assert len(replay.to_caller) == len(expected_to_caller)
    caller_ids = [
        json.loads(r["frame"]).get("id") for r in load(trace) if r["dir"] == "caller->relay"
    ]
    for got, sent in zip(replay.to_caller, expected_to_caller, strict=True):
        if "id" in sent:
            assert type(got["id"]) is int and got["id"] in caller_ids
            if "protocolVersion" in sent["result"] or "tools" in sent["result"]:
                assert_consistent(got, sent)
            else:
                assert got["result"] == sent["result"]
        else:
            assert got["method"] == sent["method"]
            assert got["params"]["progressToken"] == 3  # the SDK's token is its request id
    # Only tools/call reached the tool; ids it saw were unique (xiaozhi reuses 1 and 2).
    assert {f["method"] for f in replay.to_tool} == {"tools/call"}
    tool_ids = [f["id"] for f in replay.to_tool if "id" in f]
    assert len(tool_ids) == len(set(tool_ids))
    assert list(replay.router.check_invariants()) == []
    assert replay.router.pending_count() == 0


def test_sdk_initialize_with_id_zero_completes() -> None:
    replay = Replayer("mcp-sdk-caller.jsonl")
    rows = load("mcp-sdk-caller.jsonl")
    replay.caller_sends(rows[0]["frame"])
    # Answered by the relay at once, from its catalog, with the caller's id 0.
    (answer,) = replay.to_caller
    assert answer["id"] == 0
    assert type(answer["id"]) is int
    assert answer["result"]["serverInfo"]["name"] == "acceptance-calc"
    assert answer["result"]["protocolVersion"] == "2025-11-25"
    assert replay.to_tool == []
    replay.tool_sends(rows[1]["frame"])  # the trace's tool answer: consistent, not sent
    assert replay.relay_answered == {}


def test_xiaozhi_duplicate_ids_in_flight_route_to_the_right_request() -> None:
    replay = Replayer("xiaozhi-server-caller.jsonl")
    rows = load("xiaozhi-server-caller.jsonl")
    for row in rows[:3]:
        replay.caller_sends(row["frame"])  # initialize id 1, initialized, tools/list id 2
    # The relay answered both itself, in order.
    assert [f["id"] for f in replay.to_caller] == [1, 2]
    assert "protocolVersion" in replay.to_caller[0]["result"]
    assert "tools" in replay.to_caller[1]["result"]
    # xiaozhi reuses ids 1 and 2 for its calls; both are in flight at once, and the tool
    # answers the second first: the order is the tool's, the ids and results still right.
    replay.caller_sends(rows[5]["frame"])  # tools/call id 1: add 20 22
    replay.caller_sends(rows[7]["frame"])  # tools/call id 2: add 1 2
    first, second = replay.to_tool
    assert first["id"] != second["id"]
    replay.tool_answers(second["id"], json.loads(rows[8]["frame"])["result"])
    replay.tool_answers(first["id"], json.loads(rows[6]["frame"])["result"])
    assert [(f["id"], f["result"]["structuredContent"]) for f in replay.to_caller[2:]] == [
        (2, {"result": 3}),
        (1, {"result": 42}),
    ]


def other(client_prefix: str) -> list[str]:
    return [
        r["frame"] for r in load("other-clients.jsonl") if r["client"].startswith(client_prefix)
    ]


def test_manager_api_frames_are_answered_by_the_relay_with_integer_ids() -> None:
    replay = Replayer()
    for frame in other("xiaozhi manager-api"):
        replay.caller_sends(frame)
    # initialize, initialized and tools/list (null params) never reach the tool: the relay
    # answers them from its catalog, with ids 1 and 2 back as JSON integers.
    assert replay.to_tool == []
    init, listing = replay.to_caller
    assert [(f["id"], type(f["id"])) for f in replay.to_caller] == [(1, int), (2, int)]
    assert init["result"]["protocolVersion"] == "2024-11-05"
    assert init["result"]["serverInfo"]["name"] == replay.init_result["serverInfo"]["name"]
    assert listing["result"]["tools"] == replay.tools


def test_cloud_broker_initialize_id_zero() -> None:
    replay = Replayer()
    (frame,) = other("xiaozhi.me cloud broker")
    replay.caller_sends(frame)
    assert replay.to_tool == []
    (answer,) = replay.to_caller
    assert answer["id"] == 0 and type(answer["id"]) is int
    assert answer["result"]["protocolVersion"] == "2024-11-05"
    assert answer["result"]["serverInfo"] == replay.init_result["serverInfo"]


def test_xiaozhi_client_idless_result_is_dropped_quietly() -> None:
    replay = Replayer()
    (frame,) = other("xiaozhi-client")
    replay.tool_sends(frame)
    assert replay.to_caller == [] and replay.to_tool == []


def test_mcphub_list_changed_before_any_caller_is_tolerated() -> None:
    replay = Replayer()
    (frame,) = other("xiaozhi-mcphub")
    replay.router.caller_disconnected(CALLER)
    # No caller at all: the relay lists the tool again, and nobody is told anything.
    replay.tool_sends(frame)
    (relist,) = replay.to_tool
    assert relist["method"] == "tools/list" and replay.to_caller == []
    replay.tool_answers(relist["id"], {"tools": replay.tools[:1]})
    # A caller that initialized is told when what it sees changes: the relay's own
    # notification, once the coalescing delay has passed; the tool's is never forwarded.
    replay.router.caller_connected(CALLER, "agent")
    replay.caller_sends(other("xiaozhi.me cloud broker")[0])
    replay.to_tool, replay.to_caller = [], []
    replay.tool_sends(frame)
    (relist,) = replay.to_tool
    assert replay.to_caller == []
    replay.tool_answers(relist["id"], {"tools": replay.tools})
    replay._apply(replay.router.expire(1.0))
    assert replay.to_caller == [{"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}]


def test_sdk_server_sampling_request_with_id_zero_round_trips() -> None:
    replay = Replayer()
    # A tool request goes to a caller with a request in flight to that tool.
    call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "count"}}
    replay.caller_sends(json.dumps(call))
    (frame,) = other("mcp_pipe.py")
    replay.tool_sends(frame)
    (request,) = replay.to_caller
    assert request["method"] == "sampling/createMessage"
    answer = {"jsonrpc": "2.0", "id": request["id"], "result": {"role": "assistant"}}
    replay.caller_sends(json.dumps(answer))
    assert replay.to_tool[-1] == {"jsonrpc": "2.0", "id": 0, "result": {"role": "assistant"}}


def test_sdk_server_sampling_request_with_nothing_in_flight_is_refused() -> None:
    replay = Replayer()
    (frame,) = other("mcp_pipe.py")
    replay.tool_sends(frame)
    assert replay.to_caller == []
    (refused,) = replay.to_tool
    assert refused["id"] == 0 and refused["error"]["code"] == -32005


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
    init, tools = traced_server("xiaozhi-server-caller.jsonl")
    with trio.fail_after(10):
        async with (
            tool_peer(
                relay.tool_url("agent"),
                name=init["serverInfo"]["name"],
                tools=tools,
                capabilities=init["capabilities"],
            ) as tool,
            peer(relay.caller_url("agent")) as caller,
        ):
            await wait_for_counts(relay, tools=1, callers=1)
            seen: dict[Any, Any] = {}
            inflight: list[Any] = []
            relay_answered: dict[Any, Any] = {}
            for row in rows:
                if row["dir"] == "caller->relay":
                    await caller.send_message(row["frame"])
                    sent = json.loads(row["frame"])
                    if sent["method"] in RELAY_ANSWERS:
                        answer = await recv(caller)
                        assert answer["id"] == sent["id"] and type(answer["id"]) is int
                        relay_answered[sent["id"]] = answer
                        continue
                    if "id" not in sent:
                        continue  # notifications/initialized: absorbed by the relay
                    forwarded = await recv(tool)
                    assert forwarded["method"] == sent["method"]
                    assert forwarded["params"] == sent["params"]
                    seen[sent["id"]] = forwarded["id"]
                    inflight.append(sent["id"])
                else:
                    frame = json.loads(row["frame"])
                    original = int(PLACEHOLDER.match(frame["id"]).group(1))  # type: ignore[union-attr]
                    if original not in inflight:
                        # The trace's tool answer to what the relay answered itself.
                        assert_consistent(relay_answered.pop(original), frame)
                        continue
                    frame["id"] = seen[original]
                    await tool.send_message(json.dumps(frame, separators=(",", ":")) + "\n")
                    answer = await recv(caller)
                    assert answer["id"] == original and type(answer["id"]) is int
                    assert answer["result"] == json.loads(row["frame"])["result"]
                    inflight.remove(original)
            assert inflight == [] and relay_answered == {}
