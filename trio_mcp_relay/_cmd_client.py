"""Client-side commands: ``call``, ``check``, ``token``, ``url`` and ``fuzz``."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import trio
import typer

from ._auth import (
    Endpoint,
    TokenRole,
    caller_url,
    encrypt_token,
    endpoint_url,
    scoped_token,
    tool_url,
    with_route,
)
from ._config import ConfigError, RelayConfig, load_config, local_ip
from ._endpoint import (
    KIND_NAMES,
    EndpointUrl,
    UrlError,
    describe_connect_failure,
    describe_http_refusal,
    parse_endpoint_url,
)

if TYPE_CHECKING:
    from ._fuzz import Finding, FuzzReport

__all__ = ["register"]

EndpointArgument = Annotated[
    str | None,
    typer.Argument(
        metavar="URL",
        help="The endpoint: the health URL the relay prints (it carries the key), a base "
        "URL (http(s):// or ws(s)://HOST:PORT), or a tool or caller URL.",
        show_default=False,
    ),
]
EndpointOption = Annotated[
    str | None, typer.Option("--url", help="The endpoint, as URL.", show_default=False)
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Server key. Default: SERVER_KEY, else [server] key of the config file.",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Reference-format INI file to read the key from.", dir_okay=False
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Directory of .mcp-endpoint-server.cfg. Default: data."),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _key_config(key: str | None, config: Path | None, data_dir: Path | None) -> RelayConfig:
    """The configuration as ``serve`` would see it (so the same key), without generating one."""
    cfg_dir = data_dir or Path(os.environ.get("DATA_DIR", "data"))
    has_file = config is not None or (cfg_dir / ".mcp-endpoint-server.cfg").exists()
    if key is None and "SERVER_KEY" not in os.environ and not has_file:
        raise _fail("no key: pass --key, set SERVER_KEY, or point --config at the relay's file")
    try:
        return load_config(
            flags={"key": key}, environ=os.environ, config_file=config, data_dir=data_dir
        )
    except ConfigError as exc:
        raise _fail(str(exc)) from None


RoleOption = Annotated[
    str | None,
    typer.Option(
        "--role",
        help="Mint a scoped token that opens only this endpoint: tool, caller or both. "
        "Default: a reference-scheme token (both endpoints, never expires).",
        show_default=False,
    ),
]
ExpiresOption = Annotated[
    float | None,
    typer.Option(
        "--expires",
        help="With --role: the token stops working after this many seconds. "
        "Default: never expires.",
        show_default=False,
    ),
]
ServerIdOption = Annotated[
    str | None,
    typer.Option(
        "--server-id",
        help="With --role: bind the token to this tool server id. Default: none.",
        show_default=False,
    ),
]


def _mint(
    cfg: RelayConfig,
    agent_id: str,
    role: str | None,
    expires: float | None,
    server_id: str | None,
    md5: bool,
) -> str:
    """A scoped token when a role is given, else a reference token; usage errors exit 2."""
    assert cfg.key is not None
    if role is None:
        if expires is not None or server_id is not None:
            raise _fail("--expires and --server-id need --role (scoped tokens carry them)")
        return encrypt_token(cfg.key, agent_id, md5=md5)
    try:
        parsed = TokenRole.from_label(role)
    except ValueError as exc:
        raise _fail(f"--role: {exc}") from None
    if expires is not None and not expires > 0:
        raise _fail(f"--expires: {expires:g} is not a positive number of seconds")
    if server_id == "":
        raise _fail("--server-id: must not be empty")
    if md5:
        agent_id = hashlib.md5(agent_id.encode("utf-8")).hexdigest()
    return scoped_token(cfg.key, agent_id, parsed, expires_in=expires, server_id=server_id)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def register(app: typer.Typer) -> None:
    """Add the client-side commands to ``app``."""
    app.command(name="token")(token_command)
    app.command(name="url")(url_command)
    app.command(name="check")(check_command)
    app.command(name="fuzz")(fuzz_command)
    app.command(name="call")(call_command)


# ------------------------------------------------------------------------- token / url


def token_command(
    agent_id: Annotated[str, typer.Argument(help="The agent id to put in the token.")],
    role: RoleOption = None,
    expires: ExpiresOption = None,
    server_id: ServerIdOption = None,
    md5: Annotated[
        bool, typer.Option("--md5", help="Put md5(agent id) in the token, as manager-api does.")
    ] = False,
    quoted: Annotated[
        bool, typer.Option("--quoted", help="URL-encode the token for a query string.")
    ] = False,
    key: KeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Mint a token for AGENT_ID with the configured key (the first one, if several).

    Without --role, a reference-scheme token (what manager-api makes); with --role, a scoped
    token. Neither contains "key" or "call", which xiaozhi-server refuses in URLs.

    Example: trio-mcp-relay token my-agent --role tool --expires 2592000 --key 0123...
    """
    cfg = _key_config(key, config, data_dir)
    minted = _mint(cfg, agent_id, role, expires, server_id, md5)
    print(quote(minted, safe="") if quoted else minted)


def url_command(
    agent_id: Annotated[str, typer.Argument(help="The agent id the URLs are for.")],
    host: Annotated[
        str | None,
        typer.Option(help="Host name in the URLs. Default: this machine's address."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port in the URLs. Default: as configured.")
    ] = None,
    secure: Annotated[
        bool, typer.Option("--secure", help="wss:// (behind a TLS proxy) instead of ws://.")
    ] = False,
    md5: Annotated[
        bool, typer.Option("--md5", help="Put md5(agent id) in the token, as manager-api does.")
    ] = False,
    role: RoleOption = None,
    expires: ExpiresOption = None,
    server_id: ServerIdOption = None,
    route: Annotated[
        bool | None,
        typer.Option(
            "--route/--no-route",
            help="Add &route=HINT, the same for every URL of the agent, for a load balancer "
            "in front of a cluster to hash on. Default: when cluster mode is configured.",
            show_default=False,
        ),
    ] = None,
    key: KeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print the URLs of AGENT_ID for the configured key.

    Without --role: the tool and caller URLs, with the same reference-scheme token. With
    --role tool: the tool URL; --role caller: the caller URL, and the xiaozhi URL to give
    xiaozhi-server (a /mcp/ URL with the caller token: it dials /call/ itself); --role both:
    tool and caller URLs with one token. With a caller token, ``mcp`` is the caller URL over
    HTTP, for MCP clients (Streamable HTTP).

    Example: trio-mcp-relay url my-agent --role tool --host relay.example.com --port 443 --secure
    """
    cfg = _key_config(key, config, data_dir)
    assert cfg.key is not None
    address = f"{host or local_ip()}:{port or cfg.port}"
    base = f"{'wss' if secure else 'ws'}://{address}"
    http_base = f"{'https' if secure else 'http'}://{address}"
    routed = bool(cfg.cluster) if route is None else route

    def show(label: str, url: str) -> None:
        print(f"{label:<9}{with_route(url, agent_id) if routed else url}")

    if role is None:
        _mint(cfg, agent_id, role, expires, server_id, md5)  # the usage checks
        show("tool:", tool_url(base, cfg.key, agent_id, md5=md5))
        show("caller:", caller_url(base, cfg.key, agent_id, md5=md5))
        show("mcp:", caller_url(http_base, cfg.key, agent_id, md5=md5))
        return
    token = _mint(cfg, agent_id, role, expires, server_id, md5)
    parsed = TokenRole.from_label(role)
    if parsed is not TokenRole.CALLER:
        show("tool:", endpoint_url(base, Endpoint.TOOL, token))
    if parsed is not TokenRole.TOOL:
        show("caller:", endpoint_url(base, Endpoint.CALLER, token))
    if parsed is TokenRole.CALLER:
        show("xiaozhi:", endpoint_url(base, Endpoint.TOOL, token))
    if parsed is not TokenRole.TOOL:
        show("mcp:", endpoint_url(http_base, Endpoint.CALLER, token))


# ------------------------------------------------------------------------- call


def _optional_key(
    key: str | None, endpoint: EndpointUrl, config: Path | None, data_dir: Path | None
) -> str | None:
    """--key, else the URL's ?key=, else SERVER_KEY or the config file, else None."""
    if key is not None:
        return key
    if endpoint.key is not None:
        return endpoint.key
    cfg_dir = data_dir or Path(os.environ.get("DATA_DIR", "data"))
    has_file = config is not None or (cfg_dir / ".mcp-endpoint-server.cfg").exists()
    if "SERVER_KEY" not in os.environ and not has_file:
        return None
    return _key_config(None, config, data_dir).key


def _caller_url_for(
    given: str, key: str | None, agent: str | None, config: Path | None, data_dir: Path | None
) -> str:
    """The URL to call: a ``ws(s)://`` caller URL (WebSocket), or an ``http(s)://`` one (MCP
    Streamable HTTP) when ``given`` is a caller URL spelled with ``http://`` or ``https://``."""
    endpoint = _endpoint(given)
    if endpoint.kind == "other":
        raise _fail(
            f"{endpoint.shown} is a tool-side URL of another kind of endpoint: call needs a "
            "caller URL, ws://HOST:PORT/mcp_endpoint/call/?token=... (WebSocket) or "
            "http://HOST:PORT/mcp_endpoint/call/?token=... (Streamable HTTP)"
        )
    http = endpoint.kind == "caller" and given.strip().lower().startswith(("http://", "https://"))
    if endpoint.kind == "tool":
        print(
            "note: that is a tool URL (/mcp_endpoint/mcp/, where tools connect); calling "
            "through the caller URL with the same token (/mcp_endpoint/call/)",
            file=sys.stderr,
        )
    if endpoint.token is not None and agent is None:
        return endpoint.caller_url(http=http)
    secret = _optional_key(key, endpoint, config, data_dir)
    if secret is None:
        raise _fail(
            f"{KIND_NAMES[endpoint.kind]} has no token: give the caller URL "
            f"({endpoint.ws_base}/mcp_endpoint/call/?token=..., or "
            f"{endpoint.http_base}/mcp_endpoint/call/?token=... for Streamable HTTP), or the "
            "key (--key, or the health URL) and --agent"
        )
    return endpoint.caller_url(secret, agent or DEFAULT_AGENT, http=http)


DEFAULT_AGENT = "single_module"

_CALL_ACTIONS = ("tools", "call", "request")


def call_command(
    url: Annotated[
        str,
        typer.Argument(
            help="Where to call: the caller URL, ws://HOST:PORT/mcp_endpoint/call/?token=... "
            "(WebSocket) or http(s)://HOST:PORT/mcp_endpoint/call/?token=... (MCP Streamable "
            "HTTP); the tool URL of the same agent, or a base or health URL with the key (then "
            "--agent picks the agent), over WebSocket.",
            show_default=False,
        ),
    ],
    action: Annotated[
        str,
        typer.Argument(
            metavar="tools|call|request",
            help="tools: list the tools. call TOOL: call one (--args). request METHOD "
            "[PARAMS]: send one raw JSON-RPC request.",
            show_default=False,
        ),
    ],
    words: Annotated[
        list[str] | None,
        typer.Argument(metavar="[TOOL | METHOD [PARAMS]]", show_default=False),
    ] = None,
    args: Annotated[
        str, typer.Option("--args", help="The tool's arguments, as a JSON object (for call).")
    ] = "{}",
    timeout: Annotated[float, typer.Option(help="Seconds each request may take.")] = 30.0,
    agent: Annotated[
        str | None,
        typer.Option(
            help=f"The agent, when the URL has no token (default {DEFAULT_AGENT}).",
            show_default=False,
        ),
    ] = None,
    key: KeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """A caller client: list tools, call one, or send raw JSON-RPC (MCP handshake included).

    The URL's scheme picks the transport: ws:// or wss:// is the WebSocket caller endpoint;
    an http:// or https:// caller URL is MCP Streamable HTTP (initialize, which opens a
    session, notifications/initialized, the action, then DELETE of the session), served by
    trio-mcp-relay at the same path. Output and exit status are the same for both: 0; 1 for
    an isError result, a JSON-RPC error, a refused token (HTTP: the status and the error the
    endpoint gave), nothing listening or no answer in time; 2 for a bad URL or arguments.

    Options may go anywhere on the line. Example session:

    \b
        trio-mcp-relay call "ws://127.0.0.1:8004/mcp_endpoint/call/?token=..." tools
        trio-mcp-relay call "ws://...?token=..." call add --args '{"a": 1, "b": 2}'
        trio-mcp-relay call "ws://...?token=..." request ping --timeout 5
        trio-mcp-relay call "http://127.0.0.1:8004/mcp_endpoint/call/?token=..." tools
    """
    if action not in _CALL_ACTIONS:
        raise _fail(f"unknown action {action!r}: use tools, call TOOL, or request METHOD [PARAMS]")
    rest = list(words or [])
    caller = _caller_url_for(url, key, agent, config, data_dir)
    if action == "tools":
        if rest:
            raise _fail(f"tools takes no further arguments, got {rest[0]!r}")
        _call_tools(caller, timeout)
    elif action == "call":
        if len(rest) != 1:
            raise _fail("call needs exactly one TOOL name (its arguments go in --args)")
        _call_tool(caller, timeout, rest[0], args)
    else:
        if not 1 <= len(rest) <= 2:
            raise _fail("request needs a METHOD, and optionally PARAMS as JSON")
        _call_request(caller, timeout, rest[0], rest[1] if len(rest) == 2 else None)


def _run_caller(url: str, timeout: float, work: Any) -> Any:
    """Run ``work(caller)`` on a caller of ``url`` (by its scheme: WebSocket or Streamable
    HTTP); a failure exits 1 with one line saying what to fix."""
    from trio_websocket import ConnectionClosed, HandshakeError

    from .client import HttpProtocolError, HttpRefused, RpcError, open_caller, open_http_caller

    http = url.startswith(("http://", "https://"))
    http_errors: tuple[type[BaseException], ...] = ()
    if http:
        import httpx

        http_errors = (httpx.HTTPError,)

    async def main() -> Any:
        if http:
            async with open_http_caller(url, timeout=timeout) as http_caller:
                return await work(http_caller)
        async with open_caller(url, timeout=timeout) as caller:
            return await work(caller)

    try:
        try:
            return trio.run(main)
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
    except HttpRefused as exc:
        raise _fail(describe_http_refusal(exc, url), 1) from None
    except HttpProtocolError as exc:
        raise _fail(f"{parse_endpoint_url(url).host_port}: {exc}", 1) from None
    except http_errors as exc:
        raise _fail(describe_connect_failure(exc, url), 1) from None
    except RpcError as exc:
        hint = (
            ": this connection is on the tool side; use the caller URL "
            "(/mcp_endpoint/call/?token=...)"
            if exc.code == -32005
            else ""
        )
        raise _fail(f"the server answered with error {exc}{hint}", 1) from None
    except (HandshakeError, OSError, ConnectionClosed) as exc:
        raise _fail(describe_connect_failure(exc, url), 1) from None
    except trio.TooSlowError:
        raise _fail(f"no answer within {timeout:g} s (--timeout)", 1) from None


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The single exception inside nested one-member groups (else the group itself)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _call_tools(url: str, timeout: float) -> None:
    tools: list[dict[str, Any]] = _run_caller(url, timeout, lambda caller: caller.list_tools())
    if not tools:
        print("(no tools)")
        return
    width = max(len(t.get("name", "")) for t in tools)
    for t in tools:
        schema = t.get("inputSchema") or {}
        params = ", ".join(schema.get("properties", {}))
        description = (t.get("description") or "").strip().splitlines()
        print(f"{t.get('name', ''):<{width}}  ({params})  {description[0] if description else ''}")


def _call_tool(url: str, timeout: float, name: str, args: str) -> None:
    try:
        arguments = json.loads(args)
    except ValueError as exc:
        raise _fail(f"--args is not JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise _fail("--args must be a JSON object, e.g. '{\"a\": 1}'")
    result = _run_caller(url, timeout, lambda caller: caller.call_tool(name, arguments))
    texts = [c.get("text", "") for c in result.get("content", []) if c.get("type") == "text"]
    if texts and "structuredContent" not in result:
        print("\n".join(texts))
    else:
        print(_pretty(result.get("structuredContent", result)))
    if result.get("isError"):
        raise typer.Exit(1)


def _call_request(url: str, timeout: float, method: str, params: str | None) -> None:
    try:
        parsed = None if params is None else json.loads(params)
    except ValueError as exc:
        raise _fail(f"PARAMS is not JSON: {exc}") from None
    print(_pretty(_run_caller(url, timeout, lambda caller: caller.request(method, parsed))))


# ------------------------------------------------------------------------- check


def check_command(
    url_argument: EndpointArgument = None,
    url: EndpointOption = None,
    host: Annotated[str, typer.Option(help="Host, when no URL is given.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port, when no URL is given.")] = 8004,
    key: KeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds each step may take.")] = 10.0,
) -> None:
    """Check that an MCP endpoint works: health with the key, a tool and a caller connection,
    a forwarded round trip, the servers and tools a caller sees, a caller over MCP
    Streamable HTTP, the error for a missing tool, and a bad token refused.

    The check's tool is an MCP server with one tool, check: it answers an aggregating relay's
    own initialize and tools/list, and the round trip is a tools/call of it. The servers
    step lists the agent's tools through the caller, and its servers when the health
    endpoint reports servers per agent. The Streamable HTTP step POSTs to the caller URL
    (http://HOST:PORT/mcp_endpoint/call/?token=...): initialize opens a session, tools/list
    must offer check, tools/call of it must come back, and DELETE ends the session. An
    endpoint that answers that POST with 404, 405 or 501 does not serve Streamable HTTP
    (the reference server does not): the step is skipped, saying so, and is no failure.

    Prints a pass/fail table with a hint for each failure; exits 0 only if none fails. Works
    against trio-mcp-relay, the reference mcp-endpoint-server, and either behind a proxy.
    Given a tool or caller URL (ws:// or http://) and no key, it checks with that URL's
    token (the steps that need the key are skipped, and an agent's connected tool is never
    replaced: it is listed, over both transports, not called).

    \b
    Examples:
        trio-mcp-relay check "http://127.0.0.1:8004/mcp_endpoint/health?key=0123..."
        trio-mcp-relay check "http://127.0.0.1:8004/mcp_endpoint/call/?token=..."
    """
    from ._check import Endpoint, run_checks

    endpoint = _endpoint(url_argument or url or f"http://{host}:{port}")
    if endpoint.kind == "other":
        raise _fail(
            f"{endpoint.shown} is not an mcp-endpoint-server endpoint (no /mcp_endpoint/ path)"
        )
    secret = _optional_key(key, endpoint, config, data_dir)
    if secret is None and endpoint.token is None:
        raise _fail(
            "check needs the server key: pass --key, set SERVER_KEY, or give the health URL "
            "the relay prints (http://HOST:PORT/mcp_endpoint/health?key=KEY)"
        )
    if endpoint.kind in ("tool", "caller"):
        how = (
            "with fresh agents of the key"
            if secret is not None
            else "with this URL's token (no key given: the steps that need it are skipped)"
        )
        print(
            f"note: given {KIND_NAMES[endpoint.kind]}; checking the endpoint at "
            f"{endpoint.http_base} {how}"
        )
    results = trio.run(run_checks, Endpoint(endpoint.http_base, secret, timeout, endpoint.token))
    width = max(len(r.name) for r in results)
    for r in results:
        label = "SKIP" if r.skipped else "PASS" if r.ok else "FAIL"
        print(f"{label}  {r.name:<{width}}  {r.detail}")
        if not r.ok and r.hint:
            print(f"      {'':<{width}}  hint: {r.hint}")
    failed = sum(not r.ok for r in results)
    skipped = sum(r.skipped for r in results)
    passed = len(results) - failed - skipped
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    if failed:
        raise typer.Exit(1)


# ------------------------------------------------------------------------- fuzz


def _resolve_key(
    key: str | None,
    endpoint: EndpointUrl,
    config: Path | None,
    data_dir: Path | None,
    *,
    needed_for: str,
) -> str:
    """The key: --key, else the URL's ?key=, else as serve reads it (SERVER_KEY, config)."""
    if key is None and endpoint.key is not None:
        return endpoint.key
    cfg_dir = data_dir or Path(os.environ.get("DATA_DIR", "data"))
    has_file = config is not None or (cfg_dir / ".mcp-endpoint-server.cfg").exists()
    if key is None and "SERVER_KEY" not in os.environ and not has_file:
        raise _fail(
            f"{needed_for}, so it needs the server key: pass --key, set SERVER_KEY, or give "
            "the health URL the relay prints (http://HOST:PORT/mcp_endpoint/health?key=KEY)"
        )
    cfg = _key_config(key, config, data_dir)
    assert cfg.key is not None
    return cfg.key


def _endpoint(url: str) -> EndpointUrl:
    try:
        return parse_endpoint_url(url)
    except UrlError as exc:
        raise _fail(str(exc)) from None


def _family_list(values: list[str] | None, option: str) -> set[str]:
    from .testing import FAMILIES

    names = {n.strip() for v in values or [] for n in v.split(",") if n.strip()}
    unknown = sorted(names - FAMILIES.keys())
    if unknown:
        raise _fail(
            f"{option} {unknown[0]!r} is not an invariant family; choose from "
            + ", ".join(FAMILIES)
        )
    return names


def fuzz_command(
    url_argument: EndpointArgument = None,
    url: EndpointOption = None,
    key: KeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    examples: Annotated[int, typer.Option(min=1, help="How many scripts to try.")] = 100,
    seed: Annotated[int | None, typer.Option(help="Random seed, to repeat a run.")] = None,
    patience: Annotated[
        float,
        typer.Option(
            help="Seconds each phase that must complete may take (registration, the last answers)."
        ),
    ] = 2.0,
    grace: Annotated[
        float,
        typer.Option(help="Seconds to wait after that for frames still missing."),
    ] = 0.3,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Check only these invariant families (comma-separated, repeatable).",
            show_default=False,
        ),
    ] = None,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            help="Do not check these invariant families, e.g. to fuzz past a known "
            "defect (comma-separated, repeatable).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Fuzz a live endpoint with hypothesis and check the relay invariants.

    Each script connects a tool and up to four callers for a fresh agent: requests with
    colliding ids (0, "", 1 vs 1.0 vs "1", huge integers), progress, cancellations, invalid
    frames, callers leaving; tool answers in any order (late, duplicate, stray),
    notifications, requests to the caller side, garbage. Each violated invariant family is a
    finding, shrunk to a minimal script and printed with the frames exchanged; then a table
    of every family. Exit status: 0 all held, 1 findings, 2 the endpoint could not be fuzzed
    (the message says why).

    \b
    Invariant families (for --only and --skip):
      liveness, answers, ids, isolation, invalid-frames, notifications,
      tool-requests, progress, cancellation, late-answers

    Example: trio-mcp-relay fuzz "http://127.0.0.1:8004/mcp_endpoint/health?key=0123..."
    """
    # Here, not at the top: they import Hypothesis, which makes Trio's scheduler
    # deterministic (slower) in the process; ``serve`` must not pay for that.
    from ._fuzz import FuzzerFailed, run_fuzz
    from .testing import FAMILIES, CannotConnect

    given = url_argument or url or "http://127.0.0.1:8004"
    endpoint = _endpoint(given)
    if endpoint.kind == "other":
        raise _fail(
            f"{endpoint.shown} is not an mcp-endpoint-server endpoint (no /mcp_endpoint/ "
            "path): fuzz needs a relay it can create agents on"
        )
    secret = _resolve_key(
        key,
        endpoint,
        config,
        data_dir,
        needed_for="fuzz mints a token for a fresh agent per script",
    )
    if endpoint.kind in ("tool", "caller"):
        print(
            f"note: given {KIND_NAMES[endpoint.kind]}; fuzzing the endpoint at "
            f"{endpoint.ws_base} with fresh agents",
            file=sys.stderr,
        )
    selected = _family_list(only, "--only") or set(FAMILIES)
    skipped = _family_list(skip, "--skip")
    selected -= skipped
    if not selected:
        raise _fail("--only and --skip leave no invariant family to check")
    run_seed = seed if seed is not None else secrets.randbelow(2**31)
    print(
        f"fuzzing {endpoint.ws_base}: up to {examples} scripts, {len(selected)} invariant "
        f"families, seed {run_seed}",
        flush=True,
    )
    try:
        report = run_fuzz(
            endpoint.ws_base,
            secret,
            examples=examples,
            seed=run_seed,
            patience=patience,
            grace=grace,
            families=selected,
            on_finding=_print_finding,
        )
    except CannotConnect as exc:
        raise _fail(f"cannot fuzz: {exc}") from None
    except FuzzerFailed as exc:
        raise _fail(
            f"the fuzzer itself failed ({exc}): a bug in trio-mcp-relay; please report it with "
            f"--seed {run_seed}"
        ) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    _print_summary(report, skipped, run_seed)
    if report.findings:
        raise typer.Exit(1)


def _print_finding(number: int, finding: Finding) -> None:
    from ._fuzz import describe_step
    from .testing import FAMILIES

    session = finding.session
    own = [v for v in finding.result.violations if v.family == finding.family]
    others = [v for v in finding.result.violations if v.family != finding.family]
    print()
    print(f"FINDING {number} [{finding.family}]: {FAMILIES[finding.family]}, broken:")
    for violation in own:
        print(f"  {violation}")
    for violation in others:
        print(f"  also [{violation.family}]: {violation}")
    plural = "s" if session.callers != 1 else ""
    print(f"Minimal script ({session.callers} caller{plural}, each connected and answered once):")
    for step in session.steps:
        print(f"  {describe_step(step)}")
    if not session.steps:
        print("  (nothing)")
    if not finding.reproduced:
        print("  (not shrunk further or not repeated: it failed once, and replaying it did not")
        print("  give the same outcome; the failure may depend on timing)")
    print("Frames exchanged:")
    for line in finding.result.transcript:
        print(f"  {line}")
    sys.stdout.flush()


def _print_summary(report: FuzzReport, skipped: set[str], seed: int) -> None:
    from .testing import FAMILIES

    found = {f.family: i for i, f in enumerate(report.findings, 1)}
    print()
    width = max(len(name) for name in FAMILIES)
    print(f"{'invariant family':<{max(width, 16)}}  result")
    for name in FAMILIES:
        if name in found:
            result = f"FAIL  (finding {found[name]})"
        elif name in report.families and report.stopped is not None:
            result = "not finished (the run stopped)"
        elif name in report.families:
            result = "pass"
        else:
            result = "skipped" + (" (--skip)" if name in skipped else " (--only)")
        print(f"{name:<{max(width, 16)}}  {result}")
    failed = len(report.findings)
    verdict = (
        f"{failed} of {len(report.families)} invariant families failed"
        if failed
        else f"every invariant held ({len(report.families)} families)"
    )
    if report.stopped is not None:
        print(f"The run stopped early: the endpoint stopped working ({report.stopped}).")
    print(f"{report.scripts} scripts: {verdict}. Repeat with --seed {seed}.")
