"""Slots for what holds a connection by design: /events streams and waiting GETs.

Both are busy connections, which the connection guard never evicts; unbounded, a few clients
could take every connection the daemon has. So they share one cap (MODEL_REGISTRY_MAX_STREAMS,
never more than half the connection cap), each remote address has a share of it
(MODEL_REGISTRY_MAX_STREAMS_PER_CLIENT), and what streams leave buffered in the process is
bounded as a whole: a stream whose client stops reading is cut off rather than buffered for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from aiohttp import web

from registry.errors import http_error

RETRY_AFTER_S = 5
# Bytes the transports of every stream together may hold for clients that have yet to read.
STREAM_BUFFER_BUDGET = 32 * 1024 * 1024


@dataclass
class SlotCounters:
    refused_busy: int = 0
    refused_per_client: int = 0
    cut_off: int = 0


class StreamSlots:
    def __init__(
        self, limit: int, per_client: int, buffer_budget: int = STREAM_BUFFER_BUDGET
    ) -> None:
        self.limit = limit
        self.per_client = per_client
        self.buffer_budget = buffer_budget
        self.held = 0
        self.counters = SlotCounters()
        self.buffered_bytes = 0
        self._by_address: Counter[str] = Counter()

    def cap_to_connections(self, max_connections: int) -> None:
        """Leave at least half of the connection slots to everything else."""
        self.limit = min(self.limit, max(1, max_connections // 2))

    @contextmanager
    def hold(self, request: web.Request) -> Iterator[None]:
        """A slot for as long as the block runs; 503 or 429 (with Retry-After) when none."""
        address = request.remote or ""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if self.held >= self.limit:
            self.counters.refused_busy += 1
            raise http_error(
                web.HTTPServiceUnavailable,
                f"every one of the {self.limit} slots for event streams and waiting requests "
                "is taken; try again later",
                headers=retry,
            )
        if self._by_address[address] >= self.per_client:
            self.counters.refused_per_client += 1
            raise http_error(
                web.HTTPTooManyRequests,
                f"this address holds {self.per_client} event streams and waiting requests, "
                "its share; close one, or try again later",
                headers=retry,
            )
        self.held += 1
        self._by_address[address] += 1
        try:
            yield
        finally:
            self.held -= 1
            self._by_address[address] -= 1
            if not self._by_address[address]:
                del self._by_address[address]

    def rebuffered(self, before: int, after: int) -> bool:
        """A stream's transport went from holding `before` bytes to `after`; whether every
        stream together still holds no more than the budget."""
        self.buffered_bytes += after - before
        return self.buffered_bytes <= self.buffer_budget
