"""The newest reservations a host's fleet row lists, as JSON, each encoded once.

The row is written up to ten times a second, and a busy host's newest hundred barely change
from one write to the next (a new one in, an old one out), while encoding a hundred of them
takes about half a millisecond of the event loop: each is encoded again only when it, or the
memory it still holds, has changed.
"""

from __future__ import annotations

import json

from registry.reservation import Reservation
from registry.view import CatalogView

FLEET_ROW_RESERVATIONS = 100  # a host's row lists its newest reservations, and their count


class NewestReservations:
    def __init__(self, view: CatalogView, count: int = FLEET_ROW_RESERVATIONS) -> None:
        self._view = view
        self._count = count
        # Reservation id -> (the reservation as encoded, its pending MiB then, its JSON).
        self._encoded: dict[str, tuple[Reservation, int, str]] = {}

    def __call__(self) -> tuple[str, int, int]:
        """The newest as a JSON array, newest first; how many are open; the MiB they hold."""
        bookings, capacity = self._view.bookings, self._view.capacity
        encoded, kept = self._encoded, {}
        for reservation in bookings.newest(self._count):
            pending = capacity.pending_of(reservation)
            found = encoded.get(reservation.id)
            if found is None or found[0] is not reservation or found[1] != pending:
                as_json = json.dumps(reservation.to_api(pending), default=str)
                found = (reservation, pending, as_json)
            kept[reservation.id] = found
        self._encoded = kept
        newest = "[" + ", ".join(as_json for _r, _p, as_json in kept.values()) + "]"
        return newest, len(bookings), capacity.pending_total_mib
