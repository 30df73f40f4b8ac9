"""Plain SQL over the catalog tables. Every read and write of the catalog goes through here."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from registry.catalog.document import CatalogEntry
from registry.catalog.plan import Plan, plan_apply
from registry.model import CatalogModel

_COLUMNS = "id, name, vram, enabled, created_at, updated_at, learn"
_SEED_LOCK_KEY = 0x6D6F64656C736564  # "modelsed"
_SEEDED_KEY = "default_catalog_seeded"
CHANNEL = "model_registry_catalog"
# The original system's catalog, inserted once into a new, empty database.
DEFAULT_CATALOG: tuple[tuple[str, int], ...] = (
    ("tiny", 625),
    ("medium", 2500),
    ("large_v1", 5000),
    ("large_v2", 5000),
    ("large-v3", 10000),
)
# NOTIFY payloads must stay under 8000 bytes; a larger change is announced as "*" (reload all).
_MAX_PAYLOAD = 7900


@dataclass(frozen=True, slots=True)
class Applied:
    plan: Plan
    written: list[CatalogModel]  # created and updated rows, as they now are
    deleted_ids: list[int]

    @property
    def changed_ids(self) -> list[int]:
        return [*self.deleted_ids, *(m.id for m in self.written)]


def change_payload(ids: list[int]) -> str:
    """The NOTIFY payload for a change of these models: their ids, or "*" for many."""
    payload = ",".join(map(str, ids))
    return payload if len(payload) <= _MAX_PAYLOAD else "*"


class DuplicateName(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"a model named {name!r} already exists")
        self.name = name


class CatalogStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def list_all(self) -> list[CatalogModel]:
        rows = await self._pool.fetch(f"SELECT {_COLUMNS} FROM models ORDER BY id")
        return [CatalogModel.from_row(row) for row in rows]

    async def get_many(self, ids: Iterable[int]) -> list[CatalogModel]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM models WHERE id = ANY($1::bigint[]) ORDER BY id", list(ids)
        )
        return [CatalogModel.from_row(row) for row in rows]

    async def get(self, model_id: int) -> CatalogModel | None:
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM models WHERE id = $1", model_id)
        return None if row is None else CatalogModel.from_row(row)

    async def get_by_name(self, name: str) -> CatalogModel | None:
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM models WHERE name = $1", name)
        return None if row is None else CatalogModel.from_row(row)

    async def create(
        self, name: str, vram: int, enabled: bool = True, learn: bool = True
    ) -> CatalogModel:
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO models (name, vram, enabled, learn) VALUES ($1, $2, $3, $4)"
                f" RETURNING {_COLUMNS}",
                name,
                vram,
                enabled,
                learn,
            )
        except asyncpg.UniqueViolationError as exc:
            raise DuplicateName(name) from exc
        return CatalogModel.from_row(row)

    async def update(
        self,
        model_id: int,
        *,
        name: str | None = None,
        vram: int | None = None,
        enabled: bool | None = None,
        learn: bool | None = None,
    ) -> CatalogModel | None:
        """Change the given fields (None: leave as is); None when there is no such model."""
        try:
            row = await self._pool.fetchrow(
                f"""
                UPDATE models
                   SET name = COALESCE($2, name),
                       vram = COALESCE($3, vram),
                       enabled = COALESCE($4, enabled),
                       learn = COALESCE($5, learn)
                 WHERE id = $1
             RETURNING {_COLUMNS}
                """,
                model_id,
                name,
                vram,
                enabled,
                learn,
            )
        except asyncpg.UniqueViolationError as exc:
            raise DuplicateName(name or "") from exc
        return None if row is None else CatalogModel.from_row(row)

    async def delete(self, model_id: int) -> bool:
        deleted = await self._pool.fetchval(
            "DELETE FROM models WHERE id = $1 RETURNING id", model_id
        )
        return deleted is not None

    async def apply(self, entries: list[CatalogEntry], *, prune: bool, dry_run: bool) -> Applied:
        """Make the catalog what `entries` say, by name, in one transaction, announced once."""
        async with self._pool.acquire() as conn, conn.transaction():
            # Writers wait, readers do not: the plan stays true until the commit.
            await conn.execute("LOCK TABLE models IN SHARE ROW EXCLUSIVE MODE")
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM models")
            plan = plan_apply((CatalogModel.from_row(r) for r in rows), entries, prune)
            if dry_run or plan.empty:
                return Applied(plan, [], [])
            await conn.execute("SET LOCAL model_registry.bulk_apply = 'on'")
            deleted = await conn.fetch(
                "DELETE FROM models WHERE id = ANY($1::bigint[]) RETURNING id",
                [m.id for m in plan.delete],
            )
            updated = await conn.fetch(
                f"""
                UPDATE models AS m SET vram = u.vram, enabled = u.enabled, learn = u.learn
                  FROM unnest($1::bigint[], $2::int[], $3::bool[], $4::bool[])
                       AS u(id, vram, enabled, learn)
                 WHERE m.id = u.id
             RETURNING {", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))}
                """,
                [u.before.id for u in plan.update],
                [u.vram for u in plan.update],
                [u.enabled for u in plan.update],
                [u.learn for u in plan.update],
            )
            created = await conn.fetch(
                f"""
                INSERT INTO models (name, vram, enabled, learn)
                SELECT name, vram, enabled, learn
                  FROM unnest($1::text[], $2::int[], $3::bool[], $4::bool[])
                       WITH ORDINALITY AS e(name, vram, enabled, learn, position)
                 ORDER BY position
             RETURNING {_COLUMNS}
                """,
                [e.name for e in plan.create],
                [e.vram for e in plan.create],
                [True if e.enabled is None else e.enabled for e in plan.create],
                [True if e.learn is None else e.learn for e in plan.create],
            )
            applied = Applied(
                plan,
                [CatalogModel.from_row(r) for r in (*updated, *created)],
                [r["id"] for r in deleted],
            )
            await conn.execute(
                "SELECT pg_notify($1, $2)", CHANNEL, change_payload(applied.changed_ids)
            )
            return applied

    async def seed_default_catalog(self) -> bool:
        """Insert the default catalog into a new, empty database, once ever.

        Returns whether models were inserted. The marker is written even when the catalog
        was not empty, so models an operator deletes later never come back.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SEED_LOCK_KEY)
            if await conn.fetchval("SELECT 1 FROM registry_meta WHERE key = $1", _SEEDED_KEY):
                return False
            empty = not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM models)")
            if empty:
                await conn.executemany(
                    "INSERT INTO models (name, vram) VALUES ($1, $2)", DEFAULT_CATALOG
                )
            await conn.execute(
                "INSERT INTO registry_meta (key, value) VALUES ($1, $2::jsonb)",
                _SEEDED_KEY,
                json.dumps({"inserted": empty}),
            )
            return empty
