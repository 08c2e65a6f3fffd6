"""FailureLimiter and the delay schedule: pure bookkeeping, driven directly (no sockets, no
Trio clock: the time is an argument).

The property tests compare it with a model that keeps every failure it ever saw and filters
by time on each question, which is obviously right but unbounded; the limiter must give the
same answers while remembering a bounded amount.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mcp_relay._guard import DOUBLINGS, FailureLimiter, Penalty, failure_delay

A, B = "192.0.2.1", "192.0.2.2"


# ----------------------------------------------------------------------------- examples


def test_ban_after_limit_failures_within_the_window() -> None:
    limiter = FailureLimiter(3, window=10.0, ban=60.0)
    assert limiter.failed(A, 0.0) is False
    assert limiter.failed(A, 1.0) is False
    assert limiter.retry_after(A, 1.5) is None
    assert limiter.failed(A, 2.0) is True
    assert limiter.retry_after(A, 2.0) == 60.0
    assert limiter.retry_after(A, 32.0) == 30.0
    assert limiter.retry_after(A, 61.9) == pytest.approx(0.1)


def test_ban_ends_after_its_duration_and_counting_starts_afresh() -> None:
    limiter = FailureLimiter(2, window=10.0, ban=5.0)
    limiter.failed(A, 0.0)
    assert limiter.failed(A, 1.0) is True
    assert limiter.retry_after(A, 6.0) is None  # exactly at the end: allowed again
    assert limiter.retry_after(A, 6.0) is None
    # The failures that led to the ban do not count towards the next one.
    assert limiter.failed(A, 7.0) is False
    assert limiter.retry_after(A, 7.0) is None
    assert limiter.failed(A, 8.0) is True


def test_failures_older_than_the_window_are_forgotten() -> None:
    limiter = FailureLimiter(2, window=10.0, ban=5.0)
    limiter.failed(A, 0.0)
    # Exactly one window later the first failure has left the window.
    assert limiter.failed(A, 10.0) is False
    assert limiter.retry_after(A, 10.0) is None
    # A failure just inside the window still counts.
    assert limiter.failed(A, 19.5) is True


def test_addresses_are_counted_separately() -> None:
    limiter = FailureLimiter(2, window=10.0, ban=5.0)
    limiter.failed(A, 0.0)
    assert limiter.failed(B, 0.5) is False
    assert limiter.failed(A, 1.0) is True
    assert limiter.retry_after(A, 1.0) == 5.0
    assert limiter.retry_after(B, 1.0) is None


def test_limit_zero_turns_refusals_off_but_not_delays() -> None:
    limiter = FailureLimiter(0, window=10.0, ban=5.0, delay=8.0)
    for second in range(100):
        assert limiter.failed(A, float(second)) is False
    assert limiter.retry_after(A, 100.0) is None
    assert limiter.tracked() == 1
    assert limiter.penalize(A, 100.0) == Penalty(delay=8.0)


def test_limit_one_bans_on_the_first_failure() -> None:
    limiter = FailureLimiter(1, window=10.0, ban=5.0)
    assert limiter.failed(A, 3.0) is True
    assert limiter.retry_after(A, 3.0) == 5.0


def test_memory_is_bounded_with_the_oldest_forgotten_first() -> None:
    limiter = FailureLimiter(3, window=100.0, ban=100.0, max_tracked=4)
    for n in range(10):
        limiter.failed(f"10.0.0.{n}", float(n))
    assert limiter.tracked() == 4
    # The four most recent addresses are remembered: two more failures ban the newest...
    limiter.failed("10.0.0.9", 10.0)
    assert limiter.failed("10.0.0.9", 11.0) is True
    # ...but the oldest was forgotten, so it needs three failures again.
    assert limiter.failed("10.0.0.0", 12.0) is False
    assert limiter.failed("10.0.0.0", 13.0) is False


def test_an_address_failing_again_is_remembered_longest() -> None:
    limiter = FailureLimiter(3, window=100.0, ban=100.0, max_tracked=2)
    limiter.failed(A, 0.0)
    limiter.failed(B, 1.0)
    limiter.failed(A, 2.0)  # A is now the most recent
    limiter.failed("192.0.2.3", 3.0)  # evicts B, not A
    assert limiter.failed(A, 4.0) is True
    assert limiter.failed(B, 5.0) is False


def test_failures_from_new_addresses_never_evict_a_ban() -> None:
    # A guesser must not be able to lift its own ban by failing from other addresses once.
    limiter = FailureLimiter(2, window=100.0, ban=100.0, max_tracked=3)
    limiter.failed(A, 0.0)
    assert limiter.failed(A, 1.0) is True
    for n in range(50):
        limiter.failed(f"10.0.1.{n}", 2.0 + n / 100)
    assert limiter.retry_after(A, 3.0) == pytest.approx(98.0)


# ----------------------------------------------------------------------------- delays


def test_the_delay_schedule_for_the_default_cap() -> None:
    delays = [failure_delay(previous, 10.0) for previous in range(10)]
    assert delays == [0.0, 0.15625, 0.3125, 0.625, 1.25, 2.5, 5.0, 10.0, 10.0, 10.0]


@given(previous=st.integers(-5, 10_000), cap=st.floats(0.0, 60.0, allow_nan=False))
def test_a_first_failure_is_never_slowed_and_no_delay_exceeds_the_cap(
    previous: int, cap: float
) -> None:
    delay = failure_delay(previous, cap)
    assert 0.0 <= delay <= cap
    if previous <= 0 or cap == 0:
        assert delay == 0.0
    if previous > DOUBLINGS:
        assert delay == cap


@given(previous=st.integers(1, 30), cap=st.floats(0.001, 60.0, allow_nan=False))
def test_delays_grow_until_the_cap(previous: int, cap: float) -> None:
    assert failure_delay(previous + 1, cap) >= failure_delay(previous, cap)
    if failure_delay(previous, cap) < cap:
        assert failure_delay(previous + 1, cap) == pytest.approx(2 * failure_delay(previous, cap))


def test_penalties_grow_with_failures_in_the_window() -> None:
    limiter = FailureLimiter(10, window=60.0, ban=60.0, delay=10.0, concurrency=100)
    seen = [limiter.penalize(A, float(n)).delay for n in range(9)]
    assert seen == [failure_delay(n, 10.0) for n in range(9)]
    # Another address starts from nothing.
    assert limiter.penalize(B, 9.0) == Penalty(delay=0.0)
    # Once the failures have left the window, the next one is a first failure again.
    fresh = FailureLimiter(10, window=60.0, ban=60.0)
    fresh.penalize(A, 0.0)
    fresh.penalize(A, 1.0)
    assert fresh.penalize(A, 60.5) == Penalty(delay=failure_delay(1, 10.0))
    assert fresh.penalize(A, 200.0) == Penalty(delay=0.0)


def test_an_address_that_keeps_failing_is_refused_with_429_then_forgiven() -> None:
    limiter = FailureLimiter(3, window=60.0, ban=30.0, delay=1.0, concurrency=100)
    for n in range(3):
        penalty = limiter.penalize(A, float(n))
        assert penalty.retry_after is None
        limiter.release(A)
    # The third failure got the address refused: failing requests now get 429 at once...
    assert limiter.penalize(A, 3.0) == Penalty(retry_after=29.0)
    assert limiter.penalize(A, 10.0) == Penalty(retry_after=22.0)
    # ...without holding a slot or being counted, and only for the ban.
    assert limiter.waiting(A) == 0
    assert limiter.penalize(A, 32.0) == Penalty(delay=0.0)


def test_concurrent_failures_per_address_are_limited() -> None:
    limiter = FailureLimiter(100, window=60.0, ban=60.0, delay=10.0, concurrency=2)
    first, second = limiter.penalize(A, 0.0), limiter.penalize(A, 0.0)
    assert first.retry_after is None and second.retry_after is None
    assert limiter.waiting(A) == 2
    third = limiter.penalize(A, 0.0)
    assert third.retry_after is not None and third.retry_after >= 1.0
    assert limiter.penalize(B, 0.0).retry_after is None  # other addresses are not affected
    limiter.release(A)
    assert limiter.penalize(A, 0.1).retry_after is None
    for _ in range(5):
        limiter.release(A)
    assert limiter.waiting(A) == 0  # extra releases never go negative


# ----------------------------------------------------------------------------- properties


@attrs.define
class Model:
    """Every failure ever seen; answers computed from scratch each time."""

    limit: int
    window: float
    ban: float
    failures: dict[str, list[float]] = attrs.Factory(dict)
    banned: dict[str, float] = attrs.Factory(dict)

    def retry_after(self, address: str, now: float) -> float | None:
        until = self.banned.get(address)
        if until is None or now >= until:
            self.banned.pop(address, None)
            return None
        return until - now

    def failed(self, address: str, now: float) -> bool:
        if self.limit <= 0:
            return False
        recent = [t for t in self.failures.get(address, []) if t > now - self.window]
        recent.append(now)
        if len(recent) >= self.limit:
            self.failures.pop(address, None)
            self.banned[address] = now + self.ban
            return True
        self.failures[address] = recent
        return False


# Time only moves forward (the server passes trio.current_time()); steps include zero.
operations = st.lists(
    st.tuples(
        st.sampled_from(["failed", "retry_after"]),
        st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "::1"]),
        st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5, 7.0]),
    ),
    max_size=80,
)


@given(
    limit=st.integers(0, 5),
    window=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    ban=st.sampled_from([0.5, 2.0, 5.0]),
    ops=operations,
)
def test_agrees_with_the_unbounded_model(
    limit: int, window: float, ban: float, ops: list[tuple[str, str, float]]
) -> None:
    limiter = FailureLimiter(limit, window, ban)
    model = Model(limit, window, ban)
    now = 100.0
    for kind, address, step in ops:
        now += step
        got: Any = getattr(limiter, kind)(address, now)
        expected: Any = getattr(model, kind)(address, now)
        assert got == expected, (kind, address, now)


@given(
    max_tracked=st.integers(1, 5),
    limit=st.integers(1, 4),
    ops=st.lists(
        st.tuples(st.integers(0, 20), st.sampled_from([0.0, 0.1, 1.0, 30.0])), max_size=120
    ),
)
def test_memory_stays_bounded_and_the_newest_ban_holds(
    max_tracked: int, limit: int, ops: list[tuple[int, float]]
) -> None:
    limiter = FailureLimiter(limit, window=10.0, ban=20.0, max_tracked=max_tracked)
    now = 0.0
    for address_number, step in ops:
        now += step
        address = f"10.0.0.{address_number}"
        if limiter.failed(address, now):
            # Just banned: it is the last thing a bounded table would forget.
            assert limiter.retry_after(address, now) == pytest.approx(20.0)
        # Addresses with failures, and banned addresses, each fill at most max_tracked slots.
        assert limiter.tracked() <= 2 * max_tracked


@given(
    limit=st.integers(1, 4),
    ban=st.sampled_from([0.5, 2.0, 5.0]),
    probes=st.lists(st.floats(0.0, 10.0, allow_nan=False), max_size=20),
)
def test_retry_after_is_positive_and_never_longer_than_the_ban(
    limit: int, ban: float, probes: list[float]
) -> None:
    limiter = FailureLimiter(limit, window=10.0, ban=ban)
    for _ in range(limit):
        banned = limiter.failed(A, 1.0)
    assert banned
    for offset in sorted(probes):
        wait = limiter.retry_after(A, 1.0 + offset)
        if 1.0 + offset >= 1.0 + ban:
            assert wait is None
        else:
            assert wait is not None
            assert 0 < wait <= ban


@given(
    concurrency=st.integers(1, 4),
    cap=st.sampled_from([0.0, 1.0, 10.0]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["penalize", "release"]),
            st.sampled_from([A, B]),
            st.sampled_from([0.0, 0.1, 1.0, 20.0]),
        ),
        max_size=60,
    ),
)
def test_penalties_respect_the_cap_the_slots_and_refuse_only_with_a_reason(
    concurrency: int, cap: float, ops: list[tuple[str, str, float]]
) -> None:
    limiter = FailureLimiter(5, window=10.0, ban=30.0, delay=cap, concurrency=concurrency)
    now = 0.0
    held = {A: 0, B: 0}
    for kind, address, step in ops:
        now += step
        if kind == "release":
            if held[address]:
                held[address] -= 1
                limiter.release(address)
            continue
        banned = limiter.retry_after(address, now) is not None
        full = limiter.waiting(address) >= concurrency
        penalty = limiter.penalize(address, now)
        assert 0.0 <= penalty.delay <= cap
        if penalty.retry_after is None:
            assert not banned and not full
            held[address] += 1
        else:
            assert banned or full
            assert penalty.retry_after > 0 and penalty.delay == 0.0
        assert limiter.waiting(address) == held[address] <= concurrency
