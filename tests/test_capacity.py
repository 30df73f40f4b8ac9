"""The capacity rule as a pure function: no split across devices, best fit, margins."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpu import MIB, GpuDevice, GpuSnapshot, GpuState
from registry.capacity import Margins, Reason, assess_all, usable_devices
from registry.model import CatalogModel

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def model(model_id: int, vram: int, enabled: bool = True) -> CatalogModel:
    return CatalogModel(model_id, f"m{model_id}", vram, enabled, NOW, None)


def device(uuid: str, free_mib: int, total_mib: int = 24576, **kw: object) -> GpuDevice:
    return GpuDevice(
        uuid=uuid,
        index=int(uuid[-1]),
        name="GPU",
        total_bytes=total_mib * MIB,
        free_bytes=free_mib * MIB,
        **kw,
    )  # type: ignore[arg-type]


def snapshot(*devices: GpuDevice, state: GpuState = GpuState.OK) -> GpuSnapshot:
    return GpuSnapshot(backend="simulated", state=state, devices=devices, as_of=NOW)


def test_a_model_is_never_split_across_devices() -> None:
    # 2 x 10 GiB free is 20 GiB in all, but no single device holds 15 GiB.
    result = assess_all(
        [model(1, 15000)], snapshot(device("g0", 10000), device("g1", 10000)), Margins()
    )
    verdict = result[1]
    assert verdict.fits is False and verdict.active is False
    assert verdict.reason is Reason.INSUFFICIENT_VRAM
    assert verdict.placement is None
    assert verdict.headroom_mib == 10000 - 15000


def test_best_fit_picks_the_tightest_device_that_holds_the_model() -> None:
    gpus = snapshot(device("g0", 20000), device("g1", 6000), device("g2", 12000))
    result = assess_all([model(1, 5000), model(2, 7000), model(3, 15000)], gpus, Margins())
    assert result[1].placement is not None and result[1].placement.gpu == "g1"
    assert result[2].placement is not None and result[2].placement.gpu == "g2"
    assert result[3].placement is not None and result[3].placement.gpu == "g0"
    assert result[3].placement.free_mib == 20000
    # headroom is measured against the roomiest device
    assert [result[i].headroom_mib for i in (1, 2, 3)] == [15000, 13000, 5000]


def test_exact_fit_counts_as_fitting() -> None:
    result = assess_all([model(1, 8000)], snapshot(device("g0", 8000)), Margins())
    assert result[1].fits is True and result[1].headroom_mib == 0


@pytest.mark.parametrize(
    ("margins", "usable"),
    [
        (Margins(), 10000),
        (Margins(mib=1000), 9000),
        (Margins(percent=10), 10000 - 2458),  # 10 % of 24576 MiB, rounded up
        (Margins(mib=500, percent=1), 10000 - 500 - 246),
    ],
)
def test_margin_arithmetic(margins: Margins, usable: int) -> None:
    [only] = usable_devices(snapshot(device("g0", 10000)), margins)
    assert only.usable_mib == usable
    fits_exactly = assess_all(
        [model(1, usable), model(2, usable + 1)], snapshot(device("g0", 10000)), margins
    )
    assert fits_exactly[1].fits is True
    assert fits_exactly[2].fits is False


def test_unhealthy_devices_are_never_placed_on() -> None:
    gpus = snapshot(device("g0", 40000, healthy=False, error="lost"), device("g1", 5000))
    result = assess_all([model(1, 10000), model(2, 1000)], gpus, Margins())
    assert result[1].fits is False
    assert result[2].placement is not None and result[2].placement.gpu == "g1"


def test_disabled_models_are_inactive_but_still_assessed() -> None:
    result = assess_all([model(1, 100, enabled=False)], snapshot(device("g0", 10000)), Margins())
    assert result[1].active is False
    assert result[1].reason is Reason.DISABLED
    assert result[1].fits is True


@pytest.mark.parametrize("state", [GpuState.STALE, GpuState.UNAVAILABLE])
def test_unknown_gpu_state_gives_null_fits(state: GpuState) -> None:
    result = assess_all(
        [model(1, 100), model(2, 100, enabled=False)],
        snapshot(device("g0", 10000), state=state),
        Margins(),
    )
    assert result[1].fits is None and result[1].active is False
    assert result[1].reason is Reason.GPU_STATE_UNKNOWN
    assert result[1].headroom_mib is None and result[1].placement is None
    assert result[2].reason is Reason.DISABLED


def test_backend_none_means_active_is_enabled() -> None:
    none = GpuSnapshot(backend="none", state=GpuState.DISABLED)
    result = assess_all([model(1, 10**7), model(2, 1, enabled=False)], none, Margins())
    assert (result[1].active, result[1].fits, result[1].reason) == (True, None, None)
    assert (result[2].active, result[2].fits, result[2].reason) == (False, None, Reason.DISABLED)


def test_the_page_cache_stays_within_its_byte_budget_whatever_clients_ask() -> None:
    from registry.page_cache import PageCache
    from registry.schemas import ListQuery
    from registry.view import CatalogView

    pages = PageCache(budget_bytes=256 * 1024)
    view = CatalogView(snapshot(device("g0", 10000)), Margins(), pages=pages)
    view.replace_catalog([model(i, 100) for i in range(1, 6)])
    for skip in range(10_000):
        view.page(ListQuery(skip=skip, name=f"padding-{skip:05d}-" + "x" * 1000))
        assert pages.used_bytes <= pages.budget_bytes
    assert view.page(ListQuery(skip=1)) is view.page(ListQuery(skip=1))  # kept, once asked
