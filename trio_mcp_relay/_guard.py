"""Failed authentications cost the one who fails, never a valid credential.

Pure bookkeeping with no I/O. The server authenticates every request first; only when the
credential (a token, or the health key) is wrong does it ask :meth:`FailureLimiter.penalize`
how to answer, and a request carrying a valid credential is never delayed nor refused here,
whatever else came from its address. That matters because an address is often shared: every
client behind a reverse proxy, Docker's NAT or a home router has the same one, and one stale
client must not lock the others out.

The rules, per client address:

* **Delay.** A failure is answered (1008, or 403 on the health endpoint) after
  :func:`failure_delay`: nothing for the first failure within ``window`` seconds, then a delay
  that doubles with each further failure, up to ``delay`` (10 s by default). A guesser gets a
  few answers a minute; a client with a typo gets its first answer at once.
* **Concurrency.** At most ``concurrency`` failures from an address wait out their delay at
  once; one more is refused at once with HTTP 429 (so a guesser cannot get around the delay by
  opening many connections in parallel).
* **Refusal.** After ``limit`` failures within ``window``, further failing requests from the
  address get HTTP 429 with ``Retry-After`` at once, for ``ban`` seconds: they are not worth a
  delayed answer any more. Then counting starts afresh.

Memory is bounded: at most ``max_tracked`` addresses with recent failures and ``max_tracked``
refused addresses are remembered, the oldest forgotten first (kept apart so that failures from
many addresses never evict a refusal); the concurrency table only holds addresses with a
failure being delayed right now.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

import attrs

__all__ = ["DOUBLINGS", "FailureLimiter", "Penalty", "failure_delay"]

#: Failures, after the first, that it takes for the delay to reach its cap.
DOUBLINGS: Final = 6


def failure_delay(previous: int, cap: float) -> float:
    """How long to wait before answering a failure.

    Args:
        previous: Failures from the same address already counted in the window.
        cap: The longest delay (the ``auth_delay`` setting); 0 turns delays off.

    Returns:
        0 for a first failure; ``cap / 64`` for the second, doubling with each further
        failure until it is ``cap`` from the eighth on (with a 10 s cap: 0, 0.16, 0.31, 0.63,
        1.25, 2.5, 5, then 10 s).
    """
    if previous <= 0 or cap <= 0:
        return 0.0
    return cap * 2.0 ** min(0, previous - 1 - DOUBLINGS)


@attrs.frozen
class Penalty:
    """How to answer a failed authentication.

    Attributes:
        delay: Seconds to wait before the usual refusal (1008, or 403).
        retry_after: When not None, do not wait: refuse at once with HTTP 429 and this many
            seconds in ``Retry-After``. Such a failure holds no concurrency slot.
    """

    delay: float = 0.0
    retry_after: float | None = None


class FailureLimiter:
    """Counts failed authentications per address and decides what each one costs.

    Args:
        limit: Failures within ``window`` seconds after which failing requests from the
            address are refused at once (429) for ``ban`` seconds; 0 turns refusals off.
        window: The sliding window, in seconds.
        ban: How long failing requests from an address are refused, in seconds.
        delay: The longest delay before a failure is answered (see :func:`failure_delay`).
        concurrency: Failures from one address that may be waiting out a delay at once.
        max_tracked: Addresses remembered at most, in each of the two tables (addresses
            with recent failures, refused addresses).
    """

    def __init__(
        self,
        limit: int,
        window: float,
        ban: float,
        *,
        delay: float = 10.0,
        concurrency: int = 4,
        max_tracked: int = 10000,
    ) -> None:
        self.limit = limit
        self.window = window
        self.ban = ban
        self.delay = delay
        self.concurrency = concurrency
        self.max_tracked = max_tracked
        self._failures: dict[str, deque[float]] = {}
        self._banned: dict[str, float] = {}
        self._waiting: dict[str, int] = {}

    def penalize(self, address: str, now: float) -> Penalty:
        """A request from ``address`` failed to authenticate: decide how to answer it.

        Call :meth:`release` once a penalty without ``retry_after`` has been served.
        """
        retry = self.retry_after(address, now)
        if retry is not None:
            return Penalty(retry_after=retry)
        previous = self.recent(address, now)
        if self._waiting.get(address, 0) >= self.concurrency:
            return Penalty(retry_after=max(1.0, failure_delay(previous + 1, self.delay)))
        self.failed(address, now)
        self._waiting[address] = self._waiting.get(address, 0) + 1
        return Penalty(delay=failure_delay(previous, self.delay))

    def release(self, address: str) -> None:
        """A delayed failure from ``address`` has been answered: free its slot."""
        left = self._waiting.get(address, 0) - 1
        if left > 0:
            self._waiting[address] = left
        else:
            self._waiting.pop(address, None)

    def waiting(self, address: str) -> int:
        """Failures from ``address`` holding a concurrency slot now."""
        return self._waiting.get(address, 0)

    def recent(self, address: str, now: float) -> int:
        """Failures from ``address`` counted within the window (none while it is refused)."""
        times = self._failures.get(address)
        return 0 if times is None else sum(1 for t in times if t > now - self.window)

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds until failing requests from ``address`` are answered normally again, or
        None if they are now."""
        until = self._banned.get(address)
        if until is None:
            return None
        if now >= until:
            del self._banned[address]
            return None
        return until - now

    def failed(self, address: str, now: float) -> bool:
        """Record a failure; True if it got the address refused."""
        times = self._failures.pop(address, None) or deque()
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if self.limit > 0 and len(times) >= self.limit:
            self._banned.pop(address, None)
            self._banned[address] = now + self.ban
            self._trim(self._banned)
            return True
        self._failures[address] = times  # re-inserted last: most recent stays longest
        self._trim(self._failures)
        return False

    def _trim(self, table: dict[str, Any]) -> None:
        while len(table) > self.max_tracked:
            del table[next(iter(table))]

    def tracked(self) -> int:
        """How many addresses are remembered (for tests of the memory bound)."""
        return len(self._failures) + len(self._banned)
