"""Structured logs: one JSON object per line, carrying the need and the correlation id of the work in hand.

The HTTP middleware (shared.service) sets the correlation id of each request (the caller's `X-Correlation-ID`, or a
new one); the broker middleware below sets the need id and the correlation id of each event consumed, read from
the stream entry; `shared.db.emit` logs every event put in the outbox with both. So one need's path can be
followed across the three services: `jq 'select(.need_id == "...")'` or by `correlation_id`.

No personal data: events are logged by type and ids only, never their payload; routes are logged by their
template (`/r/{token}`, not the token); and as a last guard, anything that looks like an email address or a
phone number in a message or a traceback is masked before the line is written.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from faststream import BaseMiddleware

CORRELATION_ID: ContextVar[str | None] = ContextVar("relais_correlation_id", default=None)
NEED_ID: ContextVar[str | None] = ContextVar("relais_need_id", default=None)

_CORRELATION_OK = re.compile(r"[A-Za-z0-9._-]{1,64}")  # fullmatch: "$" would let a trailing newline in
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w+-])(?:\+\d{8,15}|0[1-9](?:[ .]?\d{2}){4})(?![\w-])")
# Attributes every LogRecord has; anything else was passed in `extra` and goes into the JSON line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def valid_correlation_id(value: str | None) -> str | None:
    """A caller's correlation id if it is safe to carry (short, plain characters), else None."""
    return value if value and _CORRELATION_OK.fullmatch(value) else None


def current_correlation_id() -> str | None:
    return CORRELATION_ID.get()


@contextmanager
def log_context(*, need_id: str | None = None, correlation_id: str | None = None) -> Iterator[None]:
    """Within the block, log lines carry these ids (and work started from here inherits them)."""
    tokens = [(CORRELATION_ID, CORRELATION_ID.set(correlation_id))]
    if need_id is not None:
        tokens.append((NEED_ID, NEED_ID.set(need_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def describe_error(exc: BaseException) -> str:
    """An exception in words fit for logs and dead letters: a validation error names its fields and rules but
    not the values it was given (an event's payload may hold a person's name or address)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        )
        count = exc.error_count()
        return f"ValidationError: {count} validation error{'s' if count > 1 else ''} for {exc.title}: {problems}"
    return redact(f"{type(exc).__name__}: {exc}")


def redact(text: str) -> str:
    """Mask email addresses and phone numbers (E.164 or French national form)."""
    return _PHONE.sub("[phone]", _EMAIL.sub("[email]", text))


class ContextFilter(logging.Filter):
    """Puts the current need and correlation ids (and the service) on every record."""

    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "need_id", None) is None:
            record.need_id = NEED_ID.get()
        if getattr(record, "correlation_id", None) is None:
            record.correlation_id = CORRELATION_ID.get()
        if self.service and not getattr(record, "service", None):
            record.service = self.service
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None and key not in line:
                line[key] = value if isinstance(value, (int, float, bool)) else redact(str(value))
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        ids = " ".join(f"{k}={getattr(record, k)}" for k in ("need_id", "correlation_id") if getattr(record, k, None))
        return f"{text} [{ids}]" if ids else text


class LogFile(logging.handlers.RotatingFileHandler):
    """A file of JSON lines: this process's records, and the lines its children wrote (`write_line`, already JSON),
    one writer for all. Rotated at 20 MB, 3 old files kept (`relais.log.1`...). `relais up` keeps its full logs so."""

    MAX_BYTES = 20 * 1024 * 1024
    BACKUPS = 3

    def __init__(self, path: Path) -> None:
        super().__init__(path, maxBytes=self.MAX_BYTES, backupCount=self.BACKUPS, encoding="utf-8")
        self.setFormatter(JsonFormatter())

    def write_line(self, line: str) -> None:
        record = logging.LogRecord("relais.up", logging.INFO, "", 0, line, None, None)
        record.json_line = True
        self.handle(record)

    def format(self, record: logging.LogRecord) -> str:
        return record.msg if getattr(record, "json_line", False) else super().format(record)


class StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a record comes, like logging's last resort: a process (or a test) that
    replaces stderr after configuring gets its lines there, and nothing writes to a stream since closed."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # noqa: ANN401 - whatever sys.stderr is
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # noqa: ANN401 - StreamHandler.setStream's; the stream is always stderr
        pass


def configure(
    service: str | None = None,
    fmt: str = "json",
    level: str = "INFO",
    *,
    screen_level: str | None = None,
    file: LogFile | None = None,
) -> None:
    """Log to stderr, one JSON object per line (`fmt="text"` for people reading a terminal); with `file`, every
    record goes there too (JSON lines) while the terminal gets those of `screen_level` and above."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if screen_level:
        handler.setLevel(screen_level)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for each in (handler, file) if file else (handler,):
        each.addFilter(ContextFilter(service))
        root.addHandler(each)
    root.setLevel(level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd (relais up's sink) logs every recipient
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin on every start


def _field(fields: dict, name: str) -> str | None:
    value = fields.get(name.encode(), fields.get(name))
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value or None


class EventLogContext(BaseMiddleware):
    """The broker's outermost middleware: while an event is consumed, log lines carry its need and correlation
    ids (read from the stream entry's plain fields and envelope headers, before its payload is parsed)."""

    async def consume_scope(self, call_next, msg):  # noqa: ANN001
        raw = msg.raw_message if isinstance(msg.raw_message, dict) else {}
        data = raw.get("data")
        fields = data if isinstance(data, dict) else {}
        with log_context(need_id=_field(fields, "need_id"), correlation_id=valid_correlation_id(msg.correlation_id)):
            return await call_next(msg)
