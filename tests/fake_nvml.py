"""A stand-in for the `pynvml` module, replaced at its function boundary only.

Error classes and constants are the real ones from nvidia-ml-py, so the backend's error
handling is exercised exactly as against the real library.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

GIB = 1024**3


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H200"
    total: int = 140 * GIB
    free: int = 139 * GIB
    reserved: int = 600 * 1024**2
    used: int = 0
    mig_enabled: bool | None = False  # None: MIG not supported on this GPU
    mig_slots: list[FakeGpu | None] = field(default_factory=list)  # None: empty slot
    lost: bool = False
    # (pid, bytes or None) per process, as the compute and graphics calls report them
    compute_processes: list[tuple[int, int | None]] = field(default_factory=list)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    processes_error: BaseException | None = None
    # (pid, smUtil percent, timestamp) samples for nvmlDeviceGetProcessUtilization; None: the
    # GPU does not sample per-process utilization (NotSupported).
    utilization: list[tuple[int, int, int]] | None = None


class FakeNvml:
    """Implements the pynvml functions the backend calls, over a list of FakeGpu."""

    NVMLError = pynvml.NVMLError
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_ArgumentVersionMismatch = pynvml.NVMLError_ArgumentVersionMismatch
    NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
    NVMLError_GpuNotFound = pynvml.NVMLError_GpuNotFound
    nvmlMemory_v2 = pynvml.nvmlMemory_v2
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE

    def __init__(self, gpus: list[FakeGpu], *, v2: bool = True) -> None:
        self.gpus = gpus
        self.v2 = v2
        self.init_error: BaseException | None = None
        self.initialised = False
        self.init_calls = 0
        self.shutdown_calls = 0
        self.hang = threading.Event()  # set: memory calls block until `release` is set
        self.release = threading.Event()
        self.calls_started = 0
        self.process_names = {}
        self.name_calls = 0

    # -- lifecycle --
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self.initialised = False

    def _check(self) -> None:
        if not self.initialised:
            raise pynvml.NVMLError_Uninitialized()

    # -- devices --
    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check()
        gpu = self.gpus[index]
        if gpu.lost:
            raise pynvml.NVMLError_GpuIsLost()
        return gpu

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        if gpu.lost:
            raise pynvml.NVMLError_GpuIsLost()
        return gpu.uuid

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return gpu.name

    def nvmlDeviceGetMigMode(self, gpu: FakeGpu) -> list[int]:
        if gpu.mig_enabled is None:
            raise pynvml.NVMLError_NotSupported()
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, gpu: FakeGpu) -> int:
        return len(gpu.mig_slots)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu: FakeGpu, index: int) -> FakeGpu:
        instance = gpu.mig_slots[index]
        if instance is None:
            raise pynvml.NVMLError_NotFound()
        return instance

    process_names: dict[int, str]  # set in __init__: what nvmlSystemGetProcessName knows

    def nvmlSystemGetProcessName(self, pid: int) -> bytes:
        self.name_calls += 1
        if pid not in self.process_names:
            raise pynvml.NVMLError_NotFound()
        return self.process_names[pid].encode()

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[Any]:
        return self._processes(gpu, gpu.compute_processes)

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: FakeGpu) -> list[Any]:
        return self._processes(gpu, gpu.graphics_processes)

    def _processes(self, gpu: FakeGpu, listed: list[tuple[int, int | None]]) -> list[Any]:
        self._check()
        if gpu.lost:
            raise pynvml.NVMLError_GpuIsLost()
        if gpu.processes_error is not None:
            raise gpu.processes_error
        # pynvml turns the driver's "not available" into None, as here.
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in listed]

    def nvmlDeviceGetProcessUtilization(self, gpu: FakeGpu, since: int) -> list[Any]:
        self._check()
        if gpu.utilization is None:
            raise pynvml.NVMLError_NotSupported()
        found = [
            SimpleNamespace(pid=pid, smUtil=util, memUtil=0, timeStamp=stamp)
            for pid, util, stamp in gpu.utilization
            if stamp > since
        ]
        if not found:
            raise pynvml.NVMLError_NotFound()
        return found

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu, version: int | None = None) -> Any:
        self._check()
        self.calls_started += 1
        if self.hang.is_set():
            self.release.wait(timeout=30)
        if gpu.lost:
            raise pynvml.NVMLError_GpuIsLost()
        if version is None:
            # v1 counts the driver's reservation as used and has no `reserved` field.
            return SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.used + gpu.reserved)
        if not self.v2:
            raise pynvml.NVMLError_FunctionNotFound()
        return SimpleNamespace(
            version=version, total=gpu.total, reserved=gpu.reserved, free=gpu.free, used=gpu.used
        )
