"""Short-lived connections to a test database, for setting up and inspecting state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from registry.embedded import EmbeddedPostgres


async def execute(dsn: str, query: str, *args: Any) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


async def fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def catalog_rows(dsn: str) -> list[Any]:
    """Every row of the catalog, to show that a request changed nothing."""
    return await fetch(dsn, "SELECT * FROM models ORDER BY id")


class StoppableServer:
    """A PostgreSQL server of one test's own, to stop and start again (an outage)."""

    def __init__(self, state_dir: Path) -> None:
        self.server = EmbeddedPostgres(state_dir / "postgres")

    def start(self) -> str:
        return self.server.start_blocking()

    def stop(self) -> None:
        self.server.stop_blocking()

    def stop_if_running(self) -> None:
        if self.server.running:
            self.stop()
