"""Running the app as a host service: listen, tell systemd, watch, reload and stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from gpu import GpuPoller
from registry import keys
from registry.app import SERVER_OPTIONS, create_app, margins_from
from registry.config import (
    SYSTEM_STATE_DIR,
    ConfigError,
    Settings,
    load_settings,
    settings_problems,
    shadowed_by_environment,
    user_state_dir,
)
from registry.event_loop import loop_name
from registry.guard.connections import (
    KEEPALIVE_TIMEOUT_S,
    GuardedRunner,
    GuardedServer,
    GuardedSite,
)
from registry.guard.fds import default_max_connections, listen_backlog, raise_open_files_limit
from registry.guard.metrics import ConnectionStats
from registry.guard.tls import TlsFiles
from registry.logs import REPEAT_WINDOW_S, flush_repeated, get_logger, set_level
from registry.sdnotify import Notifier, watchdog_interval_s

log = get_logger("registry.service")

STATUS_DEBOUNCE_S = 0.05


def status_line(app: web.Application) -> str:
    view = app[keys.VIEW]
    line = f"{view.model_count} models, {view.active_count} active, GPU {view.snapshot.state.value}"
    if reservations := view.reservations:
        pending = view.capacity.pending_total_mib
        line += f", {len(reservations)} reservation(s) holding {pending} MiB"
    return line


def poller_alive(poller: GpuPoller | None, within_s: float) -> bool:
    """Whether the GPU loop has ticked recently; a stuck loop must miss the watchdog."""
    if poller is None:
        return True
    return time.monotonic() - poller.last_tick <= max(within_s, 2 * poller.interval_s)


class Service:
    def __init__(self, settings: Settings, config_file: Path | None, overrides: dict[str, object]):
        self.config_file = config_file
        self.overrides = overrides
        self.notifier = Notifier()
        self.app = create_app(settings)
        self.live = self.app[keys.SETTINGS]
        # Before anything starts: a bad certificate is a one-line start-up error.
        self.tls = (
            TlsFiles(settings.tls_cert_file, settings.tls_key_file)
            if settings.tls_cert_file is not None and settings.tls_key_file is not None
            else None
        )
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._view_changed = asyncio.Event()
        if self.notifier.enabled:
            self.app[keys.VIEW].subscribe(self._view_changed.set)

    @property
    def settings(self) -> Settings:
        return self.live.current

    async def run(self) -> int:
        settings = self.settings
        soft, hard = raise_open_files_limit()
        max_connections = settings.max_connections or default_max_connections(soft)
        slots = self.app[keys.STREAM_SLOTS]
        slots.cap_to_connections(max_connections)
        log.info(
            "limits",
            open_files=soft,
            open_files_hard=hard,
            max_connections=max_connections,
            max_streams=slots.limit,
            max_streams_per_client=slots.per_client,
            header_timeout_s=settings.header_timeout,
            body_timeout_s=settings.body_timeout,
            keepalive_timeout_s=KEEPALIVE_TIMEOUT_S,
            event_loop=loop_name(),
        )
        _warn_about_short_tokens(settings)
        _warn_about_a_legacy_state_dir(settings)
        if self.config_file is not None and (shadowed := shadowed_by_environment()):
            log.warning(
                "reloadable settings are set in the environment, where a reload cannot change "
                "them: move them to the config file",
                config_file=str(self.config_file),
                settings=shadowed,
            )
        runner = GuardedRunner(
            self.app,
            max_connections=max_connections,
            header_timeout_s=settings.header_timeout,
            answer_at_once=self.app[keys.HOT_READS].answer,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=settings.shutdown_timeout,
            **SERVER_OPTIONS,
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            await runner.setup()
        except BaseException:
            await runner.cleanup()  # release what start-up acquired (the embedded server, ...)
            raise
        server = runner.server
        assert isinstance(server, GuardedServer)
        with self.app[keys.METRICS].collecting(ConnectionStats(server)):
            return await self._serve(runner, server, listen_backlog(soft))

    async def _serve(self, runner: GuardedRunner, server: GuardedServer, backlog: int) -> int:
        """Listen until stopped, then clean up; the exit status."""
        exit_code = 0
        background = []
        try:
            background = [
                asyncio.create_task(server.sweep(), name="header-timeouts"),
                asyncio.create_task(_flush_repeated_logs(), name="log-summaries"),
            ]
            site = GuardedSite(
                runner,
                self.settings.host,
                self.settings.port,
                ssl_context=None if self.tls is None else self.tls.context,
                backlog=backlog,
            )
            await site.start()
            log.info(
                "listening",
                host=self.settings.host,
                port=self.settings.port,
                urls=[str(s.name) for s in runner.sites],
            )
            self.notifier.send("READY=1", f"STATUS={status_line(self.app)}")
            exit_code = await self._serve_until_stopped()
        finally:
            self.notifier.send("STOPPING=1")
            log.info("stopping", grace_s=self.settings.shutdown_timeout)
            await runner.cleanup()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            flush_repeated()
            log.info("stopped", exit_code=exit_code)
        return exit_code

    async def _serve_until_stopped(self) -> int:
        fatal = self.app[keys.FATAL]
        watchdog_s = watchdog_interval_s() if self.notifier.enabled else None
        hang = HangWatch(self.settings.gpu_hang_limit, watchdog_s)
        tick_s = min(watchdog_s or 5.0, 5.0, hang.limit_s / 2)
        next_watchdog = 0.0
        last_status = ""
        events = (self._stop, fatal, self._reload, self._view_changed)
        while True:
            waiters = [asyncio.ensure_future(e.wait()) for e in events]
            await asyncio.wait(waiters, timeout=tick_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if fatal.is_set():
                log.error("a background task died; exiting so the service manager restarts us")
                return 1
            if self._stop.is_set():
                return 0
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            now = time.monotonic()
            if watchdog_s is not None and now >= next_watchdog:
                next_watchdog = now + tick_s
                poller = self.app.get(keys.POLLER)
                if poller_alive(poller, watchdog_s * 2) and not hang.hung(poller):
                    self.notifier.send("WATCHDOG=1")
            elif watchdog_s is None:
                hang.hung(self.app.get(keys.POLLER))  # said once; the readings go stale
            if self._view_changed.is_set():
                # STATUS is read by people: at most one every 50 ms, however busy the view is.
                self._view_changed.clear()
                await asyncio.sleep(STATUS_DEBOUNCE_S)
            status = status_line(self.app)
            if status != last_status:
                self.notifier.send(f"STATUS={status}")
                last_status = status

    def reload(self) -> None:
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            fresh = load_settings(self.config_file, **self.overrides)
        except ValidationError as exc:
            log.error(
                "reload failed, invalid settings; keeping the current ones",
                error=settings_problems(exc),
            )
        except ConfigError as exc:
            log.error(
                "reload failed, unreadable config file; keeping the current settings",
                error=str(exc),
            )
        else:
            if waiting := self.live.needing_restart(fresh):
                log.warning(
                    "reloaded settings that take effect only at a restart", settings=waiting
                )
            changed = self.live.reload(fresh)
            self.app[keys.VIEW].set_margins(margins_from(self.settings))
            self._reload_tls()
            if (poller := self.app.get(keys.POLLER)) is not None:
                poller.interval_s = self.settings.poll_interval
            set_level(self.settings.log_level)
            log.info("configuration reloaded", changed=changed or None)
        self.notifier.send("READY=1", f"STATUS={status_line(self.app)}")

    def _reload_tls(self) -> None:
        if self.tls is None:
            return
        try:
            self.tls.reload()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("TLS reload failed; keeping the certificate in use", error=str(exc))
        else:
            log.info("TLS certificate reloaded", cert_file=str(self.tls.cert_file))


DEFAULT_HANG_LIMIT_S = 30.0


class HangWatch:
    """Whether a GPU call has been in flight longer than the hang limit, said once per hang.

    Under systemd's watchdog a hung call withholds the pings, so systemd restarts the daemon
    with a fresh NVML (a hung driver call never returns to the same process). Without it the
    daemon keeps serving, its readings stale, and the log says why.
    """

    def __init__(self, limit_s: float | None, watchdog_half_s: float | None) -> None:
        # The default: half of WATCHDOG_USEC (the ping interval used is half of that again).
        default = watchdog_half_s if watchdog_half_s is not None else DEFAULT_HANG_LIMIT_S
        self.limit_s = limit_s if limit_s is not None else default
        self._watchdog = watchdog_half_s is not None
        self._said = False

    def hung(self, poller: GpuPoller | None) -> bool:
        hung_s = 0.0 if poller is None else poller.hung_for_s()
        if hung_s <= self.limit_s:
            self._said = False
            return False
        if not self._said:
            self._said = True
            consequence = (
                "watchdog pings stop, so systemd restarts the daemon with a fresh NVML"
                if self._watchdog
                else "GPU readings stay stale until it returns; restart the daemon for a fresh NVML"
            )
            log.error(
                f"a GPU call has not returned: {consequence}",
                hung_s=round(hung_s, 1),
                limit_s=self.limit_s,
            )
        return True


MIN_TOKEN_LENGTH = 16


def _warn_about_short_tokens(settings: Settings) -> None:
    """Say at start which setting holds a token short enough to guess (never the token)."""
    for name, tokens in (
        ("MODEL_REGISTRY_ADMIN_TOKEN", settings.admin_tokens()),
        ("MODEL_REGISTRY_SCHEDULER_TOKEN", settings.scheduler_tokens()),
    ):
        if any(len(token) < MIN_TOKEN_LENGTH for token in tokens):
            log.warning(
                "a bearer token is shorter than 16 characters: easy to guess",
                setting=name,
            )


def _warn_about_a_legacy_state_dir(settings: Settings) -> None:
    if (
        os.geteuid() == 0
        and "state_dir" not in settings.model_fields_set
        and settings.state_dir == user_state_dir()
    ):
        log.warning(
            "root keeps its state in the per-user place of an older install; a system daemon's "
            f"belongs in {SYSTEM_STATE_DIR}: stop the daemon, move the directory there",
            state_dir=str(settings.state_dir),
        )


async def _flush_repeated_logs() -> None:
    while True:
        await asyncio.sleep(REPEAT_WINDOW_S)
        flush_repeated()


async def serve(settings: Settings, config_file: Path | None, overrides: dict[str, object]) -> int:
    service = Service(settings, config_file, overrides)
    with contextlib.suppress(asyncio.CancelledError):
        return await service.run()
    return 1
