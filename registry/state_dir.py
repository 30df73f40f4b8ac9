"""The state directory: who may use it, who holds it now, and how its files are written.

One process at a time holds a state directory (its embedded PostgreSQL and its journal): a
daemon for its whole life, or a command for one run when no daemon does. The lock file says
who holds it (`<pid> <role>`), so a command that finds a daemon there uses that daemon's server
instead of starting its own, and a daemon that finds a command there waits for it to finish.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "daemon.lock"
DAEMON = "daemon"
# Files of the state directory are never opened through a symbolic link someone planted.
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class StateDirError(Exception):
    """The state directory cannot be used; the message says why and what to do."""


def check_state_dir(directory: Path) -> None:
    """Refuse a state directory that another user owns, or that others may write to: the
    promises kept there (and the database) must be this daemon's alone."""
    info = directory.stat()
    fix = f"chown {os.geteuid()} {directory} && chmod go-w {directory}"
    if info.st_uid != os.geteuid():
        raise StateDirError(
            f"the state directory {directory} belongs to user {info.st_uid}, not to this "
            f"daemon's ({os.geteuid()}): give it its own (MODEL_REGISTRY_STATE_DIR), or {fix}"
        )
    if info.st_mode & 0o022:
        raise StateDirError(
            f"the state directory {directory} is writable by group or others "
            f"(mode {info.st_mode & 0o777:o}): {fix}"
        )


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def replace_atomically(path: Path, payload: bytes) -> None:
    """Write `path` anew (0600) through a temporary file and a rename, both made durable."""
    temporary = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # a leftover, or a planted link: created anew, exclusively
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
    try:
        write_all(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(directory)  # the rename itself must survive a crash
    finally:
        os.close(directory)


@dataclass(frozen=True)
class Holder:
    """Who holds a state directory: a daemon, or a command (`command models list`)."""

    pid: str
    role: str

    @property
    def is_daemon(self) -> bool:
        return self.role == DAEMON

    def __str__(self) -> str:
        if self.is_daemon:
            return f"a model-registry daemon (pid {self.pid})"
        return f"`model-registry {self.role.removeprefix('command ')}` (pid {self.pid})"


class StateLock:
    """The lock file of a state directory, held with flock for as long as the holder runs."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def try_acquire(self, role: str) -> Holder | None:
        """Take the lock as `role`; None when taken, else who holds it (nothing is written)."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)
        self._fd = fd
        return None

    def take(
        self,
        role: str,
        *,
        wait_for_command_s: float = 60.0,
        on_wait: Callable[[Holder], None] | None = None,
    ) -> Holder | None:
        """Take the lock as `role`: None once taken, or the daemon that holds it. While a
        command holds it, wait for it (its embedded server stops when it ends), calling
        `on_wait` once; a command that does not finish in time is a StateDirError."""
        deadline = time.monotonic() + wait_for_command_s
        told = False
        while (holder := self.try_acquire(role)) is not None:
            if holder.is_daemon:
                return holder
            if time.monotonic() >= deadline:
                raise StateDirError(
                    f"{holder} has held the state directory {self.state_dir} for more than "
                    f"{wait_for_command_s:g} s: let it finish (or stop it), then try again"
                )
            if not told and on_wait is not None:
                on_wait(holder)
                told = True
            time.sleep(0.05)
        return None

    def take_as_daemon(self, on_wait: Callable[[Holder], None] | None = None) -> None:
        """Take the lock for a daemon's life; another daemon there is a StateDirError."""
        holder = self.take(DAEMON, on_wait=on_wait)
        if holder is not None:
            raise StateDirError(
                f"another model-registry daemon (pid {holder.pid}) is using the state "
                f"directory {self.state_dir}; give each daemon its own MODEL_REGISTRY_STATE_DIR"
            )

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _open(self) -> int:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
        except PermissionError:
            owner = _owner_of(self.state_dir)
            raise StateDirError(
                f"cannot open {self.path}: the state directory belongs to {owner}. Run this "
                f"as that user or as root (sudo), or talk to its daemon over HTTP"
            ) from None
        except OSError as exc:
            raise StateDirError(
                f"cannot open {self.path} ({exc.strerror}): it must be a plain file of "
                "the state directory, not a symbolic link"
            ) from None


def _read_holder(fd: int) -> Holder:
    text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    pid, _, role = text.partition(" ")
    # A lock written by an earlier release holds the pid alone: a daemon's.
    return Holder(pid=pid or "?", role=role.strip() or DAEMON)


def _owner_of(path: Path) -> str:
    try:
        uid = path.stat().st_uid
    except OSError:
        return "another user"
    try:
        return f"user {pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return f"user {uid}"
