"""Where the relay's log lines go, in what shape, and what is scrubbed out of them first.

The reference server reads a ``[logging]`` section in its INI file and this module honours it
the way the reference reads it (``src/utils/logger.py`` there):

* ``log_file``: a path, relative to the working directory (the reference's ``/app`` in its
  image); its directory is created if missing. Empty means no file. The reference writes
  ``logs/mcp_server.log`` even when the option is absent; the relay writes a file only when
  one is configured (the reference's shipped and generated config files both name one, so a
  reference install keeps its file).
* ``max_file_size``: ``10MB``, ``512KB``, ``100B`` or a plain number of bytes, case
  insensitive, ``MB`` and ``KB`` being 1024-based and allowing decimals (``1.5MB``), as the
  reference parses it; ``GB`` is accepted too. Default ``10MB``.
* ``backup_count``: rotated files kept beside the current one, default 5. They are named
  ``mcp_server.log.1`` (newest) to ``.5`` by :class:`logging.handlers.RotatingFileHandler`;
  the reference's loguru zips them instead. 0 keeps none: the file starts again empty.
* the level is ``[server] log_level``, for the console and the file alike.

Both destinations (stderr and the file) get the same format: text, or with ``log_format =
json`` one JSON object per line for log shippers, with ``time`` (UTC, ISO 8601), ``level``,
``logger``, ``message``, the record's structured extras (the access log's ``role``,
``agent``...) and ``exception`` when there is one.

Every handler carries a :class:`SecretFilter`: the relay never logs a secret on purpose, and
this is the last line of defence for what it does not write itself (an exception quoting a
URL, a library's debug line).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import logging.handlers
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from ._auth import redact

__all__ = [
    "TEXT_FORMAT",
    "JsonFormatter",
    "SecretFilter",
    "configured_logging",
    "parse_size",
    "scrub",
]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_UNITS: Final = (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024), ("B", 1))


def parse_size(text: str) -> int:
    """A size as the reference's ``max_file_size`` spells it, in bytes.

    Raises:
        ValueError: not a size.
    """
    upper = text.strip().upper()
    try:
        for unit, factor in _UNITS:
            if upper.endswith(unit):
                number = upper[: -len(unit)].strip()
                # The reference takes decimals for MB and KB, and whole bytes for B.
                return int(float(number) * factor) if factor > 1 else int(number)
        return int(upper)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a size (such as 10MB, 512KB, 100B or a number of bytes)"
        ) from None


# --- Scrubbing -------------------------------------------------------------------------------

#: ``token=…`` and ``key=…`` anywhere: query strings, and messages that quote them.
_SECRET_PARAMETER: Final = re.compile(r"(?i)\b(token|key)=([^&\s\"'<>]+)")
#: A scoped token (``st1.`` and base64url), wherever it stands.
_SCOPED_TOKEN: Final = re.compile(r"\bst1\.[A-Za-z0-9_-]{16,}")
#: Padded base64 of 16 bytes or more (a reference token's shape), raw or URL-quoted.
_PADDED_BASE64: Final = re.compile(
    r"(?<![A-Za-z0-9+/%])(?:[A-Za-z0-9+/]|%2[BbFf]){22,}(?:=|%3[Dd]){1,2}(?![A-Za-z0-9+/=%])"
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret shortened by :func:`~trio_mcp_relay._auth.redact`.

    Secrets are: each of ``secrets`` (the configured keys, also URL-quoted), the value of any
    ``token=`` or ``key=`` parameter, and anything shaped like a token (``st1.…``, padded
    base64 of 16 bytes or more). An already shortened value (ending in ``…``) is left alone,
    so scrubbing twice shows no less than once.
    """
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, redact(secret))
    text = _SECRET_PARAMETER.sub(_shorten_parameter, text)
    text = _SCOPED_TOKEN.sub(lambda m: redact(m.group(0)), text)
    return _PADDED_BASE64.sub(lambda m: redact(m.group(0)), text)


def _shorten_parameter(match: re.Match[str]) -> str:
    value = match.group(2)
    if value.endswith("…"):
        return match.group(0)
    return f"{match.group(1)}={redact(value)}"


class SecretFilter(logging.Filter):
    """Scrubs secrets (see :func:`scrub`) out of a record's message, exception text, stack
    and string extras. Install it on handlers, so it sees records from every logger.

    Args:
        secrets: exact strings to hide besides what looks like a token: the server keys and
            the admin key. Each is also hidden in its URL-quoted spelling.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        spellings = {s for secret in secrets if secret for s in (secret, quote(secret, safe=""))}
        # Longest first: a key that contains another is replaced whole.
        self.secrets: tuple[str, ...] = tuple(sorted(spellings, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_secrets_scrubbed", False):
            return True  # another handler's filter has been here
        record._secrets_scrubbed = True
        message = record.getMessage()
        scrubbed = scrub(message, self.secrets)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, self.secrets)
        for name, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, name, scrub(value, self.secrets))
        return True


# --- JSON ------------------------------------------------------------------------------------

_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """What ``extra=`` added to a record (names starting with ``_`` are private)."""
    return {
        name: value
        for name, value in record.__dict__.items()
        if name not in _STANDARD and not name.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time``, ``level``, ``logger``, ``message``,
    the record's extras, and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in _extras(record).items():
            out.setdefault(name, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


# --- Handlers --------------------------------------------------------------------------------


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """A :class:`~logging.handlers.RotatingFileHandler` for which ``backupCount=0`` means
    "keep no backup" (the file starts again empty), not "grow forever"."""

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115


@contextlib.contextmanager
def configured_logging(
    *,
    level: str,
    log_format: str = "text",
    log_file: str = "",
    max_file_size: int = 10 * 1024 * 1024,
    backup_count: int = 5,
    secrets: Iterable[str] = (),
    text_format: str = TEXT_FORMAT,
) -> Iterator[None]:
    """Send the root logger's records to stderr and, with ``log_file``, to a rotating file,
    until the block ends (then those handlers are closed and the root's level restored).

    Each handler gets a :class:`SecretFilter` for ``secrets``. Handlers already on the root
    logger (a test runner's) are left as they are.

    Raises:
        OSError: the log file or its directory cannot be created.
    """
    formatter: logging.Formatter = (
        JsonFormatter() if log_format == "json" else logging.Formatter(text_format)
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            _RotatingFile(path, maxBytes=max_file_size, backupCount=backup_count, encoding="utf-8")
        )
    secret_filter = SecretFilter(secrets)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(secret_filter)
    root = logging.getLogger()
    previous_level = root.level
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous_level)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
