"""Rendered answers, kept for the next client that asks the same: one budget in bytes for every
listing the daemon caches (/models pages and objects, /fleet/models pages), least recently used
out first.

Keys are parsed queries (with the generation they were rendered at), never raw query strings:
a parameter the listing ignores makes no new entry. Entries of an older generation are never
asked for again, so they are the first to go when room is needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

Q = TypeVar("Q")


@dataclass(frozen=True, slots=True)
class CachedBody:
    body: bytes
    etag: str


def body_etag(body: bytes) -> str:
    """A strong ETag for these exact bytes."""
    return '"' + hashlib.blake2b(body, digest_size=10).hexdigest() + '"'


DEFAULT_PAGE_CACHE_BYTES = 64 * 1024 * 1024
# What an entry holds besides its body: the key, the entry object and the table's slot.
ENTRY_OVERHEAD_BYTES = 512


class PageCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[Hashable, tuple[CachedBody, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> CachedBody | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: Hashable, value: CachedBody) -> CachedBody:
        """Keep `value` under `key` if it fits the budget, evicting the least recently used."""
        cost = len(value.body) + len(repr(key)) + ENTRY_OVERHEAD_BYTES
        if (old := self._entries.pop(key, None)) is not None:
            self.used_bytes -= old[1]
        if cost > self.budget_bytes:
            return value  # larger than the whole budget: answered, not kept
        while self.used_bytes + cost > self.budget_bytes:
            _key, (_value, evicted) = self._entries.popitem(last=False)
            self.used_bytes -= evicted
        self._entries[key] = (value, cost)
        self.used_bytes += cost
        return value


class ParsedQueries:
    """Request targets already parsed, so the hot path skips validation. Only short targets
    are kept, and only so many: a padded or endlessly varied query string costs a parse, never
    memory. (Pages are keyed by the parsed query, in the PageCache.)"""

    MAX_TARGET_BYTES = 256
    MAX_ENTRIES = 1024

    def __init__(self) -> None:
        self._parsed: dict[str, object] = {}

    def get(self, target: str, parse: Callable[[], Q]) -> Q:
        found = self._parsed.get(target)
        if found is not None:
            return found  # type: ignore[return-value]  # the same target, the same route
        parsed = parse()
        if len(target) <= self.MAX_TARGET_BYTES:
            if len(self._parsed) >= self.MAX_ENTRIES:
                self._parsed.clear()
            self._parsed[target] = parsed
        return parsed
