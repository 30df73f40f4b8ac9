"""Logs: JSON lines, request ids, and an access log that records what matters only."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from registry.config import LogFormat
from registry.logs import configure_logging
from tests.conftest import AS_SCHEDULER, SCHEDULER_TOKEN, AppClient
from tests.waiting import eventually


def _requests(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("event") == "request"]


async def test_default_access_log_skips_fast_reads_and_keeps_errors(
    start_app: AppClient, json_lines: Any
) -> None:
    client = await start_app(gpu_backend="none")
    json_lines()
    for _ in range(5):
        assert (await client.get("/models")).status == 200
    assert (await client.get("/models?limit=0")).status == 422
    assert (await client.get("/missing")).status == 404
    logged = _requests(json_lines())
    assert [(line["path"], line["status"]) for line in logged] == [
        ("/models", 422),
        ("/missing", 404),
    ]
    for line in logged:
        assert {"method", "path", "status", "duration_ms", "request_id", "timestamp"} <= set(line)
        assert line["timestamp"].endswith("Z")


async def test_access_log_all_and_off(start_app: AppClient, json_lines: Any) -> None:
    client = await start_app(gpu_backend="none", access_log="all")
    json_lines()
    await client.get("/models")
    assert len(_requests(json_lines())) == 1
    quiet = await start_app(gpu_backend="none", access_log="off")
    await quiet.get("/missing")
    assert _requests(json_lines()) == []


async def test_slow_requests_are_logged(start_app: AppClient, json_lines: Any) -> None:
    client = await start_app(gpu_backend="none", slow_request_ms=0)
    json_lines()
    await client.get("/healthz")
    assert [line["path"] for line in _requests(json_lines())] == ["/healthz"]


async def test_request_id_is_echoed_and_bound_to_log_lines(
    start_app: AppClient, json_lines: Any
) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.get("/missing", headers={"X-Request-Id": "sched-42.abc"})
    assert response.headers["X-Request-Id"] == "sched-42.abc"
    [line] = _requests(json_lines())
    assert line["request_id"] == "sched-42.abc"

    generated = (await client.get("/models")).headers["X-Request-Id"]
    other = (await client.get("/models")).headers["X-Request-Id"]
    assert generated and other and generated != other


async def test_a_hostile_request_id_is_replaced(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.get("/models", headers={"X-Request-Id": "x" * 500})
    assert response.headers["X-Request-Id"] != "x" * 500
    response = await client.get("/models", headers={"X-Request-Id": "<script>"})
    assert response.headers["X-Request-Id"] != "<script>"


async def test_the_database_password_never_reaches_the_log(
    start_app: AppClient, json_lines: Any, database_url: str
) -> None:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(database_url)
    if parts.password:  # a server of one's own (MODEL_REGISTRY_TEST_DATABASE_URL) wants its own
        with_password, secret = database_url, parts.password
    else:  # the embedded server lets its user in by the socket: any password does
        host = parts.netloc.rpartition("@")[2]
        secret = "s3cret-pw"
        with_password = urlunsplit(parts._replace(netloc=f"postgres:{secret}@{host}"))
    client = await start_app(gpu_backend="none", database_url=with_password)
    assert (await client.get("/healthz")).status == 200
    lines = json_lines()
    assert any("***" in json.dumps(line) for line in lines)
    assert all(secret not in json.dumps(line) for line in lines)


async def test_stdlib_loggers_share_the_pipeline(json_lines: Any) -> None:
    logging.getLogger("aiohttp.server").warning("from aiohttp")
    [line] = [x for x in json_lines() if x["event"] == "from aiohttp"]
    assert line["logger"] == "aiohttp.server" and line["level"] == "warning"


async def test_unparseable_requests_log_one_warning_without_traceback(
    start_app: AppClient, json_lines: Any
) -> None:

    client = await start_app(gpu_backend="none")
    json_lines()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /models HTTP/1.1\r\nHost: x\r\nX-Bad: \x00\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert b" 400 " in status_line
    lines = [line for line in json_lines() if line.get("logger") == "aiohttp.server"]
    assert len(lines) == 1
    assert lines[0]["level"] == "warning"
    assert "exception" not in lines[0] and "Traceback" not in json.dumps(lines[0])


def test_console_format_is_readable() -> None:
    buffer = io.StringIO()
    configure_logging(LogFormat.CONSOLE, "info", stream=buffer)
    try:
        logging.getLogger("registry.test").info("hello operator")
        from registry.logs import get_logger

        get_logger("registry.test").warning("gpu state changed", state="ok")
    finally:
        logging.getLogger().handlers.clear()
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2
    assert not lines[0].startswith("{") and "hello operator" in lines[0]
    assert "gpu state changed" in lines[1] and "state=ok" in lines[1]


async def test_gpu_changes_log_once_and_each_flipped_model_once(
    start_app: AppClient, json_lines: Any, gpu_file: Any
) -> None:
    from registry import keys

    client = await start_app(poll_interval=0.05)
    poller = client.app[keys.POLLER]
    json_lines()  # start-up: the first reading is a change from "no reading yet"
    for _ in range(5):  # several polls that see nothing new
        polls = poller.polls
        poller.poll_now()
        await eventually(lambda: poller.polls > polls)  # noqa: B023 (awaited in this iteration)
    assert not [
        x for x in json_lines() if x["event"] in ("gpu state changed", "model availability changed")
    ]
    gpu_file(("GPU-sim-0", 24576, 3000))  # large_v1, large_v2 and large-v3 no longer fit
    poller.poll_now()
    flips = await eventually(lambda: _logged(json_lines, "model availability changed"), bool)
    assert sorted(x["model"] for x in flips) == ["large-v3", "large_v1", "large_v2"]
    assert all(x["active"] is False and x["headroom_mib"] < 0 for x in flips)
    gpu_file().unlink()
    poller.poll_now()
    changes = await eventually(lambda: _logged(json_lines, "gpu state changed"), bool)
    [change] = changes
    assert (change["previous"], change["state"]) == ("ok", "unavailable")


async def _logged(json_lines: Any, event: str) -> list[dict[str, Any]]:
    return [line for line in json_lines() if line["event"] == event]


async def test_default_access_log_leaves_out_reservation_traffic_but_not_its_errors(
    start_app: AppClient, json_lines: Any
) -> None:
    client = await start_app(scheduler_token=SCHEDULER_TOKEN)
    auth = AS_SCHEDULER
    json_lines()
    created = await client.post("/reservations", json={"vram_mib": 100}, headers=auth)
    assert created.status == 201
    assert (await client.delete(created.headers["Location"], headers=auth)).status == 204
    assert (
        await client.post("/reservations", json={"vram_mib": 10**6}, headers=auth)
    ).status == 409
    assert (await client.post("/models", json={"name": "x", "vram": 1}, headers=auth)).status == 403
    logged = _requests(json_lines())
    assert [(line["method"], line["path"], line["status"]) for line in logged] == [
        ("POST", "/reservations", 409),
        ("POST", "/models", 403),
    ]


def test_a_repeating_error_is_logged_once_then_summarised() -> None:
    from registry.logs import RepeatSummary

    emitted: list[logging.LogRecord] = []
    now = [0.0]
    summary = RepeatSummary(emitted.append, window_s=10, clock=lambda: now[0])

    def record(event: str, exc: BaseException | None = None) -> logging.LogRecord:
        exc_info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, event, None, exc_info)

    accept_error = OSError(24, "Too many open files")
    first = record("socket.accept() out of system resource", accept_error)
    assert summary.filter(first) and first.exc_info is not None  # in full, traceback and all
    for _ in range(500):
        now[0] += 0.01
        assert not summary.filter(record("socket.accept() out of system resource", accept_error))
    assert summary.filter(record("another error"))  # a different error is not held back
    now[0] = 10.5
    later = record("socket.accept() out of system resource", accept_error)
    assert summary.filter(later)  # the window is over: this one carries the count
    assert later.exc_info is None and "repeated 501 times within 10 s" in str(later.msg)

    for _ in range(3):
        summary.filter(record("socket.accept() out of system resource", accept_error))
    summary.flush()
    assert emitted == []  # its window is not over yet
    now[0] = 25.0
    summary.flush()  # the flood stopped: what was held back is still told
    [told] = emitted
    assert "repeated 3 times" in str(told.msg) and told.exc_info is None


async def test_a_flood_of_client_errors_is_one_line_while_it_lasts(
    start_app: AppClient, json_lines: Any
) -> None:
    client = await start_app(gpu_backend="none")
    json_lines()
    for _ in range(50):
        assert (await client.get("/wp-login.php")).status == 404
    assert (await client.get("/models?limit=0")).status == 422
    logged = [(x["path"], x["status"]) for x in _requests(json_lines())]
    assert logged == [("/wp-login.php", 404), ("/models", 422)]


def test_a_flapping_model_is_told_once_then_counted() -> None:
    from registry.logs import FLAP_EVENT, RepeatSummary

    emitted: list[logging.LogRecord] = []
    now = [0.0]
    summary = RepeatSummary(emitted.append, window_s=10, clock=lambda: now[0])

    def flip(model: str, active: bool) -> bool:
        msg = {"event": FLAP_EVENT, "model": model, "active": active}
        record = logging.LogRecord("registry.view", logging.INFO, __file__, 1, msg, None, None)
        return summary.filter(record)

    assert flip("large-v3", False) and flip("medium", False)  # each model's first change
    assert not any(flip("large-v3", i % 2 == 0) for i in range(99))
    now[0] = 11.0
    summary.flush()
    [told] = emitted
    assert told.msg["model"] == "large-v3" and told.msg["repeated"] == 99


def test_each_expired_reservation_is_told() -> None:
    from registry.logs import RepeatSummary

    summary = RepeatSummary(lambda _r: None, window_s=10, clock=lambda: 0.0)
    for n in range(3):
        msg = {"event": "reservation expired", "reservation": f"r{n}", "holder": f"job-{n}"}
        record = logging.LogRecord(
            "registry.admission", logging.WARNING, __file__, 1, msg, None, None
        )
        assert summary.filter(record), "each expiry is its own news, not a repeat"


def test_refused_logins_are_told_per_address_at_most_once_a_second() -> None:
    from registry.logs import RepeatSummary

    emitted: list[logging.LogRecord] = []
    now = [0.0]
    summary = RepeatSummary(emitted.append, window_s=10, clock=lambda: now[0])

    def refused(remote: str, status: int = 401) -> logging.LogRecord:
        fields = {"event": "request", "status": status, "remote": remote, "path": "/models"}
        return logging.LogRecord("registry.access", logging.INFO, __file__, 1, fields, None, None)

    shown = []
    for step in range(51):  # 51 bad tokens in half a second, from one address
        now[0] = step * 0.01
        if summary.filter(line := refused("10.0.0.7")):
            shown.append(line)
    assert summary.filter(refused("10.0.0.8"))  # another address is named at once
    assert summary.filter(refused("10.0.0.7", 403))  # and so is a 403
    assert len(shown) == 1
    now[0] = 1.2  # a second later: the next one carries the count
    line = refused("10.0.0.7")
    assert summary.filter(line)
    assert isinstance(line.msg, dict) and line.msg["repeated"] == 51
    assert line.msg["repeated_within_s"] == 1.0 and line.msg["remote"] == "10.0.0.7"


def test_under_journald_each_line_carries_its_syslog_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.logs import get_logger

    def logged(journal: bool) -> list[str]:
        path = tmp_path / f"journal-{journal}.log"
        with path.open("w") as stream:
            info = os.fstat(stream.fileno())
            # systemd names the stream it connected; another stream (a file, a terminal, a
            # pipe to a command started from a service) gets no prefix.
            monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + (not journal)}")
            configure_logging(LogFormat.JSON, "debug", stream=stream)
            log = get_logger("registry.test")
            log.error("an error", n=1)
            log.warning("a warning")
            log.info("news")
            log.debug("detail")
            logging.getLogger("asyncpg.pool").error("a library's error")
        logging.getLogger().handlers.clear()
        return path.read_text().splitlines()

    journal = logged(journal=True)
    assert [line[:3] for line in journal] == ["<3>", "<4>", "<6>", "<7>", "<3>"]
    assert json.loads(journal[0][3:])["event"] == "an error"
    plain = logged(journal=False)
    assert all(line.startswith("{") for line in plain)
    assert [json.loads(line)["level"] for line in plain] == [
        "error",
        "warning",
        "info",
        "debug",
        "error",
    ]
