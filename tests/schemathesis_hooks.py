"""What JSON Schema cannot say about our bodies, told to schemathesis (SCHEMATHESIS_HOOKS)."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def map_body(_context: Any, body: Any) -> Any:
    """A catalog document names each model once (PUT /models answers 422 otherwise)."""
    if isinstance(body, dict) and isinstance(body.get("models"), list):
        seen: set[object] = set()
        kept = []
        for entry in body["models"]:
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str):
                if name in seen:
                    continue
                seen.add(name)
            kept.append(entry)
        body = {**body, "models": kept}
    return body
