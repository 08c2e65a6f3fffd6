"""Hypothesis-driven fuzz of a live relay over real sockets: frames from both sides.

Each example starts a relay on port 0, plays a script of interleaved caller requests (with
colliding ids), hostile frames from callers and the tool, tool notifications and answers in
any order, and checks that the relay stays up, answers every well-formed request exactly once
with its own id, and never delivers to the wrong caller.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings

from tests.helpers import start_relay
from trio_mcp_relay.core.session import Session as RoutingSession
from trio_mcp_relay.testing import Session, Step, check_session, sessions

_agents = itertools.count()
INT_ID = re.compile(rb'"id":(-?\d+),')


async def play(session: Session, patience: float = 10.0) -> list[str]:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery)
            agent = f"fuzz-{next(_agents)}"
            problems = await check_session(
                relay.tool_url(agent), relay.caller_url(agent), session, patience=patience
            )
            nursery.cancel_scope.cancel()
    return problems


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_live_relay_keeps_its_invariants(session: Session) -> None:
    assert trio.run(play, session) == []


def test_checker_reports_a_planted_id_type_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker can fail: a relay that returns integer ids as strings (the reference
    server's bug) is caught, and hypothesis shrinks the script to one request and its answer.
    (Every integer id is affected, so any script with one answered integer id finds it.)"""
    original = RoutingSession._response_from_server

    def stringly(self: RoutingSession, server: Any, frame: Any) -> Any:
        actions = original(self, server, frame)
        return [attrs.evolve(a, data=INT_ID.sub(rb'"id":"\1",', a.data)) for a in actions]

    monkeypatch.setattr(RoutingSession, "_response_from_server", stringly)
    found: list[Session] = []

    @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate, Phase.shrink])
    @given(sessions(max_callers=2, max_steps=6))
    def run(session: Session) -> None:
        problems = trio.run(play, session, 0.25)
        if problems:
            found.append(session)
        assert problems == []

    with pytest.raises(AssertionError, match=r"sent id (-?\d+), got back '\1'"):
        run()
    smallest = min(found, key=lambda s: len(s.steps))
    assert [step.kind for step in smallest.steps if step.kind == "request"] == ["request"]


def test_clean_session_with_colliding_ids_passes() -> None:
    session = Session(
        2, (Step(0, "request", 0), Step(1, "request", 0), Step("tool", "answer", True))
    )
    assert trio.run(play, session) == []
