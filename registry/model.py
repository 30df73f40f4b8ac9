"""A catalog model, the domain type every part reads, and the rules for its name and VRAM."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Comma-separated names, as filters take them.
NAME_LIST_PATTERN = rf"^{NAME_PATTERN[1:-1]}(,{NAME_PATTERN[1:-1]})*$"
NAME_MAX_LENGTH = 128
VRAM_MIN_MIB = 1
VRAM_MAX_MIB = 10_000_000


@dataclass(frozen=True, slots=True)
class CatalogModel:
    id: int
    name: str
    vram: int
    enabled: bool
    created_at: datetime
    updated_at: datetime | None
    learn: bool = True  # whether its loads teach its footprint

    @classmethod
    def from_row(cls, row: Any) -> CatalogModel:
        return cls(
            id=row["id"],
            name=row["name"],
            vram=row["vram"],
            enabled=row["enabled"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            learn=row["learn"],
        )
