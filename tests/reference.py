"""What the listing must say, built from the pure capacity rule: the reference for faster paths."""

from __future__ import annotations

from typing import Any

from registry.capacity import Assessment
from registry.model import CatalogModel


def model_object(model: CatalogModel, verdict: Assessment) -> dict[str, Any]:
    """The listing's JSON object for `model`, as the pure rule's `verdict` has it."""
    placement = verdict.placement
    return {
        "id": model.id,
        "name": model.name,
        "active": verdict.active,
        "vram": model.vram,
        "created_at": model.created_at.isoformat(),
        "updated_at": None if model.updated_at is None else model.updated_at.isoformat(),
        "enabled": model.enabled,
        "fits": verdict.fits,
        "reason": None if verdict.reason is None else verdict.reason.value,
        "placement": None
        if placement is None
        else {"gpu": placement.gpu, "index": placement.index, "free_mib": placement.free_mib},
        "headroom_mib": verdict.headroom_mib,
    }
