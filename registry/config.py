"""Settings: defaults < TOML file (--config) < MODEL_REGISTRY_* environment < CLI flags."""

from __future__ import annotations

import os
import socket
import tomllib
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from registry.footprint import DEFAULT_MAX_SHRINK, VramSource

ENV_PREFIX = "MODEL_REGISTRY_"
_config_file: ContextVar[Path | None] = ContextVar("config_file", default=None)


class GpuBackendName(StrEnum):
    NVML = "nvml"
    SIMULATED = "simulated"
    NONE = "none"


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


class EventLoop(StrEnum):
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class AccessLog(StrEnum):
    DEFAULT = "default"
    ALL = "all"
    OFF = "off"


SYSTEM_STATE_DIR = Path("/var/lib/model-registry")


def user_state_dir() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "model-registry"


def has_state(directory: Path) -> bool:
    """Whether a daemon has kept anything in `directory` (a database, a journal)."""
    return (directory / "postgres" / "PG_VERSION").exists() or (
        directory / "reservations.jsonl"
    ).exists()


def default_state_dir(euid: int | None = None, system_dir: Path = SYSTEM_STATE_DIR) -> Path:
    """systemd's $STATE_DIRECTORY; else, for root, /var/lib/model-registry, as for any system
    daemon (unless an older install keeps its data in the per-user place: that one, said at
    start); else the per-user data directory."""
    if systemd_dirs := os.environ.get("STATE_DIRECTORY"):  # colon-separated when several
        return Path(systemd_dirs.split(":")[0])
    if (os.geteuid() if euid is None else euid) == 0:
        legacy = user_state_dir()
        if has_state(legacy) and not has_state(system_dir):
            return legacy
        return system_dir
    return user_state_dir()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    database_url: SecretStr | None = Field(
        default=None, description="PostgreSQL URL; unset: an embedded server in the state dir."
    )
    state_dir: Path = Field(default_factory=default_state_dir)
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    gpu_backend: GpuBackendName = GpuBackendName.NVML
    gpu_simulated_file: Path | None = None
    poll_interval: float = Field(default=1.0, ge=0.05, le=60.0)
    gpu_call_timeout: float = Field(default=2.0, gt=0, le=60.0)
    gpu_hang_limit: float | None = Field(
        default=None,
        gt=0,
        le=3600.0,
        description="Seconds a GPU call may go unreturned before the watchdog pings stop; "
        "default: half of WATCHDOG_USEC, or 30 s without systemd's watchdog.",
    )
    vram_margin_mib: int = Field(default=0, ge=0)
    vram_margin_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    admin_token: SecretStr | None = None
    scheduler_token: SecretStr | None = Field(
        default=None, description="Bearer token(s) that may reserve VRAM but not edit the catalog."
    )
    read_token: SecretStr | None = Field(
        default=None,
        description="Bearer token(s) every GET then needs (a scheduler or admin token does too), "
        "but /healthz and /readyz; unset: reads are open.",
    )
    allowed_hosts: str = Field(
        default="",
        description="Host names, comma-separated, a loopback-only daemon answers to besides "
        "localhost, 127.0.0.1 and [::1].",
    )
    seed_catalog: bool = True
    log_format: LogFormat | None = Field(
        default=None, description="json or console; unset: json unless stdout is a terminal."
    )
    log_level: str = "info"
    access_log: AccessLog = AccessLog.DEFAULT
    proc_root: Path = Field(
        default=Path("/proc"),
        description="Where the host's processes are listed: binds by a container's own pid "
        "look there for the host pid.",
    )
    event_loop: EventLoop = Field(
        default=EventLoop.UVLOOP,
        description="uvloop (the default, where it is installed) or asyncio's own loop.",
    )
    slow_request_ms: float = Field(default=250.0, ge=0)
    shutdown_timeout: float = Field(default=5.0, ge=0, le=60.0)
    catalog_reload_interval: float = Field(default=30.0, ge=1.0, le=3600.0)
    host_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=253,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="This host's name in the fleet; default: the host name.",
    )
    advertise_url: str | None = Field(
        default=None, description="How other hosts reach this daemon; default http://<fqdn>:<port>."
    )
    heartbeat_interval: float = Field(
        default=5.0, ge=0.05, le=300.0, description="Seconds between fleet heartbeats at most."
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="Client connections at most; default: the open-file limit less a reserve.",
    )
    header_timeout: float = Field(
        default=10.0, ge=0.1, le=600.0, description="Seconds for a request head to arrive."
    )
    body_timeout: float = Field(
        default=30.0, ge=0.1, le=3600.0, description="Seconds for a request body to arrive."
    )
    tls_cert_file: Path | None = Field(default=None, description="Serve HTTPS with this cert.")
    tls_key_file: Path | None = Field(default=None, description="... and this private key.")
    events_keepalive: float = Field(
        default=15.0, ge=0.05, le=300.0, description="Seconds between /events keep-alive comments."
    )
    max_streams: int = Field(
        default=1024,
        ge=1,
        description="/events streams and waiting GETs at most, together; never more than half "
        "the connection cap. Beyond it, 503.",
    )
    max_streams_per_client: int = Field(
        default=64, ge=1, description="... of them from one remote address. Beyond it, 429."
    )
    dcgm_metrics: bool = False
    max_reservations: int = Field(
        default=10_000, ge=1, description="Open reservations at most; beyond it, 429 too_many."
    )
    max_instances: int = Field(
        default=10_000, ge=1, description="Live instances at most; beyond it, 429 too_many."
    )
    vram_source: VramSource = Field(
        default=VramSource.MAX,
        description="What admission books: max(declared, observed), declared, or observed.",
    )
    page_cache_mib: int = Field(
        default=64,
        ge=0,
        le=1 << 20,
        description="MiB of rendered listings kept for repeated queries (least recently used out).",
    )
    footprint_min_samples: int = Field(
        default=3, ge=1, le=100, description="Samples before an observed size counts."
    )
    footprint_max_shrink: float = Field(
        default=DEFAULT_MAX_SHRINK,
        ge=0.0,
        le=1.0,
        description="Under vram_source observed, the most a learned size takes off the declared "
        "one (0.5: never below half of it).",
    )
    idle_after_s: float = Field(
        default=30.0,
        ge=0.0,
        le=86400.0,
        description="Seconds an instance must be idle (no sessions, no GPU activity) before a "
        "claim may ask for it to go.",
    )
    min_residency_s: float = Field(
        default=60.0,
        ge=0.0,
        le=86400.0,
        description="Seconds an instance must have been loaded before a claim may ask for it "
        "to go (no evict/reload loops).",
    )
    room_timeout_s: float = Field(
        default=120.0,
        ge=1.0,
        le=3600.0,
        description="Seconds a claim waits for its victims to go before it is withdrawn.",
    )
    max_instances_per_token: int | None = Field(
        default=None,
        ge=1,
        description="Live instances one token may own; default: a quarter of max_instances.",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("must be one of debug, info, warning, error, critical")
        return level

    @field_validator("admin_token", "scheduler_token", "read_token", "database_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        _ = parts.port  # raises ValueError for a port that is not a number
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if (path := _config_file.get()) is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("advertise_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.strip().rstrip("/")

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "set both MODEL_REGISTRY_TLS_CERT_FILE and ..._TLS_KEY_FILE, or neither"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def advertised_url(self) -> str:
        """The URL other hosts use for this daemon."""
        if self.advertise_url is not None:
            return self.advertise_url
        host = socket.getfqdn()
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"

    def database_dsn(self) -> str | None:
        """The configured PostgreSQL URL; None means the embedded server."""
        return None if self.database_url is None else self.database_url.get_secret_value()

    def instances_per_token(self) -> int:
        return self.max_instances_per_token or max(1, self.max_instances // 4)

    def admin_tokens(self) -> list[str]:
        return _tokens(self.admin_token)

    def scheduler_tokens(self) -> list[str]:
        return _tokens(self.scheduler_token)

    def read_tokens(self) -> list[str]:
        return _tokens(self.read_token)

    def reading_token(self) -> str | None:
        """The token a command that only reads sends: read, else scheduler, else admin."""
        tokens = self.read_tokens() + self.scheduler_tokens() + self.admin_tokens()
        return tokens[0] if tokens else None

    def writing_token(self, *, admin_first: bool) -> str | None:
        """The token a command that writes sends. Ending what another token booked takes an
        admin token, so removals try that first; bookings are made with a scheduler token when
        there is one, so that they are its to renew and release."""
        admin, scheduler = self.admin_tokens(), self.scheduler_tokens()
        tokens = admin + scheduler if admin_first else scheduler + admin
        return tokens[0] if tokens else None

    def allowed_host_names(self) -> frozenset[str]:
        return frozenset(
            name.strip().lower().rstrip(".") for name in self.allowed_hosts.split(",") if name
        ) - {""}


def _tokens(value: SecretStr | None) -> list[str]:
    """A comma-separated list of tokens; blanks are ignored."""
    if value is None:
        return []
    return [t.strip() for t in value.get_secret_value().split(",") if t.strip()]


class ConfigError(Exception):
    """The configuration cannot be loaded; the message is meant for the operator."""


def settings_problems(error: ValidationError) -> str:
    """What is wrong with the settings, in one line: names and reasons, never the values (a
    URL or a token among them would reach the journal)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}"
        for e in error.errors(include_input=False, include_url=False)
    )


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; `overrides` (CLI flags) win over everything, None means not given."""
    if config_file is not None:
        _check_readable(config_file)
    token = _config_file.set(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _config_file.reset(token)


def _check_readable(config_file: Path) -> None:
    """A config file that is missing, unreadable or not TOML is one clear ConfigError."""
    try:
        text = config_file.read_bytes().decode()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config_file}") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {config_file}: {exc.strerror or exc} (the daemon's user "
            "must be able to read it; see docs/operations.md)"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {config_file} is not UTF-8 text") from None
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None


# The settings that SIGHUP can change without a restart, read again from the --config file (the
# environment of a running process does not change: a setting there shadows the file's).
LIVE_SETTINGS = (
    "poll_interval",
    "vram_margin_mib",
    "vram_margin_percent",
    "log_level",
    "admin_token",
    "scheduler_token",
    "read_token",
)


class LiveSettings:
    """The settings in force. A reload replaces `current` as a whole, so every reader that goes
    through here (handlers, background loops) sees a reloaded value from then on."""

    def __init__(self, settings: Settings) -> None:
        self.current = settings

    def needing_restart(self, fresh: Settings) -> list[str]:
        """Settings `fresh` changes that a reload cannot apply: they wait for a restart."""
        current = self.current
        return sorted(
            name
            for name in Settings.model_fields
            if name not in LIVE_SETTINGS and getattr(fresh, name) != getattr(current, name)
        )

    def reload(self, fresh: Settings) -> dict[str, dict[str, Any]]:
        """Take the reloadable settings from `fresh`; return what changed (from, to)."""
        current = self.current
        changed = {
            name: _change(getattr(current, name), getattr(fresh, name))
            for name in LIVE_SETTINGS
            if getattr(fresh, name) != getattr(current, name)
        }
        self.current = current.model_copy(
            update={name: getattr(fresh, name) for name in LIVE_SETTINGS}
        )
        return changed


def shadowed_by_environment() -> list[str]:
    """Reloadable settings set in the environment: a reload cannot change them (the file's
    value is ignored), so the operator should move them to the config file."""
    return [
        f"{ENV_PREFIX}{name.upper()}"
        for name in LIVE_SETTINGS
        if f"{ENV_PREFIX}{name.upper()}" in os.environ
    ]


def _change(before: Any, after: Any) -> dict[str, Any]:
    """A setting's change as logged: a secret's values are never shown."""
    if isinstance(before, SecretStr) or isinstance(after, SecretStr):
        return {"from": "set" if before else "unset", "to": "set" if after else "unset"}
    return {"from": before, "to": after}
