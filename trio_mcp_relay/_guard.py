"""Slow down guessing: refuse an address for a while after repeated failed authentications.

Pure bookkeeping with no I/O; the server asks :meth:`FailureLimiter.retry_after` before it
authenticates a connection (or checks the health key) and reports failures with
:meth:`FailureLimiter.failed`. Memory is bounded: at most ``max_tracked`` addresses with
recent failures and ``max_tracked`` banned addresses are remembered, the oldest forgotten
first. The two are kept apart so that failures from many addresses never evict a ban.
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["FailureLimiter"]


class FailureLimiter:
    """Counts failures per address in a sliding window and bans an address that has too many.

    Args:
        limit: failures within ``window`` seconds that ban the address; 0 turns this off.
        window: the sliding window, in seconds.
        ban: how long a banned address is refused, in seconds.
        max_tracked: addresses remembered at most, in each of the two tables (addresses
            with recent failures, banned addresses).
    """

    def __init__(self, limit: int, window: float, ban: float, *, max_tracked: int = 10000) -> None:
        self.limit = limit
        self.window = window
        self.ban = ban
        self.max_tracked = max_tracked
        self._failures: dict[str, deque[float]] = {}
        self._banned: dict[str, float] = {}

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds until ``address`` may try again, or None if it may try now."""
        until = self._banned.get(address)
        if until is None:
            return None
        if now >= until:
            del self._banned[address]
            return None
        return until - now

    def failed(self, address: str, now: float) -> bool:
        """Record a failure; True if it got the address banned."""
        if self.limit <= 0:
            return False
        times = self._failures.pop(address, None) or deque()
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
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
