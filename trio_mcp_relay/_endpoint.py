"""Where an endpoint is: one URL grammar for every client command, one failure vocabulary.

Users paste whatever URL they have at hand, so ``check``, ``fuzz``, ``call``, ``pipe`` and
``tools`` all accept the same forms and derive the one they need:

* a base URL: ``http(s)://HOST:PORT`` or ``ws(s)://HOST:PORT`` (a path before
  ``/mcp_endpoint`` is kept, for a relay behind a proxy path prefix; a bare ``HOST:PORT``
  means ``http://``);
* the health URL the relay prints, ``http://HOST:PORT/mcp_endpoint/health?key=KEY``, which
  also carries the key;
* a tool URL, ``ws://HOST:PORT/mcp_endpoint/mcp/?token=TOKEN``, or a caller URL,
  ``…/mcp_endpoint/call/?token=TOKEN`` (the same token serves both sides of an agent);
* any other ``ws(s)://`` URL with a token, such as the hosted ``wss://api.xiaozhi.me/mcp/``
  (only a tool bridge can use it as is).

Connection failures are put into words here and nowhere else (:func:`describe_connect_failure`,
and :func:`describe_http_refusal` for an HTTP error status of MCP Streamable HTTP): one line
that says what is wrong and what to fix, whatever layer raised it.
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import quote, unquote, urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from ._auth import encrypt_token

if TYPE_CHECKING:
    from .client import HttpRefused

__all__ = [
    "EndpointUrl",
    "UrlError",
    "describe_connect_failure",
    "describe_http_refusal",
    "http_refusal_hint",
    "parse_endpoint_url",
]

UrlKind = Literal["base", "health", "tool", "caller", "other"]

_PATHS: Final[dict[str, UrlKind]] = {
    "/mcp_endpoint/health": "health",
    "/mcp_endpoint/mcp": "tool",
    "/mcp_endpoint/call": "caller",
    "/mcp_endpoint": "base",
}

KIND_NAMES: Final[dict[str, str]] = {
    "base": "a base URL",
    "health": "the health URL",
    "tool": "a tool URL (/mcp_endpoint/mcp/)",
    "caller": "a caller URL (/mcp_endpoint/call/)",
    "other": "an endpoint URL",
}

PROXY_FIX: Final = (
    "nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; "
    'proxy_set_header Connection "upgrade"'
)


class UrlError(ValueError):
    """The URL cannot name an endpoint; the message says why, without its secrets."""


@attrs.frozen
class EndpointUrl:
    """A parsed endpoint URL.

    Attributes:
        kind: ``base``, ``health``, ``tool``, ``caller`` or ``other`` (see the module).
        secure: TLS (``https``/``wss``).
        netloc: ``host:port`` as given.
        prefix: The path before ``/mcp_endpoint`` (``""`` unless behind a path prefix).
        key: The ``key=`` parameter (health URL), unquoted.
        token: The ``token=`` parameter, unquoted.
        original: The URL as given.
    """

    kind: UrlKind
    secure: bool
    netloc: str
    prefix: str = ""
    key: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    original: str = attrs.field(default="", repr=False)

    @property
    def ws_base(self) -> str:
        return f"{'wss' if self.secure else 'ws'}://{self.netloc}{self.prefix}"

    @property
    def http_base(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.netloc}{self.prefix}"

    @property
    def host_port(self) -> str:
        return self.netloc.rpartition("@")[2]

    def tool_url(self, key: str | None = None, agent: str | None = None) -> str:
        """The tool URL: this one, the same token's, or one minted with ``key`` for ``agent``."""
        if self.kind == "other":
            return self.original
        return self._side_url("mcp", key, agent)

    def caller_url(
        self, key: str | None = None, agent: str | None = None, *, http: bool = False
    ) -> str:
        """The caller URL: this one, the same token's, or one minted with ``key``.

        ``http``: the ``http(s)://`` form, where the relay serves MCP Streamable HTTP (the
        same path and token as the WebSocket caller URL).
        """
        return self._side_url("call", key, agent, http=http)

    def _side_url(
        self, side: str, key: str | None, agent: str | None, *, http: bool = False
    ) -> str:
        if agent is not None and key is not None:
            token = encrypt_token(key, agent)
        elif self.token is not None:
            token = self.token
        else:
            raise UrlError(
                f"{KIND_NAMES[self.kind]} has no token: give the {_SIDE[side]} URL "
                f"({self.ws_base}/mcp_endpoint/{side}/?token=...), or the key to mint one"
            )
        base = self.http_base if http else self.ws_base
        return f"{base}/mcp_endpoint/{side}/?token={quote(token, safe='')}"

    def health_url(self, key: str) -> str:
        return f"{self.http_base}/mcp_endpoint/health?key={quote(key, safe='')}"

    @property
    def shown(self) -> str:
        """The URL as given, without its query (where the secrets are)."""
        return self.original.split("?", 1)[0]


_SIDE: Final = {"mcp": "tool", "call": "caller"}


def _query(text: str) -> dict[str, str]:
    # Not parse_qs: it reads "+" as a space, and a pasted base64 token may hold a raw "+".
    values: dict[str, str] = {}
    for part in text.split("&"):
        name, sep, value = part.partition("=")
        if sep and name not in values:
            values[name] = unquote(value)
    return values


def parse_endpoint_url(url: str) -> EndpointUrl:
    """Parse any URL form of the module's grammar.

    Raises:
        UrlError: Not http(s)/ws(s), no host, or a path that is none of the endpoint's.
    """
    text = url.strip()
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "ws", "wss"):
        raise UrlError(
            f"the URL must start with http://, https://, ws:// or wss://, not {scheme}://"
        )
    if not parts.hostname:
        raise UrlError(f"the URL has no host: {text.split('?', 1)[0]!r}")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise UrlError(f"the URL's port is not a number: {parts.netloc!r}") from None
    query = _query(parts.query)
    secure = scheme in ("https", "wss")
    path = parts.path.rstrip("/")
    kind: UrlKind = "other" if "token" in query else "base"
    prefix = "" if kind == "other" else path
    for suffix, named in _PATHS.items():
        if path.endswith(suffix):
            kind, prefix = named, path[: -len(suffix)]
            break
    return EndpointUrl(
        kind=kind,
        secure=secure,
        netloc=parts.netloc,
        prefix=prefix,
        key=query.get("key") or None,
        token=query.get("token") or None,
        original=text,
    )


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _where(url: str) -> str:
    try:
        return parse_endpoint_url(url).host_port
    except UrlError:
        return "the endpoint"


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the members of any group among them."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        chain.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return chain


def describe_connect_failure(exc: BaseException, url: str) -> str:
    """One line: why connecting to ``url`` failed, and what to fix. Never empty, no secrets."""
    leaf = _leaf(exc)
    where = _where(url)
    chain = _cause_chain(leaf)
    if isinstance(leaf, ConnectionRejected):
        status = leaf.status_code
        if status == 429:
            return (
                f"{where} refused the WebSocket with HTTP 429 (too many failed "
                "authentications from this address): wait until the ban ends (trio-mcp-relay's "
                "--auth-ban, 60 s by default), and check the key"
            )
        if status in (401, 403):
            return (
                f"{where} refused the WebSocket with HTTP {status}: a wrong key or token, or an "
                "Origin or address rule of the endpoint or of a proxy in front"
            )
        if status == 503:
            return f"{where} refused the WebSocket with HTTP 503: it is at its connection limit"
        if status in (200, 301, 302, 307, 308, 400, 404, 405, 426, 501):
            return (
                f"{where} answered HTTP {status} instead of a WebSocket upgrade: it is not an MCP "
                f"endpoint (wrong port or path?), or a proxy in front does not forward upgrades "
                f"({PROXY_FIX})"
            )
        return f"{where} refused the WebSocket with HTTP {status}"
    if isinstance(leaf, ConnectionClosed):
        reason = leaf.reason
        code = reason.code if reason is not None else 1006
        text = f" {reason.reason}" if reason is not None and reason.reason else ""
        if code == 1008:
            return f"{where} refused the token (close 1008{text}): use the server key"
        return f"{where} closed the connection ({code}{text})"
    tls = url.strip().lower().startswith(("https://", "wss://"))
    if isinstance(leaf, trio.TooSlowError) or any(isinstance(c, trio.Cancelled) for c in chain):
        if tls:
            return (
                f"no TLS handshake with {where} in time: if the endpoint has no TLS, use "
                "http:// or ws://"
            )
        return (
            f"no answer from {where} in time: a firewall, a wrong address, or a proxy holding "
            "the connection"
        )
    for item in chain:
        if isinstance(item, ssl.SSLError):
            detail = getattr(item, "reason", None) or item.__class__.__name__
            return (
                f"the TLS handshake with {where} failed ({detail}): use http:// or ws:// for an "
                "endpoint without TLS, or fix its certificate"
            )
        if isinstance(item, socket.gaierror):
            return f"cannot resolve the host of {where}: check the URL"
        if isinstance(item, ConnectionRefusedError):
            return (
                f"nothing listens at {where} (connection refused): start the endpoint, or fix "
                "the host and port"
            )
        if isinstance(item, OSError) and item.strerror:
            return f"cannot connect to {where}: {item.strerror}"
    if isinstance(leaf, HandshakeError):
        cause = next((c for c in chain[1:] if str(c)), None)
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return (
            f"the WebSocket handshake with {where} failed{detail}: is an MCP endpoint listening "
            "there (and not a plain HTTP server)?"
        )
    text = str(leaf)
    return f"cannot connect to {where}: {type(leaf).__name__}{': ' + text if text else ''}"


def _ws_form(url: str) -> str:
    """``url`` as the WebSocket caller URL of the same endpoint, without its query."""
    try:
        endpoint = parse_endpoint_url(url)
    except UrlError:
        return "ws://HOST:PORT/mcp_endpoint/call/?token=..."
    return f"{endpoint.ws_base}/mcp_endpoint/call/?token=..."


def describe_http_refusal(exc: HttpRefused, url: str) -> str:
    """One line: what an HTTP error status of a Streamable HTTP endpoint means, and what to fix.

    Names the status, the JSON-RPC error of the body (code, message, details) and the request
    it answered; never the URL's query (the token)."""
    where = _where(url)
    error = exc.error
    data = error.data if error is not None and isinstance(error.data, dict) else {}
    details = data.get("details")
    said = ""
    if error is not None:
        said = f" ({error.code} {error.message}" + (f": {details}" if details else "") + ")"
    elif exc.body and not exc.body.lstrip().startswith("<"):
        said = f" ({exc.body[:80]})"
    head = f"{where} answered HTTP {exc.status}{said} to {exc.method}"
    fix = http_refusal_hint(exc, url)
    return f"{head}: {fix}" if fix else head


def http_refusal_hint(exc: HttpRefused, url: str) -> str:
    """What to fix for an HTTP error status of a Streamable HTTP endpoint ("" if nothing
    useful can be said): the second half of :func:`describe_http_refusal`."""
    error = exc.error
    data = error.data if error is not None and isinstance(error.data, dict) else {}
    details = data.get("details")
    status, code = exc.status, error.code if error is not None else None
    wait = f" (retry after {exc.retry_after} s)" if exc.retry_after else ""
    fix = ""
    if status == 401:
        fix = (
            "the token was refused: use a caller URL with a token minted with this endpoint's "
            "key (trio-mcp-relay url AGENT)"
        )
    elif status == 403 and isinstance(details, str) and "tool token" in details:
        fix = (
            "a tool token cannot call: use a caller token (trio-mcp-relay url AGENT --role caller)"
        )
    elif status == 403 and isinstance(details, str) and "reference tokens" in details:
        fix = "this endpoint takes scoped tokens only (trio-mcp-relay url AGENT --role caller)"
    elif status == 403:
        fix = (
            "refused: an Origin or address rule of the endpoint or of a proxy in front, or a "
            "token that may not call"
        )
    elif status == 404 and exc.session:
        fix = "the session ended (it expired, or the relay restarted): run the command again"
    elif status in (404, 405, 501):
        fix = (
            "no MCP Streamable HTTP endpoint there: check the path (/mcp_endpoint/call/); an "
            "endpoint that speaks only WebSocket (such as the reference mcp-endpoint-server) "
            f"takes the WebSocket caller URL, {_ws_form(url)}"
        )
    elif status == 429 and code == -32004:
        fix = f"too many failed authentications from this address{wait}: wait, and check the token"
    elif status == 429:
        fix = f"the agent has as many callers as the endpoint allows{wait}: try again later"
    elif status == 413:
        fix = "the message is over the endpoint's size limit (trio-mcp-relay's --max-message-size)"
    elif status == 400 and code == -32022:
        fix = (
            f"the endpoint does not serve MCP revision {data.get('requested')} (it serves "
            f"{', '.join(map(str, data.get('supported') or [])) or 'others'})"
        )
    elif status == 503:
        fix = f"the endpoint is shutting down or at its connection limit{wait}: try again"
    return fix


#: The agent of the tool URL minted from a health URL: the one the relay's banner shows.
BANNER_AGENT: Final = "single_module"


def tool_side_url(given: str) -> tuple[str, str | None]:
    """The URL a tool bridge dials, for any URL of the grammar, and a note if it was derived.

    A tool URL (or another endpoint's, such as xiaozhi.me's) is used as is; a caller URL
    gives the tool URL of the same token; the health URL gives the tool URL of the agent
    ``single_module`` minted with its key.

    Raises:
        UrlError: The URL is not one of the grammar, or has neither token nor key.
    """
    endpoint = parse_endpoint_url(given)
    if endpoint.kind in ("tool", "other"):
        if endpoint.original.startswith(("http://", "https://")):
            return endpoint.tool_url(), None
        return given.strip(), None
    if endpoint.kind == "caller":
        return endpoint.tool_url(), (
            "that is a caller URL (/mcp_endpoint/call/, where MCP clients connect); using the "
            "tool URL with the same token (/mcp_endpoint/mcp/)"
        )
    if endpoint.key is None and endpoint.original.startswith(("ws://", "wss://")):
        return given.strip(), None  # a WebSocket URL of an endpoint that needs no token
    if endpoint.key is not None:
        return endpoint.tool_url(endpoint.key, BANNER_AGENT), (
            f"using the tool URL of agent {BANNER_AGENT}, minted with the health URL's key"
        )
    raise UrlError(
        f"{KIND_NAMES[endpoint.kind]} has no token: give the tool URL "
        f"({endpoint.ws_base}/mcp_endpoint/mcp/?token=...), or the health URL with its key"
    )
