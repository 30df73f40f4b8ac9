"""GET /models answered from the connection (registry.hot_reads): the same answer as the
handler's, counted the same, behind the same gate, and only where nothing else is needed."""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from registry import keys
from registry.config import Settings
from registry.guard import connections
from registry.guard.connections import GuardedServer, can_answer_at_once
from registry.service import Service
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AppClient, DaemonTestServer
from tests.scrape import scrape
from tests.waiting import eventually

PER_REQUEST = ("date", "x-request-id")  # what differs between any two answers


@dataclass
class Answer:
    head: bytes
    status: int
    headers: dict[str, str]
    body: bytes

    def fixed_head(self) -> list[bytes]:
        """The head without the headers that differ between any two answers."""
        lines = self.head.split(b"\r\n")
        return [line for line in lines if line.split(b":")[0].lower().decode() not in PER_REQUEST]


class Connection:
    """One keep-alive connection, spoken to in raw HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, client: Any) -> Connection:
        return cls(*await asyncio.open_connection(client.host, client.port))

    async def ask(self, request: bytes, *, body_follows: bool = True) -> Answer:
        self.writer.write(request)
        return await self.answer(body_follows=body_follows)

    async def answer(self, *, body_follows: bool = True) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode().split("\r\n")
        fields = (line.split(": ", 1) for line in lines[1:] if line)
        headers = {name.lower(): value for name, value in fields}
        length = int(headers.get("content-length", 0)) if body_follows else 0
        body = await asyncio.wait_for(self.reader.readexactly(length), 10)
        return Answer(head, int(lines[0].split()[1]), headers, body)

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


def get(target: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: localhost", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def test_a_rendered_page_is_answered_from_the_connection_as_the_handler_answers_it(
    start_app: AppClient,
) -> None:
    client = await start_app()
    hot = client.app[keys.HOT_READS]
    connection = await Connection.open(client)
    for target in ("/models", "/models?limit=2&skip=1"):
        by_handler = await connection.ask(get(target))
        answered = hot.answered
        at_once = await connection.ask(get(target))
        assert hot.answered == answered + 1, target
        assert at_once.status == 200
        assert at_once.fixed_head() == by_handler.fixed_head()
        assert at_once.body == by_handler.body
        assert at_once.headers["x-request-id"] != by_handler.headers["x-request-id"]
        assert email.utils.parsedate_to_datetime(at_once.headers["date"]).tzinfo is not None
    # Counted as the handler's answers are, under the same labels.
    samples = await scrape(client)
    labels = (("method", "GET"), ("route", "/models"), ("status", "200"))
    assert samples[("model_registry_http_requests_total", labels)] == 4
    assert samples[
        ("model_registry_http_request_duration_seconds_count", labels[:2])
    ] == pytest.approx(4)
    connection.close()


async def test_answers_from_the_connection_carry_the_clients_request_id_or_a_new_one(
    start_app: AppClient,
) -> None:
    client = await start_app()
    hot = client.app[keys.HOT_READS]
    connection = await Connection.open(client)
    await connection.ask(get("/models"))
    given = await connection.ask(get("/models", "X-Request-Id: scheduler-7.a:1"))
    assert given.headers["x-request-id"] == "scheduler-7.a:1"
    refused = await connection.ask(get("/models", "X-Request-Id: no spaces allowed"))
    new = await connection.ask(get("/models"))
    ids = {refused.headers["x-request-id"], new.headers["x-request-id"]}
    assert len(ids) == 2 and "no spaces allowed" not in ids
    assert hot.answered == 3
    connection.close()


@pytest.mark.parametrize(
    ("request_bytes", "body_follows"),
    [
        (get("/models", method="HEAD"), False),
        (get("/models", 'If-None-Match: "not-this-one"'), True),
        (get("/models", "Connection: keep-alive", version="1.0"), True),
        (get("/models", "Content-Length: 2") + b"{}", True),
        (get("/models?limit=3"), True),  # not rendered yet
        (get("/models/1"), True),
        (get("/models", "Upgrade: websocket", "Connection: Upgrade"), True),
    ],
    ids=["head", "conditional", "http-1.0", "with-a-body", "new-page", "one-model", "upgrade"],
)
async def test_what_needs_more_goes_the_usual_way(
    start_app: AppClient, request_bytes: bytes, body_follows: bool
) -> None:
    client = await start_app()
    hot = client.app[keys.HOT_READS]
    connection = await Connection.open(client)
    assert (await connection.ask(get("/models"))).status == 200
    answer = await connection.ask(request_bytes, body_follows=body_follows)
    assert answer.status == 200
    assert hot.answered == 0
    # And the connection goes on: the next plain listing is answered at once.
    assert (await connection.ask(get("/models"))).status == 200
    assert hot.answered == 1
    connection.close()


async def test_connection_close_is_answered_by_the_handler_and_closes(
    start_app: AppClient,
) -> None:
    client = await start_app()
    connection = await Connection.open(client)
    await connection.ask(get("/models"))
    answer = await connection.ask(get("/models", "Connection: close"))
    assert answer.status == 200 and answer.headers["connection"] == "close"
    assert await connection.closed_by_server()
    assert client.app[keys.HOT_READS].answered == 0


async def test_requests_sent_together_are_answered_in_order(start_app: AppClient) -> None:
    client = await start_app()
    connection = await Connection.open(client)
    first = await connection.ask(get("/models?limit=1"))
    second = await connection.ask(get("/models?limit=2"))
    connection.writer.write(get("/models?limit=2") + get("/models?limit=1") + get("/models"))
    answers = [await connection.answer() for _ in range(3)]
    assert [a.body for a in answers[:2]] == [second.body, first.body]
    assert answers[2].status == 200
    connection.close()


async def test_a_foreign_host_is_refused_after_answers_from_the_connection(
    start_app: AppClient,
) -> None:
    client = await start_app()
    connection = await Connection.open(client)
    await connection.ask(get("/models"))
    await connection.ask(get("/models"))
    assert client.app[keys.HOT_READS].answered == 1
    foreign = await connection.ask(get("/models").replace(b"localhost", b"evil.example"))
    assert foreign.status == 403
    connection.close()


async def test_a_read_token_set_by_a_reload_is_asked_for_at_once(start_app: AppClient) -> None:
    client = await start_app()
    connection = await Connection.open(client)
    await connection.ask(get("/models"))
    assert (await connection.ask(get("/models"))).status == 200
    live = client.app[keys.SETTINGS]
    live.reload(
        live.current.model_copy(update={"read_token": SecretStr("read-token-0123456789abcdef")})
    )
    assert (await connection.ask(get("/models"))).status == 401
    reader = await connection.ask(
        get("/models", "Authorization: Bearer read-token-0123456789abcdef")
    )
    assert reader.status == 200
    assert client.app[keys.HOT_READS].answered == 1
    connection.close()


async def test_with_every_request_logged_nothing_is_answered_from_the_connection(
    start_app: AppClient,
) -> None:
    client = await start_app(access_log="all")
    for _ in range(3):
        assert (await client.get("/models")).status == 200
    assert client.app[keys.HOT_READS].answered == 0


async def test_a_catalog_change_shows_in_the_very_next_answer(start_app: AppClient) -> None:
    client = await start_app(admin_token=ADMIN_TOKEN)
    connection = await Connection.open(client)
    await connection.ask(get("/models"))
    await connection.ask(get("/models"))
    created = await client.post(
        "/models", json={"name": "fresh-model", "vram": 10}, headers=AS_ADMIN
    )
    assert created.status == 201
    after = await connection.ask(get("/models"))
    assert b'"fresh-model"' in after.body
    again = await connection.ask(get("/models"))
    assert again.body == after.body and client.app[keys.HOT_READS].answered == 2
    connection.close()


async def test_keep_alive_counts_from_the_last_answer_from_the_connection(
    make_settings: Callable[..., Settings], aiohttp_client: Any
) -> None:
    from registry.app import SERVER_OPTIONS, create_app

    keepalive_s = 0.3
    server = DaemonTestServer(create_app(make_settings()))
    await server.start_server(keepalive_timeout=keepalive_s, **SERVER_OPTIONS)
    client = await aiohttp_client(server)
    first = await Connection.open(client)
    assert (await first.ask(get("/models"))).status == 200  # renders the page
    connection = await Connection.open(client)
    loop = asyncio.get_running_loop()
    # Kept busy for three times the keep-alive timeout, by answers from the connection alone:
    # never closed under a client that is using it.
    busy_until = loop.time() + 3 * keepalive_s
    while loop.time() < busy_until:
        assert (await connection.ask(get("/models"))).status == 200
    assert client.app[keys.HOT_READS].answered > 3
    # Then idle: closed once the timeout has passed.
    assert await connection.closed_by_server()
    first.close()


async def test_an_answered_connection_owes_no_request_head(start_app: AppClient) -> None:
    client = await start_app()
    connection = await Connection.open(client)
    await connection.ask(get("/models"))
    await connection.ask(get("/models"))
    assert client.app[keys.HOT_READS].answered == 1
    guarded = client.server.runner.server
    assert isinstance(guarded, GuardedServer)
    # Not counted as a slow request head by the header timeout's sweep.
    assert [h.head_since for h in guarded._connections] == [None] * len(guarded._connections)
    connection.writer.write(b"GET /mod")  # half a head: owed from now
    await eventually(
        lambda: [h.head_since for h in guarded._connections],
        lambda owed: any(since is not None for since in owed),
    )
    connection.close()


def test_this_aiohttp_has_what_answering_from_the_connection_needs() -> None:
    assert can_answer_at_once()


async def test_an_aiohttp_without_those_internals_answers_everything_the_usual_way(
    start_app: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        connections, "_HANDLER_INTERNALS", (*connections._HANDLER_INTERNALS, "_gone")
    )
    client = await start_app()
    for _ in range(3):
        assert (await client.get("/models")).status == 200
    assert client.app[keys.HOT_READS].answered == 0


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_the_service_answers_from_the_connection(
    make_settings: Callable[..., Settings], tmp_path: Path, scheme: str
) -> None:
    from tests.daemon import free_port
    from tests.test_guard import Certificates

    port, tls, client_tls = free_port(), {}, None
    if scheme == "https":
        certificates = Certificates(tmp_path).issue()
        tls = {"tls_cert_file": certificates.cert_file, "tls_key_file": certificates.key_file}
        client_tls = certificates.client
    service = Service(make_settings(port=port, **tls), None, {})
    running = asyncio.ensure_future(service.run())
    try:
        url = f"{scheme}://127.0.0.1:{port}/models"
        connector = aiohttp.TCPConnector(ssl=client_tls) if client_tls else None
        async with aiohttp.ClientSession(connector=connector) as http:

            async def listing() -> bytes | None:
                try:
                    async with http.get(url) as answer:
                        return await answer.read() if answer.status == 200 else None
                except aiohttp.ClientConnectionError:
                    return None

            first = await eventually(listing, lambda body: body is not None, timeout_s=30)
            for _ in range(3):
                assert await listing() == first
        assert service.app[keys.HOT_READS].answered >= 2
    finally:
        service._stop.set()
        assert await asyncio.wait_for(running, timeout=15) == 0


async def test_a_fault_in_answering_from_the_connection_leaves_the_request_to_the_handler(
    start_app: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await start_app()
    connection = await Connection.open(client)
    first = await connection.ask(get("/models"))

    def broken() -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.app[keys.HOT_READS], "_date_and_server", broken)
    again = await connection.ask(get("/models"))
    assert again.status == 200 and again.body == first.body
    connection.close()
