"""Prometheus metrics. GPU and model gauges are read from the live view at scrape time.

Features add their own collectors with `Metrics.collecting`, in the cleanup context that owns
the object they read, so nothing here refers to a feature.
"""

from __future__ import annotations

import bisect
import contextlib
import platform
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gpu import MIB, GpuState
from registry import __version__
from registry.view import CatalogView

disable_created_metrics()  # type: ignore[no-untyped-call] # the *_created series only add noise to every scrape
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StateCollector(Collector):
    def __init__(
        self, view: CatalogView, last_success: Callable[[], float | None], dcgm: bool
    ) -> None:
        self._view = view
        self._last_success = last_success
        self._dcgm = dcgm

    def collect(self) -> Iterator[Metric]:
        view = self._view
        yield from _gpu_metrics(view, self._dcgm)
        models = GaugeMetricFamily(
            "model_registry_models", "Models in the catalog by state.", labels=["state"]
        )
        total = view.model_count
        models.add_metric(["active"], view.active_count)
        models.add_metric(["inactive"], total - view.active_count)
        yield models
        per_model = GaugeMetricFamily(
            "model_registry_model_active",
            "1 when the model can be used for a new session now.",
            labels=["model"],
        )
        for model in view.models():
            assessment = view.assessment(model.id)
            per_model.add_metric([model.name], 1.0 if assessment and assessment.active else 0.0)
        yield per_model
        yield _footprint_metrics(view)
        yield _reload_metrics(view)
        if view.snapshot.state is not GpuState.DISABLED:
            # 0 until the first good poll, so that the stale-readings alert fires after a
            # restart with the GPUs unreadable too (an absent series alerts on nothing).
            yield GaugeMetricFamily(
                "model_registry_gpu_last_successful_poll_timestamp_seconds",
                "Unix time of the last successful GPU poll; 0 before the first.",
                value=self._last_success() or 0.0,
            )
        yield GaugeMetricFamily(
            "model_registry_page_cache_bytes",
            "Bytes of rendered listings kept (MODEL_REGISTRY_PAGE_CACHE_MIB bounds them).",
            view.pages.used_bytes,
        )


def _reload_metrics(view: CatalogView) -> Metric:
    family = GaugeMetricFamily(
        "model_registry_model_reload_seconds",
        "How long a model's loads took on a GPU product, to ready (median of the newest).",
        labels=["model", "gpu_name"],
    )
    footprints = view.footprints
    for name in footprints.models():
        for gpu_name in footprints.of_model(name):
            if (seconds := footprints.reload_s(name, gpu_name)) is not None:
                family.add_metric([name, gpu_name], seconds)
    return family


def _footprint_metrics(view: CatalogView) -> Metric:
    """Declared, observed and effective VRAM of the models that have samples, per product:
    the drift between what a model declares and what its loads take."""
    family = GaugeMetricFamily(
        "model_registry_model_vram_bytes",
        "A model's VRAM per GPU product: declared, observed (p95 of loads), effective (booked).",
        labels=["model", "gpu_name", "kind"],
    )
    footprints = view.footprints
    for name in footprints.models():
        model = view.model_by_name(name)
        if model is None:
            continue
        for gpu_name in footprints.of_model(name):
            observed = footprints.observed(name, gpu_name)
            if observed is None and footprints.reload_s(name, gpu_name) is not None:
                continue  # only load times learned there: no size to compare
            family.add_metric([name, gpu_name, "declared"], model.vram * MIB)
            if observed is not None:
                family.add_metric([name, gpu_name, "observed"], observed * MIB)
            family.add_metric(
                [name, gpu_name, "effective"], footprints.effective(model, gpu_name) * MIB
            )
    return family


def _gpu_metrics(view: CatalogView, dcgm: bool) -> Iterator[Metric]:
    snapshot = view.snapshot
    labels = ["uuid", "gpu", "name"]
    families = {
        field: GaugeMetricFamily(
            f"model_registry_gpu_memory_{field}_bytes",
            f"GPU memory {field}, in bytes.",
            labels=labels,
        )
        for field in ("total", "free", "used", "reserved")
    }
    usable = GaugeMetricFamily(
        "model_registry_gpu_usable_bytes",
        "Free GPU memory after the configured margin and pending reservations, in bytes.",
        labels=labels,
    )
    pending = GaugeMetricFamily(
        "model_registry_gpu_pending_bytes",
        "GPU memory booked by open reservations and not yet loaded, in bytes.",
        labels=labels,
    )
    dcgm_families = {
        field: GaugeMetricFamily(
            f"DCGM_FI_DEV_FB_{field.upper()}",
            f"Framebuffer memory {field} (MiB).",
            labels=["gpu", "UUID", "modelName"],
        )
        for field in ("free", "used", "reserved")
    }
    if snapshot.known:
        for device in snapshot.devices:
            values = [device.uuid, str(device.index), device.name]
            memory = {
                "total": device.total_bytes,
                "free": device.free_bytes,
                "used": device.used_bytes,
                "reserved": device.reserved_bytes,
            }
            for field, value in memory.items():
                if value is not None:
                    families[field].add_metric(values, value)
                    if dcgm and field in dcgm_families:
                        dcgm_families[field].add_metric(
                            [str(device.index), device.uuid, device.name], value // MIB
                        )
    for budget in view.capacity.budgets:
        device = budget.device
        values = [device.uuid, str(device.index), device.name]
        if snapshot.known and budget.usable_mib is not None:
            usable.add_metric(values, budget.usable_mib * MIB)
        pending.add_metric(values, budget.pending_mib * MIB)
    yield from families.values()
    yield usable
    yield pending
    if dcgm:
        yield from dcgm_families.values()


class _RequestStats(Collector):
    """HTTP request counts and latencies, kept as plain numbers.

    The hot path is two dict lookups and a bisect: prometheus_client's Counter and Histogram
    take a lock per update, which measurably cuts throughput. The event loop is the only
    writer, so no lock is needed; scrapes read a consistent enough view.
    """

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

    def __init__(self) -> None:
        self._routes: dict[str, _RouteStats] = {}

    def route(self, route: str) -> _RouteStats:
        """One route's counters, for its handler to hold: no lookup by route per request."""
        stats = self._routes.get(route)
        if stats is None:
            stats = self._routes[route] = _RouteStats()
        return stats

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "model_registry_http_requests",
            "HTTP requests answered.",
            labels=["route", "method", "status"],
        )
        routes = list(self._routes.items())
        for route, stats in routes:
            for (method, status), count in list(stats.counts.items()):
                requests.add_metric([route, method, str(status)], count)
        latency = HistogramMetricFamily(
            "model_registry_http_request_duration_seconds",
            "HTTP request latency.",
            labels=["route", "method"],
        )
        latencies = [(r, m, v) for r, stats in routes for m, v in list(stats.latency.items())]
        for route, method, values in latencies:
            cumulative, running = [], 0.0
            for bound, in_bucket in zip((*self.BUCKETS, float("inf")), values[:-1], strict=True):
                running += in_bucket
                cumulative.append((_bound(bound), running))
            latency.add_metric([route, method], cumulative, values[-1])
        yield requests
        yield latency


class _RouteStats:
    """One route's requests by (method, status), and its latency by method: the count per
    bucket, then the count above the last, then the sum."""

    __slots__ = ("counts", "latency")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list[float]] = {}

    def observe(self, method: str, status: int, seconds: float) -> None:
        if method not in _KNOWN_METHODS:
            method = "other"  # clients choose methods; labels must stay bounded
        key = (method, status)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        latency = self.latency.get(method)
        if latency is None:
            latency = self.latency[method] = [0.0] * (len(_RequestStats.BUCKETS) + 2)
        latency[bisect.bisect_left(_RequestStats.BUCKETS, seconds)] += 1
        latency[-1] += seconds


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class _BuildInfo(Collector):
    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "model_registry_build_info",
            "Always 1: the running version and the Python it runs on.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


class Flag(Collector):
    """A gauge that is 1 while `probe` says so, else 0, read at scrape time."""

    def __init__(self, name: str, documentation: str, probe: Callable[[], bool]) -> None:
        self._name, self._documentation, self._probe = name, documentation, probe

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation, value=float(self._probe()))


class Metrics:
    def __init__(self, view: CatalogView, *, dcgm: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.last_success: float | None = None
        self.poll_seconds = Histogram(
            "model_registry_gpu_poll_duration_seconds",
            "Time to read the GPUs once.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.poll_errors = Counter(
            "model_registry_gpu_poll_errors", "GPU polls that failed.", registry=self.registry
        )
        self._requests = _RequestStats()
        self.registry.register(self._requests)
        # process_start_time_seconds and friends: a restart loop shows as its changes.
        ProcessCollector(registry=self.registry)
        self.registry.register(_BuildInfo())
        self.registry.register(_StateCollector(view, lambda: self.last_success, dcgm))

    @contextlib.contextmanager
    def collecting(self, collector: Collector) -> Iterator[None]:
        """Export `collector` while the block runs: the lifetime of the object it reads."""
        self.registry.register(collector)
        try:
            yield
        finally:
            self.registry.unregister(collector)

    def observe_poll(self, seconds: float, ok: bool) -> None:
        self.poll_seconds.observe(seconds)
        if ok:
            self.last_success = time.time()
        else:
            self.poll_errors.inc()

    def route_requests(self, route: str) -> Callable[[str, int, float], None]:
        """`observe(method, status, seconds)` of one route's requests, for its handler to hold."""
        return self._requests.route(route).observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
