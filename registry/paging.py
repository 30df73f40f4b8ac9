"""The `pagination` object every paged listing answers with, in the original system's shape:
`per_page` = limit, `current_page` = skip // limit + 1, `total_pages` = ceil(total / limit)."""

from __future__ import annotations

import math


def pagination(total: int, skip: int, limit: int) -> dict[str, int]:
    return {
        "total_items": total,
        "total_pages": math.ceil(total / limit),
        "current_page": skip // limit + 1,
        "per_page": limit,
    }


def pagination_json(total: int, skip: int, limit: int) -> str:
    """The same object as JSON text, for listings rendered as text."""
    return (
        f'{{"total_items":{total},"total_pages":{math.ceil(total / limit)},'
        f'"current_page":{skip // limit + 1},"per_page":{limit}}}'
    )
