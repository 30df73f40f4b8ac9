"""The NVML backend, over the `pynvml` module of the nvidia-ml-py distribution.

Every function of the library is reached through `self._nvml`, so tests replace the module at
its function boundary and nothing else.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import replace
from types import ModuleType
from typing import Any

from gpu.backend import GpuUnavailable
from gpu.snapshot import GpuDevice, GpuProcess

# A device that fails with one of these is gone until NVML is initialised again.
_LIFECYCLE_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_Uninitialized", "NVMLError_GpuNotFound")
# The v2 memory call is missing or refused by this driver: use v1 from now on.
_NO_V2_ERRORS = (
    "NVMLError_FunctionNotFound",
    "NVMLError_ArgumentVersionMismatch",
    "NVMLError_NotSupported",
)
# Compute processes (CUDA) and graphics processes; a process can be in both lists.
_PROCESS_CALLS = ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses")


def _load_pynvml() -> ModuleType:
    return importlib.import_module("pynvml")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlBackend:
    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml if nvml is not None else _load_pynvml()
        self._initialised = False
        self._needs_reinit = False
        self._use_v2: bool | None = None  # None: not tried yet
        self._uuid_by_index: dict[int, str] = {}
        self._process_names: dict[int, str | None] = {}  # pid -> name, while it runs
        # Per device, the driver's timestamp of the newest utilization sample read: the next
        # reading asks for what came after it.
        self._utilization_seen: dict[str, int] = {}

    def _errors(self, *names: str) -> tuple[type[BaseException], ...]:
        return tuple(getattr(self._nvml, name) for name in names if hasattr(self._nvml, name))

    def read(self) -> list[GpuDevice]:
        nvml = self._nvml
        if self._needs_reinit:
            self.close()
        if not self._initialised:
            try:
                nvml.nvmlInit()
            except nvml.NVMLError as exc:
                raise GpuUnavailable(f"NVML init failed: {exc}") from exc
            self._initialised = True
            self._use_v2 = None
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            self._needs_reinit = True
            raise GpuUnavailable(f"NVML device count failed: {exc}") from exc
        if count == 0:
            raise GpuUnavailable("NVML sees no GPU on this machine")
        devices: list[GpuDevice] = []
        for index in range(count):
            devices.extend(self._read_gpu(index))
        running = {p.pid for d in devices for p in d.processes}
        for pid in self._process_names.keys() - running:
            del self._process_names[pid]
        return devices

    def _read_gpu(self, index: int) -> list[GpuDevice]:
        nvml = self._nvml
        lifecycle = self._errors(*_LIFECYCLE_ERRORS)
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            self._uuid_by_index[index] = uuid
            name = _text(nvml.nvmlDeviceGetName(handle))
            if self._mig_enabled(handle):
                return self._read_mig_instances(handle, index, uuid, name)
            return [self._device(handle, index=index, uuid=uuid, name=name)]
        except lifecycle as exc:
            self._needs_reinit = True
            return [self._lost(index, exc)]
        except nvml.NVMLError as exc:
            return [self._lost(index, exc)]

    def _lost(self, index: int, exc: BaseException) -> GpuDevice:
        return GpuDevice(
            uuid=self._uuid_by_index.get(index, f"index-{index}"),
            index=index,
            name="unknown",
            total_bytes=0,
            free_bytes=0,
            healthy=False,
            error=f"{type(exc).__name__}: {exc}",
        )

    def _mig_enabled(self, handle: Any) -> bool:
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except self._errors("NVMLError_NotSupported", "NVMLError_FunctionNotFound"):
            return False
        return bool(current == nvml.NVML_DEVICE_MIG_ENABLE)

    def _read_mig_instances(
        self, handle: Any, index: int, parent_uuid: str, parent_name: str
    ) -> list[GpuDevice]:
        nvml = self._nvml
        instances: list[GpuDevice] = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except self._errors("NVMLError_NotFound", "NVMLError_InvalidArgument"):
                continue  # an empty slot between configured instances
            instances.append(
                self._device(
                    mig,
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                    name=f"{parent_name} MIG {slot}",
                    parent_uuid=parent_uuid,
                )
            )
        return instances

    def _device(
        self, handle: Any, *, index: int, uuid: str, name: str, parent_uuid: str | None = None
    ) -> GpuDevice:
        memory, has_reserved = self._memory(handle)
        processes, processes_known = self._processes(handle)
        if processes:
            processes = self._with_activity(handle, uuid, processes)
        return GpuDevice(
            uuid=uuid,
            index=index,
            name=name,
            total_bytes=int(memory.total),
            free_bytes=int(memory.free),
            used_bytes=_optional_int(memory, "used"),
            reserved_bytes=int(memory.reserved) if has_reserved else None,
            parent_uuid=parent_uuid,
            processes=processes,
            processes_known=processes_known,
        )

    def _processes(self, handle: Any) -> tuple[tuple[GpuProcess, ...], bool]:
        """Who holds memory on the device, and whether the driver would say (some call
        answered): with no answer, the list is empty and unknown, not known to be empty."""
        nvml = self._nvml
        lifecycle = self._errors(*_LIFECYCLE_ERRORS)
        used_by_pid: dict[int, int | None] = {}
        answered = False
        for call in _PROCESS_CALLS:
            function = getattr(nvml, call, None)
            if function is None:
                continue
            try:
                infos = function(handle)
            except lifecycle:
                raise
            except nvml.NVMLError:
                continue  # not supported, no permission: the memory figures still stand
            answered = True
            for info in infos:
                pid = int(info.pid)
                raw = getattr(info, "usedGpuMemory", None)
                used = None if raw is None else int(raw)
                known = used_by_pid.get(pid)
                used_by_pid[pid] = used if known is None else max(known, used or 0)
        processes = tuple(
            GpuProcess(pid, used, self._process_name(pid))
            for pid, used in sorted(used_by_pid.items())
        )
        return processes, answered

    def _with_activity(
        self, handle: Any, uuid: str, processes: tuple[GpuProcess, ...]
    ) -> tuple[GpuProcess, ...]:
        """Each process's SM use since the last reading, where the driver samples it: no
        sample since then is 0; a driver that does not sample (not supported) leaves None."""
        nvml = self._nvml
        function = getattr(nvml, "nvmlDeviceGetProcessUtilization", None)
        if function is None:
            return processes
        since = self._utilization_seen.get(uuid, 0)
        try:
            samples = function(handle, since)
        except self._errors("NVMLError_NotFound"):
            samples = []  # nothing ran since the last reading
        except nvml.NVMLError:
            return processes  # not supported, no permission: activity unknown
        busiest: dict[int, int] = {}
        for sample in samples:
            pid = int(sample.pid)
            busiest[pid] = max(busiest.get(pid, 0), int(sample.smUtil))
            since = max(since, int(sample.timeStamp))
        self._utilization_seen[uuid] = since
        return tuple(replace(p, sm_util=busiest.get(p.pid, 0)) for p in processes)

    def _process_name(self, pid: int) -> str | None:
        """The driver's name for the process, else the kernel's; asked once per process."""
        if pid not in self._process_names:
            name = None
            with contextlib.suppress(self._nvml.NVMLError, AttributeError):
                name = _text(self._nvml.nvmlSystemGetProcessName(pid)) or None
            self._process_names[pid] = name or proc_name(pid)
        return self._process_names[pid]

    def _memory(self, handle: Any) -> tuple[Any, bool]:
        nvml = self._nvml
        if self._use_v2 is not False:
            no_v2: tuple[type[BaseException], ...] = (
                TypeError,
                AttributeError,
                *self._errors(*_NO_V2_ERRORS),
            )
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            except no_v2:
                self._use_v2 = False
            else:
                self._use_v2 = True
                return memory, True
        return nvml.nvmlDeviceGetMemoryInfo(handle), False

    def close(self) -> None:
        if self._initialised:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
        self._initialised = False
        self._needs_reinit = False


def _optional_int(memory: Any, field: str) -> int | None:
    value = getattr(memory, field, None)
    return None if value is None else int(value)


def proc_name(pid: int) -> str | None:
    """The command name the kernel has for `pid`; None when it is not in this PID namespace."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            return comm.read().strip() or None
    except OSError:
        return None
