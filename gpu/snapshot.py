"""Immutable readings of GPU memory, as published by the poller."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

MIB = 1024 * 1024


class GpuState(enum.StrEnum):
    OK = "ok"
    STALE = "stale"
    UNAVAILABLE = "unavailable"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding memory on a device, as the driver reports it.

    `used_bytes` is None when the driver does not say (some platforms, some containers).
    """

    pid: int
    used_bytes: int | None = None
    name: str | None = None  # None: neither the driver nor /proc would say
    # Its streaming-multiprocessor use (percent) since the last reading, where the driver
    # reports it (NVML's per-process utilization); None where it does not. Not part of a
    # reading's identity: activity alone does not make a new snapshot (nor a new page, ETag
    # or event); the poll listeners see it in every reading.
    sm_util: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One allocatable device: a whole GPU, or one MIG instance of a GPU with MIG on.

    Memory is in bytes, as NVML reports it. `used_bytes` and `reserved_bytes` are None when the
    driver does not report them (v1 memory call), never a made-up zero.
    """

    uuid: str
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int | None = None
    reserved_bytes: int | None = None
    healthy: bool = True
    error: str | None = None
    parent_uuid: str | None = None
    processes: tuple[GpuProcess, ...] = ()
    # False when the driver would not list the processes (permissions, some MIG or container
    # setups): then nobody can tell whether a given process is on the device.
    processes_known: bool = True

    @property
    def total_mib(self) -> int:
        return self.total_bytes // MIB

    @property
    def free_mib(self) -> int:
        # Rounded down: a scheduler must never be promised memory that is not there.
        return self.free_bytes // MIB

    def has_process(self, pid: int) -> bool:
        return any(process.pid == pid for process in self.processes)

    def process_used_mib(self, pid: int) -> int | None:
        """MiB the driver attributes to `pid` on this device; None when it is not listed."""
        for process in self.processes:
            if process.pid == pid and process.used_bytes is not None:
                return process.used_bytes // MIB  # rounded down: never more than measured
        return None


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """What the poller knows about the GPUs at one moment.

    `as_of` is when these readings were first observed; the poller re-confirms them every
    interval and publishes a new snapshot only when something changes (state, error or memory).
    """

    backend: str
    state: GpuState
    devices: tuple[GpuDevice, ...] = ()
    as_of: datetime | None = None
    error: str | None = None

    @property
    def known(self) -> bool:
        """Whether the readings can be trusted for capacity decisions."""
        return self.state is GpuState.OK

    def same_readings(self, other: GpuSnapshot | None) -> bool:
        return (
            other is not None
            and self.state is other.state
            and self.error == other.error
            and self.devices == other.devices
        )
