"""Short-lived connections to a test database, for setting up and inspecting state."""

from __future__ import annotations

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
