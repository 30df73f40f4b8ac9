"""GPU awareness: backends that read device memory and a poller that publishes snapshots.

This package knows nothing of the web app or the database.
"""

from gpu.backend import GpuBackend, GpuUnavailable
from gpu.poller import GpuPoller
from gpu.snapshot import MIB, GpuDevice, GpuProcess, GpuSnapshot, GpuState

__all__ = [
    "MIB",
    "GpuBackend",
    "GpuDevice",
    "GpuPoller",
    "GpuProcess",
    "GpuSnapshot",
    "GpuState",
    "GpuUnavailable",
]
