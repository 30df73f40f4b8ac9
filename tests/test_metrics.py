"""GET /metrics: Prometheus text that carries the live GPU and catalog state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import AppClient
from tests.scrape import scrape

MIB = 1024**2


def _device_labels(uuid: str, index: int = 0) -> tuple[tuple[str, str], ...]:
    return (("gpu", str(index)), ("name", "Simulated GPU"), ("uuid", uuid))


async def test_metrics_carry_the_simulated_device(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    gpu_file(("GPU-sim-0", 24576, 6000))
    client = await start_app(vram_margin_mib=500)
    await client.get("/models")
    await client.get("/models?limit=0")
    samples = await scrape(client)
    labels = _device_labels("GPU-sim-0")
    assert samples[("model_registry_gpu_memory_total_bytes", labels)] == 24576 * MIB
    assert samples[("model_registry_gpu_memory_free_bytes", labels)] == 6000 * MIB
    assert samples[("model_registry_gpu_usable_bytes", labels)] == 5500 * MIB
    # The simulated file gives no used/reserved figures: absent, not zero.
    assert ("model_registry_gpu_memory_reserved_bytes", labels) not in samples

    assert samples[("model_registry_models", (("state", "active"),))] == 4
    assert samples[("model_registry_models", (("state", "inactive"),))] == 1
    assert samples[("model_registry_model_active", (("model", "tiny"),))] == 1
    assert samples[("model_registry_model_active", (("model", "large-v3"),))] == 0

    assert samples[("model_registry_gpu_poll_duration_seconds_count", ())] >= 1
    assert samples[("model_registry_gpu_poll_errors_total", ())] == 0
    assert samples[("model_registry_gpu_last_successful_poll_timestamp_seconds", ())] > 1.7e9

    ok = (("method", "GET"), ("route", "/models"), ("status", "200"))
    bad = (("method", "GET"), ("route", "/models"), ("status", "422"))
    assert samples[("model_registry_http_requests_total", ok)] == 1
    assert samples[("model_registry_http_requests_total", bad)] == 1
    latency = (("le", "+Inf"), ("method", "GET"), ("route", "/models"))
    assert samples[("model_registry_http_request_duration_seconds_bucket", latency)] == 2
    assert not any(name.startswith("DCGM_") for name, _ in samples)


async def test_dcgm_names_behind_a_setting(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    gpu_file(("GPU-sim-0", 24576, 6000))
    client = await start_app(dcgm_metrics=True)
    samples = await scrape(client)
    labels = (("UUID", "GPU-sim-0"), ("gpu", "0"), ("modelName", "Simulated GPU"))
    assert samples[("DCGM_FI_DEV_FB_FREE", labels)] == 6000


async def test_unmatched_paths_and_odd_methods_keep_labels_bounded(start_app: AppClient) -> None:
    client = await start_app()
    for path in ("/a", "/b", "/c"):
        await client.get(path)
    await client.request("PROPFIND", "/models")
    samples = await scrape(client)
    routes = {
        dict(labels).get("route")
        for name, labels in samples
        if name == "model_registry_http_requests_total"
    }
    methods = {
        dict(labels).get("method")
        for name, labels in samples
        if name == "model_registry_http_requests_total"
    }
    assert routes == {"unmatched"}
    assert "PROPFIND" not in methods and "other" in methods


async def test_poll_errors_are_counted(start_app: AppClient, gpu_file: Callable[..., Path]) -> None:
    gpu_file().write_text("not json")
    client = await start_app()
    samples = await scrape(client)
    assert samples[("model_registry_gpu_poll_errors_total", ())] >= 1
    assert not any(name == "model_registry_gpu_memory_free_bytes" for name, _ in samples)


async def test_what_the_alerts_need_is_there_from_the_start(
    start_app: AppClient, tmp_path: Path
) -> None:
    from registry import __version__, keys
    from tests.waiting import eventually

    # GPUs unreadable from the start: the last success reads 0, so "stale" can fire.
    unreadable = await start_app(gpu_simulated_file=tmp_path / "no-such-gpus.json")
    samples = await scrape(unreadable)
    assert samples[("model_registry_gpu_last_successful_poll_timestamp_seconds", ())] == 0
    info = [labels for name, labels in samples if name == "model_registry_build_info"]
    assert [dict(labels)["version"] for labels in info] == [__version__]
    assert samples[("process_start_time_seconds", ())] > 1.7e9
    await eventually(lambda: unreadable.app[keys.CATALOG_SYNC].listening.is_set())
    assert (await scrape(unreadable))[("model_registry_database_up", ())] == 1
    # Without GPU awareness there are no readings to go stale: no series, no alert.
    blind = await start_app(gpu_backend="none")
    assert not [
        key
        for key in await scrape(blind)
        if key[0] == "model_registry_gpu_last_successful_poll_timestamp_seconds"
    ]


async def test_a_lost_database_shows_in_its_metric(start_app: AppClient, own_server: Any) -> None:
    import asyncio

    from tests.waiting import eventually

    dsn = own_server.start()
    client = await start_app(database_url=dsn)

    async def database_up() -> float:
        return (await scrape(client))[("model_registry_database_up", ())]

    await eventually(database_up, lambda up: up == 1)
    await asyncio.to_thread(own_server.stop)
    await eventually(database_up, lambda up: up == 0, timeout_s=10)
    await asyncio.to_thread(own_server.start)
    await eventually(database_up, lambda up: up == 1, timeout_s=15)
