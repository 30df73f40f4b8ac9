"""Running the real `model-registry serve` as a child process, as systemd would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.waiting import eventually


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NotifyListener:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout_s: float = 15.0) -> list[str]:
        """Receive until a datagram holds `line`; return every line received so far."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {line!r} within {timeout_s} s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                datagram = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            lines = datagram.split("\n")
            self.messages.extend(lines)
            if line in lines:
                return self.messages

    def drain(self) -> None:
        """Take in the datagrams already queued, without waiting for more."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.extend(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sock.close()


class Daemon:
    def __init__(
        self,
        env: dict[str, str],
        *args: str,
        log_path: Path,
        open_files: int | None = None,
        scheme: str = "http",
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        # Never the developer's own state directory; a test that restarts a daemon passes one.
        state_dir = log_path.with_name(f"{log_path.stem}-state")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "registry", "serve", "--port", str(self.port), *args],
            env={
                **os.environ,
                "MODEL_REGISTRY_LOG_FORMAT": "json",
                "MODEL_REGISTRY_STATE_DIR": str(state_dir),
                **env,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=None if open_files is None else (lambda: _limit_open_files(open_files)),
        )

    async def wait_ready(self, timeout_s: float = 30.0, ssl: Any = None) -> None:
        connector = aiohttp.TCPConnector(ssl=ssl) if ssl is not None else None
        async with aiohttp.ClientSession(connector=connector) as session:

            async def answers() -> bool:
                if self.process.poll() is not None:
                    raise AssertionError(f"daemon exited early:\n{self.log()}")
                try:
                    async with session.get(f"{self.url}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            try:
                await eventually(answers, timeout_s=timeout_s, step_s=0.05)
            except AssertionError as exc:
                if "exited early" in str(exc):
                    raise
                raise AssertionError(f"daemon not answering:\n{self.log()}") from None

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout_s: float = 10.0) -> int:
        return self.process.wait(timeout=timeout_s)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


def _limit_open_files(limit: int) -> None:
    """In the child, before exec: a soft and hard open-file limit, as on a stingy host."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


async def get_json(url: str, **kwargs: Any) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as response:
        return response.status, await response.json()


def reload_with(daemon: Daemon, notify: NotifyListener, config: Path, text: str) -> list[str]:
    """Write `text` to the daemon's configuration file and SIGHUP it: back once the reload is
    done, with every notify line received so far."""
    config.write_text(text)
    daemon.signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1")
    return notify.wait_for("READY=1")
