"""Plain SQL over footprint_samples. A change is announced with NOTIFY (the model's name)."""

from __future__ import annotations

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


_RECORD = """
INSERT INTO footprint_samples (instance_id, model, gpu_name, peak_mib, host)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[])
ON CONFLICT (instance_id) DO UPDATE
   SET peak_mib = GREATEST(footprint_samples.peak_mib, EXCLUDED.peak_mib), recorded_at = now()
"""
_PRUNE = """
DELETE FROM footprint_samples AS s
 USING (SELECT instance_id,
               row_number() OVER (PARTITION BY model, gpu_name
                                  ORDER BY recorded_at DESC, instance_id) AS n
          FROM footprint_samples WHERE model = ANY($1::text[])) AS ranked
 WHERE s.instance_id = ranked.instance_id AND ranked.n > $2
"""
_SUMMARY = f"""
WITH ranked AS (
    SELECT model, gpu_name, peak_mib, recorded_at,
           row_number() OVER (PARTITION BY model, gpu_name
                              ORDER BY recorded_at DESC, instance_id) AS n
      FROM footprint_samples
     WHERE $1::text[] IS NULL OR model = ANY($1::text[])
)
SELECT model, gpu_name, count(*) AS samples, max(peak_mib) AS peak_mib,
       max(recorded_at) AS updated_at,
       percentile_disc(0.95) WITHIN GROUP (ORDER BY peak_mib)
           FILTER (WHERE n <= {RECENT_SAMPLES}) AS p95_mib,
       count(*) FILTER (WHERE n <= {RECENT_SAMPLES}) AS recent
  FROM ranked
 GROUP BY model, gpu_name
 ORDER BY model, gpu_name
"""


@dataclass(frozen=True, slots=True)
class ProductSummary:
    model: str
    gpu_name: str
    samples: int
    peak_mib: int
    p95_mib: int
    recent: int
    updated_at: datetime

    def observed(self) -> Observed:
        return Observed(self.p95_mib, self.recent)

    def to_api(self) -> dict[str, Any]:
        return {
            "gpu_name": self.gpu_name,
            "samples": self.samples,
            "peak_mib": self.peak_mib,
            "p95_mib": self.p95_mib,
            "updated_at": self.updated_at.isoformat(),
        }


class FootprintStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, samples: list[Sample]) -> None:
        """Write samples (a peak only grows), keep the newest per key, announce the models."""
        models = sorted({s.model for s in samples})
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                _RECORD,
                [s.instance_id for s in samples],
                [s.model for s in samples],
                [s.gpu_name for s in samples],
                [s.peak_mib for s in samples],
                [s.host for s in samples],
            )
            await conn.execute(_PRUNE, models, KEPT_PER_KEY)
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
            )
            for r in rows
        ]

    async def forget(self, model: str) -> int:
        """Discard a model's samples (its serving setup changed); how many there were."""
        async with self._pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetch(
                "DELETE FROM footprint_samples WHERE model = $1 RETURNING instance_id", model
            )
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, model)
        return len(deleted)
