"""The tool-side bridge: stdio MCP servers dialled in to an MCP endpoint over WebSocket.

A drop-in replacement for ``mcp_pipe.py``, the sample script the Xiaozhi ecosystem copies
around: each configured stdio MCP server runs as a child process, and one WebSocket per server
carries its JSON-RPC frames to the endpoint (this relay, the reference mcp-endpoint-server or
``wss://api.xiaozhi.me/mcp/?token=...``), which acts as the MCP client.

Theory of operation. Each server gets a *bridge* with two independent lifetimes:

* the **child process** is started once and outlives WebSocket reconnects, so the server keeps
  its state. When it dies it is restarted with its own backoff; if the endpoint had initialized
  it, the bridge replays the endpoint's last ``initialize`` request (its answer is swallowed)
  and ``notifications/initialized``, so the endpoint's MCP session
  stays valid across the restart. Requests in flight when it died are answered ``-32603`` at
  once; requests that arrive while it is down get the same answer.
* the **WebSocket** is dialled, and redialled with exponential backoff and jitter after every
  disconnect (the first dial waits for the child to exist). Each connection is a
  *generation*. Child output waits in a bounded *backlog* while no connection is up (the
  oldest line is dropped, with a warning, when it is full) and is flushed on the next
  connection; while a connection is up a full backlog blocks the child's stdout instead
  (backpressure, nothing lost).

Ids: the child sees request ids of the bridge's own (a counter) and each answer gets the
endpoint's id back, exactly. Endpoints number their requests per connection, so without this
a request on a new connection could share its id with one the old connection left in flight,
and the old answer would be taken for the new one. With it, an answer to a request from an
earlier generation is recognised and dropped rather than flushed (the endpoint that asked is
gone), and ``notifications/cancelled`` from the endpoint is mapped to the child's id.

Frames: a WebSocket message is parsed and re-serialized compactly (or, when it is not JSON,
sent as is with its newlines removed) and written to the child's stdin as one line; each line
of the child's stdout is sent with its line ending stripped (compact again when its id was
restored), if it is JSON: other lines are not MCP, and are logged and dropped.

Structure::

    run_pipe                        one task per server; returns only by cancellation
    └── _Bridge.run
        ├── child loop              start, wait, log the exit code, back off, restart
        │   └── run_process         (its deliver_cancel: SIGTERM, then SIGKILL)
        │       ├── stdout reader   lines -> backlog (blocks while connected and full)
        │       ├── stderr reader   lines -> our stderr, prefixed "[name] "
        │       └── replay          re-initialize a restarted child
        └── connection loop         dial, serve, back off, redial
            └── one connection
                ├── transport       trio-websocket's reader task, in a shielded scope so it
                │                   can finish the close handshake after a cancel
                ├── endpoint -> child  (blocks while the child is not reading stdin)
                ├── backlog -> endpoint
                └── keepalive       ping; no pong in time ends the connection

Nothing here prints: everything goes through :mod:`logging` (the logger
``trio_mcp_relay.pipe``), and every URL is logged with its ``token=`` redacted. The children's
stderr is copied to our stderr as it comes.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import parse_qs, quote, urlsplit

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from ._auth import _SECRET_IN_URL, redact
from ._endpoint import UrlError, tool_side_url
from ._frames import FrameError, _loads, dumps

__all__ = [
    "Backoff",
    "BridgeStatus",
    "PipeConfigError",
    "PipeFailed",
    "PipeOptions",
    "ServerSpec",
    "command_server",
    "compact_line",
    "load_config_file",
    "parse_config",
    "prepare",
    "read_dotenv",
    "redact_url",
    "run_pipe",
    "server_url",
    "server_urls",
    "shown_endpoint",
]

log = logging.getLogger("trio_mcp_relay.pipe")

ENDPOINT_ENV: Final = "MCP_ENDPOINT"
CONFIG_ENV: Final = "MCP_CONFIG"
DEFAULT_CONFIG: Final = "mcp_config.json"
DOTENV: Final = ".env"
#: Config entry types that mean "this process speaks MCP on stdin/stdout".
STDIO_TYPES: Final = frozenset({"stdio"})
#: Config entry types of remote servers, by the transport that bridges them.
REMOTE_TYPES: Final = {
    "http": "http",
    "streamablehttp": "http",
    "streamable-http": "http",
    "streamable_http": "http",
    "sse": "sse",
}
#: JSON-RPC error the bridge answers for its child (the server process is gone or restarting).
INTERNAL_ERROR: Final = -32603
#: The longest line read from a child; a longer one is dropped with a warning.
MAX_LINE: Final = 16 * 1024 * 1024
#: A stderr line longer than this is shown in pieces.
MAX_STDERR_LINE: Final = 64 * 1024
#: How long a restarted child gets to answer the replayed ``initialize``.
REPLAY_TIMEOUT: Final = 10.0
#: After a child exits, how long its output pipes get to drain (a grandchild may hold them).
OUTPUT_GRACE: Final = 1.0
#: The close code and reason when we stop (Ctrl-C, SIGTERM, cancellation).
_STOPPED: Final = (1000, "trio-mcp-relay pipe stopped")


class PipeConfigError(Exception):
    """The command line, environment or config file does not describe a runnable pipe.

    The message says what to fix; it never contains the endpoint's token.
    """


class PipeFailed(Exception):
    """Every server of the pipe has stopped for good; the message says why (one line)."""


# ----------------------------------------------------------------------------- settings


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be 0 or more, not {value!r}")


def _fraction(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{attribute.name} must be at least 0 and below 1, not {value!r}")


@attrs.frozen
class PipeOptions:
    """Timing and size settings of a pipe. The defaults suit a real deployment.

    Attributes:
        backoff_initial: Seconds before the first retry (reconnect, or child restart).
        backoff_max: The longest wait between retries; the wait doubles up to it.
        backoff_reset: A connection (or child) that stayed up this many seconds resets its
            backoff to ``backoff_initial``.
        jitter: Each wait is multiplied by a random factor in ``1 ± jitter`` (never above
            ``backoff_max``), so that many pipes do not redial in step.
        ping_interval: Seconds between WebSocket pings; 0 turns them off.
        ping_timeout: Seconds the endpoint has to answer a ping before the connection is
            dropped and redialled.
        buffer_lines: Child output lines kept while disconnected (the oldest goes first).
        kill_timeout: Seconds a child gets after SIGTERM before SIGKILL.
        connect_timeout: Seconds for the TCP, TLS and WebSocket handshakes.
        close_timeout: Seconds the endpoint gets to answer our close frame.
        max_message_size: The largest WebSocket message accepted from the endpoint, in bytes.
        max_restarts: A stdio server that exits this many times in a row, each within
            ``backoff_reset`` seconds of starting, is not started again (its bridge stops;
            when every bridge has stopped, :func:`run_pipe` raises :class:`PipeFailed`).
            0 restarts it forever.
    """

    backoff_initial: float = attrs.field(default=1.0, validator=_positive)
    backoff_max: float = attrs.field(default=60.0, validator=_positive)
    backoff_reset: float = attrs.field(default=30.0, validator=_not_negative)
    jitter: float = attrs.field(default=0.2, validator=_fraction)
    ping_interval: float = attrs.field(default=20.0, validator=_not_negative)
    ping_timeout: float = attrs.field(default=20.0, validator=_positive)
    buffer_lines: int = attrs.field(default=1000, validator=_positive)
    kill_timeout: float = attrs.field(default=5.0, validator=_not_negative)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    close_timeout: float = attrs.field(default=2.0, validator=_not_negative)
    max_message_size: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    max_restarts: int = attrs.field(default=5, validator=_not_negative)


@attrs.frozen
class ServerSpec:
    """One MCP server to bridge: a stdio command to run, or a remote server to talk to.

    Attributes:
        name: Shown in log lines and as the prefix of the child's stderr lines.
        command: The program and its arguments (stdio).
        env: The child's complete environment (stdio).
        transport: ``stdio``, ``http`` (Streamable HTTP) or ``sse`` (the older HTTP+SSE).
        url: The remote server's URL (``http`` and ``sse``).
        headers: HTTP headers sent with every request to it (``http`` and ``sse``).
        server_id: Sent as ``&server_id=`` in the tool URL, so that several servers of one
            token join the agent instead of replacing each other (see :func:`server_url`);
            None sends none (the endpoint then names the server by its ``serverInfo``).
            Config entries have their name here; a lone command has None.
    """

    name: str
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict, repr=False, hash=False)
    transport: str = "stdio"
    url: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False, hash=False)
    server_id: str | None = None


@attrs.define
class BridgeStatus:
    """What one bridge is doing; read it, do not write it.

    Attributes:
        name: The server's name.
        connected: A WebSocket connection is up.
        connections: WebSocket handshakes completed so far.
        child_starts: Child processes started so far (1 + restarts).
        child_pid: The running child's process id, or None while it is down.
        last_exit_code: The previous child's exit code (negative: killed by that signal).
        dropped_lines: Child output lines dropped because the backlog was full.
    """

    name: str
    connected: bool = False
    connections: int = 0
    child_starts: int = 0
    child_pid: int | None = None
    last_exit_code: int | None = None
    dropped_lines: int = 0


# ----------------------------------------------------------------------------- inputs


def read_dotenv(path: Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines, as the ``.env`` files next to mcp_pipe.py hold them.

    Blank lines and ``#`` comments are skipped, a leading ``export`` is allowed, one pair of
    matching quotes around a value is stripped, and an unquoted value ends at `` #``.

    Args:
        path: The file; a missing file reads as empty.

    Returns:
        The variables, in file order.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return {}
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def redact_url(url: str) -> str:
    """``url`` with the value of every ``token=`` and ``key=`` parameter shortened."""
    return _SECRET_IN_URL.sub(lambda m: f"{m.group(1)}={redact(m.group(2))}", url)


def shown_endpoint(url: str) -> str:
    """``url`` as it appears in our logs: no query string, and the token's first characters.

    (Not ``?token=…``: the command line's RedactingFilter would shorten that a second time.)
    """
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    token = parse_qs(parts.query).get("token", [""])[0]
    return f"{shown} (token {redact(token)})" if token else shown


#: The longest ``server_id`` trio-mcp-relay accepts (``server/handshake.py``'s MAX_SERVER_ID).
MAX_SERVER_ID: Final = 64
#: Substrings xiaozhi-server's ``validate_mcp_endpoint`` refuses anywhere in an endpoint URL.
_FORBIDDEN_IN_URL: Final = ("key", "call")


def check_server_id(server_id: str, what: str = "server_id") -> None:
    """Refuse what trio-mcp-relay's handshake would close with 1008: it must be 1 to 64
    printable characters.

    Raises:
        ValueError: the message names ``what``.
    """
    if not server_id or len(server_id) > MAX_SERVER_ID or not server_id.isprintable():
        raise ValueError(
            f"{what} {server_id!r} cannot be a server_id: 1 to {MAX_SERVER_ID} printable characters"
        )


def quote_server_id(server_id: str) -> str:
    """``server_id`` percent-encoded for a query, never spelling ``key`` or ``call``.

    xiaozhi-server refuses an endpoint URL containing ``key`` or ``call`` in any letter case,
    so in a name such as ``keyboard`` or ``Callback`` the first letter of each such word is
    written as its escape (``%6Beyboard``, ``%43allback``); the endpoint decodes it back, so
    the server's identity is the name as written. Escapes are made only of ``%``, digits and
    ``A``-``F``, and ``k``/``y``/``l`` are not hex digits, so an escape never completes
    another forbidden word and every forbidden word keeps a literal letter to escape.
    """
    text = quote(server_id, safe="")
    while True:
        lowered = text.lower()
        hits = [i for word in _FORBIDDEN_IN_URL if (i := lowered.find(word)) >= 0]
        if not hits:
            return text
        start = min(hits)
        word = next(w for w in _FORBIDDEN_IN_URL if lowered.startswith(w, start))
        # The first letter of the word that is not itself inside an escape.
        escapes = {j for j, c in enumerate(text) if c == "%" for j in (j, j + 1, j + 2)}
        index = next(j for j in range(start, start + len(word)) if j not in escapes)
        text = f"{text[:index]}%{ord(text[index]):02X}{text[index + 1 :]}"


def url_server_id(url: str) -> str | None:
    """The ``server_id`` query parameter of ``url``, unquoted (None when absent or empty)."""
    values = parse_qs(urlsplit(url).query).get("server_id")
    return values[0] if values and values[0] else None


def server_url(endpoint: str, server_id: str | None) -> str:
    """``endpoint`` with ``&server_id=`` for ``server_id`` (see :func:`quote_server_id`).

    A URL that already carries a ``server_id`` gets it replaced. None returns ``endpoint``.
    """
    if server_id is None:
        return endpoint
    parts = urlsplit(endpoint)
    kept = [p for p in parts.query.split("&") if p and p.partition("=")[0] != "server_id"]
    kept.append(f"server_id={quote_server_id(server_id)}")
    return parts._replace(query="&".join(kept)).geturl()


def server_urls(endpoint: str, servers: Sequence[ServerSpec]) -> list[str]:
    """The tool URL each server dials: ``endpoint`` plus its ``server_id``.

    A single server dialling a URL that already has a ``server_id`` keeps that one (a token
    may be bound to it).

    Raises:
        PipeConfigError: a server's ``server_id`` is not one the endpoint accepts, two
            servers share one, or several servers are given a URL with a ``server_id`` (they
            would replace each other).
    """
    given = url_server_id(endpoint)
    if given is not None and len(servers) == 1:
        return [endpoint]
    if given is not None:
        raise PipeConfigError(
            f"the endpoint URL has server_id={given!r}: each of the {len(servers)} servers "
            "needs its own (the names of the config entries); remove server_id from the URL"
        )
    seen: set[str] = set()
    for spec in servers:
        if spec.server_id is None:
            continue
        try:
            check_server_id(spec.server_id, f"server {spec.name!r}: its name")
        except ValueError as exc:
            raise PipeConfigError(str(exc)) from None
        if spec.server_id in seen:
            raise PipeConfigError(f"two servers have the server_id {spec.server_id!r}")
        seen.add(spec.server_id)
    return [server_url(endpoint, spec.server_id) for spec in servers]


def _check_endpoint(url: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise PipeConfigError(
            f"the endpoint must be a ws:// or wss:// URL with a host, not {redact_url(url)!r}"
        )
    return url


def _child_environ(environ: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    # The endpoint URL holds the token: a server has no use for it (an entry's own "env" can
    # still pass it on), and mcp_pipe.py's habit of leaking it to every child is not kept.
    env = {name: value for name, value in environ.items() if name != ENDPOINT_ENV}
    env.update(extra)
    # Without it a Python server's print() output sits in a block buffer on the pipe.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _check_command(name: str, command: Sequence[str], env: Mapping[str, str]) -> None:
    if shutil.which(command[0], path=env.get("PATH", os.defpath)) is None:
        raise PipeConfigError(
            f"server {name!r}: command not found or not executable: {command[0]!r}"
        )


def command_server(
    command: Sequence[str],
    *,
    name: str | None = None,
    environ: Mapping[str, str],
    cwd: Path | None = None,
    python: str | None = None,
) -> ServerSpec:
    """The server for ``trio-mcp-relay pipe -- COMMAND ARGS...``.

    As ``python mcp_pipe.py something.py`` would, a lone ``something.py`` runs with the
    ``python`` on the ``PATH`` (the user's environment, with the script's dependencies), or
    with ``python`` if given; not with the interpreter trio-mcp-relay happens to run on.

    Args:
        command: The program and its arguments.
        name: The name for logs; by default the script's stem (``python my_server.py`` is
            ``my_server``), or the program's name.
        environ: The environment the child inherits.
        cwd: Where the child will run (default: here), to check that a lone script exists.

    Returns:
        The server.

    Raises:
        PipeConfigError: ``command`` is empty or its program (or lone script) is missing.
    """
    argv = tuple(command)
    if not argv:
        raise PipeConfigError("the server command is empty")
    if len(argv) == 1 and argv[0].endswith(".py"):
        if not ((cwd or Path.cwd()) / argv[0]).is_file():
            raise PipeConfigError(f"no such script: {argv[0]}")
        argv = (_python_for(argv[0], python, environ), argv[0])
    if name is None:
        if len(argv) > 1 and not argv[1].startswith("-"):
            name = Path(argv[1]).stem
        else:
            name = Path(argv[0]).name
    env = _child_environ(environ, {})
    _check_command(name, argv, env)
    return ServerSpec(name=name, command=argv, env=env)


def _python_for(script: str, python: str | None, environ: Mapping[str, str]) -> str:
    search = environ.get("PATH", os.defpath)
    if python is not None:
        found = shutil.which(python, path=search)
        if found is None:
            raise PipeConfigError(f"--python {python!r}: not found or not executable")
        return found
    for name in ("python", "python3"):
        found = shutil.which(name, path=search)
        if found is not None:
            return found
    raise PipeConfigError(
        f"no python on PATH to run {script}: activate its environment, or pass --python"
    )


def _string_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list):
        raise PipeConfigError(f"{what} must be a list of strings")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise PipeConfigError(f"{what} must be a list of strings, not {item!r}")
        out.append(str(item))
    return out


def parse_config(
    data: object, *, source: str, environ: Mapping[str, str], check_commands: bool = True
) -> list[ServerSpec]:
    """The servers of an mcp_pipe.py config: ``{"mcpServers": {name: entry}}``.

    An entry is ``{"type": "stdio", "command": ..., "args": [...], "env": {...},
    "disabled": false}`` (``transportType`` is accepted for ``type``; with neither, an entry
    with a ``command`` is stdio, one with only a ``url`` is ``http``). Entries of type ``http``
    (also ``streamablehttp``) and ``sse`` are remote servers, ``{"type": "http", "url": ...,
    "headers": {...}}``, bridged natively (mcp_pipe.py runs them through mcp-proxy).
    Disabled entries are skipped; entries of any other type are skipped with a warning.

    Args:
        data: The parsed JSON.
        source: Where it came from, for messages.
        environ: The environment each child inherits; an entry's ``env`` is added to it.
        check_commands: Check that each command can be found on the child's PATH.

    Returns:
        The enabled servers, in file order, each with its entry's name as ``server_id``.

    Raises:
        PipeConfigError: The structure is wrong, or no enabled stdio server is left.
    """
    if not isinstance(data, dict):
        raise PipeConfigError(f"{source}: the top level must be a JSON object")
    servers = data.get("mcpServers")
    if not isinstance(servers, dict):
        raise PipeConfigError(
            f'{source}: expected {{"mcpServers": {{"<name>": {{"command": ..., "args": '
            "[...]}}}}}}: the mcpServers object is missing"
        )
    specs: list[ServerSpec] = []
    for name, entry in servers.items():
        where = f"{source}: server {name!r}"
        if not isinstance(entry, dict):
            raise PipeConfigError(f"{where} must be a JSON object")
        if entry.get("disabled"):
            log.info("[%s] disabled in %s: skipped", name, source)
            continue
        default = "http" if "url" in entry and "command" not in entry else "stdio"
        kind = entry.get("type") or entry.get("transportType") or default
        if not isinstance(kind, str):
            raise PipeConfigError(f"{where}: type must be a string")
        if kind.lower() in REMOTE_TYPES:
            specs.append(_remote_server(str(name), entry, REMOTE_TYPES[kind.lower()], where))
            continue
        if kind.lower() not in STDIO_TYPES:
            log.warning(
                "[%s] type %r is not supported by trio-mcp-relay pipe (stdio, http and sse "
                "only): skipped",
                name,
                kind,
            )
            continue
        command = entry.get("command")
        if not isinstance(command, str) or not command:
            raise PipeConfigError(f'{where}: "command" (a non-empty string) is required')
        args = _string_list(entry.get("args") or [], f'{where}: "args"')
        extra = entry.get("env") or {}
        if not isinstance(extra, dict):
            raise PipeConfigError(f'{where}: "env" must be an object')
        env = _child_environ(environ, {str(k): str(v) for k, v in extra.items()})
        spec = ServerSpec(name=str(name), command=(command, *args), env=env, server_id=str(name))
        if check_commands:
            _check_command(spec.name, spec.command, env)
        specs.append(spec)
    if not specs:
        raise PipeConfigError(f"{source}: no enabled server to run")
    return specs


def _remote_server(name: str, entry: dict[str, Any], transport: str, where: str) -> ServerSpec:
    url = entry.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise PipeConfigError(f'{where}: "url" (an http:// or https:// URL) is required')
    headers = entry.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise PipeConfigError(f'{where}: "headers" must be an object of strings')
    return ServerSpec(
        name=name, transport=transport, url=url, headers=dict(headers), server_id=name
    )


def load_config_file(
    path: Path, *, environ: Mapping[str, str], check_commands: bool = True
) -> list[ServerSpec]:
    """Read an mcp_pipe.py config file; see :func:`parse_config`.

    Raises:
        PipeConfigError: The file cannot be read, is not JSON, or is not a valid config.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise PipeConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipeConfigError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    return parse_config(data, source=str(path), environ=environ, check_commands=check_commands)


def prepare(
    *,
    endpoint: str | None,
    config: Path | None,
    command: Sequence[str],
    name: str | None,
    environ: Mapping[str, str],
    cwd: Path,
    python: str | None = None,
) -> tuple[str, list[ServerSpec]]:
    """Decide what to run, as the ``pipe`` command does.

    The endpoint is ``endpoint``, else ``MCP_ENDPOINT`` from ``environ``, else from
    ``cwd/.env``. With a ``command`` that is the one server; otherwise the config is
    ``config``, else ``MCP_CONFIG`` (environment, then ``.env``), else ``cwd/mcp_config.json``.
    The ``.env`` variables are also passed to the children (without overriding ``environ``),
    as mcp_pipe.py's ``load_dotenv()`` does.

    Returns:
        The endpoint URL and the servers.

    Raises:
        PipeConfigError: Something is missing or malformed; the message says what to fix.
    """
    dotenv = read_dotenv(cwd / DOTENV)
    merged = {**dotenv, **environ}
    url = endpoint or merged.get(ENDPOINT_ENV)
    if not url:
        raise PipeConfigError(
            f"no endpoint: pass --endpoint ws://HOST/mcp_endpoint/mcp/?token=TOKEN, or set "
            f"{ENDPOINT_ENV} in the environment or in {DOTENV}"
        )
    try:
        url, note = tool_side_url(url)
    except UrlError as exc:
        raise PipeConfigError(str(exc)) from None
    if note is not None:
        log.warning("%s", note)
    url = _check_endpoint(url)
    if "token=" not in url:
        log.warning("the endpoint URL has no token= parameter; most endpoints require one")
    if command:
        if config is not None:
            raise PipeConfigError("give either a server command or --config, not both")
        return url, [command_server(command, name=name, environ=merged, cwd=cwd, python=python)]
    if config is None and merged.get(CONFIG_ENV):
        config = Path(merged[CONFIG_ENV])
    if config is not None:
        path = config if config.is_absolute() else cwd / config
        servers = load_config_file(path, environ=merged)
        server_urls(url, servers)  # refuse unusable server_ids before starting anything
        return url, servers
    default = cwd / DEFAULT_CONFIG
    if default.is_file():
        servers = load_config_file(default, environ=merged)
        server_urls(url, servers)
        return url, servers
    raise PipeConfigError(
        "no server to run: give a command (trio-mcp-relay pipe -- python server.py) or a "
        f"config file (--config, {CONFIG_ENV}, or ./{DEFAULT_CONFIG})"
    )


# ----------------------------------------------------------------------------- pure parts


@attrs.define
class Backoff:
    """Exponential backoff with jitter and a cap.

    ``next_delay()`` gives ``initial``, then twice that, and so on up to ``maximum``, each
    multiplied by a random factor in ``1 ± jitter`` and never above ``maximum``; ``reset()``
    starts again from ``initial``.
    """

    initial: float
    maximum: float
    jitter: float = 0.2
    uniform: Callable[[float, float], float] = random.uniform
    _next: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._next = min(self.initial, self.maximum)

    def next_delay(self) -> float:
        """The wait before the next attempt."""
        base = self._next
        self._next = min(base * 2, self.maximum)
        return min(base * self.uniform(1 - self.jitter, 1 + self.jitter), self.maximum)

    def reset(self) -> None:
        """Start again from ``initial`` (the last attempt stayed up long enough)."""
        self._next = min(self.initial, self.maximum)


def _parse(data: bytes) -> Any:
    """Exact JSON (huge integers intact), or raise FrameError."""
    return _loads(data)


def _incoming(message: str | bytes) -> tuple[bytes, dict[str, Any] | None]:
    """The line to write for a WebSocket message, and the message if it is a JSON object."""
    data = message.encode("utf-8") if isinstance(message, str) else message
    try:
        parsed = _parse(data)
    except FrameError:
        return data.replace(b"\r", b"").replace(b"\n", b""), None
    return dumps(parsed), parsed if isinstance(parsed, dict) else None


def compact_line(message: str | bytes) -> bytes:
    """One WebSocket message as one line for a child's stdin (without the newline).

    JSON is re-serialized compactly (so a pretty-printed frame becomes one line); anything
    else is passed on as UTF-8 with its line breaks removed, for the server to reject.
    """
    return _incoming(message)[0]


class _LineSplitter:
    """Bytes in, complete lines out; a line longer than ``limit`` comes out as None, once."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._scanned = 0
        self._discarding = False

    def feed(self, chunk: bytes | bytearray) -> list[bytes | None]:
        self._buffer += chunk
        lines: list[bytes | None] = []
        start = 0
        while (end := self._buffer.find(b"\n", max(start, self._scanned))) >= 0:
            if self._discarding:
                self._discarding = False
            elif end - start > self._limit:
                lines.append(None)
            else:
                lines.append(bytes(self._buffer[start:end]))
            start = end + 1
            self._scanned = start
        del self._buffer[:start]
        self._scanned = len(self._buffer)
        if self._scanned > self._limit:
            if not self._discarding:
                lines.append(None)
                self._discarding = True
            self._buffer.clear()
            self._scanned = 0
        return lines

    def finish(self) -> list[bytes | None]:
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return [rest] if rest and not self._discarding else []


class _Outcome(enum.Enum):
    """What :meth:`_Session.from_child` decided about a line."""

    FORWARD = "forward"
    NOT_JSON = "not JSON"
    REPLAY = "replay"


@attrs.define
class _Pending:
    original: Any  # the id as the endpoint sent it
    key: bytes  # its compact JSON
    generation: int


class _Session:
    """Request bookkeeping between the endpoint and the child: pure, no I/O.

    The child sees ids of the bridge's own (a counter), and each answer gets the endpoint's
    id back. So requests from two connections never collide at the child, even when the new
    connection reuses an id the old one still has in flight (endpoints number per connection),
    and an answer can be matched to the connection that asked, however the child orders its
    answers. A ``notifications/cancelled`` from the endpoint is mapped the same way.
    """

    def __init__(self) -> None:
        self.generation = 0
        self._next_id = 0
        self.pending: dict[int, _Pending] = {}
        self._latest: dict[tuple[int, bytes], int] = {}  # (generation, id key) -> child id
        self.init_params: Any = None
        self.seen_initialize = False
        self._replay_id: int | None = None

    def new_generation(self) -> int:
        self.generation += 1
        return self.generation

    def _allocate(self) -> int:
        self._next_id += 1
        return self._next_id

    def to_child(self, frame: dict[str, Any], generation: int) -> tuple[bytes, int | None]:
        """The line for a JSON object from the endpoint, and the child id if it is a request
        (tracked until answered, :meth:`untrack`, or :meth:`abandon`)."""
        if "method" in frame and "id" in frame:
            child_id = self._allocate()
            key = dumps(frame["id"])
            self.pending[child_id] = _Pending(frame["id"], key, generation)
            self._latest[generation, key] = child_id
            return dumps({**frame, "id": child_id}), child_id
        if frame.get("method") == "notifications/cancelled":
            params = frame.get("params")
            if isinstance(params, dict) and "requestId" in params:
                child_id_or_none = self._latest.get((generation, dumps(params["requestId"])))
                if child_id_or_none is not None:
                    params = {**params, "requestId": child_id_or_none}
                    return dumps({**frame, "params": params}), None
        return dumps(frame), None

    def _forget(self, child_id: int) -> _Pending | None:
        pending = self.pending.pop(child_id, None)
        if pending is not None and self._latest.get((pending.generation, pending.key)) == child_id:
            del self._latest[pending.generation, pending.key]
        return pending

    def untrack(self, child_id: int) -> _Pending | None:
        """Forget a request that never reached the child; None if already forgotten."""
        return self._forget(child_id)

    def abandon(self) -> list[_Pending]:
        """Every pending request, forgotten: the child is gone."""
        pending = list(self.pending.values())
        self.pending.clear()
        self._latest.clear()
        return pending

    def remember_initialize(self, frame: dict[str, Any]) -> None:
        self.seen_initialize = True
        self.init_params = frame.get("params")

    def replay_frames(self) -> tuple[bytes, bytes]:
        """The ``initialize`` request and ``notifications/initialized`` for a new child."""
        self._replay_id = self._allocate()
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": self._replay_id, "method": "initialize"}
        if self.init_params is not None:
            request["params"] = self.init_params
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        return dumps(request), dumps(initialized)

    def from_child(self, line: bytes) -> tuple[_Outcome, bytes, int | None]:
        """Decide about a child's stdout line: forward it (as what, and tagged with the
        generation of the request it answers, if any), drop it as not JSON, or swallow the
        answer to a replayed ``initialize``."""
        try:
            frame = _parse(line)
        except FrameError:
            return _Outcome.NOT_JSON, line, None
        if not isinstance(frame, dict) or "method" in frame or "id" not in frame:
            return _Outcome.FORWARD, line, None
        child_id = frame["id"]
        if type(child_id) is not int:
            return _Outcome.FORWARD, line, None
        if child_id == self._replay_id:
            self._replay_id = None
            return _Outcome.REPLAY, line, None
        pending = self._forget(child_id)
        if pending is None:
            return _Outcome.FORWARD, line, None
        return _Outcome.FORWARD, dumps({**frame, "id": pending.original}), pending.generation


def _error_line(rid: Any, message: str, data: Any = None) -> str:
    error: dict[str, Any] = {"code": INTERNAL_ERROR, "message": message}
    if data is not None:
        error["data"] = data
    return dumps({"jsonrpc": "2.0", "id": rid, "error": error}).decode("utf-8")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _describe_error(exc: BaseException) -> str:
    leaf = _leaves(exc)[0]
    if isinstance(leaf, ConnectionRejected):
        return f"the endpoint refused the handshake with HTTP {leaf.status_code}"
    if isinstance(leaf, trio.TooSlowError):
        return "timed out"
    cause = leaf.__cause__ if isinstance(leaf, HandshakeError) else None
    shown = cause or leaf
    if isinstance(shown, OSError) and shown.strerror:
        return shown.strerror
    return f"{type(shown).__name__}: {shown}" if str(shown) else type(shown).__name__


# ----------------------------------------------------------------------------- the Trio shell


@attrs.define(eq=False)
class _Line:
    text: str
    generation: int | None  # the generation a response belongs to; None: deliver on any


class _Backlog:
    """Child output waiting for the endpoint: bounded; what "full" means depends on whether
    a connection is up (block the child while connected, drop the oldest while not)."""

    def __init__(self, limit: int, status: BridgeStatus) -> None:
        self._items: deque[_Line] = deque()
        self._limit = limit
        self._status = status
        self._changed = trio.Event()
        self._connected = False
        self._dropped_since_warning = 0

    def __len__(self) -> int:
        return len(self._items)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def set_connected(self, connected: bool) -> None:
        self._connected = connected
        self._notify()

    async def put(self, line: _Line) -> None:
        while len(self._items) >= self._limit and self._connected:
            await self._changed.wait()
        if len(self._items) >= self._limit:
            self._items.popleft()
            self._status.dropped_lines += 1
            if self._dropped_since_warning == 0:
                log.warning(
                    "[%s] output backlog full (%d lines) while disconnected: dropping the "
                    "oldest lines",
                    self._status.name,
                    self._limit,
                )
            self._dropped_since_warning += 1
        self._items.append(line)
        self._notify()

    async def peek(self) -> _Line:
        while not self._items:
            await self._changed.wait()
        return self._items[0]

    def pop(self, line: _Line) -> None:
        if self._items and self._items[0] is line:
            self._items.popleft()
            self._notify()

    def take_drop_count(self) -> int:
        count, self._dropped_since_warning = self._dropped_since_warning, 0
        return count


_MISSING_MODULE: Final = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")

#: Lines queued for a child's stdin. When full, the endpoint's frames wait (backpressure).
_INBOX_SIZE: Final = 16


@attrs.define(eq=False)
class _Child:
    """A running child. Its stdin is written by one writer task, fed by ``inbox``: a line is
    either queued whole or not at all, so a cancelled sender never leaves half a line."""

    process: trio.Process | None  # None: a remote server
    inbox: trio.MemorySendChannel[bytes]
    ready: bool = False
    replayed: trio.Event = attrs.Factory(trio.Event)

    async def write(self, line: bytes) -> None:
        """Queue a line; BrokenResourceError once the child is gone."""
        await self.inbox.send(line)


async def _write_stdin(stdin: trio.abc.SendStream, inbox: trio.MemoryReceiveChannel[bytes]) -> None:
    async with inbox:
        try:
            async for line in inbox:
                await stdin.send_all(line + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the child closed its stdin or exited; the child loop notices


async def _host_nursery(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[trio.Nursery]
) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            task_status.started(nursery)
            await trio.sleep_forever()


class _Bridge:
    def __init__(
        self, endpoint: str, spec: ServerSpec, options: PipeOptions, status: BridgeStatus
    ) -> None:
        self.endpoint = endpoint
        self.shown = shown_endpoint(endpoint)
        self.spec = spec
        self.name = spec.name
        self.options = options
        self.status = status
        self.session = _Session()
        self.backlog = _Backlog(options.buffer_lines, status)
        self.child: _Child | None = None
        self.first_start = trio.Event()
        self.close_with = _STOPPED
        self.missing_module: str | None = None
        self.gave_up: str | None = None

    def _backoff(self) -> Backoff:
        o = self.options
        return Backoff(o.backoff_initial, o.backoff_max, o.jitter)

    async def run(self) -> None:
        """Run until cancelled, or until the server keeps failing (then ``gave_up`` says why)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._connection_loop)
            await self._child_loop()
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------------- the child

    async def _child_loop(self) -> None:
        """Start, wait, restart with backoff; return when the server keeps failing."""
        backoff = self._backoff()
        failures = 0
        while True:
            started = trio.current_time()
            await self._run_child_once()
            if trio.current_time() - started >= self.options.backoff_reset:
                backoff.reset()
                failures = 0
            else:
                failures += 1
            limit = self.options.max_restarts
            if limit and failures > limit and self.spec.transport == "stdio":
                self.gave_up = (
                    f"the MCP server {self.name!r} exited {failures} times in a row, each "
                    f"within {self.options.backoff_reset:g} s of starting"
                    + (f" (No module named {self.missing_module!r})" if self.missing_module else "")
                    + "; not restarting it"
                )
                log.error("[%s] %s", self.name, self.gave_up)
                return
            delay = backoff.next_delay()
            what = (
                "restarting the MCP server"
                if self.spec.transport == "stdio"
                else ("reconnecting to the remote MCP server")
            )
            log.info("[%s] %s in %.2f s", self.name, what, delay)
            await trio.sleep(delay)

    async def _run_child_once(self) -> None:
        if self.spec.transport != "stdio":
            await self._run_remote_once()
            return
        command = list(self.spec.command)
        process: trio.Process | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    process = await nursery.start(
                        functools.partial(
                            trio.run_process,
                            command,
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            check=False,
                            deliver_cancel=self._stop_child,
                            env=dict(self.spec.env),
                            # Own process group: a terminal's Ctrl-C reaches only us, and
                            # stopping the child reaches its own children too (npx, uv run).
                            start_new_session=sys.platform != "win32",
                        )
                    )
                except OSError as exc:
                    log.error(
                        "[%s] cannot start %s: %s",
                        self.name,
                        command[0],
                        exc.strerror or exc,
                    )
                    return
                finally:
                    self.first_start.set()
                assert process is not None
                assert process.stdin and process.stdout and process.stderr
                self.status.child_starts += 1
                self.status.child_pid = process.pid
                log.info("[%s] started %s (pid %d)", self.name, " ".join(command), process.pid)
                inbox, inbox_reader = trio.open_memory_channel[bytes](_INBOX_SIZE)
                child = _Child(process, inbox)
                nursery.start_soon(_write_stdin, process.stdin, inbox_reader)
                out_done, err_done = trio.Event(), trio.Event()
                nursery.start_soon(self._read_stdout, process.stdout, child, out_done)
                nursery.start_soon(self._read_stderr, process.stderr, err_done)
                self.child = child
                if self.session.seen_initialize:
                    nursery.start_soon(self._replay_initialize, child)
                else:
                    child.ready = True
                code = await process.wait()
                self.child = None
                inbox.close()
                self.status.child_pid = None
                self.status.last_exit_code = code
                with trio.move_on_after(OUTPUT_GRACE):
                    await out_done.wait()
                    await err_done.wait()
                nursery.cancel_scope.cancel()
            log.warning("[%s] the MCP server %s", self.name, _describe_exit(code))
            for pending in self.session.abandon():
                error = _error_line(
                    pending.original, f"the MCP server {_describe_exit(code)}", {"code": code}
                )
                await self.backlog.put(_Line(error, pending.generation))
        finally:
            self.child = None
            self.status.child_pid = None
            if process is not None:
                with trio.CancelScope(shield=True):
                    for stream in (process.stdin, process.stdout, process.stderr):
                        if stream is not None:
                            await trio.aclose_forcefully(stream)

    async def _run_remote_once(self) -> None:
        """The remote server (``http``/``sse``) in the place of a child, until it fails."""
        from ._remote import RemoteError, run_remote

        assert self.spec.url is not None
        inbox, inbox_reader = trio.open_memory_channel[bytes](_INBOX_SIZE)
        child = _Child(None, inbox)
        self.status.child_starts += 1
        self.first_start.set()
        log.info(
            "[%s] bridging the remote MCP server %s (%s)",
            self.name,
            redact_url(self.spec.url),
            self.spec.transport,
        )

        async def deliver(line: bytes) -> None:
            await self._from_child(line, child)

        why = "the remote MCP server is unreachable"
        try:
            async with trio.open_nursery() as nursery:
                self.child = child
                if self.session.seen_initialize:
                    nursery.start_soon(self._replay_initialize, child)
                else:
                    child.ready = True
                try:
                    await run_remote(
                        self.spec.transport,
                        self.spec.url,
                        dict(self.spec.headers),
                        inbox_reader,
                        deliver,
                    )
                except RemoteError as exc:
                    why = f"the remote MCP server failed: {exc}"
                    log.warning("[%s] %s", self.name, why)
                nursery.cancel_scope.cancel()
        finally:
            self.child = None
            inbox.close()
        for pending in self.session.abandon():
            error = _error_line(pending.original, why)
            await self.backlog.put(_Line(error, pending.generation))

    def _signal_child(self, process: trio.Process, signum: int) -> None:
        try:
            if sys.platform != "win32":
                os.killpg(process.pid, signum)
            elif signum == signal.SIGTERM:
                process.terminate()
            else:
                process.kill()
        except ProcessLookupError:
            pass

    async def _stop_child(self, process: trio.Process) -> None:
        """``deliver_cancel`` for the child: SIGTERM, then SIGKILL after ``kill_timeout``."""
        log.info("[%s] stopping the MCP server (pid %d)", self.name, process.pid)
        self._signal_child(process, signal.SIGTERM)
        with trio.move_on_after(self.options.kill_timeout):
            await process.wait()
            return
        log.warning(
            "[%s] the MCP server ignored SIGTERM for %g s: killing it",
            self.name,
            self.options.kill_timeout,
        )
        self._signal_child(process, signal.SIGKILL)

    async def _replay_initialize(self, child: _Child) -> None:
        request, initialized = self.session.replay_frames()
        try:
            await child.write(request)
            with trio.move_on_after(REPLAY_TIMEOUT) as waited:
                await child.replayed.wait()
            if waited.cancelled_caught:
                log.warning(
                    "[%s] the restarted MCP server did not answer initialize within %g s",
                    self.name,
                    REPLAY_TIMEOUT,
                )
            await child.write(initialized)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        child.ready = True
        log.info("[%s] re-initialized the restarted MCP server", self.name)

    async def _read_stdout(
        self, stream: trio.abc.ReceiveStream, child: _Child, done: trio.Event
    ) -> None:
        splitter = _LineSplitter(MAX_LINE)
        try:
            while chunk := await stream.receive_some():
                for line in splitter.feed(chunk):
                    await self._from_child(line, child)
            for line in splitter.finish():
                await self._from_child(line, child)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            done.set()

    async def _from_child(self, raw: bytes | None, child: _Child) -> None:
        if raw is None:
            log.warning("[%s] dropped a stdout line longer than %d bytes", self.name, MAX_LINE)
            return
        line = raw.rstrip(b"\r")
        if not line.strip():
            return
        outcome, line, generation = self.session.from_child(line)
        if outcome == _Outcome.NOT_JSON:
            log.warning(
                "[%s] stdout line is not JSON-RPC, not forwarded (log to stderr instead): %r",
                self.name,
                line[:200],
            )
        elif outcome == _Outcome.REPLAY:
            child.replayed.set()
        else:
            await self.backlog.put(_Line(line.decode("utf-8"), generation))

    async def _read_stderr(self, stream: trio.abc.ReceiveStream, done: trio.Event) -> None:
        splitter = _LineSplitter(MAX_STDERR_LINE)
        prefix = f"[{self.name}] "
        try:
            while chunk := await stream.receive_some():
                for line in splitter.feed(chunk):
                    self._show_stderr(prefix, line)
            for line in splitter.finish():
                self._show_stderr(prefix, line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            done.set()

    def _show_stderr(self, prefix: str, line: bytes | None) -> None:
        text = (
            "(a line too long to show)"
            if line is None
            else line.rstrip(b"\r").decode("utf-8", "replace")
        )
        sys.stderr.write(f"{prefix}{text}\n")
        sys.stderr.flush()
        missing = _MISSING_MODULE.search(text)
        if missing is not None:
            module = missing.group(1)
            if module != self.missing_module:
                self.missing_module = module
                python = self.spec.command[0] if self.spec.command else "python"
                log.error(
                    "[%s] the MCP server cannot import %r: it is not installed for %s. Install "
                    "it there (%s -m pip install %s), or run the script with another Python "
                    '(pipe --python PATH, or the entry\'s "command")',
                    self.name,
                    module,
                    python,
                    python,
                    module.split(".")[0],
                )

    # ------------------------------------------------------------------------- the endpoint

    async def _connection_loop(self) -> NoReturn:
        # Dial only once the server exists: a tool connection is an offer to answer calls.
        await self.first_start.wait()
        backoff = self._backoff()
        while True:
            uptime = await self._connect_once()
            if uptime is not None and uptime >= self.options.backoff_reset:
                backoff.reset()
            delay = backoff.next_delay()
            log.info("[%s] reconnecting in %.2f s", self.name, delay)
            await trio.sleep(delay)

    async def _connect_once(self) -> float | None:
        """One connection, from dialling to closed; how long it was up (None: never)."""
        server_id = url_server_id(self.endpoint)
        log.info(
            "[%s] connecting to %s%s",
            self.name,
            self.shown,
            f" as server_id {server_id!r}" if server_id is not None else "",
        )
        connected_at: float | None = None
        try:
            async with trio.open_nursery() as nursery:
                transport_scope = trio.CancelScope(shield=True)
                transport: trio.Nursery = await nursery.start(_host_nursery, transport_scope)
                ws: WebSocketConnection | None = None
                self.close_with = _STOPPED
                try:
                    with trio.fail_after(self.options.connect_timeout):
                        ws = await connect_websocket_url(
                            transport, self.endpoint, max_message_size=self.options.max_message_size
                        )
                    connected_at = trio.current_time()
                    await self._serve(ws)
                finally:
                    with trio.CancelScope(shield=True):
                        if ws is not None:
                            await self._close(ws, *self.close_with)
                    transport_scope.cancel()
        except Exception as exc:  # a failed dial or a broken connection: log, then redial
            self._log_failure(exc, connected=connected_at is not None)
        if connected_at is None:
            return None
        return trio.current_time() - connected_at

    def _log_failure(self, exc: Exception, *, connected: bool) -> None:
        leaf = _leaves(exc)[0]
        what = "connection failed" if connected else f"cannot connect to {self.shown}"
        if isinstance(leaf, ConnectionRejected) and leaf.status_code in (401, 403):
            log.error("[%s] %s: %s (check the token)", self.name, what, _describe_error(exc))
        elif isinstance(leaf, HandshakeError | OSError | trio.TooSlowError | ConnectionClosed):
            log.warning("[%s] %s: %s", self.name, what, _describe_error(exc))
        else:
            log.error("[%s] %s", self.name, what, exc_info=exc)

    async def _close(self, ws: WebSocketConnection, code: int, reason: str) -> None:
        reported = ws.closed
        with trio.move_on_after(self.options.close_timeout):
            await ws.aclose(code, reason)
        # trio-websocket 0.12 leaves a client's socket open when the server closed first.
        await trio.aclose_forcefully(ws._stream)
        if reported is not None:
            self._log_close(reported.code, reported.reason)

    def _log_close(self, code: int, reason: str | None) -> None:
        detail = f"code {code}" + (f" ({reason})" if reason else "")
        if code == 1008:
            log.error(
                "[%s] the endpoint closed the connection: %s; check the token in the URL",
                self.name,
                detail,
            )
        elif code == 4001:
            log.warning(
                "[%s] the endpoint closed the connection: %s: another connection with the "
                "same token replaced this one (the reference server and trio-mcp-relay keep "
                "one per agent: give each server its own agent token)",
                self.name,
                detail,
            )
        elif code in (1000, 1001):
            log.info("[%s] the endpoint closed the connection: %s", self.name, detail)
        else:
            log.warning("[%s] the endpoint closed the connection: %s", self.name, detail)

    async def _serve(self, ws: WebSocketConnection) -> None:
        """Pump frames until the connection ends."""
        generation = self.session.new_generation()
        self.status.connections += 1
        self.status.connected = True
        dropped = self.backlog.take_drop_count()
        if dropped:
            log.warning("[%s] %d output lines were dropped while disconnected", self.name, dropped)
        log.info(
            "[%s] connected to %s%s",
            self.name,
            self.shown,
            f"; sending {len(self.backlog)} buffered lines" if len(self.backlog) else "",
        )
        self.backlog.set_connected(True)
        try:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(self._endpoint_to_child, ws, generation, pumps.cancel_scope)
                pumps.start_soon(self._child_to_endpoint, ws, generation, pumps.cancel_scope)
                if self.options.ping_interval > 0:
                    pumps.start_soon(self._keepalive, ws, pumps.cancel_scope)
        finally:
            self.status.connected = False
            self.backlog.set_connected(False)

    async def _endpoint_to_child(
        self, ws: WebSocketConnection, generation: int, done: trio.CancelScope
    ) -> None:
        try:
            while True:
                await self._deliver(await ws.get_message(), generation)
        except ConnectionClosed:
            done.cancel()

    async def _deliver(self, message: str | bytes, generation: int) -> None:
        line, frame = _incoming(message)
        is_request = frame is not None and "method" in frame and "id" in frame
        child = self.child
        if child is None or not child.ready:
            if frame is not None and is_request:
                error = _error_line(frame["id"], "the MCP server is not running (restarting)")
                await self.backlog.put(_Line(error, generation))
            log.debug("[%s] the MCP server is down: frame not delivered", self.name)
            return
        child_id = None
        if frame is not None:
            line, child_id = self.session.to_child(frame, generation)
        try:
            await child.write(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if child_id is not None and (pending := self.session.untrack(child_id)):
                error = _error_line(pending.original, "the MCP server is not running")
                await self.backlog.put(_Line(error, generation))
            return
        if frame is not None and is_request and frame["method"] == "initialize":
            self.session.remember_initialize(frame)

    async def _child_to_endpoint(
        self, ws: WebSocketConnection, generation: int, done: trio.CancelScope
    ) -> None:
        try:
            while True:
                line = await self.backlog.peek()
                if line.generation is not None and line.generation != generation:
                    log.debug(
                        "[%s] dropped an answer to a request from an earlier connection",
                        self.name,
                    )
                else:
                    await ws.send_message(line.text)
                self.backlog.pop(line)
        except ConnectionClosed:
            done.cancel()

    async def _keepalive(self, ws: WebSocketConnection, done: trio.CancelScope) -> None:
        interval, timeout = self.options.ping_interval, self.options.ping_timeout
        try:
            while True:
                await trio.sleep(interval)
                with trio.move_on_after(timeout) as waited:
                    await ws.ping()
                if waited.cancelled_caught:
                    log.warning(
                        "[%s] no pong from the endpoint within %g s: reconnecting",
                        self.name,
                        timeout,
                    )
                    self.close_with = (1001, "no pong")
                    done.cancel()
                    return
        except ConnectionClosed:
            done.cancel()


async def run_pipe(
    endpoint: str,
    servers: Sequence[ServerSpec],
    options: PipeOptions | None = None,
    *,
    task_status: trio.TaskStatus[list[BridgeStatus]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Bridge each server to ``endpoint`` until cancelled.

    Start it with ``statuses = await nursery.start(run_pipe, url, servers)`` to get one
    :class:`BridgeStatus` per server (in order) once every bridge has started.

    Args:
        endpoint: The ``ws://`` or ``wss://`` URL, token included.
        servers: The stdio MCP servers; each gets its own child process and WebSocket, and
            dials ``endpoint`` with its ``server_id`` added (:func:`server_urls`).
        options: Timings and sizes; the defaults suit a real deployment.
        task_status: For ``nursery.start``.

    Resource handling:
        Every child process and socket belongs to this call. Cancelling it closes each
        WebSocket with 1000 (the endpoint gets ``options.close_timeout`` seconds to answer)
        and stops each child with SIGTERM, then SIGKILL after ``options.kill_timeout``
        seconds; it returns (raising ``Cancelled``) only once all of that is done.

    Error handling:
        Nothing the endpoint does ends the pipe: a failed dial or a dropped connection is
        logged and redialled with backoff. A child that exits is logged with its exit code
        and restarted with backoff, up to ``options.max_restarts`` quick exits in a row; then
        its bridge stops. When every bridge has stopped, :class:`PipeFailed` is raised.
        :class:`PipeConfigError` (before anything starts): see :func:`server_urls`.
    """
    options = options or PipeOptions()
    urls = server_urls(endpoint, servers)
    statuses = [BridgeStatus(spec.name) for spec in servers]
    bridges = [
        _Bridge(url, s, options, st) for url, s, st in zip(urls, servers, statuses, strict=True)
    ]
    async with trio.open_nursery() as nursery:
        for bridge in bridges:
            nursery.start_soon(bridge.run)
        task_status.started(statuses)
    reasons = "; ".join(b.gave_up for b in bridges if b.gave_up)
    raise PipeFailed(reasons or "every MCP server stopped")
