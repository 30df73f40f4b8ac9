"""The shapes of the catalog's writes: PUT /models options, POST and PATCH bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from registry.schemas import ModelName, Vram


class ApplyQuery(BaseModel):
    """Query parameters of PUT /models."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    prune: bool = Field(default=False, description="Also delete models the document omits.")
    dry_run: bool = Field(default=False, description="Only say what would change.")


class ApplyResult(BaseModel):
    created: list[str] = Field(description="Names created, in the document's order.")
    updated: list[str]
    deleted: list[str]
    unchanged: int
    dry_run: bool


class ModelCreate(BaseModel):
    # Strict: a JSON body says what its schema says (0 is not false, "5" is not 5).
    model_config = ConfigDict(extra="forbid", strict=True)

    name: ModelName
    vram: Vram
    enabled: bool = True
    learn: bool = Field(default=True, description="Whether its loads teach its footprint.")


def _patch_schema(schema: dict[str, Any]) -> None:
    schema["minProperties"] = 1
    for name, prop in schema.get("properties", {}).items():
        # Absent means "unchanged"; null is not a value: keep only the non-null branch.
        [non_null] = [branch for branch in prop.pop("anyOf") if branch.get("type") != "null"]
        prop.pop("default", None)
        schema["properties"][name] = {**non_null, **prop}


class ModelPatch(BaseModel):
    """Any of the fields, at least one; null is not a value (leave the field out instead)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_patch_schema)

    # Absent fields stay None; an explicit null is refused, and the schema says so.
    name: ModelName | None = None
    vram: Vram | None = None
    enabled: bool | None = None
    learn: bool | None = None

    @field_validator("name", "vram", "enabled", "learn", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("may not be null; leave the field out to keep its value")
        return value
