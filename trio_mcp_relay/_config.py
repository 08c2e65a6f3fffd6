"""Configuration: command-line flags, environment, the reference's INI file, defaults.

Precedence, highest first: flags, environment, the config file, defaults. The file is the
reference server's ``data/.mcp-endpoint-server.cfg`` read as it is, so a relay can replace a
reference server in place and keep its key (and so every token already handed out):

.. code-block:: ini

    [server]
    host = 0.0.0.0
    port = 8004
    key = 0123456789abcdef0123456789abcdef
    debug = false
    log_level = INFO

    [security]
    allowed_origins = *
    enable_cors = true

    [logging]
    log_file = logs/mcp_server.log
    max_file_size = 10MB
    backup_count = 5

Settings only this relay has live in the same file (``[security] reference_tokens``,
``[security] trusted_proxies``, ``[logging] log_format``, ``[tools]`` filters, and the limits
and timeouts under ``[limits]`` by their field names, e.g. ``max_inflight_per_caller = 20``);
the reference ignores what it does not know. ``[logging]`` is read as the reference reads it:
see :mod:`trio_mcp_relay._logs`.

Key rotation: ``[server] key``, ``SERVER_KEY`` and ``--key`` (repeatable) take several keys,
comma-separated. The first becomes :attr:`RelayConfig.key` (it makes new tokens and is the
default health key), the others :attr:`RelayConfig.previous_keys` (still accepted).

Every value goes through one cattrs converter into :class:`RelayConfig`, whose attrs
validators hold the rules; a value that fails becomes a :class:`ConfigError` naming the
setting the way its source spells it (``PORT (environment)``, ``[server] port in <file>``,
``--port``).

With no key anywhere, one is generated the way the reference does (32 hex characters) and
written into the config file, so that tokens survive restarts.
"""

from __future__ import annotations

import configparser
import contextlib
import math
import os
import secrets
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, NewType, TypeAlias

import attrs
import cattrs
from cattrs.errors import ClassValidationError

from trio_mcp_relay._auth import redact
from trio_mcp_relay._logs import parse_size
from trio_mcp_relay._proxies import parse_networks
from trio_mcp_relay.core.catalog import ToolFilter
from trio_mcp_relay.core.session import AgentFilters

__all__ = ["CONFIG_FILE_NAME", "ConfigError", "RelayConfig", "load_config", "local_ip"]

CONFIG_FILE_NAME: Final = ".mcp-endpoint-server.cfg"
"""The reference server's config file name, inside the data directory."""

_LOG_LEVELS: Final = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
_LOG_FORMATS: Final = frozenset({"text", "json"})

ByteSize = NewType("ByteSize", int)
"""A number of bytes, also given as the reference writes sizes (``10MB``, ``512KB``)."""
_BOOLEANS: Final = configparser.ConfigParser.BOOLEAN_STATES


class ConfigError(Exception):
    """A setting has a value the relay cannot use.

    The message names the setting and where the value came from, e.g.
    ``PORT (environment): 'abc' is not an integer``.
    """


class _InvalidValue(ValueError):
    """Raised by the validators below; ``load_config`` adds the setting's name and source."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def _upper(value: str) -> str:
    return value.upper()


def _lower(value: str) -> str:
    return value.lower()


def _one_of(choices: frozenset[str]) -> Callable[[object, attrs.Attribute[str], str], None]:
    def check(_: object, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            names = ", ".join(sorted(choices))
            raise _InvalidValue(attribute.name, f"{value!r} is not one of {names}")

    return check


def _not_empty(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value == "":
        raise _InvalidValue(attribute.name, "must not be empty")


def _port_number(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 65535:
        raise _InvalidValue(attribute.name, f"{value} is not a port number (0 to 65535)")


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise _InvalidValue(attribute.name, f"{value!r} is not a positive number")


def _redis_url(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not value.startswith(("redis://", "rediss://", "unix://")):
        raise _InvalidValue(
            attribute.name, f"{redact_url(value)!r} is not a redis://HOST:PORT/DB URL"
        )


def redact_url(url: str) -> str:
    """A Redis URL without its password (for logs and errors)."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://…@{tail}"


def _redact_url(value: str) -> str:
    return repr(redact_url(value))


def _lease(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (1.0 <= value <= 300.0):
        raise _InvalidValue(attribute.name, f"{value!r} is not between 1 and 300 seconds")


def _node_name(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not all(c.isalnum() or c in "-_." for c in value):
        raise _InvalidValue(attribute.name, f"{value!r}: use letters, digits, '-', '_', '.'")


def _zero_or_positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise _InvalidValue(attribute.name, f"{value!r} is not zero or a positive number")


def _key_text(_: object, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is None:
        return
    if value == "":
        raise _InvalidValue(attribute.name, "must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _InvalidValue(attribute.name, "is not valid UTF-8 text") from None


def _redact_key(key: str | None) -> str:
    return "None" if key is None else repr(redact(key))


def _redact_keys(keys: tuple[str, ...]) -> str:
    return repr(tuple(redact(key) for key in keys))


_Texts: TypeAlias = "attrs.Attribute[tuple[str, ...]]"


def _keys_text(_: object, attribute: _Texts, value: tuple[str, ...]) -> None:
    for key in value:
        if key == "":
            raise _InvalidValue(attribute.name, "must not hold an empty key")


def _networks(_: object, attribute: _Texts, value: tuple[str, ...]) -> None:
    try:
        parse_networks(value)
    except ValueError as exc:
        raise _InvalidValue(attribute.name, str(exc)) from None


@attrs.frozen
class RelayConfig:
    """Everything the relay needs to start.

    Attributes:
        host: Address to listen on.
        port: TCP port to listen on; 0 picks a free one.
        key: The server key: decrypts tokens and guards the health endpoint. ``None`` only
            before :func:`load_config` has filled it in. Its ``repr`` is redacted.
        data_dir: Directory of the reference-format config file.
        log_level: One of DEBUG, INFO, WARNING, ERROR, CRITICAL (stored upper-case).
        enable_cors: Answer CORS preflights and add CORS headers on the HTTP endpoints.
        allowed_origins: Origins allowed by CORS; ``"*"`` allows any.
        max_message_size: Largest WebSocket message accepted, in bytes.
        handshake_timeout: Seconds a new connection has to finish its HTTP/WebSocket handshake.
        forward_timeout: Seconds a request may wait in a tool's queue before it is answered
            ``-32002``.
        tool_request_timeout: Seconds a tool-initiated request waits for a caller's answer.
        init_timeout: Seconds each step of a tool server's initialization by the relay
            (``initialize``, each page of each list) may take; a server that lets one pass
            is closed 4003. Also bounds how long a caller request waits for it.
        tool_filters: Tools to hide, by agent (``"*"``: every agent) and server, from the
            config file's ``[tools]`` sections (see :func:`parse_tool_filters`).
        outbox_size: Frames queued per connection at most (a caller over it is closed 1013, a
            frame to a tool over it refused with ``-32002``).
        outbox_bytes: Bytes queued per connection at most, with the same consequences (an
            empty queue always takes one frame, however large).
        max_queued_bytes: Bytes queued across all connections at most, likewise.
        max_pending_per_address: Connections one client address may hold before they have
            authenticated; more are answered HTTP 503 at once.
        admin_key: Key for the health endpoint; ``None`` means the server key (as the
            reference). Its ``repr`` is redacted.
        ping_interval: Seconds between WebSocket pings to every peer; 0 turns pings off.
        ping_timeout: Seconds a peer has to answer a ping before it is closed (1011).
        max_connections: Open TCP connections at most; more are answered HTTP 503.
        max_callers_per_agent: Caller connections per agent at most; more are closed (4002).
        max_inflight_per_caller: Requests one caller may have in flight; more get ``-32007``.
        max_tool_requests: Tool-initiated requests awaiting a caller, per agent; more get
            ``-32007``.
        request_timeout: Seconds a caller request may stay unanswered before the relay answers
            ``-32006`` and cancels it at the tool; 0 (the default) waits for the tool forever.
        session_idle_timeout: Seconds an HTTP session (Streamable HTTP or HTTP+SSE caller)
            lives with no request and no open stream; it then ends like a caller that
            disconnects (its requests in flight are cancelled at the tool).
        slow_caller_grace: Seconds a frame may wait in a caller's queue before the caller is
            closed (1013).
        shutdown_grace: Seconds a graceful shutdown waits for in-flight requests.
        cluster: ``redis://HOST:PORT/DB``: run as one node of a cluster sharing that Redis
            (needs the ``cluster`` extra); empty (the default): alone.
        cluster_lease: Seconds a node's leases (itself, its servers) live without its
            heartbeat: how long a dead node's servers stay in the other nodes' catalogs.
        cluster_node: This node's name in the cluster (default: host name, port and a random
            suffix).
        auth_failures: Failed authentications from one client address within
            ``auth_window`` after which further *failing* requests from it are refused at once
            (HTTP 429 with ``Retry-After``) for ``auth_ban`` seconds; 0 is off. A request
            carrying a valid token or key is never refused this way.
        auth_window: See ``auth_failures``; also how long failures count towards the delay.
        auth_ban: See ``auth_failures``.
        auth_delay: Longest delay, in seconds, before a failed authentication is answered
            (1008, or 403 on the health endpoint). The first failure from an address is not
            delayed; each further one within ``auth_window`` waits twice as long as the one
            before, up to this. 0 turns delays off.
        auth_concurrency: Failed authentications from one client address that may be
            waiting out their delay at once; one more is answered 429 at once.
        previous_keys: Keys accepted besides ``key`` (rotation): tokens made with them keep
            working, new tokens are made with ``key``. Their ``repr`` is redacted.
        reference_tokens: Accept the reference scheme's tokens (one token per agent, both
            endpoints, no expiry). False requires scoped tokens.
        trusted_proxies: Addresses and networks (``10.0.0.0/8``) of reverse proxies whose
            ``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP`` header names the client
            address used for limits and logs; from anyone else these headers are ignored.
        log_file: File the log also goes to, rotated by size; relative to the working
            directory (as the reference); empty (the default): no file.
        max_file_size: Bytes a log file may reach before it is rotated (``10MB`` in the
            file); 0 never rotates.
        backup_count: Rotated log files kept (``log_file.1`` newest); 0 keeps none.
        log_format: ``text`` or ``json`` (one JSON object per line), for stderr and the file.
        metrics_token: A token that opens ``/metrics`` besides the admin key (so a
            Prometheus server need not hold the admin key). Its ``repr`` is redacted.
        metrics_agents: Agents that always get their own label in ``/metrics``.
        metrics_top_agents: How many more agents (those with the most connections) get
            their own label in ``/metrics``; the others are counted as ``other``.
    """

    host: str = attrs.field(default="0.0.0.0", validator=_not_empty)
    port: int = attrs.field(default=8004, validator=_port_number)
    key: str | None = attrs.field(default=None, validator=_key_text, repr=_redact_key)
    data_dir: Path = Path("data")
    log_level: str = attrs.field(default="INFO", converter=_upper, validator=_one_of(_LOG_LEVELS))
    enable_cors: bool = True
    allowed_origins: tuple[str, ...] = ("*",)
    max_message_size: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    forward_timeout: float = attrs.field(default=10.0, validator=_positive)
    tool_request_timeout: float = attrs.field(default=30.0, validator=_positive)
    outbox_size: int = attrs.field(default=256, validator=_positive)
    outbox_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    max_queued_bytes: int = attrs.field(default=256 * 1024 * 1024, validator=_positive)
    max_pending_per_address: int = attrs.field(default=64, validator=_positive)
    admin_key: str | None = attrs.field(default=None, validator=_key_text, repr=_redact_key)
    ping_interval: float = attrs.field(default=20.0, validator=_zero_or_positive)
    ping_timeout: float = attrs.field(default=20.0, validator=_positive)
    max_connections: int = attrs.field(default=10000, validator=_positive)
    max_callers_per_agent: int = attrs.field(default=100, validator=_positive)
    max_inflight_per_caller: int = attrs.field(default=100, validator=_positive)
    max_tool_requests: int = attrs.field(default=32, validator=_positive)
    request_timeout: float = attrs.field(default=0.0, validator=_zero_or_positive)
    slow_caller_grace: float = attrs.field(default=10.0, validator=_positive)
    session_idle_timeout: float = attrs.field(default=300.0, validator=_positive)
    shutdown_grace: float = attrs.field(default=10.0, validator=_zero_or_positive)
    auth_failures: int = attrs.field(default=10, validator=_zero_or_positive)
    auth_window: float = attrs.field(default=60.0, validator=_positive)
    auth_ban: float = attrs.field(default=60.0, validator=_positive)
    auth_delay: float = attrs.field(default=10.0, validator=_zero_or_positive)
    auth_concurrency: int = attrs.field(default=4, validator=_positive)
    previous_keys: tuple[str, ...] = attrs.field(
        default=(), validator=_keys_text, repr=_redact_keys
    )
    reference_tokens: bool = True
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), validator=_networks)
    init_timeout: float = attrs.field(default=10.0, validator=_positive)
    tool_filters: Mapping[str, AgentFilters] = attrs.field(factory=dict, eq=False)
    log_file: str = ""
    max_file_size: ByteSize = attrs.field(
        default=ByteSize(10 * 1024 * 1024), validator=_zero_or_positive
    )
    backup_count: int = attrs.field(default=5, validator=_zero_or_positive)
    log_format: str = attrs.field(default="text", converter=_lower, validator=_one_of(_LOG_FORMATS))
    metrics_token: str | None = attrs.field(default=None, validator=_key_text, repr=_redact_key)
    metrics_agents: tuple[str, ...] = ()
    metrics_top_agents: int = attrs.field(default=10, validator=_zero_or_positive)
    cluster: str = attrs.field(default="", validator=_redis_url, repr=_redact_url)
    cluster_lease: float = attrs.field(default=10.0, validator=_lease)
    cluster_node: str = attrs.field(default="", validator=_node_name)

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether a request from ``origin`` may be served (none: not a browser, so yes)."""
        allowed = self.allowed_origins
        return origin is None or "*" in allowed or origin in allowed

    def cors_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` for a request from ``origin``: None when CORS
        is off or the origin is not allowed."""
        if not self.enable_cors:
            return None
        if "*" in self.allowed_origins:
            return "*"
        return origin if origin is not None and origin in self.allowed_origins else None

    @property
    def keys(self) -> tuple[str, ...]:
        """Every accepted server key, the signing key first (empty before a key is set)."""
        return ((self.key,) if self.key is not None else ()) + self.previous_keys

    @property
    def admin_keys(self) -> tuple[str, ...]:
        """The keys the health and status endpoints accept: the admin key if one is set,
        else every server key."""
        return (self.admin_key,) if self.admin_key else self.keys

    @property
    def metrics_keys(self) -> tuple[str, ...]:
        """The keys ``/metrics`` accepts: the admin keys, and the metrics token if set."""
        return self.admin_keys + ((self.metrics_token,) if self.metrics_token else ())


# --- Structuring -----------------------------------------------------------------------------
# Values arrive as strings (environment, file) or already typed (flags). The hooks accept both
# and are strict about the rest: cattrs' defaults would take bool("false") as True, a string as
# a tuple of its characters, and a float as an int.


def _structure_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    return value


def _structure_int(value: object, _: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    raise ValueError(f"{value!r} is not an integer")


def _structure_float(value: object, _: type) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value.strip())
    raise ValueError(f"{value!r} is not a number")


def _structure_bool(value: object, _: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        return _BOOLEANS[value.strip().lower()]
    raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, on/off, 1/0)")


def _structure_origins(value: object, _: type) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(origin.strip() for origin in value.split(",") if origin.strip())
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError(f"{value!r} is not a comma-separated list")


def _structure_size(value: object, _: type) -> ByteSize:
    if isinstance(value, int) and not isinstance(value, bool):
        return ByteSize(value)
    if isinstance(value, str):
        return ByteSize(parse_size(value))
    raise ValueError(f"{value!r} is not a size")


def _structure_path(value: object, _: type) -> Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, str):
        return Path(value)
    raise ValueError(f"{value!r} is not a path")


_converter: Final = cattrs.Converter()
_converter.register_structure_hook(str, _structure_str)
_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(float, _structure_float)
_converter.register_structure_hook(bool, _structure_bool)
_converter.register_structure_hook_func(lambda type_: type_ == tuple[str, ...], _structure_origins)
_converter.register_structure_hook(Path, _structure_path)
_converter.register_structure_hook(ByteSize, _structure_size)
_converter.register_structure_hook_func(
    lambda type_: type_ == Mapping[str, AgentFilters], lambda value, _: dict(value)
)


# --- Sources ---------------------------------------------------------------------------------

_ENV_NAMES: Final = {
    "host": "HOST",
    "port": "PORT",
    "key": "SERVER_KEY",
    "log_level": "LOG_LEVEL",
    "enable_cors": "ENABLE_CORS",
    "allowed_origins": "ALLOWED_ORIGINS",
    "data_dir": "DATA_DIR",
    "admin_key": "ADMIN_KEY",
    "reference_tokens": "REFERENCE_TOKENS",
    "trusted_proxies": "TRUSTED_PROXIES",
    "log_file": "LOG_FILE",
    "max_file_size": "LOG_MAX_FILE_SIZE",
    "backup_count": "LOG_BACKUP_COUNT",
    "log_format": "LOG_FORMAT",
    "metrics_token": "METRICS_TOKEN",
    "metrics_agents": "METRICS_AGENTS",
    "metrics_top_agents": "METRICS_TOP_AGENTS",
    "cluster": "CLUSTER",
    "cluster_lease": "CLUSTER_LEASE",
    "cluster_node": "CLUSTER_NODE",
}

# The reference's [server] debug switches uvicorn's auto-reload, which has no counterpart
# here: it is accepted and ignored, like every other key the relay does not use.
_FILE_NAMES: Final = {
    "host": ("server", "host"),
    "port": ("server", "port"),
    "key": ("server", "key"),
    "log_level": ("server", "log_level"),
    "allowed_origins": ("security", "allowed_origins"),
    "enable_cors": ("security", "enable_cors"),
    "admin_key": ("security", "admin_key"),
    "reference_tokens": ("security", "reference_tokens"),
    "trusted_proxies": ("security", "trusted_proxies"),
    "tool_filters": ("tools", "allow/deny"),
    "log_file": ("logging", "log_file"),
    "max_file_size": ("logging", "max_file_size"),
    "backup_count": ("logging", "backup_count"),
    "log_format": ("logging", "log_format"),
    "metrics_token": ("security", "metrics_token"),
    "metrics_agents": ("metrics", "agents"),
    "metrics_top_agents": ("metrics", "top_agents"),
    "cluster": ("cluster", "redis"),
    "cluster_lease": ("cluster", "lease"),
    "cluster_node": ("cluster", "node"),
}
# Limits and timeouts only this relay has, under their own names, so that a reload (SIGHUP)
# can change them: flags stay as they were given at start, the file is read again.
_LIMITS: Final = (
    "max_message_size",
    "handshake_timeout",
    "forward_timeout",
    "tool_request_timeout",
    "init_timeout",
    "request_timeout",
    "outbox_size",
    "outbox_bytes",
    "max_queued_bytes",
    "max_pending_per_address",
    "ping_interval",
    "ping_timeout",
    "max_connections",
    "max_callers_per_agent",
    "max_inflight_per_caller",
    "max_tool_requests",
    "slow_caller_grace",
    "session_idle_timeout",
    "shutdown_grace",
    "auth_failures",
    "auth_window",
    "auth_ban",
    "auth_delay",
    "auth_concurrency",
)
_FILE_NAMES.update({name: ("limits", name) for name in _LIMITS})

# previous_keys is not a setting of its own: it is what follows the first key in "key".
_SETTING_OF: Final = {"previous_keys": "key"}

_FIELDS: Final = frozenset(field.name for field in attrs.fields(RelayConfig))


@attrs.frozen
class _Source:
    """Where a value came from, so an error can name the setting as the user wrote it."""

    kind: str
    file: Path | None = None

    def describe(self, field: str) -> str:
        field = _SETTING_OF.get(field, field)
        if self.kind == "flag":
            return "--" + field.replace("_", "-")
        if self.kind == "environment":
            return f"{_ENV_NAMES[field]} (environment)"
        if self.kind == "file":
            section, option = _FILE_NAMES[field]
            return f"[{section}] {option} in {self.file}"
        return f"{field} ({self.kind})"


_FLAG = _Source("flag")
_ENVIRONMENT = _Source("environment")
_GENERATED = _Source("generated")


def _config_parser() -> configparser.ConfigParser:
    # No interpolation: values are taken literally, so a "%" in a key or an origin is not an
    # error. Inline comments after whitespace are allowed because the reference's own docs
    # write "port = 8004  # ..." (the reference would then silently fall back to 8004).
    return configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))


def _read_file(path: Path) -> dict[str, str]:
    parser = _config_parser()
    try:
        with path.open(encoding="utf-8-sig") as stream:
            parser.read_file(stream)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}: {first_line}") from None
    values: dict[str, Any] = {}
    for field, (section, option) in _FILE_NAMES.items():
        if field == "tool_filters":
            continue
        value = parser.get(section, option, fallback=None)
        if value is not None:
            values[field] = value
    filters = parse_tool_filters(parser)
    if filters:
        values["tool_filters"] = filters
    return values


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.replace(",", " ").split() if p)


def parse_tool_filters(parser: configparser.ConfigParser) -> dict[str, AgentFilters]:
    """The tool filters of a config file, by agent (``"*"``: the default for every agent).

    Sections, each with ``allow`` and/or ``deny`` (``fnmatch`` patterns on the tools' own
    names, separated by commas or spaces; deny wins; no ``allow``: everything):

    ``[tools]``
        every agent's tools.
    ``[tools:AGENT]``
        that agent's tools, instead of ``[tools]``.
    ``[tools:AGENT:SERVER]``
        the tools of the server of that identity, for that agent (``*``: every agent), on
        top of the agent's filter.
    """
    agents: dict[str, ToolFilter] = {}
    servers: dict[str, dict[str, ToolFilter]] = {}
    for section in parser.sections():
        head, _, rest = section.partition(":")
        if head.strip() != "tools":
            continue
        options = set(parser.options(section)) - set(parser.defaults())
        unknown = options - {"allow", "deny"}
        if unknown:
            raise ConfigError(
                f"[{section}]: unknown option {sorted(unknown)[0]!r} (use allow and deny)"
            )
        found = ToolFilter(
            allow=_patterns(parser.get(section, "allow", fallback="")),
            deny=_patterns(parser.get(section, "deny", fallback="")),
        )
        agent, _, server = rest.partition(":")
        agent, server = agent.strip() or "*", server.strip()
        if not rest.strip():
            agents["*"] = found
        elif server:
            servers.setdefault(agent, {})[server] = found
        elif agent == "*":
            raise ConfigError(f"[{section}]: write [tools] for every agent")
        else:
            agents[agent] = found
    if not agents and not servers:
        return {}
    every = agents.get("*", ToolFilter())
    every_server = servers.get("*", {})
    out = {"*": AgentFilters(every, every_server)}
    for agent in (set(agents) | set(servers)) - {"*"}:
        out[agent] = AgentFilters(
            agents.get(agent, every), {**every_server, **servers.get(agent, {})}
        )
    return out


def _resolve_data_dir(
    flags: Mapping[str, object | None], environ: Mapping[str, str], data_dir: Path | None
) -> tuple[Path, _Source]:
    """The data directory comes first: it says where the config file is."""
    if data_dir is not None:
        given: object = data_dir
        source = _FLAG
    elif flags.get("data_dir") is not None:
        given, source = flags["data_dir"], _FLAG
    elif "DATA_DIR" in environ:
        given, source = environ["DATA_DIR"], _ENVIRONMENT
    else:
        return RelayConfig().data_dir, _Source("default")
    try:
        path = _structure_path(given, Path)
    except ValueError as exc:
        raise ConfigError(f"{source.describe('data_dir')}: {exc}") from None
    if str(given) == "":
        raise ConfigError(f"{source.describe('data_dir')}: must not be empty")
    return path, source


def load_config(
    *,
    flags: Mapping[str, object | None],
    environ: Mapping[str, str],
    config_file: Path | None,
    data_dir: Path | None,
    generate_key: bool = True,
) -> RelayConfig:
    """Merge flags, environment, config file and defaults into a :class:`RelayConfig`.

    Args:
        flags: Command-line values by :class:`RelayConfig` field name; ``None`` means the
            flag was not given.
        environ: The environment, usually ``os.environ``. Read: ``HOST``, ``PORT``,
            ``SERVER_KEY`` (comma-separated keys, the signing key first), ``LOG_LEVEL``,
            ``ENABLE_CORS``, ``ALLOWED_ORIGINS`` (comma separated), ``DATA_DIR``,
            ``ADMIN_KEY``, ``REFERENCE_TOKENS``, ``TRUSTED_PROXIES`` (comma separated),
            ``LOG_FILE``, ``LOG_MAX_FILE_SIZE``, ``LOG_BACKUP_COUNT``, ``LOG_FORMAT``,
            ``METRICS_TOKEN``, ``METRICS_AGENTS`` (comma separated) and ``METRICS_TOP_AGENTS``.
        config_file: A reference-format INI file that must exist; ``None`` reads
            ``<data dir>/.mcp-endpoint-server.cfg`` if it exists.
        data_dir: The data directory given on the command line, if any; it beats
            ``flags["data_dir"]`` and ``DATA_DIR``.
        generate_key: With no key anywhere, make one and save it (below). False makes that
            a :class:`ConfigError` instead: a reload must not replace every key in use.

    Returns:
        The configuration, always with a key. When no source gives one, a fresh 32-hex-digit
        key is written into the config file (created with mode 0600 if needed, other content
        kept) so the next load finds it.

    Raises:
        ConfigError: A value is malformed or out of range, the explicit config file does not
            exist or cannot be parsed, or the generated key cannot be saved.
        ValueError: ``flags`` holds a name that is not a :class:`RelayConfig` field.
    """
    unknown = set(flags) - _FIELDS
    if unknown:
        raise ValueError(f"unknown setting names in flags: {', '.join(sorted(unknown))}")

    resolved_dir, dir_source = _resolve_data_dir(flags, environ, data_dir)
    if config_file is None:
        path = resolved_dir / CONFIG_FILE_NAME
        from_file = _read_file(path) if path.exists() else {}
    else:
        path = config_file
        if not path.exists():
            raise ConfigError(f"--config: config file {path} does not exist")
        from_file = _read_file(path)

    merged: dict[str, tuple[object, _Source]] = {"data_dir": (resolved_dir, dir_source)}
    file_source = _Source("file", path)
    for field, value in from_file.items():
        merged[field] = (value, file_source)
    for field, env_name in _ENV_NAMES.items():
        if field != "data_dir" and env_name in environ:
            merged[field] = (environ[env_name], _ENVIRONMENT)
    for field, flag_value in flags.items():
        if field != "data_dir" and flag_value is not None:
            merged[field] = (flag_value, _FLAG)

    if "key" in merged:
        _split_keys(merged)
    generated_key = "key" not in merged
    if generated_key and not generate_key:
        raise ConfigError(f"[server] key in {path}: no key in the flags, environment or file")
    if generated_key:
        # The reference's own format: 32 hex characters (it uses uuid4().hex).
        merged["key"] = (secrets.token_hex(16), _GENERATED)

    config = _structure(merged)
    if generated_key:
        assert config.key is not None
        _save_key(path, config.key)
    return config


def _split_keys(merged: dict[str, tuple[object, _Source]]) -> None:
    """``key`` may hold several keys (a list from a repeated flag, or comma-separated text):
    the first stays ``key``, the rest become ``previous_keys``, from the same source."""
    value, source = merged["key"]
    items = value if isinstance(value, list | tuple) else [value]
    if not all(isinstance(item, str) for item in items):
        return  # not text: the converter reports it
    keys: list[str] = []
    for item in items:
        assert isinstance(item, str)
        pieces = [piece.strip() for piece in item.split(",")] if "," in item else [item]
        if "" in pieces and len(pieces) > 1:
            raise ConfigError(f"{source.describe('key')}: an empty key in the list")
        keys += [piece for piece in dict.fromkeys(pieces) if piece not in keys]
    if not keys:
        raise ConfigError(f"{source.describe('key')}: must not be empty")
    merged["key"] = (keys[0], source)
    merged["previous_keys"] = (tuple(keys[1:]), source)


def _structure(merged: Mapping[str, tuple[object, _Source]]) -> RelayConfig:
    """Structure the merged values, turning every failure into one :class:`ConfigError`.

    Type errors come from the converter's hooks, annotated by cattrs with the field name;
    range errors come from the attrs validators as :class:`_InvalidValue`, which cattrs may
    pass through as they are or inside its exception group.
    """

    def describe(field: str) -> str:
        source = merged[field][1] if field in merged else _Source("default")
        return source.describe(field)

    values = {field: value for field, (value, _) in merged.items()}
    problems: list[str] = []
    try:
        return _converter.structure(values, RelayConfig)
    except ClassValidationError as group:
        with_notes, without_notes = group.group_exceptions()
        for exc, note in with_notes:
            problems.append(f"{describe(str(note.name))}: {_first_line(exc)}")
        for exc in without_notes:
            if isinstance(exc, _InvalidValue):
                problems.append(f"{describe(exc.field)}: {exc.detail}")
            else:
                problems.append(_first_line(exc))
    except _InvalidValue as exc:
        problems.append(f"{describe(exc.field)}: {exc.detail}")
    raise ConfigError("; ".join(problems))


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _save_key(path: Path, key: str) -> None:
    """Write ``key = <key>`` into the ``[server]`` section of ``path``, keeping the rest.

    The file is edited as text, not rewritten by configparser, so the user's comments and
    layout survive. It is replaced atomically and ends up with mode 0600: it holds a secret.
    """
    try:
        text = path.read_text(encoding="utf-8-sig") if path.exists() else ""
        lines = text.splitlines(keepends=True)
        entry = f"key = {key}\n"
        header = next(
            (index for index, line in enumerate(lines) if line.strip() == "[server]"), None
        )
        if header is None:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines += (["\n"] if lines else []) + ["[server]\n", entry]
        else:
            if not lines[header].endswith("\n"):
                lines[header] += "\n"
            lines.insert(header + 1, entry)

        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file with mode 0600 and a name no one else can have taken.
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                stream.write("".join(lines))
            os.chmod(temporary, 0o600)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        raise ConfigError(
            f"[server] key in {path}: cannot save the generated key: {exc.strerror or exc}"
        ) from None


def local_ip() -> str:
    """Find this machine's outward-facing IPv4 address, as the reference does.

    "Connecting" a UDP socket only asks the kernel for a route; no packet is sent.

    Returns:
        The source address of the default route, or ``"127.0.0.1"`` if there is none.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("8.8.8.8", 80))
            address = probe.getsockname()[0]
    except Exception:
        return "127.0.0.1"
    return address if isinstance(address, str) else "127.0.0.1"
