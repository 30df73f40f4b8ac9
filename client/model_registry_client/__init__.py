"""The client schedulers install: reserve VRAM on a model-registry daemon, renewed while a
load runs and released after it; list what fits; watch for changes; place a load in a fleet.

    with Registry(url, token=tok) as reg, reg.reserve("large-v3", holder=session) as lease:
        start_worker(model="large-v3", gpu=lease.gpu.uuid)
"""

from model_registry_client.aio import AsyncFleet, AsyncLease, AsyncRegistry, AsyncWatch
from model_registry_client.errors import (
    Forbidden,
    LeaseLost,
    NotFound,
    Refused,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
)
from model_registry_client.objects import (
    Candidate,
    Event,
    Footprint,
    GpuDevice,
    GpuRef,
    Gpus,
    Instance,
    Model,
    Placement,
    ProductFootprint,
    Reservation,
    WarmSpot,
)
from model_registry_client.sync import Fleet, Lease, Registry, Watch

__all__ = [
    "AsyncFleet",
    "AsyncLease",
    "AsyncRegistry",
    "AsyncWatch",
    "Candidate",
    "Event",
    "Fleet",
    "Footprint",
    "Forbidden",
    "GpuDevice",
    "GpuRef",
    "Gpus",
    "Instance",
    "Lease",
    "LeaseLost",
    "Model",
    "NotFound",
    "Placement",
    "ProductFootprint",
    "Refused",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "Reservation",
    "Unauthorized",
    "WarmSpot",
    "Watch",
]
