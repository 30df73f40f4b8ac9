"""The catalog as a document: `{"models": [{"name", "vram", "enabled"?}, ...]}` in JSON, or
`[[models]]` tables in TOML. Parsed and validated the same way for `PUT /models` and the CLI;
rendered back for `models export`, so that an export applies back with nothing to do.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from registry.errors import validation_issues
from registry.model import CatalogModel
from registry.schemas import ModelName, Vram


class CatalogEntryIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: ModelName
    vram: Vram
    enabled: bool | None = None  # absent: true for a new model, unchanged for an existing one
    learn: bool | None = None  # the same: whether its loads teach its footprint


def _unique_entries(schema: dict[str, Any]) -> None:
    # JSON Schema cannot say "unique by name"; identical entries are the part it can say.
    schema["properties"]["models"]["uniqueItems"] = True


class CatalogDocument(BaseModel):
    """The whole catalog; `PUT /models` takes it as its body. Each name at most once."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_unique_entries)

    models: list[CatalogEntryIn]


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    vram: int
    enabled: bool | None
    learn: bool | None = None


class CatalogInvalid(Exception):
    """A catalog document with problems: every one of them, in FastAPI's error shape."""

    def __init__(self, issues: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(issues)} problem(s)")
        self.issues = issues


def parse_catalog(document: object, location: str = "body") -> list[CatalogEntry]:
    """Validate a parsed document; raise CatalogInvalid naming every bad or repeated entry."""
    try:
        parsed = CatalogDocument.model_validate(document)
    except ValidationError as exc:
        issues = validation_issues(exc, location)
        issues.extend(_repeated_names(document, location))
        raise CatalogInvalid(issues) from None
    entries = [CatalogEntry(e.name, e.vram, e.enabled, e.learn) for e in parsed.models]
    if repeated := _repeated_names(document, location):
        raise CatalogInvalid(repeated)
    return entries


def _repeated_names(document: object, location: str) -> list[dict[str, Any]]:
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, list):
        return []
    first_seen: dict[str, int] = {}
    issues = []
    for position, entry in enumerate(models):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if name in first_seen:
            issues.append(
                {
                    "type": "duplicate_name",
                    "loc": [location, "models", position, "name"],
                    "msg": f"name listed twice (first at position {first_seen[name]})",
                    "input": name,
                }
            )
        else:
            first_seen[name] = position
    return issues


def load_catalog_text(text: str, source: str) -> object:
    """A document from TOML or JSON text; `source` (a file name) decides, else the content."""
    as_json = source.endswith(".json") or (
        not source.endswith(".toml") and text.lstrip().startswith("{")
    )
    try:
        return json.loads(text) if as_json else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if as_json else "TOML"
        raise CatalogInvalid(
            [{"type": "parse_error", "loc": [source], "msg": f"not valid {kind}: {exc}"}]
        ) from None


def export_json(models: Iterable[CatalogModel]) -> str:
    entries = [
        {"name": m.name, "vram": m.vram, "enabled": m.enabled, "learn": m.learn} for m in models
    ]
    return json.dumps({"models": entries}, indent=2) + "\n"


def export_toml(models: Iterable[CatalogModel]) -> str:
    # Names are [A-Za-z0-9._-] only: a JSON string is a valid TOML basic string for them.
    tables = [
        f"[[models]]\nname = {json.dumps(m.name)}\nvram = {m.vram}\n"
        f"enabled = {'true' if m.enabled else 'false'}\n"
        f"learn = {'true' if m.learn else 'false'}\n"
        for m in models
    ]
    return "\n".join(tables)


def describe_issues(issues: Sequence[dict[str, Any]]) -> str:
    """One line per problem, for a terminal: `models[3].vram: Input should be ...`."""
    lines = []
    for issue in issues:
        where = ""
        for part in issue["loc"][1:]:
            where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
        lines.append(f"{where or issue['loc'][0]}: {issue['msg']}")
    return "\n".join(lines)
