"""The reservations on disk: an append-only journal in the state directory.

Every change is one JSON line: `{"put": {...}}` (a reservation as it now is), `{"end": id}`,
`{"instance": {...}}` (an instance as it now is), `{"end_instance": id}`, or `{"bind": {...}}`:
a reservation that became an instance, in one line, so a crash loses neither.
A grant is acknowledged only once its line is on disk (written and fdatasync'ed), so a daemon
killed at any moment restarts with every promise it made. Requests that arrive while a write is
in flight share the next one (group commit). At start-up, and whenever the journal has grown
long, it is rewritten as one line per open reservation, atomically. A lock file keeps a second
daemon off the same state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from registry.instance import Instance
from registry.logs import get_logger
from registry.reservation import Reservation
from registry.state_dir import (
    NOFOLLOW,
    Holder,
    StateDirError,
    StateLock,
    check_state_dir,
    replace_atomically,
    write_all,
)

log = get_logger("registry.admission.ledger")

FILE_NAME = "reservations.jsonl"
FORMAT = 2  # 2 added instances; a daemon that reads only 1 refuses the file, and says so
_HEADER = b'{"format":2}\n'


class LedgerError(Exception):
    """The journal cannot be used; the message says which file and what to do."""


class _Bind(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reservation: str
    instance: Instance


class _Line(BaseModel):
    """One journal line; a `put` is validated into a Reservation as it stands."""

    model_config = ConfigDict(extra="forbid")

    format: int | None = None
    put: Reservation | None = None
    end: str | None = None
    instance: Instance | None = None
    end_instance: str | None = None
    bind: _Bind | None = None


def _line(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


class ReservationLedger:
    def __init__(
        self, state_dir: Path, *, compact_after_lines: int = 10_000, boot_id: str | None = None
    ) -> None:
        self.path = state_dir / FILE_NAME
        self._lock = StateLock(state_dir)
        self._fd: int | None = None
        self._compact_after = compact_after_lines
        self._boot_id = boot_id  # instances of another boot are dropped at start (pids reused)
        self.instances: list[Instance] = []  # what the journal held, read by open()
        self._current_instances: Callable[[], list[Instance]] = list
        self._instance_count: Callable[[], int] = int
        self._current: Callable[[], list[Reservation]] = list
        self._open_count: Callable[[], int] = int
        self._pending: list[bytes] = []  # lines recorded, not yet written
        self._recorded = 0  # lines recorded so far
        self._durable = 0  # lines known to be on disk
        self._lines_in_file = 0
        self._write_lock = asyncio.Lock()

    # -- start and stop -------------------------------------------------------------------

    def open(
        self,
        current: Callable[[], list[Reservation]],
        open_count: Callable[[], int] | None = None,
    ) -> list[Reservation]:
        """Take the state directory, read what it holds and start a fresh journal.

        `current` returns the open reservations as the book holds them; it is what a
        rewrite of the journal writes. `open_count` says how many there are, cheaply.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            check_state_dir(self.path.parent)
        except StateDirError as exc:
            raise LedgerError(str(exc)) from None
        self._take_lock()
        try:
            reservations = self._replay()
            self._rewrite(reservations, self.instances)
        except BaseException:
            self.close()
            raise
        self._current = current
        self._open_count = open_count or (lambda: len(current()))
        return reservations

    def _take_lock(self) -> None:
        def waiting(holder: Holder) -> None:
            log.warning(f"waiting for {holder} to let go of the state directory")

        try:
            self._lock.take_as_daemon(on_wait=waiting)
        except StateDirError as exc:
            raise LedgerError(str(exc)) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lock.release()

    # -- recording ------------------------------------------------------------------------

    def track_instances(
        self, current: Callable[[], list[Instance]], count: Callable[[], int]
    ) -> None:
        """`current` returns the live instances: what a rewrite keeps besides reservations;
        `count` says how many there are, cheaply."""
        self._current_instances = current
        self._instance_count = count

    def put_instance(self, instance: Instance) -> None:
        self._record(_line({"instance": instance.to_record()}))

    def end_instance(self, instance_id: str) -> None:
        self._record(_line({"end_instance": instance_id}))

    def bind(self, reservation_id: str, instance: Instance) -> None:
        """Record, as one step, that a reservation ended by becoming `instance`."""
        self._record(
            _line({"bind": {"reservation": reservation_id, "instance": instance.to_record()}})
        )

    def put(self, reservation: Reservation) -> None:
        """Record a reservation as it now is (new, renewed, or given a pid)."""
        self._record(_line({"put": reservation.to_record()}))

    def end(self, reservation_id: str) -> None:
        """Record that a reservation ended (released, expired or never granted)."""
        self._record(_line({"end": reservation_id}))

    def _record(self, line: bytes) -> None:
        self._pending.append(line)
        self._recorded += 1

    async def flush(self) -> None:
        """Return once everything recorded so far is on disk."""
        wanted = self._recorded
        if self._durable >= wanted:
            return
        async with self._write_lock:
            if self._durable >= wanted:
                return  # a write that started after we recorded covered us
            lines, self._pending = self._pending, []
            covers = self._recorded
            # Rewrite once the file holds twice the open reservations and live instances (and
            # at least `compact_after` lines): a rewrite costs O(open), so it must stay rare.
            limit = max(self._compact_after, 2 * (self._open_count() + self._instance_count()))
            if self._lines_in_file + len(lines) > limit:
                snapshot = self._current()
                instances = self._current_instances()
                write = asyncio.to_thread(self._rewrite, snapshot, instances)
            else:
                write = asyncio.to_thread(self._append, b"".join(lines), len(lines))
            try:
                # Shielded: a cancelled caller must not abandon a write half-reported.
                await asyncio.shield(write)
            except OSError:
                self._pending[:0] = lines  # written again by the next flush
                raise
            self._durable = covers

    def _append(self, data: bytes, count: int) -> None:
        assert self._fd is not None
        before = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            write_all(self._fd, data)
            os.fdatasync(self._fd)
        except OSError:
            # No torn line may stay in the middle of the journal.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, before)
            raise
        self._lines_in_file += count

    def _rewrite(
        self, reservations: list[Reservation], instances: list[Instance] | None = None
    ) -> None:
        """Replace the journal by one line per open reservation and instance, atomically."""
        payload = (
            _HEADER
            + b"".join(_line({"put": r.to_record()}) for r in reservations)
            + b"".join(_line({"instance": i.to_record()}) for i in instances or ())
        )
        replace_atomically(self.path, payload)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | NOFOLLOW)
        self._lines_in_file = len(reservations) + len(instances or ())

    # -- reading --------------------------------------------------------------------------

    def _replay(self) -> list[Reservation]:
        try:
            fd = os.open(self.path, os.O_RDONLY | NOFOLLOW)
            with os.fdopen(fd, "rb") as journal:
                raw = journal.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LedgerError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        lines = raw.split(b"\n")
        complete, torn = lines[:-1], lines[-1]
        if torn:
            # A write cut short by a crash was never acknowledged: drop it.
            log.warning("dropping an unfinished last line of the journal", file=str(self.path))
        held: dict[str, Reservation] = {}
        instances: dict[str, Instance] = {}
        for number, line in enumerate(complete, start=1):
            try:
                parsed = _Line.model_validate_json(line)
            except ValidationError as exc:
                raise LedgerError(
                    f"{self.path} line {number} is not a journal line this daemon can read "
                    f"({exc.errors()[0]['msg']}); the file holds promises made to schedulers: "
                    "move it aside only once no load depends on them"
                ) from None
            if parsed.format is not None and parsed.format > FORMAT:
                raise LedgerError(
                    f"{self.path} has format {parsed.format}; this daemon reads up to {FORMAT}: "
                    "it was written by a newer model-registry, which is the one to run here"
                )
            if parsed.put is not None:
                held[parsed.put.id] = parsed.put
            if parsed.end is not None:
                held.pop(parsed.end, None)
            if parsed.bind is not None:
                held.pop(parsed.bind.reservation, None)
                instances[parsed.bind.instance.id] = parsed.bind.instance
            if parsed.instance is not None:
                instances[parsed.instance.id] = parsed.instance
            if parsed.end_instance is not None:
                instances.pop(parsed.end_instance, None)
        self.instances = [i for i in instances.values() if i.boot_id == self._boot_id]
        if dropped := len(instances) - len(self.instances):
            log.info(
                "instances of an earlier boot dropped: their pids mean nothing now", count=dropped
            )
        return list(held.values())
