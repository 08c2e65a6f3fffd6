"""The engine of ``trio-mcp-relay fuzz``: hypothesis drives :mod:`trio_mcp_relay.testing`.

Theory of operation. First a fixed minimal script per family (:data:`PROBES`) is played:
a defect it shows is a finding whose script is already as small as can be. Then each
*round* is one hypothesis search over scripts that use only the step
kinds the still-unsolved invariant families need. A script fails the round when it violates one
of those families; hypothesis then shrinks it to a minimal script, and that script (replayed
once more, with every frame recorded) becomes a *finding* for the first family it violates.
That family is dropped and a new round starts on the remaining ones, with what is left of the
example budget. So each broken invariant gets its own minimal script, and a defect that is
found at once (a lost id-0 answer) does not hide the others (dropped notifications).

Two kinds of trouble are kept apart:

* a violated invariant is a :class:`Finding`;
* not being able to test at all (nothing listening, a refused handshake or token, an endpoint
  that forwards nothing) raises :class:`~trio_mcp_relay.testing.CannotConnect`, with one line
  saying what to fix. It is checked with an empty script before anything else, and a script
  that meets it later stops the run the same way (a :class:`BaseException`, so that
  hypothesis does not take it for a failure to shrink).

A script that fails once but passes when replayed (timing) is still reported, marked as not
reproduced, instead of hypothesis's ``FlakyFailure``.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed

from ._auth import caller_url, tool_url
from .testing import (
    FAMILIES,
    CannotConnect,
    Session,
    SessionResult,
    Step,
    Violation,
    run_session,
    sessions,
    step_family,
)

__all__ = ["Finding", "FuzzReport", "FuzzerFailed", "describe_step", "run_fuzz"]


@attrs.frozen
class Finding:
    """One violated invariant family, with its minimal script as last played."""

    family: str
    session: Session
    result: SessionResult
    reproduced: bool


@attrs.define
class FuzzReport:
    """The outcome of :func:`run_fuzz`."""

    families: tuple[str, ...]  # checked, in FAMILIES order
    findings: list[Finding] = attrs.Factory(list)
    scripts: int = 0
    stopped: str | None = None  # why the run ended early: the endpoint stopped working


class FuzzerFailed(Exception):
    """The fuzzer itself failed (a bug of ours); the message is one line."""


class _Abort(BaseException):
    """Stops hypothesis at once (it does not catch BaseException): nothing to shrink."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _script(callers: int, *steps: tuple[str | int, str, Any]) -> Session:
    return Session(callers, tuple(Step(who, kind, value) for who, kind, value in steps))


_NOTE = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info"}}

#: Minimal scripts, one or more per family, played before the random ones: a defect they
#: show is reported with a script that cannot be shrunk further. Those that can break a
#: fragile endpoint for good (binary frames, answers for a caller that left) come last.
PROBES: tuple[Session, ...] = (
    _script(1, (0, "request", 0)),
    _script(1, (0, "request", "")),
    _script(1, (0, "request", 1.5)),
    _script(1, (0, "request", 1), (0, "request", 1)),
    _script(2, (0, "request", 1), (1, "request", 1)),
    _script(1, ("tool", "notify", _NOTE)),
    _script(1, (0, "hostile", "{")),
    _script(1, ("tool", "ask", {"jsonrpc": "2.0", "id": 1, "method": "roots/list"})),
    _script(1, (0, "progress", (1, "p1"))),
    _script(1, (0, "request", 1), (0, "cancel", True)),
    _script(1, (0, "request", 1), ("tool", "answer", False), ("tool", "duplicate", False)),
    _script(1, ("tool", "stray", "no-such-request")),
    _script(1, (0, "hostile", b"\xff")),
    _script(2, (0, "request", 1), (0, "leave", None)),
)


def describe_step(step: Any) -> str:
    """A script step in plain words."""
    who = "tool" if step.who == "tool" else f"caller {step.who}"
    value = step.value
    which = "newest" if value else "oldest"
    texts: dict[str, Callable[[], str]] = {
        "request": lambda: f"sends a request (tools/call) with id {value!r}",
        "progress": lambda: f"sends a request with id {value[0]!r} and progressToken {value[1]!r}",
        "cancel": lambda: f"cancels its {which} unanswered request",
        "leave": lambda: "disconnects",
        "answer": lambda: f"answers its {which} unanswered request",
        "duplicate": lambda: f"sends its {which} answer again (a duplicate)",
        "stray": lambda: f"sends an answer with id {value!r}, to no request it was sent",
        "notify": lambda: f"sends the notification {value['method']}",
        "ask": lambda: f"sends a {value['method']} request to the caller side, id {value['id']!r}",
        "hostile": lambda: f"sends an invalid frame: {value!r:.70}",
    }
    return f"{who:<8} {texts[step.kind]()}"


def run_fuzz(
    ws_base: str,
    key: str,
    *,
    examples: int,
    seed: int,
    patience: float,
    grace: float,
    families: Iterable[str],
    max_callers: int = 4,
    max_steps: int = 30,
    on_finding: Callable[[int, Finding], None] | None = None,
) -> FuzzReport:
    """Fuzz the endpoint at ``ws_base`` (each script on a fresh agent minted with ``key``).

    Raises:
        CannotConnect: The endpoint cannot be fuzzed; the message says what to fix.
        FuzzerFailed: A bug in the fuzzer.
    """
    chosen = tuple(f for f in FAMILIES if f in set(families))
    report = FuzzReport(chosen)

    played: list[tuple[Session, SessionResult]] = []

    def play(session: Session) -> SessionResult:
        agent = f"trio-mcp-relay-fuzz-{secrets.token_hex(6)}"
        tool, caller = tool_url(ws_base, key, agent), caller_url(ws_base, key, agent)
        result = trio.run(
            functools.partial(run_session, tool, caller, session, patience=patience, grace=grace)
        )
        played[:] = [(session, result)]
        return result

    def found(finding: Finding) -> None:
        report.findings.append(finding)
        if on_finding is not None:
            on_finding(len(report.findings), finding)

    empty = play(Session(1, ()))
    if empty.violations:
        raise CannotConnect(
            f"even an empty script fails, so nothing can be tested: {empty.violations[0]}"
        )

    remaining = list(chosen)
    budget = examples
    for probe in PROBES:
        if not remaining or budget <= 0:
            break
        if any(step_family(step) not in (None, *chosen) for step in probe.steps):
            continue  # it would exercise a family that was not asked for (--only, --skip)
        try:
            result = play(probe)
        except CannotConnect as exc:
            if exc.refused:
                raise
            _stopped_working([], played[0], exc, found)
            report.stopped = str(exc)
            return report
        report.scripts += 1
        budget -= 1
        violated = {v.family for v in result.violations}
        family = next((f for f in remaining if f in violated), None)
        if family is not None:
            found(Finding(family, probe, result, reproduced=True))
            remaining.remove(family)
    while remaining and budget > 0:
        calls: list[tuple[Session, SessionResult, str | None]] = []
        targets = frozenset(remaining)

        @settings(
            max_examples=budget,
            deadline=None,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
            print_blob=False,
            verbosity=Verbosity.quiet,
        )
        @given(sessions(max_callers=max_callers, max_steps=max_steps, families=targets))
        def one(session: Session) -> None:
            try:
                result = play(session)
            except CannotConnect as exc:
                raise _Abort(exc) from None
            except Exception as exc:
                raise _Abort(FuzzerFailed(f"{type(exc).__name__}: {exc}")) from None
            violated = {v.family for v in result.violations}
            family = next((f for f in remaining if f in violated), None)
            calls.append((session, result, family))  # noqa: B023 (one() runs in this round)
            if family is not None:
                raise AssertionError(family)

        try:
            hypothesis_seed(seed + len(report.findings))(one)()
        except _Abort as abort:
            report.scripts += len(calls)
            if not isinstance(abort.error, CannotConnect) or abort.error.refused:
                raise abort.error from None  # a bug of ours, or turned away (429): no finding
            # It worked for the empty script and for others since: the fuzzing broke it.
            _stopped_working(calls, played[0], abort.error, found)
            report.stopped = str(abort.error)
            return report
        except Exception:  # a failure (or hypothesis's Flaky): what we recorded tells which
            pass
        else:
            report.scripts += len(calls)
            break
        failing = [i for i, (_, _, family) in enumerate(calls) if family is not None]
        if not failing:
            raise FuzzerFailed("hypothesis stopped without a failing script")
        generated = failing[0] + 1
        report.scripts += generated
        budget -= generated
        session, result, family = calls[failing[-1]]
        assert family is not None
        found(Finding(family, session, result, reproduced=calls[-1][2] is not None))
        remaining.remove(family)
    return report


def _stopped_working(
    calls: list[tuple[Session, SessionResult, str | None]],
    last: tuple[Session, SessionResult],
    error: CannotConnect,
    found: Callable[[Finding], None],
) -> None:
    """The endpoint stopped working mid-run: report what this round had found (unshrunk) and
    the last script played, after which it no longer worked."""
    failing = [(s, r, f) for s, r, f in calls if f is not None]
    if failing and failing[-1][2] != "liveness":
        session, result, family = failing[-1]
        assert family is not None
        found(Finding(family, session, result, reproduced=False))
    session, result = last
    stopped = Violation("liveness", f"after this script the endpoint stopped working: {error}")
    result = attrs.evolve(result, violations=(*result.violations, stopped))
    found(Finding("liveness", session, result, reproduced=False))
