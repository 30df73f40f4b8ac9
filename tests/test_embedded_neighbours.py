"""The embedded PostgreSQL beside its neighbours: commands run while a daemon serves the same
state directory use that daemon's server and leave it alone; a daemon waits for a command
that holds the state directory; and a daemon brings its server back when it dies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from registry.embedded import EmbeddedPostgres
from registry.state_dir import StateLock
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AS_SCHEDULER, SCHEDULER_TOKEN, SpawnDaemon
from tests.daemon import Daemon
from tests.waiting import eventually


def run_cli(state_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registry", *args],
        env={**os.environ, "MODEL_REGISTRY_STATE_DIR": str(state_dir), **env},
        capture_output=True,
        text=True,
        timeout=90,
    )


def postmaster_pid(state_dir: Path) -> int:
    return int((state_dir / "postgres" / "postmaster.pid").read_text().split("\n", 1)[0])


@pytest.fixture
def embedded_daemon(embedded_state_dir: Path, tmp_path: Path, gpu_file: Callable[..., Path]) -> Any:
    """A real daemon on an embedded server of its own, in `embedded_state_dir`."""
    started: list[Daemon] = []

    def start() -> Daemon:
        daemon = Daemon(
            {
                "MODEL_REGISTRY_STATE_DIR": str(embedded_state_dir),
                "MODEL_REGISTRY_GPU_BACKEND": "simulated",
                "MODEL_REGISTRY_GPU_SIMULATED_FILE": str(gpu_file()),
                "MODEL_REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN,
                "MODEL_REGISTRY_SCHEDULER_TOKEN": SCHEDULER_TOKEN,
                "MODEL_REGISTRY_POLL_INTERVAL": "0.2",
            },
            log_path=tmp_path / f"embedded-daemon{len(started)}.log",
        )
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.signal(signal.SIGTERM)  # it stops its server on the way out
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait_exit(timeout_s=30)
        daemon.stop()
    with contextlib.suppress(OSError, ValueError):  # left by a daemon that had to be killed
        os.kill(postmaster_pid(embedded_state_dir), signal.SIGINT)


class ReadinessWatch:
    """Asks /readyz back to back in the background (each answer before the next question);
    remembers every answer that was not 200."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.failures: list[tuple[int, Any]] = []
        self.polls = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReadinessWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"{self.url}/readyz") as response:
                    self.polls += 1
                    if response.status != 200:
                        self.failures.append((response.status, await response.json()))


async def _names(session: aiohttp.ClientSession, url: str) -> list[str]:
    async with session.get(f"{url}/models?limit=1000") as response:
        return [m["name"] for m in (await response.json())["data"]]


async def test_commands_beside_a_serving_daemon_use_its_server_and_leave_it_running(
    embedded_daemon: Callable[[], Daemon], embedded_state_dir: Path, tmp_path: Path
) -> None:
    daemon = embedded_daemon()
    await daemon.wait_ready(timeout_s=60)
    postmaster = postmaster_pid(embedded_state_dir)
    lock_before = (embedded_state_dir / "daemon.lock").read_bytes()
    rules = embedded_state_dir / "postgres" / "pg_hba.conf"
    rules_before = rules.stat().st_mtime_ns
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[[models]]\nname = "from-a-file"\nvram = 1234\n')
    state = embedded_state_dir
    async with ReadinessWatch(daemon.url) as watch, aiohttp.ClientSession() as session:
        listed = await asyncio.to_thread(run_cli, state, "models", "list")
        assert listed.returncode == 0, listed.stderr
        assert "large-v3" in listed.stdout
        added = await asyncio.to_thread(run_cli, state, "models", "add", "beside-it", "4321")
        assert added.returncode == 0, added.stderr
        # The daemon hears of it at once (its LISTEN), not at its next reload.
        await eventually(lambda: _names(session, daemon.url), lambda n: "beside-it" in n)
        applied = await asyncio.to_thread(run_cli, state, "models", "apply", str(catalog))
        assert applied.returncode == 0, applied.stderr
        await eventually(lambda: _names(session, daemon.url), lambda n: "from-a-file" in n)
        exported = await asyncio.to_thread(run_cli, state, "models", "export")
        assert exported.returncode == 0 and "beside-it" in exported.stdout, exported.stderr
        migrated = await asyncio.to_thread(run_cli, state, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert watch.polls > 5
    assert watch.failures == []
    assert postmaster_pid(embedded_state_dir) == postmaster  # never stopped nor restarted
    assert (embedded_state_dir / "daemon.lock").read_bytes() == lock_before
    assert rules.stat().st_mtime_ns == rules_before  # its access rules were not rewritten
    for result in (listed, added, applied, exported, migrated):
        assert "previous run left" not in result.stderr
    log = daemon.log()
    assert "embedded postgresql exited" not in log and "database unavailable" not in log


async def test_a_command_without_a_daemon_runs_its_own_server_and_stops_it(
    embedded_state_dir: Path,
) -> None:
    result = await asyncio.to_thread(run_cli, embedded_state_dir, "models", "list")
    assert result.returncode == 0, result.stderr
    assert not (embedded_state_dir / "postgres" / "postmaster.pid").exists()
    # It let go of the state directory: a daemon (here, the lock alone) may take it.
    lock = StateLock(embedded_state_dir)
    assert lock.try_acquire("daemon") is None
    lock.release()


async def test_a_daemon_waits_for_a_command_that_holds_the_state_directory(
    spawn_daemon: SpawnDaemon, tmp_path: Path
) -> None:
    state_dir = tmp_path / "held"
    command = StateLock(state_dir)
    assert command.try_acquire("command models apply") is None
    daemon = spawn_daemon(MODEL_REGISTRY_STATE_DIR=str(state_dir))
    try:
        await eventually(
            daemon.log,
            lambda log: "waiting for `model-registry models apply`" in log,
            timeout_s=30,
        )
        assert daemon.process.poll() is None
    finally:
        command.release()
    await daemon.wait_ready(timeout_s=30)
    # The lock names its holder without stray bytes.
    assert (state_dir / "daemon.lock").read_text() == f"{daemon.process.pid} daemon\n"
    # A second daemon is refused at once, naming the first.
    second = spawn_daemon(MODEL_REGISTRY_STATE_DIR=str(state_dir))
    assert second.wait_exit(timeout_s=30) == 1
    assert f"another model-registry daemon (pid {daemon.process.pid})" in second.log()


def test_the_access_rules_let_in_the_daemons_user_and_root_only(embedded_state_dir: Path) -> None:
    import pwd

    server = EmbeddedPostgres(embedded_state_dir / "postgres")
    server.start_blocking()
    try:
        ident = (embedded_state_dir / "postgres" / "pg_ident.conf").read_text()
    finally:
        server.stop_blocking()
    me = pwd.getpwuid(os.geteuid()).pw_name
    mapped = {line.split()[1] for line in ident.splitlines() if not line.startswith("#")}
    assert mapped == {me, "root"}


def test_another_user_is_told_whom_to_run_the_command_as(
    embedded_state_dir: Path, tmp_path: Path
) -> None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to act as another user")
    probe = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", "import registry"],
        capture_output=True,
        cwd="/",
    )
    if probe.returncode != 0:
        pytest.skip("this Python is not readable by an ordinary user (e.g. under /root)")
    embedded_state_dir.mkdir(mode=0o700)
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-m", "registry", "models", "list"],
        env={**os.environ, "MODEL_REGISTRY_STATE_DIR": str(embedded_state_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 1
    assert "as that user or as root (sudo)" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_daemon_brings_its_embedded_server_back_and_loses_nothing_acknowledged(
    embedded_daemon: Callable[[], Daemon], embedded_state_dir: Path
) -> None:
    daemon = embedded_daemon()
    await daemon.wait_ready(timeout_s=60)
    acknowledged_models: list[str] = []
    acknowledged_reservations: list[str] = []
    stop = asyncio.Event()

    async def keep_writing(session: aiohttp.ClientSession) -> None:
        number = 0
        while not stop.is_set():
            number += 1
            name = f"written-{number}"
            async with session.post(
                f"{daemon.url}/models", json={"name": name, "vram": 100}, headers=AS_ADMIN
            ) as answer:
                if answer.status == 201:
                    acknowledged_models.append(name)
            async with session.post(
                f"{daemon.url}/reservations",
                json={"vram_mib": 1, "ttl_s": 600, "holder": name},
                headers=AS_SCHEDULER,
            ) as answer:
                if answer.status == 201:
                    acknowledged_reservations.append((await answer.json())["id"])

    async with aiohttp.ClientSession() as session:
        writer = asyncio.create_task(keep_writing(session))
        try:
            for kill in range(3):
                before = len(acknowledged_models)
                await eventually(lambda b=before: len(acknowledged_models) > b + 3, timeout_s=10)
                pid = postmaster_pid(embedded_state_dir)
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()

                async def ready_again(p: int = pid) -> bool:
                    async with session.get(f"{daemon.url}/readyz") as response:
                        return response.status == 200 and postmaster_pid(embedded_state_dir) != p

                await eventually(ready_again, timeout_s=10, step_s=0.05)
                assert time.monotonic() - killed_at < 10, f"kill {kill + 1}"
                # Writes go through again on the same pool, without a daemon restart.
                after = len(acknowledged_models)
                await eventually(lambda a=after: len(acknowledged_models) > a, timeout_s=10)
        finally:
            stop.set()
            await writer
        assert daemon.process.poll() is None
        names = await _names(session, daemon.url)
        async with session.get(f"{daemon.url}/reservations") as response:
            open_ids = {r["id"] for r in (await response.json())["data"]}
        async with session.get(f"{daemon.url}/metrics") as response:
            metrics = await response.text()
    assert set(acknowledged_models) <= set(names)
    assert set(acknowledged_reservations) <= open_ids
    # And in the database itself, read by a command through the daemon's server.
    listed = await asyncio.to_thread(run_cli, embedded_state_dir, "models", "export")
    assert listed.returncode == 0, listed.stderr
    assert all(f'name = "{name}"' in listed.stdout for name in acknowledged_models)
    assert "model_registry_embedded_postgres_restarts_total 3.0" in metrics
    log = daemon.log()
    assert log.count("the embedded postgresql exited") == 3
    assert log.count("the embedded postgresql is back") == 3


async def test_backup_and_restore_beside_a_serving_daemon_and_into_a_shared_server(
    embedded_daemon: Callable[[], Daemon],
    embedded_state_dir: Path,
    tmp_path: Path,
    database_url: str,
) -> None:
    from registry.embedded import recorded_server
    from tests.db import execute, fetch

    daemon = embedded_daemon()
    await daemon.wait_ready(timeout_s=60)
    dsn = recorded_server(embedded_state_dir)
    assert dsn is not None
    samples = "SELECT model, peak_mib FROM footprint_samples ORDER BY 1"
    await execute(
        dsn,
        "INSERT INTO footprint_samples (instance_id, model, gpu_name, peak_mib, host) "
        "VALUES ('i-1', 'medium', 'H200', 3000, 'here')",
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{daemon.url}/models", json={"name": "kept", "vram": 111}, headers=AS_ADMIN
        ) as answer:
            kept = await answer.json()
        backup = tmp_path / "registry.backup"
        made = await asyncio.to_thread(run_cli, embedded_state_dir, "backup", str(backup))
        assert made.returncode == 0, made.stderr
        assert backup.stat().st_mode & 0o777 == 0o600
        # Life goes on: a model removed, another added, the samples gone.
        async with session.delete(f"{daemon.url}/models/{kept['id']}", headers=AS_ADMIN):
            pass
        async with session.post(
            f"{daemon.url}/models", json={"name": "after", "vram": 222}, headers=AS_ADMIN
        ):
            pass
        await execute(dsn, "DELETE FROM footprint_samples")
        unconfirmed = await asyncio.to_thread(run_cli, embedded_state_dir, "restore", str(backup))
        assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr
        assert "after" in await _names(session, daemon.url)  # nothing changed
        async with ReadinessWatch(daemon.url) as watch:
            restored = await asyncio.to_thread(
                run_cli, embedded_state_dir, "restore", str(backup), "--yes"
            )
            assert restored.returncode == 0, restored.stderr
            # The serving daemon reads it all again at once.
            names = await eventually(
                lambda: _names(session, daemon.url), lambda n: "kept" in n and "after" not in n
            )
        assert watch.failures == []
        async with session.get(f"{daemon.url}/models?name=kept") as answer:
            assert (await answer.json())["data"][0]["id"] == kept["id"]  # the same id
    assert "large-v3" in names
    assert [(r["model"], r["peak_mib"]) for r in await fetch(dsn, samples)] == [("medium", 3000)]
    # Moving to a shared PostgreSQL: the same backup restored there keeps ids and samples.
    moved = await asyncio.to_thread(
        run_cli,
        embedded_state_dir,
        "restore",
        str(backup),
        "--yes",
        MODEL_REGISTRY_DATABASE_URL=database_url,
    )
    assert moved.returncode == 0, moved.stderr
    rows = await fetch(database_url, "SELECT id, name FROM models WHERE name = 'kept'")
    assert [(r["id"], r["name"]) for r in rows] == [(kept["id"], "kept")]
    assert [(r["model"], r["peak_mib"]) for r in await fetch(database_url, samples)] == [
        ("medium", 3000)
    ]
