"""A backend that reads devices from a JSON file at every poll, for tests and drills."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpu.backend import GpuUnavailable
from gpu.snapshot import MIB, GpuDevice, GpuProcess


class _SimulatedProcess(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pid: int = Field(ge=1)
    used_mib: int | None = Field(default=None, ge=0)
    name: str | None = None
    sm_util: int | None = Field(default=None, ge=0, le=100)


class _SimulatedDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uuid: str = Field(min_length=1)
    name: str = "Simulated GPU"
    index: int | None = Field(default=None, ge=0)
    total_mib: int = Field(ge=1)
    free_mib: int = Field(ge=0)
    used_mib: int | None = Field(default=None, ge=0)
    reserved_mib: int | None = Field(default=None, ge=0)
    healthy: bool = True
    # null: the driver would not list the processes (as with no permission to)
    processes: list[_SimulatedProcess] | None = []


class _SimulatedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: list[_SimulatedDevice]


def _optional_bytes(mib: int | None) -> int | None:
    return None if mib is None else mib * MIB


class SimulatedBackend:
    name = "simulated"

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def read(self) -> list[GpuDevice]:
        if self.path is None:
            raise GpuUnavailable("no simulated file configured (MODEL_REGISTRY_GPU_SIMULATED_FILE)")
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise GpuUnavailable(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            parsed = _SimulatedFile.model_validate(json.loads(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "document"
            raise GpuUnavailable(
                f"invalid simulated file {self.path}: {where}: {first['msg']}"
            ) from exc
        except ValueError as exc:
            raise GpuUnavailable(f"invalid simulated file {self.path}: {exc}") from exc
        if not parsed.devices:
            raise GpuUnavailable(f"simulated file {self.path} lists no devices")
        return [
            GpuDevice(
                uuid=device.uuid,
                index=position if device.index is None else device.index,
                name=device.name,
                total_bytes=device.total_mib * MIB,
                free_bytes=device.free_mib * MIB,
                used_bytes=_optional_bytes(device.used_mib),
                reserved_bytes=_optional_bytes(device.reserved_mib),
                healthy=device.healthy,
                error=None if device.healthy else "marked unhealthy in the simulated file",
                processes=tuple(
                    GpuProcess(p.pid, _optional_bytes(p.used_mib), p.name, p.sm_util)
                    for p in device.processes or ()
                ),
                processes_known=device.processes is not None,
            )
            for position, device in enumerate(parsed.devices)
        ]

    def close(self) -> None:
        pass
