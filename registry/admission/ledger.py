"""The reservations on disk: one JSON file in the state directory, replaced atomically.

A reservation is acknowledged only once it is on disk (written, fsynced, renamed into place),
so a daemon killed at any moment restarts with every promise it made. Concurrent requests share
one write (group commit). A lock file keeps a second daemon off the same state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from registry.admission.reservation import Reservation

FILE_NAME = "reservations.json"
LOCK_NAME = "daemon.lock"
_FORMAT = 1


class LedgerError(Exception):
    """The reservations file cannot be used; the message says which file and what to do."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    vram_mib: int
    gpu_uuid: str
    gpu_index: int
    created_at: AwareDatetime
    expires_at: AwareDatetime
    model: str | None = None
    holder: str | None = None
    pid: int | None = None
    pid_baseline_mib: int = 0


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int
    reservations: list[_Record]


def _write_atomically(path: Path, payload: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(directory)  # the rename itself must survive a crash
    finally:
        os.close(directory)


class ReservationLedger:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self._lock_path = state_dir / LOCK_NAME
        self._lock_file: IO[str] | None = None
        self._write_lock = asyncio.Lock()
        self._requested = 0  # saves asked for
        self._written = 0  # saves covered by the last completed write

    def open(self) -> list[Reservation]:
        """Take the state directory for this daemon and read the reservations it holds."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_file = self._lock_path.open("a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "?"
            lock_file.close()
            raise LedgerError(
                f"another model-registry daemon (pid {holder}) is using the state directory "
                f"{self.path.parent}; give each daemon its own MODEL_REGISTRY_STATE_DIR"
            ) from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._lock_file = lock_file
        try:
            return self._read()
        except LedgerError:
            self.close()
            raise

    def _read(self) -> list[Reservation]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LedgerError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            parsed = _File.model_validate_json(raw)
        except ValidationError as exc:
            raise LedgerError(
                f"{self.path} is not a reservations file this daemon can read "
                f"({exc.error_count()} problem(s), first: {exc.errors()[0]['msg']}); it holds "
                "promises made to schedulers: move it aside only once no load depends on them"
            ) from None
        if parsed.format != _FORMAT:
            raise LedgerError(
                f"{self.path} has format {parsed.format}; this daemon reads {_FORMAT}"
            )
        return [Reservation(**record.model_dump()) for record in parsed.reservations]

    async def save(self, current: Callable[[], list[Reservation]]) -> None:
        """Return once the reservations as they are now are on disk.

        `current` is read when the write starts, so callers that arrive while a write is in
        flight share the next one.
        """
        self._requested += 1
        wanted = self._requested
        async with self._write_lock:
            if self._written >= wanted:
                return
            covers = self._requested
            payload = json.dumps(
                {"format": _FORMAT, "reservations": [r.to_record() for r in current()]},
                separators=(",", ":"),
            ).encode()
            # Shielded: a cancelled caller must not leave a write half-reported.
            await asyncio.shield(asyncio.to_thread(_write_atomically, self.path, payload))
            self._written = covers

    def close(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
