"""Numbered migrations: once each, safe under concurrency, and a refusal to run on newer data."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from registry import keys
from registry.migrations import (
    DatabaseTooNew,
    FleetStillUp,
    load_migrations,
    migrate,
    migrations_dir,
    pending_problem,
)
from tests.conftest import AppClient, LogLines
from tests.db import execute, fetch


async def _applied(dsn: str) -> list[tuple[int, str]]:
    rows = await fetch(dsn, "SELECT version, name FROM schema_migrations ORDER BY version")
    return [(r["version"], r["name"]) for r in rows]


def test_migration_files_are_numbered_and_found() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations_dir().name == "sql"


async def test_migrate_applies_everything_once_and_is_idempotent(empty_database_url: str) -> None:
    first = await migrate(empty_database_url)
    assert first == [m.name for m in load_migrations()]
    assert await migrate(empty_database_url) == []
    assert [v for v, _ in await _applied(empty_database_url)] == [
        m.version for m in load_migrations()
    ]


async def test_concurrent_migrations_apply_each_file_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(migrate(empty_database_url) for _ in range(4)))
    applied_names = [name for result in results for name in result]
    assert sorted(applied_names) == sorted(m.name for m in load_migrations())
    assert len(await _applied(empty_database_url)) == len(load_migrations())


def test_two_concurrent_migrate_commands(empty_database_url: str) -> None:
    env = {**os.environ, "MODEL_REGISTRY_DATABASE_URL": empty_database_url}
    commands = [
        subprocess.Popen(
            [sys.executable, "-m", "registry", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outputs = [command.communicate(timeout=60)[0].decode() for command in commands]
    assert [command.returncode for command in commands] == [0, 0], outputs
    combined = "".join(outputs)
    for migration in load_migrations():
        assert combined.count(f'"migration": "{migration.name}"') == 1, combined
    assert len(asyncio.run(_applied(empty_database_url))) == len(load_migrations())


async def test_a_failing_migration_leaves_nothing_behind(
    empty_database_url: str, tmp_path: Path
) -> None:
    good = load_migrations()
    (tmp_path / "0001_catalog.sql").write_text(good[0].sql)
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE half_done (x int); SELECT nonsense;")
    with pytest.raises(asyncpg.PostgresError):
        await migrate(empty_database_url, load_migrations(tmp_path))
    [row] = await fetch(empty_database_url, "SELECT to_regclass('half_done') AS found")
    assert row["found"] is None
    assert [v for v, _ in await _applied(empty_database_url)] == [1]


_FROM_THE_FUTURE = "INSERT INTO schema_migrations (version, name) VALUES (9999, '9999_future')"


async def test_refuses_a_database_newer_than_the_code(database_url: str) -> None:
    await execute(database_url, _FROM_THE_FUTURE)
    with pytest.raises(DatabaseTooNew, match="9999"):
        await migrate(database_url)


def test_serve_refuses_a_newer_database_with_a_clear_message(database_url: str) -> None:
    asyncio.run(execute(database_url, _FROM_THE_FUTURE))
    env = {
        **os.environ,
        "MODEL_REGISTRY_DATABASE_URL": database_url,
        "MODEL_REGISTRY_GPU_BACKEND": "none",
    }
    result = subprocess.run(
        [sys.executable, "-m", "registry", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "9999" in result.stderr
    assert "upgrade model-registry" in result.stderr
    assert "Traceback" not in result.stderr


async def test_an_older_daemon_runs_on_a_database_whose_newer_migrations_are_compatible(
    database_url: str, start_app: AppClient, json_lines: LogLines
) -> None:
    every = load_migrations()
    assert every[-1].compatible, "the newest migration only adds: older daemons keep working"
    older = every[:-1]  # the code of a daemon one release behind
    assert await migrate(database_url, older) == []
    assert any(
        line["event"].startswith("the database is newer than this model-registry")
        and line["newer_migrations"] == [every[-1].version]
        for line in json_lines()
    )
    conn = await asyncpg.connect(database_url)
    try:
        assert await pending_problem(conn, older) is None  # /readyz stays ready
    finally:
        await conn.close()
    # A real daemon on a database with a compatible migration it has never heard of.
    await execute(
        database_url,
        "INSERT INTO schema_migrations (version, name, compatible) VALUES (9998, '9998_x', true)",
    )
    client = await start_app(database_url=database_url)
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/models")).status == 200


async def test_a_migration_running_daemons_cannot_follow_waits_for_the_fleet_or_force(
    database_url: str, start_app: AppClient, tmp_path: Path
) -> None:
    every = load_migrations()
    for migration in every:
        (tmp_path / f"{migration.name}.sql").write_text(migration.sql)
    (tmp_path / "0098_adds.sql").write_text(
        "-- compatible: a new table.\nCREATE TABLE added_by_0098 (x int);\n"
    )
    (tmp_path / "0099_breaks.sql").write_text(
        "ALTER TABLE models RENAME COLUMN vram TO vram_mib;\n"
    )
    newer = load_migrations(tmp_path)
    # Two hosts serve from this database.
    serving = [await start_app(database_url=database_url) for _ in range(2)]
    names = sorted(client.app[keys.SETTINGS].current.host_id for client in serving)
    with pytest.raises(FleetStillUp, match=rf"0099_breaks.*{names[0]}, {names[1]}.*--force"):
        await migrate(database_url, newer)
    # Refused as a whole: not even the compatible one before it went in.
    assert max(v for v, _ in await _applied(database_url)) == every[-1].version
    # The daemon asking does not count itself; the other host still does.
    with pytest.raises(FleetStillUp, match=names[1]):
        await migrate(database_url, newer, host_id=names[0])
    # Once the hosts are stopped (their rows say so), it applies; or with force, at once.
    await serving[0].close()
    with pytest.raises(FleetStillUp, match=names[1]):
        await migrate(database_url, newer)
    assert await migrate(database_url, newer, force=True) == ["0098_adds", "0099_breaks"]


def test_the_migrate_command_takes_force(database_url: str) -> None:
    env = {**os.environ, "MODEL_REGISTRY_DATABASE_URL": database_url}
    result = subprocess.run(
        [sys.executable, "-m", "registry", "migrate", "--force"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "schema is current" in result.stdout


@pytest.mark.parametrize(
    ("name", "vram"),
    [
        ("", 1),
        ("-dash-first", 1),
        ("has space", 1),
        ("x" * 129, 1),
        ("ok", 0),
        ("ok", 10_000_001),
    ],
)
async def test_the_table_itself_refuses_invalid_models(
    database_url: str, name: str, vram: int
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO models (name, vram) VALUES ($1, $2)", name, vram)
        await conn.execute("INSERT INTO models (name, vram) VALUES ('a' || repeat('b', 127), 1)")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO models (name, vram) VALUES ('a' || repeat('b', 127), 2)"
            )
        row = await conn.fetchrow("SELECT enabled, created_at, updated_at FROM models")
        assert row["enabled"] is True and row["created_at"] is not None
        assert row["updated_at"] is None
    finally:
        await conn.close()
