"""Reloading the configuration of a running relay, without dropping a connection.

Theory of operation
-------------------
A reload compares the configuration just loaded with the one the relay runs and sorts every
setting that differs into one of two kinds:

* **live** settings (:data:`LIVE_SETTINGS`) take effect at once: the keys (tokens of a new key
  work on the next connection, tokens of a removed key are refused from then on; connections
  already open stay up, they are not authenticated again), the admin key, tool filters (callers
  whose view of the tools changes get ``notifications/tools/list_changed``), the request limits
  and timeouts, the admission limits of new connections, CORS and origins, trusted proxies, the
  log level of the ``trio_mcp_relay`` loggers. A timeout applies to what starts after the
  reload; what is already waiting keeps the deadline it had.
* **restart** settings (:data:`RESTART_SETTINGS`) are fixed for the relay's life: the listening
  socket (``host``, ``port``), ``data_dir``, what every open connection was built with
  (``max_message_size``, the outbox bounds, the shared byte budget), keepalive and the failed
  authentication policy, whose counts a new policy would forget. The relay keeps running with
  the old value and says which settings wait for a restart.

:func:`plan_reload` is that comparison, pure: it returns the configuration to run from now on
(the running one with the live settings of the new one) and a :class:`ReloadReport` of what
changed. :func:`apply_reload` hands the new values to the parts of a running relay that hold
them. :class:`RelayHandle` is how a program embedding the relay asks for a reload; the CLI
turns ``SIGHUP`` into one (see ``_cli.py``).

No secret is ever part of a report: keys are described by their count and whether the signing
key changed, never by their value, not even redacted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._auth import TokenAuthenticator
from .._config import RelayConfig
from .._proxies import TrustedProxies
from ..core.session import AgentFilters

if TYPE_CHECKING:
    from .serve import _Relay

__all__ = ["LIVE_SETTINGS", "RESTART_SETTINGS", "RelayHandle", "ReloadReport", "plan_reload"]

log = logging.getLogger("trio_mcp_relay.server")

#: Settings a reload changes in the running relay.
LIVE_SETTINGS: Final = frozenset(
    {
        "key",
        "previous_keys",
        "admin_key",
        "reference_tokens",
        "tool_filters",
        "log_level",
        "enable_cors",
        "allowed_origins",
        "trusted_proxies",
        "handshake_timeout",
        "forward_timeout",
        "tool_request_timeout",
        "init_timeout",
        "request_timeout",
        "max_inflight_per_caller",
        "max_tool_requests",
        "max_connections",
        "max_callers_per_agent",
        "max_pending_per_address",
        "slow_caller_grace",
        "session_idle_timeout",
        "shutdown_grace",
        "metrics_token",
    }
)

#: Settings that keep the value the relay started with until it is restarted.
RESTART_SETTINGS: Final = frozenset(
    {
        "host",
        "port",
        "data_dir",
        "max_message_size",
        "outbox_size",
        "outbox_bytes",
        "max_queued_bytes",
        "ping_interval",
        "ping_timeout",
        "auth_failures",
        "auth_window",
        "auth_ban",
        "auth_delay",
        "auth_concurrency",
        # The log file and format are set up once, before the relay starts.
        "log_file",
        "max_file_size",
        "backup_count",
        "log_format",
        # Which agents get their own metrics label is fixed with the counters at start.
        "metrics_agents",
        "metrics_top_agents",
        # A node joins its cluster once, under one name and one lease.
        "cluster",
        "cluster_lease",
        "cluster_node",
    }
)


@attrs.frozen
class ReloadReport:
    """What a reload changed.

    Attributes:
        changed: The live settings whose new values the relay runs with now, by
            :class:`~trio_mcp_relay.RelayConfig` field name (``key`` stands for the whole key
            list, ``previous_keys`` included).
        needs_restart: Settings whose new value differs from the running one but takes
            effect only after a restart; the relay keeps the running value.
        lines: One human-readable line per setting of either kind, free of secrets (what the
            relay logs): those of ``changed``, then those of ``needs_restart``, in order.
    """

    changed: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()


def _field_names() -> list[str]:
    # previous_keys is part of "key": the key list is compared as one setting.
    return [f.name for f in attrs.fields(RelayConfig) if f.name != "previous_keys"]


def _filters(config: RelayConfig) -> dict[str, AgentFilters]:
    return dict(config.tool_filters)


def _differs(name: str, running: RelayConfig, loaded: RelayConfig) -> bool:
    if name == "key":
        return running.keys != loaded.keys
    if name == "tool_filters":
        return _filters(running) != _filters(loaded)
    return bool(getattr(running, name) != getattr(loaded, name))


def _describe(name: str, running: RelayConfig, loaded: RelayConfig) -> str:
    if name == "key":
        old, new = running.keys, loaded.keys
        added = len(set(new) - set(old))
        removed = len(set(old) - set(new))
        signing = "the signing key changed" if old[:1] != new[:1] else "the same signing key"
        return (
            f"key: {_count(len(old))} -> {_count(len(new))} "
            f"({added} added, {removed} removed; {signing})"
        )
    if name == "admin_key":
        if running.admin_key is None:
            return "admin_key: set (the health endpoint takes it instead of the server keys)"
        if loaded.admin_key is None:
            return "admin_key: removed (the health endpoint takes the server keys)"
        return "admin_key: changed"
    if name == "metrics_token":
        state = "removed" if loaded.metrics_token is None else "set"
        return f"metrics_token: {state} (/metrics takes it besides the admin key)"
    if name == "tool_filters":
        before, after = _filters(running), _filters(loaded)
        agents = sorted(a for a in set(before) | set(after) if before.get(a) != after.get(a))
        return f"tool filters: changed for {', '.join(agents)} ('*': every agent)"
    return f"{name}: {_show(getattr(running, name))} -> {_show(getattr(loaded, name))}"


def _count(keys: int) -> str:
    return f"{keys} key" if keys == 1 else f"{keys} keys"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(none)"
    return str(value)


def plan_reload(running: RelayConfig, loaded: RelayConfig) -> tuple[RelayConfig, ReloadReport]:
    """Compare a freshly loaded configuration with the running one.

    Args:
        running: The configuration the relay runs with.
        loaded: The configuration just loaded; it must have a key.

    Returns:
        The configuration to run with from now on (``running`` with every live setting of
        ``loaded``; the restart settings stay as they run) and what differs.

    Raises:
        ValueError: ``loaded`` has no key.
    """
    if loaded.key is None:
        raise ValueError("the new configuration has no key")
    changed: list[str] = []
    needs_restart: list[str] = []
    live_lines: list[str] = []
    restart_lines: list[str] = []
    for name in _field_names():
        if not _differs(name, running, loaded):
            continue
        line = _describe(name, running, loaded)
        if name in LIVE_SETTINGS:
            changed.append(name)
            live_lines.append(line)
        else:
            needs_restart.append(name)
            kept = _show(getattr(running, name))
            restart_lines.append(f"{line}: needs a restart (it stays {kept} until then)")
    live = {name: getattr(loaded, name) for name in changed}
    if "key" in live:
        live["previous_keys"] = loaded.previous_keys
    effective = attrs.evolve(running, **live) if live else running
    lines = (*live_lines, *restart_lines)
    return effective, ReloadReport(tuple(changed), tuple(needs_restart), lines)


def apply_reload(relay: _Relay, loaded: RelayConfig) -> ReloadReport:
    """Reload ``relay`` with ``loaded`` (see :func:`plan_reload`), log what changed, and
    return that. Synchronous: every part it touches reads its settings when it uses them."""
    effective, report = plan_reload(relay.config, loaded)
    changed = set(report.changed)
    if changed:
        relay.config = effective
        relay.dispatcher.config = relay.lifecycle.config = relay.routes.config = effective
    if changed & {"key", "reference_tokens"}:
        if relay.own_authenticator:
            relay.authenticator = TokenAuthenticator(
                effective.keys, accept_reference=effective.reference_tokens
            )
        else:
            log.warning(
                "reload: the authenticator was given to serve_relay: the new keys reach only "
                "the health endpoint"
            )
    if "reference_tokens" in changed and relay.own_authenticator:
        relay.status.token_for = relay._reference_token if effective.reference_tokens else None
    if changed & {"key", "admin_key"}:
        relay.admin_key = effective.admin_key or effective.key or ""
        relay.routes.health_keys = effective.admin_keys
    if changed & {"key", "admin_key", "metrics_token"}:
        relay.metrics.keys = effective.metrics_keys
    router = relay.router
    router.tool_request_timeout = effective.tool_request_timeout
    router.request_timeout = effective.request_timeout
    router.max_inflight_per_caller = effective.max_inflight_per_caller
    router.max_tool_requests = effective.max_tool_requests
    router.init_timeout = effective.init_timeout
    relay.pending.limit = effective.max_pending_per_address
    if "trusted_proxies" in changed:
        relay.proxies = TrustedProxies.parse(effective.trusted_proxies)
    if "tool_filters" in changed:
        filters: Mapping[str, AgentFilters] = effective.tool_filters
        router.set_filters(
            {a: f for a, f in filters.items() if a != "*"},
            filters.get("*"),
            now=trio.current_time(),
        )
        relay.dispatcher.dispatch([])  # wakes the timer for the list_changed it set up
    if "log_level" in changed:
        logging.getLogger("trio_mcp_relay").setLevel(effective.log_level)
    _log(report)
    return report


def _log(report: ReloadReport) -> None:
    if not report.lines:
        log.info("reload: nothing changed")
        return
    live = len(report.changed)
    for line in report.lines[:live]:
        log.info("reload: %s", line)
    for line in report.lines[live:]:
        log.warning("reload: %s", line)


class RelayHandle:
    """Reloads a running relay: give it to :func:`~trio_mcp_relay.serve_relay` as ``handle``.

    Example::

        handle = RelayHandle()
        await nursery.start(functools.partial(serve_relay, config, handle=handle))
        ...
        report = handle.reload(load_config(...))   # from the relay's Trio thread

    A handle serves one relay at a time, from the moment ``serve_relay`` reports its port
    until it returns.
    """

    def __init__(self) -> None:
        self._relay: _Relay | None = None

    @property
    def running(self) -> bool:
        """Whether a relay is attached (it is serving)."""
        return self._relay is not None

    def reload(self, config: RelayConfig) -> ReloadReport:
        """Run with ``config`` from now on, as far as that can change without a restart.

        Live settings take effect at once; open connections stay up, whatever the new keys.
        What differs in the other settings is logged and reported, and waits for a restart.

        Args:
            config: The whole new configuration (as :func:`~trio_mcp_relay.load_config`
                returns it), with a key.

        Returns:
            What changed, and what needs a restart.

        Raises:
            RuntimeError: No relay is running with this handle.
            ValueError: ``config`` has no key.
        """
        if self._relay is None:
            raise RuntimeError("no relay is running with this handle")
        return apply_reload(self._relay, config)

    def _attach(self, relay: _Relay) -> None:
        if self._relay is not None:
            raise RuntimeError("this handle already serves a running relay")
        self._relay = relay

    def _detach(self) -> None:
        self._relay = None
