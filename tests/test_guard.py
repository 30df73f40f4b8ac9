"""Hostile and sloppy clients, with real sockets against the real daemon: descriptor limits,
the connection cap and its evictions, head and body timeouts, HTTPS and its reload; each
under both event loops the daemon runs on (uvloop, its default, and asyncio's own)."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
import trustme

from registry.guard.fds import RESERVED_FDS
from tests.conftest import SCHEDULER_TOKEN, SpawnDaemon
from tests.daemon import Daemon
from tests.sse import EventReader
from tests.waiting import eventually


@pytest.fixture(autouse=True, params=["uvloop", "asyncio"])
def event_loop_of_the_daemon(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The daemons these tests start run on this loop (MODEL_REGISTRY_EVENT_LOOP)."""
    loop: str = request.param
    monkeypatch.setenv("MODEL_REGISTRY_EVENT_LOOP", loop)
    return loop


HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"  # the blank line never comes


def _room_for(sockets: int) -> None:
    """This test process needs descriptors for its own clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < sockets + 256:
        wanted = sockets + 256 if hard == resource.RLIM_INFINITY else min(hard, sockets + 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < sockets + 64:
        pytest.skip(f"this process may not open {sockets} sockets")


async def _half_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HALF_HEAD)
    await writer.drain()
    return reader, writer


async def _body_on_its_way(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose body has yet to arrive in full: a connection at work."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /reservations HTTP/1.1\r\nHost: localhost\r\n"
        + f"Authorization: Bearer {SCHEDULER_TOKEN}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        + b'{"vram_mib":'
    )
    await writer.drain()
    return reader, writer


async def _closed(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """Whether the daemon closed this connection within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(4096):
                pass
            return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def _still_served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether this half-open connection is still there: its request, finished now, is
    answered."""
    writer.write(b"\r\n")
    await writer.drain()
    async with asyncio.timeout(5.0):
        return (await reader.readline()).startswith(b"HTTP/1.1 200")


async def _healthz(url: str, timeout_s: float) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
        http.get(url + "/healthz") as answer,
    ):
        return answer.status


def _lines_after(log: str, event: str) -> list[str]:
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if f'"{event}"' in line)
    return lines[start + 1 :]


async def test_1100_half_open_connections_under_a_1024_limit_leave_it_reachable(
    spawn_daemon: SpawnDaemon,
) -> None:
    _room_for(1200)
    daemon = spawn_daemon(open_files=1024)
    await daemon.wait_ready()
    limits = next(json.loads(x) for x in daemon.log().splitlines() if '"limits"' in x)
    assert (limits["open_files"], limits["max_connections"]) == (1024, 1024 - RESERVED_FDS)

    attackers = [await _half_open(daemon.port) for _ in range(1100)]
    try:
        # The daemon has taken the flood in: the oldest half-open connections made room.
        assert await _closed(attackers[0][0], timeout_s=5.0)
        started = time.monotonic()
        assert await _healthz(daemon.url, timeout_s=1.0) == 200
        assert time.monotonic() - started < 1.0
        assert await _still_served(*attackers[-1])  # the newest are still there
    finally:
        for _reader, writer in attackers:
            writer.close()
    after = _lines_after(daemon.log(), "listening")
    assert len(after) < 20, after
    assert "Traceback" not in daemon.log() and "out of system resource" not in daemon.log()


async def test_at_the_cap_idle_connections_are_evicted_and_busy_ones_are_not(
    spawn_daemon: SpawnDaemon,
) -> None:
    daemon = spawn_daemon(
        MODEL_REGISTRY_MAX_CONNECTIONS="8",
        MODEL_REGISTRY_HEADER_TIMEOUT="60",
        MODEL_REGISTRY_SCHEDULER_TOKEN=SCHEDULER_TOKEN,
        # A stream whose client went away is noticed at its next keep-alive write.
        MODEL_REGISTRY_EVENTS_KEEPALIVE="0.3",
    )
    await daemon.wait_ready()
    await _until_connections(daemon, 0)  # the start-up check's own connection is gone
    idle = [await _half_open(daemon.port) for _ in range(8)]
    assert await _healthz(daemon.url, timeout_s=2.0) == 200  # a real client gets in
    assert await _closed(idle[0][0], timeout_s=1.0), "the oldest idle one made room"
    assert await _still_served(*idle[1])
    for _reader, writer in idle:
        writer.close()

    async with aiohttp.ClientSession() as http:
        streams = []
        for _ in range(4):  # event streams (at most half the slots): busy, never evicted
            response = await http.get(daemon.url + "/events")
            streams.append(EventReader(response))
            assert (await streams[-1].next()).event == "snapshot"
        bodies = [await _body_on_its_way(daemon.port) for _ in range(4)]  # busy too
        newcomer, _writer = await _half_open(daemon.port)
        assert await _closed(newcomer, timeout_s=1.0), "no idle slot: the newcomer is refused"
        for stream in streams:
            assert not stream.response.content.at_eof()
        for reader, writer in bodies:
            assert not reader.at_eof()
            writer.close()
    await _until_connections(daemon, 0)  # the streams' slots are free again
    metrics = _metrics(daemon)
    assert metrics["model_registry_http_connections_evicted_total"] >= 1
    assert metrics["model_registry_http_connections_refused_total"] >= 1
    assert metrics["model_registry_http_connections_max"] == 8
    log = daemon.log()
    assert "Traceback" not in log


async def test_a_request_head_and_a_body_must_arrive_in_time(
    spawn_daemon: SpawnDaemon,
) -> None:
    daemon = spawn_daemon(
        MODEL_REGISTRY_HEADER_TIMEOUT="0.5",
        MODEL_REGISTRY_BODY_TIMEOUT="0.5",
        MODEL_REGISTRY_SCHEDULER_TOKEN=SCHEDULER_TOKEN,
    )
    await daemon.wait_ready()
    reader, _writer = await _half_open(daemon.port)
    started = time.monotonic()
    assert await _closed(reader, timeout_s=3.0)
    assert 0.4 < time.monotonic() - started < 2.5

    # A keep-alive connection between requests is not owing a head: it stays open.
    with socket.create_connection(("127.0.0.1", daemon.port)) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert b"200 OK" in conn.recv(4096)
        # A half-open connection made now is closed once the header timeout has passed for
        # both: by then the kept-alive one would have been closed too, were it owing a head.
        late, _late_writer = await _half_open(daemon.port)
        assert await _closed(late, timeout_s=3.0)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert b"200 OK" in conn.recv(4096)

    # A body that trickles: 408, then the connection is closed.
    reader, writer = await _body_on_its_way(daemon.port)
    answer = await asyncio.wait_for(reader.read(65536), 3.0)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive in time" in answer
    assert await _closed(reader, timeout_s=2.0)
    writer.close()


class Certificates:
    """A private CA and the daemon's certificate and key files, issued (again) on demand."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.cert_file, self.key_file = directory / "cert.pem", directory / "key.pem"
        self.client = ssl.create_default_context()
        self.ca.configure_trust(self.client)

    def issue(self, name: str = "registry.example") -> Certificates:
        cert = self.ca.issue_cert("127.0.0.1", name)
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.cert_file))
        cert.private_key_pem.write_to_path(str(self.key_file))
        return self

    def daemon_env(self) -> dict[str, str]:
        return {
            "MODEL_REGISTRY_TLS_CERT_FILE": str(self.cert_file),
            "MODEL_REGISTRY_TLS_KEY_FILE": str(self.key_file),
        }


async def test_400_silent_tls_connections_under_a_300_limit_leave_https_reachable(
    spawn_daemon: SpawnDaemon, tmp_path: Path
) -> None:
    """Connections are counted when accepted, not when their handshake ends: ones that never
    send a ClientHello make room for real clients like any other idle connection."""
    _room_for(500)
    certificates = Certificates(tmp_path).issue()
    daemon = spawn_daemon(open_files=300, scheme="https", **certificates.daemon_env())
    await daemon.wait_ready(ssl=certificates.client)
    silent = [await asyncio.open_connection("127.0.0.1", daemon.port) for _ in range(400)]
    try:
        assert await _closed(silent[0][0], timeout_s=5.0)
        started = time.monotonic()
        connector = aiohttp.TCPConnector(ssl=certificates.client)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get(daemon.url + "/gpus", timeout=aiohttp.ClientTimeout(total=2.0)) as answer,
        ):
            assert answer.status == 200
            gpus = await answer.json()
        assert time.monotonic() - started < 2.0
        assert gpus["state"] == "ok", gpus
    finally:
        for _reader, writer in silent:
            writer.close()
    after = _lines_after(daemon.log(), "listening")
    assert len(after) < 40, after[:50]
    assert "Too many open files" not in daemon.log()


async def test_a_tls_handshake_must_end_within_the_header_timeout(
    spawn_daemon: SpawnDaemon, tmp_path: Path
) -> None:
    certificates = Certificates(tmp_path).issue()
    daemon = spawn_daemon(
        scheme="https", MODEL_REGISTRY_HEADER_TIMEOUT="0.5", **certificates.daemon_env()
    )
    await daemon.wait_ready(ssl=certificates.client)
    silent, writer = await asyncio.open_connection("127.0.0.1", daemon.port)  # no ClientHello
    assert await _closed(silent, timeout_s=3.0)
    writer.close()


async def test_https_with_a_certificate_that_is_reloaded_on_sighup(
    spawn_daemon: SpawnDaemon, tmp_path: Path
) -> None:
    certificates = Certificates(tmp_path)
    cert_file = certificates.cert_file
    issue = certificates.issue
    issue("first.example")
    daemon = spawn_daemon(scheme="https", **certificates.daemon_env())
    client_tls = certificates.client
    await daemon.wait_ready(ssl=client_tls)

    def served_names() -> set[str]:
        with (
            socket.create_connection(("127.0.0.1", daemon.port)) as raw,
            client_tls.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            peer = tls.getpeercert()
            return {value for kind, value in peer.get("subjectAltName", ()) if kind == "DNS"}

    assert served_names() == {"first.example"}
    with pytest.raises(aiohttp.ClientError):  # HTTPS only
        await _healthz(daemon.url.replace("https", "http"), timeout_s=2.0)

    issue("second.example")  # rotated in place, as certbot or cert-manager would
    daemon.signal(signal.SIGHUP)
    await eventually(lambda: served_names() == {"second.example"}, step_s=0.05)

    cert_file.write_text("not a certificate")  # a broken rotation keeps the old pair
    daemon.signal(signal.SIGHUP)
    await eventually(lambda: "TLS reload failed" in daemon.log(), step_s=0.05)
    assert served_names() == {"second.example"}
    assert "Traceback" not in daemon.log()


def _metrics(daemon: Daemon) -> dict[str, float]:
    """The daemon's unlabelled samples, read over a connection of their own (then closed)."""
    from prometheus_client.parser import text_string_to_metric_families

    with socket.create_connection(("127.0.0.1", daemon.port)) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    text = raw.partition(b"\r\n\r\n")[2].decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def _until_connections(daemon: Daemon, count: int) -> None:
    """Until the daemon holds `count` client connections, besides the one that asks."""

    def holds() -> bool:
        try:
            return _metrics(daemon)["model_registry_http_connections"] == count + 1
        except (ConnectionError, KeyError):  # refused: every slot is still busy
            return False

    await eventually(holds, step_s=0.05)
