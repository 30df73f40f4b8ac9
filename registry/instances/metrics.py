"""Instances open, made and ended, for Prometheus."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry.instances.book import InstanceBook


class InstanceStats(Collector):
    def __init__(self, instances: InstanceBook) -> None:
        self._instances = instances

    def collect(self) -> Iterator[Metric]:
        counters = self._instances.counters
        yield GaugeMetricFamily(
            "model_registry_instances_open",
            "Instances: models loaded on this host by a live process.",
            value=self._instances.open_count,
        )
        yield CounterMetricFamily(
            "model_registry_instances_created", "Instances bound or adopted.", counters.created
        )
        ended = CounterMetricFamily(
            "model_registry_instances_ended",
            "Instances ended: process_exited (left the GPU), unloaded (reported).",
            labels=["reason"],
        )
        for reason in ("process_exited", "unloaded"):
            ended.add_metric([reason], counters.ended.get(reason, 0))
        yield ended
        idle = GaugeMetricFamily(
            "model_registry_instance_idle_seconds",
            "Per model, the longest any of its instances here has been idle (no sessions, no "
            "GPU activity): how much room an unload could make.",
            labels=["model"],
        )
        for model, seconds in sorted(self._instances.longest_idle().items()):
            idle.add_metric([model], seconds)
        yield idle
