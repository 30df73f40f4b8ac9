"""Where the catalog lives: a configured PostgreSQL server, or an embedded one in the state dir."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from registry.embedded import EmbeddedDatabaseError, EmbeddedPostgres, recorded_server
from registry.embedded_supervisor import EmbeddedSupervisor
from registry.logs import get_logger
from registry.migrations import load_migrations, migrate, pending_problem
from registry.state_dir import Holder, StateLock

log = get_logger("registry.database")

# Errors that mean "the server is not reachable right now", as opposed to a bad query.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # What asyncpg raises when the server ends a session in the middle of an operation (a
    # restart): the connection is unusable, as when it is refused (asyncpg issue 1069).
    asyncpg.InternalClientError,
)

_CLOSE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *UNAVAILABLE_ERRORS)


def redact_dsn(dsn: str) -> str:
    """The URL with its passwords replaced (in the user info and in a `password` query
    parameter), for log lines and error messages."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable database URL>"
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    if parts.query:
        query = [
            (key, "***" if key.lower() in ("password", "sslpassword") else value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*/"))
    return urlunsplit(parts)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 8) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=10,
        timeout=5,
    )


class DatabaseUnavailable(Exception):
    """The database cannot be reached at start-up; the message names it, password redacted."""


@dataclass(frozen=True)
class Server:
    """The database a daemon serves from: its DSN, and the embedded server it started (to be
    looked after), if any."""

    dsn: str
    embedded: EmbeddedPostgres | None = None


async def _migrate(dsn: str, host_id: str | None = None, force: bool = False) -> None:
    log.info("connecting to the database", dsn=redact_dsn(dsn))
    try:
        applied = await migrate(dsn, host_id=host_id, force=force)
    except UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot reach {redact_dsn(dsn)}: {exc}") from exc
    if applied:
        log.info("database migrated", applied=applied)


@contextlib.asynccontextmanager
async def migrated_database(
    database_url: str | None,
    state_dir: Path,
    *,
    host_id: str | None = None,
    force: bool = False,
) -> AsyncIterator[Server]:
    """The configured database, or an embedded one in `state_dir`, migrated (as fleet host
    `host_id`, for a daemon; `force` applies even what live fleet hosts cannot follow).

    The caller holds the state directory (registry.state_dir.StateLock). An embedded server
    started here is stopped on the way out.
    """
    embedded = None
    if database_url is None:
        embedded = EmbeddedPostgres(state_dir / "postgres")
        dsn = await embedded.start()
    else:
        dsn = database_url
    try:
        await _migrate(dsn, host_id, force)
        yield Server(dsn, embedded)
    finally:
        if embedded is not None:
            await embedded.stop()


@contextlib.asynccontextmanager
async def command_database(
    database_url: str | None, state_dir: Path, command: str, *, force: bool = False
) -> AsyncIterator[str]:
    """The database a command works on, migrated; yields its DSN.

    The configured one; else the embedded server of the daemon that holds `state_dir`,
    reached through its socket and left as it is; else, when no daemon runs there, an
    embedded server started for this command alone, holding the state directory meanwhile
    (a daemon that starts then waits for it).
    """
    if database_url is not None:
        async with migrated_database(database_url, state_dir, force=force) as server:
            yield server.dsn
        return
    lock = StateLock(state_dir)

    def waiting(holder: Holder) -> None:
        log.info(f"waiting for {holder} to let go of the state directory")

    daemon = await asyncio.to_thread(lock.take, f"command {command}", on_wait=waiting)
    if daemon is None:
        try:
            async with migrated_database(None, state_dir, force=force) as server:
                yield server.dsn
        finally:
            lock.release()
        return
    dsn = recorded_server(state_dir)
    if dsn is None:
        raise EmbeddedDatabaseError(
            f"{daemon} holds the state directory {state_dir} but runs no embedded PostgreSQL "
            "there: it is starting or stopping (try again), or it uses a server of its own "
            "(give this command the same MODEL_REGISTRY_DATABASE_URL)"
        )
    try:
        await _migrate(dsn, force=force)
    except asyncpg.InvalidAuthorizationSpecificationError:
        raise EmbeddedDatabaseError(
            f"the embedded PostgreSQL of {daemon} lets in only the daemon's own user and "
            "root: run this as that user, or with sudo"
        ) from None
    yield dsn


class Database:
    """The connection pool; features build their stores on it."""

    def __init__(
        self, dsn: str, pool: asyncpg.Pool, supervisor: EmbeddedSupervisor | None = None
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.supervisor = supervisor

    async def problems(self, timeout_s: float = 2.0) -> list[str]:
        """What keeps the database from serving this code; empty when all is well."""
        if self.supervisor is not None and (problem := self.supervisor.problem) is not None:
            return [problem]
        try:
            async with asyncio.timeout(timeout_s), self.pool.acquire() as conn:
                problem = await pending_problem(conn, load_migrations())
        except UNAVAILABLE_ERRORS as exc:
            return [f"database unreachable: {type(exc).__name__}: {exc}"]
        except asyncpg.PostgresError as exc:
            return [f"database error: {exc}"]
        return [] if problem is None else [problem]

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), timeout=5)
        except _CLOSE_ERRORS:
            self.pool.terminate()
