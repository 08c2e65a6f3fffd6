"""Shared fixtures: hypothesis profiles and a relay listening on a real loopback port."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import trio
from hypothesis import HealthCheck, settings

from tests.helpers import RunningRelay, start_relay
from tests.redis import redis  # noqa: F401  (a fixture: a real redis-server)

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
async def relay(nursery: trio.Nursery) -> AsyncIterator[RunningRelay]:
    """A relay on 127.0.0.1, port 0, with a fixed key."""
    running = await start_relay(nursery)
    yield running
