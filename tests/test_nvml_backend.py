"""The NVML backend against a fake `pynvml`, replaced at its function boundary."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu import GpuUnavailable
from gpu.nvml import NvmlBackend
from tests.fake_nvml import GIB, FakeGpu, FakeNvml

MIB = 1024**2


def test_v2_driver_reports_reserved_apart_from_used() -> None:
    fake = FakeNvml(
        [FakeGpu("GPU-a", total=140 * GIB, free=100 * GIB, reserved=600 * MIB, used=39 * GIB)]
    )
    [device] = NvmlBackend(fake).read()
    assert device.uuid == "GPU-a"
    assert device.free_bytes == 100 * GIB  # NVML's own figure, not total - used
    assert device.used_bytes == 39 * GIB
    assert device.reserved_bytes == 600 * MIB


def test_v1_only_driver_falls_back_and_leaves_reserved_absent() -> None:
    fake = FakeNvml([FakeGpu("GPU-a", free=100 * GIB, used=0)], v2=False)
    backend = NvmlBackend(fake)
    [device] = backend.read()
    assert device.free_bytes == 100 * GIB
    assert device.reserved_bytes is None
    assert device.used_bytes == 600 * MIB  # v1 counts the reservation as used
    [again] = backend.read()  # v2 is not retried once refused
    assert again == device


def test_mig_instances_are_devices_and_the_parent_is_not() -> None:
    slices = [FakeGpu(f"MIG-{i}", total=18 * GIB, free=(10 + i) * GIB) for i in range(3)]
    parent = FakeGpu("GPU-parent", mig_enabled=True, mig_slots=[slices[0], None, slices[2]])
    devices = NvmlBackend(FakeNvml([parent])).read()
    assert [d.uuid for d in devices] == ["MIG-0", "MIG-2"]
    assert all(d.parent_uuid == "GPU-parent" for d in devices)
    assert [d.free_bytes for d in devices] == [10 * GIB, 12 * GIB]


def test_mig_not_supported_means_a_whole_gpu() -> None:
    [device] = NvmlBackend(FakeNvml([FakeGpu("GPU-old", mig_enabled=None)])).read()
    assert device.uuid == "GPU-old" and device.parent_uuid is None


def test_lost_gpu_marks_that_device_unhealthy_then_reinitialises() -> None:
    gpus = [FakeGpu("GPU-0"), FakeGpu("GPU-1")]
    fake = FakeNvml(gpus)
    backend = NvmlBackend(fake)
    backend.read()
    gpus[1].lost = True
    healthy, lost = backend.read()
    assert healthy.healthy and healthy.uuid == "GPU-0"
    assert not lost.healthy and lost.uuid == "GPU-1"  # remembered from the last good read
    assert lost.error is not None and "GpuIsLost" in lost.error
    gpus[1].lost = False
    assert fake.shutdown_calls == 0
    devices = backend.read()
    assert fake.shutdown_calls == 1 and fake.init_calls == 2
    assert all(d.healthy for d in devices)


@pytest.mark.parametrize(
    "error", ["NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded", "NVMLError_NoPermission"]
)
def test_init_failure_is_unavailable_with_nvml_text(error: str) -> None:
    fake = FakeNvml([FakeGpu("GPU-0")])
    fake.init_error = getattr(fake, error)()
    backend = NvmlBackend(fake)
    with pytest.raises(GpuUnavailable, match="NVML init failed") as caught:
        backend.read()
    assert str(getattr(fake, error)()) in str(caught.value)
    fake.init_error = None
    assert [d.uuid for d in backend.read()] == ["GPU-0"]


def test_zero_devices_is_a_failure() -> None:
    with pytest.raises(GpuUnavailable, match="no GPU"):
        NvmlBackend(FakeNvml([])).read()


def test_processes_come_from_the_compute_and_graphics_lists() -> None:
    gpu = FakeGpu("GPU-a", free=100 * GIB)
    gpu.compute_processes = [(300, 4 * GIB), (100, None)]
    gpu.graphics_processes = [(300, 4 * GIB), (200, 512 * MIB)]  # 300 is in both lists
    [device] = NvmlBackend(FakeNvml([gpu])).read()
    assert [(p.pid, p.used_bytes) for p in device.processes] == [
        (100, None),  # the driver does not say
        (200, 512 * MIB),
        (300, 4 * GIB),
    ]
    assert device.process_used_mib(300) == 4096
    assert device.process_used_mib(100) is None and device.process_used_mib(999) is None


def test_a_driver_that_will_not_list_processes_still_reports_memory() -> None:
    import pynvml

    gpu = FakeGpu("GPU-a", free=100 * GIB)
    gpu.processes_error = pynvml.NVMLError_NoPermission()
    [device] = NvmlBackend(FakeNvml([gpu])).read()
    assert device.healthy and device.free_bytes == 100 * GIB and device.processes == ()


def test_a_gpu_lost_while_listing_processes_is_unhealthy() -> None:
    import pynvml

    gpu = FakeGpu("GPU-a", free=100 * GIB)
    gpu.processes_error = pynvml.NVMLError_GpuIsLost()
    [device] = NvmlBackend(FakeNvml([gpu])).read()
    assert not device.healthy and "GpuIsLost" in (device.error or "")


def test_process_names_come_from_the_driver_else_from_proc() -> None:
    import os

    gpu = FakeGpu("GPU-a", free=100 * GIB)
    me, gone = os.getpid(), 4_194_303  # this test's own process; a pid nobody has
    gpu.compute_processes = [(100, GIB), (me, GIB), (gone, None)]
    fake = FakeNvml([gpu])
    fake.process_names = {100: "/usr/bin/vllm"}
    backend = NvmlBackend(fake)
    [device] = backend.read()
    names = {p.pid: p.name for p in device.processes}
    assert names[100] == "/usr/bin/vllm"
    assert names[me] == Path("/proc/self/comm").read_text().strip()
    assert names[gone] is None  # another PID namespace: no name, memory still counted
    calls = fake.name_calls
    backend.read()
    assert fake.name_calls == calls, "a running process is named once"


def test_per_process_gpu_activity_comes_from_the_utilization_samples() -> None:
    gpu = FakeGpu("GPU-a", compute_processes=[(100, 1 * GIB), (200, 2 * GIB)])
    backend = NvmlBackend(FakeNvml([gpu]))
    # A GPU that does not sample per-process utilization: activity unknown.
    [device] = backend.read()
    assert [p.sm_util for p in device.processes] == [None, None]
    gpu.utilization = [(100, 37, 1_000), (100, 80, 2_000)]
    [device] = backend.read()
    assert [(p.pid, p.sm_util) for p in device.processes] == [(100, 80), (200, 0)]
    # Only samples newer than the last read count: none since, so nobody was busy.
    [device] = backend.read()
    assert [p.sm_util for p in device.processes] == [0, 0]
    gpu.utilization.append((200, 5, 3_000))
    [device] = backend.read()
    assert [p.sm_util for p in device.processes] == [0, 5]
