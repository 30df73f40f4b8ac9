"""The fleet as this daemon last read it, for Prometheus."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry.fleet.reader import FleetReader


class FleetStats(Collector):
    def __init__(self, fleet: FleetReader) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        hosts = GaugeMetricFamily(
            "model_registry_fleet_hosts",
            "Hosts of the fleet by state, as this daemon last read them.",
            labels=["state"],
        )
        counts = {"ok": 0, "stale": 0, "offline": 0}
        for host in self._fleet.last_hosts().hosts:
            counts[host.state] = counts.get(host.state, 0) + 1
        for state, count in counts.items():
            hosts.add_metric([state], count)
        yield hosts
