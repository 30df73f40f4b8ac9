"""The shape of GET /models/{id}/footprint."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class ProductFootprintOut(BaseModel):
    gpu_name: str = Field(description="The GPU product (a MIG slice counts as its parent's).")
    samples: int = Field(description="Samples kept (the newest 100).")
    peak_mib: int | None = Field(description="The largest peak among them (null: none yet).")
    p95_mib: int | None = Field(description="p95 of the newest 20: the observed size.")
    updated_at: datetime
    loads: int = Field(description="Load times kept (the newest 100).")
    reload_s: float | None = Field(
        description="Median of the newest 20 load times, to ready (null: none yet)."
    )
    below_declared: bool = Field(
        description="The observed size is more than 30% below the declared one (logged, alerted)."
    )


class FootprintOut(BaseModel):
    model: str
    declared_mib: int
    effective_mib: int = Field(description="What admission books, on the placement's product.")
    source: Literal["max", "declared", "observed"] = Field(
        description="MODEL_REGISTRY_VRAM_SOURCE of this daemon."
    )
    floor_mib: int = Field(
        description="The least admission books under source observed: declared x (1 - "
        "MODEL_REGISTRY_FOOTPRINT_MAX_SHRINK)."
    )
    learn: bool
    reload_s: float = Field(description="How long a load takes, on the placement's product.")
    reload_estimated: bool = Field(
        description="reload_s is an estimate (1 s per GiB booked): no load time learned yet."
    )
    observed: list[ProductFootprintOut]
