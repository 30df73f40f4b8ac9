"""Shared fixtures: one real PostgreSQL server per session, a fresh database per test."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gpu import GpuBackend
from registry import keys
from registry.admission.book import Clock, utc_now
from registry.app import SERVER_OPTIONS, create_app
from registry.config import LogFormat, Settings
from registry.embedded import EmbeddedPostgres, embedded_account, first_closed
from registry.guard.connections import GuardedRunner
from registry.logs import configure_logging
from registry.migrations import migrate
from tests.daemon import Daemon
from tests.db import StoppableServer

# The tokens every test uses: one admin, one scheduler (16 characters or more, as a real one).
ADMIN_TOKEN = "test-admin-token-7f3a"
SCHEDULER_TOKEN = "test-scheduler-token-2c9e"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AS_SCHEDULER = {"Authorization": f"Bearer {SCHEDULER_TOKEN}"}

# Per xdist worker: workers may share one server (MODEL_REGISTRY_TEST_DATABASE_URL).
TEMPLATE_DB = f"model_registry_template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
_db_numbers = itertools.count(1)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings must come from the test, not from the developer's shell or systemd; and a
    command run without a state directory of its own keeps its state in the test's (the
    default, for root, is /var/lib/model-registry)."""
    for name in list(os.environ):
        # MODEL_REGISTRY_TEST_* are the test suite's own (database, browser).
        if name.startswith("MODEL_REGISTRY_") and not name.startswith("MODEL_REGISTRY_TEST_"):
            monkeypatch.delenv(name)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "default-state"))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that runs the CLI in-process reconfigures logging: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the tests keep embedded servers' state directories.

    Run as root, the server runs as its own system user, which must reach its data; pytest's
    temporary directories are 0700 and keep it out. So, as root, a directory of the suite's own
    (0711) is made where that user can reach it, and removed afterwards.
    """
    if os.geteuid() != 0:
        yield tmp_path_factory.mktemp("embedded")
        return
    account = embedded_account()
    place = next(
        Path(p)
        for p in (tempfile.gettempdir(), "/var/tmp", "/tmp")
        if Path(p).is_dir() and first_closed(Path(p), account) is None
    )
    root = Path(tempfile.mkdtemp(prefix="model-registry-tests-", dir=place))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def embedded_state_dir(embedded_root: Path, request: pytest.FixtureRequest) -> Path:
    """A state directory of this test's own, where an embedded server may start."""
    return embedded_root / f"{request.node.name[:24]}-{next(_db_numbers)}"


@pytest.fixture(scope="session")
def pg_admin_dsn(embedded_root: Path) -> Iterator[str]:
    """A PostgreSQL server: MODEL_REGISTRY_TEST_DATABASE_URL, or an embedded one."""
    configured = os.environ.get("MODEL_REGISTRY_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    server = EmbeddedPostgres(embedded_root / "session" / "postgres")
    dsn = asyncio.run(server.start())
    try:
        yield dsn
    finally:
        asyncio.run(server.stop())


@pytest.fixture(scope="session")
def template_dsn(pg_admin_dsn: str) -> str:
    """A migrated database that every test's database is copied from (fast: no DDL per test)."""

    async def build() -> str:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
        finally:
            await admin.close()
        dsn = with_database(pg_admin_dsn, TEMPLATE_DB)
        await migrate(dsn)
        return dsn

    return asyncio.run(build())


@pytest.fixture
async def empty_database_url(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no tables at all."""
    async with _scratch_database(pg_admin_dsn, template=None) as dsn:
        yield dsn


@pytest.fixture
async def database_url(pg_admin_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database, copied from the session's template."""
    async with _scratch_database(pg_admin_dsn, template=TEMPLATE_DB) as dsn:
        yield dsn


class _scratch_database:
    def __init__(self, admin_dsn: str, template: str | None) -> None:
        self.admin_dsn = admin_dsn
        self.template = template
        self.name = f"mr_test_{os.getpid()}_{next(_db_numbers)}"

    async def __aenter__(self) -> str:
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            template = f" TEMPLATE {self.template}" if self.template else ""
            await admin.execute(f"CREATE DATABASE {self.name}{template}")
        finally:
            await admin.close()
        return with_database(self.admin_dsn, self.name)

    async def __aexit__(self, *exc: object) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        finally:
            await admin.close()


LogLines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_lines() -> Iterator[LogLines]:
    """Send the process's log to a buffer as JSON; each call returns the lines since the last."""
    buffer = io.StringIO()
    configure_logging(LogFormat.JSON, "debug", stream=buffer)

    def read() -> list[dict[str, Any]]:
        out = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return [json.loads(line) for line in out.splitlines()]

    yield read
    logging.getLogger().handlers.clear()


@pytest.fixture
def own_server(embedded_state_dir: Path) -> Iterator[StoppableServer]:
    """A PostgreSQL server for this test alone, which it may stop and start."""
    server = StoppableServer(embedded_state_dir)
    yield server
    server.stop_if_running()


@pytest.fixture
def gpu_file(tmp_path: Path) -> Callable[..., Path]:
    """Write the simulated backend's file: gpu_file((uuid, total_mib, free_mib), ...).

    A device may also be given as a dict, as the file holds it (with `processes`, say).
    Called with no device, it only returns the file's path.
    """
    path = tmp_path / "gpus.json"

    def write(*devices: tuple[str, int, int] | dict[str, Any]) -> Path:
        if not devices:
            return path
        content = {
            "devices": [
                device
                if isinstance(device, dict)
                else {
                    "uuid": device[0],
                    "name": "Simulated GPU",
                    "total_mib": device[1],
                    "free_mib": device[2],
                }
                for device in devices
            ]
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(content))
        tmp.replace(path)  # atomic, as a drill script would do it
        return path

    write(("GPU-sim-0", 24576, 20000))
    return write


ONE_GPU = "GPU-sim-0"
ONE_GPU_TOTAL_MIB = 81920


@pytest.fixture
def gpus(gpu_file: Callable[..., Path]) -> Callable[..., Path]:
    """gpus({pid: used_mib}, free=..., known=True): one 80 GiB simulated device, written empty
    at first. `free` is what the processes leave unless given; `known=False` hides its process
    list, as a driver that cannot read it would."""

    def write(
        processes: Mapping[int, int | None] | None = None,
        *,
        free: int | None = None,
        known: bool = True,
    ) -> Path:
        processes = processes or {}
        if free is None:
            free = max(0, ONE_GPU_TOTAL_MIB - sum(used or 0 for used in processes.values()))
        listed = [{"pid": pid, "used_mib": used} for pid, used in processes.items()]
        return gpu_file(
            {
                "uuid": ONE_GPU,
                "name": "Simulated GPU",
                "total_mib": ONE_GPU_TOTAL_MIB,
                "free_mib": free,
                "processes": listed if known else None,
            }
        )

    write()
    return write


SpawnDaemon = Callable[..., Daemon]


@pytest.fixture
def spawn_daemon(
    tmp_path: Path, database_url: str, gpu_file: Callable[..., Path]
) -> Iterator[SpawnDaemon]:
    """Start real `model-registry serve` processes on this test's database and simulated GPU
    file: spawn_daemon(MODEL_REGISTRY_X="...", ...). Each is a host of its own (host id,
    state directory, log) unless the test says otherwise; all are stopped afterwards."""
    started: list[Daemon] = []

    def spawn(
        *args: str,
        open_files: int | None = None,
        scheme: str = "http",
        port: int | None = None,
        **env: str,
    ) -> Daemon:
        number = len(started)
        daemon = Daemon(
            {
                "MODEL_REGISTRY_DATABASE_URL": database_url,
                "MODEL_REGISTRY_GPU_BACKEND": "simulated",
                "MODEL_REGISTRY_GPU_SIMULATED_FILE": str(gpu_file()),
                "MODEL_REGISTRY_HOST_ID": f"daemon-{number}",
                **env,
            },
            *args,
            log_path=tmp_path / f"daemon{number}.log",
            open_files=open_files,
            scheme=scheme,
            port=port,
        )
        started.append(daemon)
        return daemon

    yield spawn
    for daemon in started:
        daemon.stop()


@pytest.fixture
def make_settings(
    database_url: str, gpu_file: Callable[..., Path], tmp_path: Path
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "state_dir": tmp_path / "state",
            "gpu_backend": "simulated",
            "gpu_simulated_file": gpu_file(),
            "poll_interval": 0.2,
            "log_format": "json",
        }
        values.update(overrides)
        return Settings(**values)

    return make


AppClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


class DaemonTestServer(TestServer):
    """The app on the daemon's own runner, as `model-registry serve` runs it: the connection
    guard, and the listing answered from the connection (registry.hot_reads)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return GuardedRunner(
            self.app,
            max_connections=1024,
            header_timeout_s=self.app[keys.SETTINGS].current.header_timeout,
            answer_at_once=self.app[keys.HOT_READS].answer,
            **kwargs,
        )


@pytest.fixture
def start_app(
    make_settings: Callable[..., Settings],
    aiohttp_client: Any,
    tmp_path: Path,
) -> AppClient:
    """Start the real app (database, poller, listener) and return an HTTP client for it."""

    started = itertools.count()

    async def start(
        settings: Settings | None = None,
        *,
        backend: GpuBackend | None = None,
        clock: Clock = utc_now,
        **overrides: Any,
    ) -> TestClient[web.Request, web.Application]:
        # Each daemon of a test is a host of its own: its own state directory and host id.
        number = next(started)
        overrides.setdefault("state_dir", tmp_path / f"state{number}")
        overrides.setdefault("host_id", f"test-host-{number}")
        app = create_app(settings or make_settings(**overrides), gpu_backend=backend, clock=clock)
        server = DaemonTestServer(app)
        await server.start_server(**SERVER_OPTIONS)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(server)
        return client

    return start
