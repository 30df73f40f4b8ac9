"""Plain SQL over footprint_samples. A change is announced with NOTIFY (the model's name)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from registry.footprint import RECENT_SAMPLES, Observed

CHANNEL = "model_registry_footprints"
RELOAD_ALL = "*"  # a payload that names no model: read every model's footprints again
KEPT_PER_KEY = 100


@dataclass(frozen=True, slots=True)
class Sample:
    """One instance's peak: what one load of `model` took on a `gpu_name` device."""

    instance_id: str
    model: str
    gpu_name: str
    peak_mib: int
    host: str


@dataclass(frozen=True, slots=True)
class LoadSample:
    """How long one load of `model` took on a `gpu_name` device, to `ready`."""

    instance_id: str
    model: str
    gpu_name: str
    load_s: float
    host: str


_RECORD_LOADS = """
INSERT INTO load_samples (instance_id, model, gpu_name, load_s, host)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::real[], $5::text[])
ON CONFLICT (instance_id) DO NOTHING
"""
_RECORD = """
INSERT INTO footprint_samples (instance_id, model, gpu_name, peak_mib, host)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[])
ON CONFLICT (instance_id) DO UPDATE
   SET peak_mib = GREATEST(footprint_samples.peak_mib, EXCLUDED.peak_mib), recorded_at = now()
"""


def _prune(table: str) -> str:
    """Keep the newest $2 rows per model and product of the models in $1."""
    return f"""
DELETE FROM {table} AS s
 USING (SELECT instance_id,
               row_number() OVER (PARTITION BY model, gpu_name
                                  ORDER BY recorded_at DESC, instance_id) AS n
          FROM {table} WHERE model = ANY($1::text[])) AS ranked
 WHERE s.instance_id = ranked.instance_id AND ranked.n > $2
"""


_PRUNE = _prune("footprint_samples")
_PRUNE_LOADS = _prune("load_samples")
_SUMMARY = f"""
WITH ranked AS (
    SELECT model, gpu_name, peak_mib, recorded_at,
           row_number() OVER (PARTITION BY model, gpu_name
                              ORDER BY recorded_at DESC, instance_id) AS n
      FROM footprint_samples
     WHERE $1::text[] IS NULL OR model = ANY($1::text[])
), sizes AS (
    SELECT model, gpu_name, count(*) AS samples, max(peak_mib) AS peak_mib,
           max(recorded_at) AS updated_at,
           percentile_disc(0.95) WITHIN GROUP (ORDER BY peak_mib)
               FILTER (WHERE n <= {RECENT_SAMPLES}) AS p95_mib,
           count(*) FILTER (WHERE n <= {RECENT_SAMPLES}) AS recent
      FROM ranked
     GROUP BY model, gpu_name
), ranked_loads AS (
    SELECT model, gpu_name, load_s, recorded_at,
           row_number() OVER (PARTITION BY model, gpu_name
                              ORDER BY recorded_at DESC, instance_id) AS n
      FROM load_samples
     WHERE $1::text[] IS NULL OR model = ANY($1::text[])
), loads AS (
    SELECT model, gpu_name, count(*) AS loads, max(recorded_at) AS updated_at,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY load_s)
               FILTER (WHERE n <= {RECENT_SAMPLES}) AS reload_s
      FROM ranked_loads
     GROUP BY model, gpu_name
)
SELECT coalesce(s.model, l.model) AS model, coalesce(s.gpu_name, l.gpu_name) AS gpu_name,
       coalesce(s.samples, 0) AS samples, s.peak_mib, s.p95_mib, coalesce(s.recent, 0) AS recent,
       greatest(s.updated_at, l.updated_at) AS updated_at,
       coalesce(l.loads, 0) AS loads, l.reload_s
  FROM sizes AS s FULL JOIN loads AS l USING (model, gpu_name)
 ORDER BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class ProductSummary:
    model: str
    gpu_name: str
    samples: int
    peak_mib: int | None  # None: no footprint sample yet, only load times
    p95_mib: int | None
    recent: int
    updated_at: datetime
    loads: int = 0
    reload_s: float | None = None  # median of the newest load times

    def observed(self) -> Observed:
        return Observed(self.p95_mib, self.recent, self.reload_s)

    def to_api(self) -> dict[str, Any]:
        return {
            "gpu_name": self.gpu_name,
            "samples": self.samples,
            "peak_mib": self.peak_mib,
            "p95_mib": self.p95_mib,
            "updated_at": self.updated_at.isoformat(),
            "loads": self.loads,
            "reload_s": None if self.reload_s is None else round(self.reload_s, 3),
        }


class FootprintStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, samples: Sequence[Sample], loads: Sequence[LoadSample] = ()) -> None:
        """Write samples (a peak only grows) and load times, keep the newest per key,
        announce the models."""
        models = sorted({s.model for s in samples} | {s.model for s in loads})
        batches = (
            (_RECORD, _PRUNE, [(s.peak_mib, s) for s in samples]),
            (_RECORD_LOADS, _PRUNE_LOADS, [(s.load_s, s) for s in loads]),
        )
        async with self._pool.acquire() as conn, conn.transaction():
            for record, prune, rows in batches:
                if not rows:
                    continue
                await conn.execute(
                    record,
                    [s.instance_id for _value, s in rows],
                    [s.model for _value, s in rows],
                    [s.gpu_name for _value, s in rows],
                    [value for value, _s in rows],
                    [s.host for _value, s in rows],
                )
                await conn.execute(prune, models, KEPT_PER_KEY)
            for model in models:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, model)

    async def summaries(self, models: list[str] | None = None) -> list[ProductSummary]:
        """Per (model, GPU product): samples kept, largest peak, p95 of the newest, when."""
        rows = await self._pool.fetch(_SUMMARY, models)
        return [
            ProductSummary(
                r["model"],
                r["gpu_name"],
                r["samples"],
                r["peak_mib"],
                r["p95_mib"],
                r["recent"],
                r["updated_at"],
                r["loads"],
                r["reload_s"],
            )
            for r in rows
        ]

    async def forget(self, model: str) -> int:
        """Discard a model's samples (its serving setup changed); how many there were."""
        async with self._pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetch(
                "DELETE FROM footprint_samples WHERE model = $1 RETURNING instance_id", model
            )
            await conn.execute("DELETE FROM load_samples WHERE model = $1", model)
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, model)
        return len(deleted)
