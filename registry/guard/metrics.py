"""Client connections and what the connection cap did, for Prometheus."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry.guard.connections import GuardedServer


class ConnectionStats(Collector):
    def __init__(self, server: GuardedServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        yield GaugeMetricFamily(
            "model_registry_http_connections", "Client connections open.", server.open_count
        )
        yield GaugeMetricFamily(
            "model_registry_http_connections_max",
            "Client connections allowed (MODEL_REGISTRY_MAX_CONNECTIONS).",
            server.max_connections,
        )
        counters = server.counters
        for name, value, help_text in (
            ("evicted", counters.evicted, "Idle or head-owing connections closed at the cap."),
            ("refused", counters.refused, "Connections refused at the cap, every slot busy."),
            ("head_timeouts", counters.timed_out, "Connections closed owing a request head."),
        ):
            yield CounterMetricFamily(f"model_registry_http_connections_{name}", help_text, value)
