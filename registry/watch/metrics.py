"""Watchers (blocking GETs and event streams) open now, for Prometheus."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry.watch.feed import ChangeFeed
from registry.watch.slots import StreamSlots


class WatchStats(Collector):
    def __init__(self, feed: ChangeFeed, slots: StreamSlots) -> None:
        self._feed = feed
        self._slots = slots

    def collect(self) -> Iterator[Metric]:
        watchers = GaugeMetricFamily(
            "model_registry_watchers",
            "Blocking GETs waiting for a change, and event streams open.",
            labels=["kind"],
        )
        watchers.add_metric(["waiting"], self._feed.waiting)
        watchers.add_metric(["stream"], self._feed.streams)
        yield watchers
        slots = self._slots
        yield GaugeMetricFamily(
            "model_registry_watchers_max",
            "Event streams and waiting GETs at most, together (MODEL_REGISTRY_MAX_STREAMS).",
            slots.limit,
        )
        refused = CounterMetricFamily(
            "model_registry_watchers_refused",
            "Event streams and waiting GETs refused: every slot taken (busy, 503) or the "
            "address's share taken (per_client, 429).",
            labels=["reason"],
        )
        refused.add_metric(["busy"], slots.counters.refused_busy)
        refused.add_metric(["per_client"], slots.counters.refused_per_client)
        yield refused
        yield CounterMetricFamily(
            "model_registry_streams_cut_off",
            "Event streams closed because their client stopped reading.",
            slots.counters.cut_off,
        )
        yield GaugeMetricFamily(
            "model_registry_streams_buffered_bytes",
            "Bytes event streams hold for clients that have yet to read them.",
            slots.buffered_bytes,
        )
