"""Hypothesis-driven fuzz of a live relay over real sockets: frames from both sides.

Each example starts a relay on port 0, plays a script (caller requests with colliding ids,
progress, cancellation, invalid frames, callers leaving; tool answers in any order, duplicate
and stray answers, notifications, requests to the caller side, garbage) and checks every
invariant family. Planted bugs show that the checker can fail, and in the right family.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.helpers import KEY, start_relay
from trio_mcp_relay import _fuzz
from trio_mcp_relay._auth import caller_url, tool_url
from trio_mcp_relay._fuzz import PROBES
from trio_mcp_relay.core.actions import Send
from trio_mcp_relay.core.session import Session as RoutingSession
from trio_mcp_relay.testing import (
    FAMILIES,
    CannotConnect,
    Session,
    SessionResult,
    Step,
    Violation,
    check_session,
    run_session,
    sessions,
)

_agents = itertools.count()
INT_ID = re.compile(rb'"id":(-?\d+),')
NOTE = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info"}}


async def play(session: Session, patience: float = 10.0) -> list[Violation]:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            agent = f"fuzz-{next(_agents)}"
            # A generous grace: it costs nothing while every frame arrives, and a loaded
            # machine must not turn a late frame into a false finding.
            problems = await check_session(
                relay.tool_url(agent),
                relay.caller_url(agent),
                session,
                patience=patience,
                grace=min(patience, 2.0),
            )
            nursery.cancel_scope.cancel()
    return problems


def families(problems: list[Violation]) -> set[str]:
    return {p.family for p in problems}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_live_relay_keeps_its_invariants(session: Session) -> None:
    assert trio.run(play, session) == []


@pytest.mark.parametrize("probe", PROBES, ids=lambda s: " ".join(step.kind for step in s.steps))
def test_every_probe_passes_against_our_relay(probe: Session) -> None:
    assert trio.run(play, probe) == []


def test_checker_reports_a_planted_id_type_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker can fail: a relay that returns integer ids as strings (the reference
    server's bug) is caught, and hypothesis shrinks the script to one request and its answer.
    (Every integer id is affected, so any script with one answered integer id finds it.)"""
    original = RoutingSession._response_from_server

    def stringly(self: RoutingSession, server: Any, frame: Any, now: float) -> Any:
        actions = original(self, server, frame, now)
        return [Send(a.conn, INT_ID.sub(rb'"id":"\1",', a.data), a.request) for a in actions]

    monkeypatch.setattr(RoutingSession, "_response_from_server", stringly)
    found: list[Session] = []

    @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate, Phase.shrink])
    @given(sessions(max_callers=2, max_steps=6))
    def run(session: Session) -> None:
        problems = trio.run(play, session, 0.25)
        if problems:
            found.append(session)
        assert [str(p) for p in problems] == []

    with pytest.raises(AssertionError, match=r"with id (-?\d+) and got its answer with id '\1'"):
        run()
    smallest = min(found, key=lambda s: len(s.steps))
    assert [step.kind for step in smallest.steps if step.kind == "request"] == ["request"]


def test_dropped_tool_notifications_are_their_own_finding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relay that drops tool notifications (as the reference does) still lets every script
    synchronise (that is done with requests), and only the notifications family fails."""
    monkeypatch.setattr(
        RoutingSession, "_notification_from_server", lambda self, server, frame, now: []
    )
    requests_only = Session(2, (Step(0, "request", 0), Step(1, "request", "")))
    assert trio.run(play, requests_only) == []
    problems = trio.run(play, Session(2, (Step("tool", "notify", NOTE),)), 0.5)
    assert families(problems) == {"notifications"}
    assert "caller 0 did not receive tool notification #0 (notifications/message)" in map(
        str, problems
    )


def test_a_lost_id_zero_answer_is_an_answers_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    original = RoutingSession._response_from_server

    def drops_zero(self: RoutingSession, server: Any, frame: Any, now: float) -> Any:
        return [a for a in original(self, server, frame, now) if b'"id":0,' not in a.data]

    monkeypatch.setattr(RoutingSession, "_response_from_server", drops_zero)
    problems = trio.run(play, Session(1, (Step(0, "request", 0), Step(0, "request", 1))), 0.5)
    assert [(p.family, p.text) for p in problems] == [
        ("answers", "caller 0 never got an answer to request #0 with id 0")
    ]


def test_the_transcript_holds_every_frame_of_the_script() -> None:
    async def main() -> tuple[Any, ...]:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                relay = await start_relay(nursery)
                result = await run_session(
                    relay.tool_url("t"), relay.caller_url("t"), Session(1, (Step(0, "request", 7),))
                )
                nursery.cancel_scope.cancel()
        return result.transcript

    transcript = trio.run(main)
    assert transcript[0] == "-- script"
    assert transcript[1].startswith('caller 0 sent     {"jsonrpc":"2.0","id":7,')
    assert any(line.startswith("tool     received") and '"seq":0' in line for line in transcript)
    assert any(line.startswith('caller 0 received {"jsonrpc":"2.0","id":7,') for line in transcript)


def test_a_closed_port_or_a_wrong_key_cannot_be_fuzzed() -> None:
    async def main() -> list[str]:
        messages = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                relay = await start_relay(nursery)
                wrong = "f" * 32
                for tool, caller in (
                    (tool_url(relay.base, wrong, "a"), caller_url(relay.base, wrong, "a")),
                ):
                    with pytest.raises(CannotConnect) as refused:
                        await run_session(tool, caller, Session(1, ()), patience=2)
                    messages.append(str(refused.value))
                nursery.cancel_scope.cancel()
            listener = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listener[0].socket.getsockname()[1]
            await listener[0].aclose()
            base = f"ws://127.0.0.1:{port}"
            with pytest.raises(CannotConnect) as closed:
                await run_session(
                    tool_url(base, KEY, "a"), caller_url(base, KEY, "a"), Session(1, ()), patience=2
                )
            messages.append(str(closed.value))
        return messages

    wrong_key, closed_port = trio.run(main)
    assert "refused the token" in wrong_key and "server key" in wrong_key
    assert "nothing listens at 127.0.0.1:" in closed_port


@given(st.sets(st.sampled_from(sorted(FAMILIES)), min_size=1), st.data())
def test_scripts_hold_only_the_steps_their_families_need(
    chosen: set[str], data: st.DataObject
) -> None:
    only_for = {
        "progress": "progress",
        "cancel": "cancellation",
        "notify": "notifications",
        "ask": "tool-requests",
        "duplicate": "late-answers",
        "stray": "late-answers",
        "leave": "late-answers",
    }
    session = data.draw(sessions(families=chosen))
    for step in session.steps:
        family = only_for.get(step.kind)
        if step.kind == "hostile" and step.who != "tool":
            family = "invalid-frames"
        assert family is None or family in chosen


def test_clean_session_with_colliding_ids_passes() -> None:
    session = Session(
        2, (Step(0, "request", 0), Step(1, "request", 0), Step("tool", "answer", True))
    )
    assert trio.run(play, session) == []


def test_a_progress_token_reused_after_a_cancel_is_credited_to_the_live_request() -> None:
    """Found by fuzzing this relay: the checker, not the relay, was wrong."""
    session = Session(
        1,
        (
            Step(0, "progress", (0, 0)),
            Step(0, "cancel", False),
            Step(0, "progress", (0, 0)),
        ),
    )
    assert trio.run(play, session) == []


def _failing_after(calls: int, error: CannotConnect) -> Any:
    played = itertools.count()

    async def fake_run_session(*args: Any, **kwargs: Any) -> SessionResult:
        if next(played) >= calls:
            raise error
        return SessionResult((), ("-- script",))

    return fake_run_session


def test_an_endpoint_that_turns_us_away_mid_run_is_no_finding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    banned = CannotConnect("127.0.0.1:1 refused the WebSocket with HTTP 429", refused=True)
    monkeypatch.setattr(_fuzz, "run_session", _failing_after(3, banned))
    with pytest.raises(CannotConnect, match="HTTP 429"):
        _fuzz.run_fuzz(
            "ws://127.0.0.1:1", KEY, examples=20, seed=1, patience=1, grace=0, families=FAMILIES
        )


def test_an_endpoint_that_stops_working_mid_run_is_a_liveness_finding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wedged = CannotConnect("no request from the caller reached the tool within 1 s")
    monkeypatch.setattr(_fuzz, "run_session", _failing_after(3, wedged))
    report = _fuzz.run_fuzz(
        "ws://127.0.0.1:1", KEY, examples=20, seed=1, patience=1, grace=0, families=FAMILIES
    )
    assert [f.family for f in report.findings] == ["liveness"]
    finding = report.findings[0]
    assert finding.session == _fuzz.PROBES[1]  # the last script played before it broke
    assert str(finding.result.violations[-1]).startswith(
        "after this script the endpoint stopped working: no request"
    )
    assert report.stopped is not None


def test_skipped_families_are_not_exercised_by_probes_or_scripts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    played: list[Session] = []

    async def fake_run_session(tool: str, caller: str, session: Session, **_: Any) -> Any:
        played.append(session)
        return SessionResult((), ())

    monkeypatch.setattr(_fuzz, "run_session", fake_run_session)
    chosen = [f for f in FAMILIES if f not in ("invalid-frames", "late-answers")]
    report = _fuzz.run_fuzz(
        "ws://127.0.0.1:1", KEY, examples=40, seed=1, patience=1, grace=0, families=chosen
    )
    assert report.findings == [] and report.scripts == 40
    kinds = {(step.who == "tool", step.kind) for session in played for step in session.steps}
    assert (False, "hostile") not in kinds  # a caller's invalid frame
    assert not kinds & {(True, "duplicate"), (True, "stray"), (False, "leave")}
    assert (True, "hostile") in kinds  # the tool's garbage tests liveness: always in
