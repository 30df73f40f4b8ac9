"""The interface every GPU backend implements."""

from __future__ import annotations

from typing import Protocol

from gpu.snapshot import GpuDevice


class GpuUnavailable(Exception):
    """The backend cannot read any device right now; the message says why."""


class GpuBackend(Protocol):
    """A source of device readings.

    `read` is blocking and is always called from the poller's single worker thread, so an
    implementation may keep unsynchronised state between calls.
    """

    name: str

    def read(self) -> list[GpuDevice]:
        """Return every allocatable device, or raise GpuUnavailable."""
        ...

    def close(self) -> None:
        """Release the library; the next read starts afresh."""
        ...
