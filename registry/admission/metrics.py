"""Reservations open, granted, ended and refused, for Prometheus."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry.admission.book import ReservationBook
from registry.admission.claims import Claims
from registry.capacity import Reason


class ReservationStats(Collector):
    def __init__(self, book: ReservationBook) -> None:
        self._book = book

    def collect(self) -> Iterator[Metric]:
        book = self._book
        counters = book.counters
        yield GaugeMetricFamily(
            "model_registry_reservations_open", "Open reservations.", value=book.open_count
        )
        for name, value, help_text in (
            ("created", counters.created, "Reservations granted."),
            ("released", counters.released, "Reservations ended by their holder."),
            ("expired", counters.expired, "Reservations ended by expiry."),
            (
                "rolled_back",
                counters.rolled_back,
                "Reservations granted, then dropped because they could not be recorded.",
            ),
        ):
            yield CounterMetricFamily(f"model_registry_reservations_{name}", help_text, value)
        rejected = CounterMetricFamily(
            "model_registry_reservations_rejected",
            "Reservations refused, by reason.",
            labels=["reason"],
        )
        for reason in (*(r.value for r in Reason), "too_many"):
            rejected.add_metric([reason], counters.rejected.get(reason, 0))
        yield rejected


class ClaimStats(Collector):
    def __init__(self, claims: Claims) -> None:
        self._claims = claims

    def collect(self) -> Iterator[Metric]:
        counters = self._claims.counters
        outcomes = CounterMetricFamily(
            "model_registry_claims",
            "Claims (make_room reservations that waited for victims) ended, by outcome: "
            "completed (their room came), withdrawn, expired, released.",
            labels=["outcome"],
        )
        for outcome, count in counters.outcomes.items():
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield CounterMetricFamily(
            "model_registry_claim_victims_evicted",
            "Instances that went for a claim.",
            counters.evicted,
        )
