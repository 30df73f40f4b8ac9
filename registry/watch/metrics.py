"""Watchers (blocking GETs and event streams) open now, for Prometheus."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry.watch.feed import ChangeFeed


class WatchStats(Collector):
    def __init__(self, feed: ChangeFeed) -> None:
        self._feed = feed

    def collect(self) -> Iterator[Metric]:
        watchers = GaugeMetricFamily(
            "model_registry_watchers",
            "Blocking GETs waiting for a change, and event streams open.",
            labels=["kind"],
        )
        watchers.add_metric(["waiting"], self._feed.waiting)
        watchers.add_metric(["stream"], self._feed.streams)
        yield watchers
