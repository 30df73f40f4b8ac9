"""Numbered SQL migrations, each applied once in its own transaction under an advisory lock.

A migration whose first line is `-- compatible: ...` only adds (a column with a default, a
table, an index): daemons that do not know it keep working on it. A daemon refuses a database
that holds migrations newer than its code, unless every one of them was compatible; then it
starts and says so. That is what lets a fleet on one PostgreSQL upgrade host by host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from registry.logs import get_logger

log = get_logger("registry.migrations")

# Any constant unique to this application; pg_advisory_lock takes a bigint.
MIGRATION_LOCK_KEY = 0x6D6F64656C726567  # "modelreg"
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_COMPATIBLE_MARK = "-- compatible:"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def compatible(self) -> bool:
        """Whether older daemons may run on a database that has this migration."""
        return self.sql.lstrip().startswith(_COMPATIBLE_MARK)


class DatabaseTooNew(Exception):
    """The database holds migrations this code does not know."""


class FleetStillUp(Exception):
    """A migration that running daemons cannot follow, while fleet hosts are up."""


def migrations_dir() -> Path:
    # Installed wheel: shipped as registry/sql. Source checkout: the repository's sql/.
    packaged = Path(str(resources.files("registry"))) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name not of the form NNNN_name.sql: {path.name}")
        found.append(Migration(int(match.group(1)), path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a number in {directory}")
    if not found:
        raise ValueError(f"no migrations found in {directory}")
    return found


async def applied_versions(conn: asyncpg.Connection) -> set[int]:
    return set(await _applied(conn))


async def _applied(conn: asyncpg.Connection) -> dict[int, bool]:
    """Applied versions, each with whether older daemons may run on it."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    has_flag = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
        "WHERE table_name = 'schema_migrations' AND column_name = 'compatible')"
    )
    flag = "compatible" if has_flag else "false"
    rows = await conn.fetch(f"SELECT version, {flag} AS compatible FROM schema_migrations")
    return {row["version"]: row["compatible"] for row in rows}


def _newer(applied: dict[int, bool], migrations: list[Migration]) -> tuple[list[int], list[int]]:
    """Applied versions this code does not know: (compatible ones, the others)."""
    known = {m.version for m in migrations}
    newer = sorted(v for v in applied if v not in known)
    return [v for v in newer if applied[v]], [v for v in newer if not applied[v]]


async def migrate(
    dsn: str,
    migrations: list[Migration] | None = None,
    *,
    host_id: str | None = None,
    force: bool = False,
) -> list[str]:
    """Apply pending migrations; return the names applied. Raise DatabaseTooNew, or
    FleetStillUp for a migration not marked compatible while fleet hosts (other than
    `host_id`, the daemon asking) are up, unless `force`."""
    migrations = migrations if migrations is not None else load_migrations()
    # A dedicated connection: a session-level advisory lock must not go back to a pool.
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            applied = await _prepare(conn)
            _refuse_a_newer_database(applied, migrations)
            if not force:
                await _refuse_under_a_live_fleet(conn, migrations, applied, host_id)
            return await _apply_pending(conn, migrations, applied)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def _prepare(conn: asyncpg.Connection) -> dict[int, bool]:
    """The migrations table, made when missing; what it says is applied."""
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    await conn.execute(
        "ALTER TABLE schema_migrations "
        "ADD COLUMN IF NOT EXISTS compatible boolean NOT NULL DEFAULT false"
    )
    return await _applied(conn)


_LIVE_HOSTS = """
SELECT host FROM fleet_hosts
 WHERE stopped_at IS NULL
   AND now() - heartbeat_at <= 3 * heartbeat_interval_s * interval '1 second'
   AND host IS DISTINCT FROM $1
 ORDER BY host
"""


async def _refuse_under_a_live_fleet(
    conn: asyncpg.Connection,
    migrations: list[Migration],
    applied: dict[int, bool],
    host_id: str | None,
) -> None:
    breaking = [m.name for m in migrations if m.version not in applied and not m.compatible]
    if not breaking or not applied:  # a new database has no fleet to break
        return
    if not await conn.fetchval("SELECT to_regclass('fleet_hosts') IS NOT NULL"):
        return
    hosts = [row["host"] for row in await conn.fetch(_LIVE_HOSTS, host_id)]
    if hosts:
        raise FleetStillUp(
            f"migration(s) {breaking} change the schema in a way running daemons cannot follow, "
            f"and these fleet hosts are up: {', '.join(hosts)}. Stop their daemons "
            "(systemctl stop model-registry), then migrate; or run `model-registry migrate "
            "--force` to apply it now (those hosts go not ready until they are upgraded)"
        )


def _refuse_a_newer_database(applied: dict[int, bool], migrations: list[Migration]) -> None:
    latest_known = max(m.version for m in migrations)
    compatible, breaking = _newer(applied, migrations)
    if breaking:
        raise DatabaseTooNew(
            f"the database has migration(s) {breaking} but this model-registry knows only up to "
            f"{latest_known}; upgrade model-registry or point it at another database"
        )
    if compatible:
        log.warning(
            "the database is newer than this model-registry, in compatible steps only: "
            "running on it; upgrade this host when you can",
            newer_migrations=compatible,
            known_up_to=latest_known,
        )


async def _apply_pending(
    conn: asyncpg.Connection, migrations: list[Migration], applied: dict[int, bool]
) -> list[str]:
    done = []
    for migration in migrations:
        if migration.version in applied:
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, compatible) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.compatible,
            )
        log.info("migration applied", migration=migration.name)
        done.append(migration.name)
    return done


async def pending_problem(conn: asyncpg.Connection, migrations: list[Migration]) -> str | None:
    """None when the schema matches this code, else what is wrong (for /readyz)."""
    applied = await _applied(conn)
    known = {m.version for m in migrations}
    if missing := sorted(known - applied.keys()):
        return f"migrations not applied: {missing}"
    _compatible, breaking = _newer(applied, migrations)
    if breaking:
        return f"database has unknown migrations: {breaking}"
    return None
