"""Typed settings: a TOML file plus ``KENSHO_*`` environment overrides.

Precedence, lowest first: built-in defaults, the TOML file (``--config FILE``, else
``$KENSHO_CONFIG``, else ``./kensho.toml`` when it exists), then environment
variables. Every setting ``section.key`` can be overridden by ``KENSHO_SECTION_KEY``
(``server.port`` by ``KENSHO_SERVER_PORT``); a few have short aliases documented on
the field (``KENSHO_API_KEY``). List settings take comma-separated values and mapping
settings ``name=value`` pairs (``KENSHO_LOG_LEVELS="storage=debug,runtime=warning"``).

Unknown keys, unknown ``KENSHO_*`` variables and wrong types are errors, never
silently ignored: a typo (``KENSHO_SERVR_PORT``) would otherwise leave a production
setting at its default. The accepted variable names are derived from the models
below, so a new field is accepted (and its misspellings refused) with no list to keep.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kensho._env import CONFIG_FILE_ENV, ENV_PREFIX
from kensho.errors import ConfigError

__all__ = [
    "CONFIG_FILE_ENV",
    "DEFAULT_CONFIG_FILE",
    "ENV_PREFIX",
    "LogSettings",
    "ModelSettings",
    "RuntimeSettings",
    "ServerSettings",
    "Settings",
    "ShareSettings",
    "StorageSettings",
    "TelemetrySettings",
    "TrustSettings",
    "default_data_dir",
    "env_variables",
    "load_settings",
]

DEFAULT_CONFIG_FILE = Path("kensho.toml")

LevelName = Literal["debug", "info", "warning", "error", "critical"]
_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical", "exception": "error"}


def _normalise_level(value: object) -> object:
    if isinstance(value, str):
        lowered = value.strip().lower()
        return _LEVEL_ALIASES.get(lowered, lowered)
    return value


def default_data_dir() -> Path:
    """Where Kensho keeps its store when no root is configured (XDG data home)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kensho"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _expand_home(cls, value: object) -> object:
        # "~/models" in a config file means the user's home, as in a shell.
        return value.expanduser() if isinstance(value, Path) else value


class LogSettings(_Section):
    """``[log]``: the telemetry pipeline (see docs/logging.md)."""

    level: LevelName = "info"
    levels: dict[str, LevelName] = Field(default_factory=dict)
    format: Literal["auto", "json", "console"] = "auto"
    file: Path | None = None
    file_max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    file_backups: int = Field(default=5, ge=0, le=1000)

    @field_validator("level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        return _normalise_level(value)

    @field_validator("levels", mode="before")
    @classmethod
    def _levels(cls, value: object) -> object:
        if isinstance(value, dict):
            return {str(k): _normalise_level(v) for k, v in value.items()}
        return value


class StorageSettings(_Section):
    """``[storage]``: the integrity store.

    ``source_*`` bound what one HTTP source may cost a run: seconds to wait for a
    connection (at most 10 s) or for the next bytes, retries of a failed request, and
    the slowest average rate (bytes/s, per ``source_rate_window`` seconds; 0: none)
    before the source is abandoned for the next one. 16 KiB/s is far below any link
    that can move model weights, and makes a trickling mirror lose its turn in 30 s.
    """

    root: Path = Field(default_factory=default_data_dir)
    manifest: Path | None = None
    sources: list[str] = Field(default_factory=list)
    source_timeout: float = Field(default=30.0, gt=0)
    source_retries: int = Field(default=5, ge=0, le=100)
    source_min_rate: int = Field(default=16 * 1024, ge=0)
    source_rate_window: float = Field(default=30.0, gt=0)
    # Over-the-air releases (docs/releases.md): poll the sources' release channels every
    # ``update_interval`` seconds (jittered; 0: never, not even at boot), stage a newer
    # trusted release at ``prefetch_rate`` bytes/s (0: unlimited), and apply it live
    # when ``auto_apply``, else at the next boot, `kensho sync` or POST /v1/kensho/update.
    update_interval: float = Field(default=0.0, ge=0)
    prefetch_rate: int = Field(default=0, ge=0)
    auto_apply: bool = False
    # ``peer+mdns://`` (docs/storage.md): how long a repair or sync that needs bytes
    # listens for peers announcing themselves on the LAN before asking them.
    discovery_timeout: float = Field(default=1.5, gt=0, le=30)


class ShareSettings(_Section):
    """``[share]``: the verified chunks this store serves to peers.

    ``kensho up`` serves them at ``/v1/kensho/chunks/{sha256}`` when ``enabled``
    (``kensho share`` always does). At most ``max_transfers`` chunks are sent at once
    (more get 429, and the peer asks its next source), at most ``rate_limit`` bytes/s
    in all (0: no limit), so that a fleet syncing from one device cannot starve it.
    ``announce`` (off by default: it tells the whole LAN the store is here) registers
    the chunk server over mDNS/DNS-SD, for stores that list ``peer+mdns://``.
    """

    enabled: bool = True
    max_transfers: int = Field(default=8, ge=1, le=1024)
    rate_limit: int = Field(default=0, ge=0)
    announce: bool = False


class ServerSettings(_Section):
    """``[server]``: the HTTP API. ``api_key`` also reads ``KENSHO_API_KEY``."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = Field(
        default=None, min_length=8, max_length=512, json_schema_extra={"env": "KENSHO_API_KEY"}
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    request_timeout: float | None = Field(default=None, gt=0)
    shutdown_timeout: float = Field(default=10.0, ge=0)
    protect_metrics: bool = False  # the API key also guards /healthz, /readyz, /metrics

    @field_validator("api_key")
    @classmethod
    def _visible_ascii(cls, value: str | None) -> str | None:
        # A Bearer token travels in an HTTP header: printable ASCII, no spaces.
        if value is not None and not all("!" <= c <= "~" for c in value):
            raise ValueError("must be printable ASCII without spaces")
        return value


class ModelSettings(_Section):
    """``[model]``: what ``kensho up`` serves and on which engines.

    ``engine = "torch"`` runs the model folder with transformers: the primary on
    ``primary_device`` (CUDA), the fallback on ``fallback_device`` (CPU). ``"llama"``
    runs the store's GGUF file ``gguf`` on llama.cpp, each engine in its own process
    (the primary with every layer on the GPU); ``fallback_gguf`` names another file of
    the store for the CPU fallback (a quantized one, e.g. ``model-q8_0.gguf``; empty:
    the same file). ``fallback_engine`` mixes kinds (``engine = "torch"`` with
    ``fallback_engine = "llama"``); empty means the same as ``engine``. ``"mock"``
    serves the fault-injecting engines instead (demos, load tests), with the given
    latencies. ``isolate`` (default true) runs each torch engine in its own child
    process too, as llama engines always are: its decode loop then shares no GIL with
    the server's event loop, and a CUDA fault or a SIGKILL costs that process only
    (false: in the server's process, one torch import and no pipe; for debugging).
    ``dir`` is the store holding the model; empty means the embedded demo.
    ``id`` is the model name clients send (``model`` in OpenAI requests, listed by
    ``GET /v1/models``); empty means the store's manifest ``name`` (the demo's is
    ``kensho-demo``), so one manifest names its model everywhere.
    """

    id: str | None = Field(default=None, min_length=1, max_length=256)
    dir: Path | None = None
    engine: Literal["torch", "llama", "mock"] = "torch"
    fallback_engine: Literal["torch", "llama"] | None = None
    isolate: bool = True
    gguf: str = Field(default="model.gguf", min_length=1, max_length=4096)
    fallback_gguf: str | None = Field(default=None, min_length=1, max_length=4096)
    primary_device: str = "cuda"
    fallback_device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    max_tokens: int = Field(default=256, ge=1, le=32768)
    mock_time_to_first_token: float = Field(default=0.02, ge=0)
    mock_time_per_token: float = Field(default=0.005, ge=0)


class RuntimeSettings(_Section):
    """``[runtime]``: circuit breakers, failover and the task executor (task #20).

    Defaults follow the roadmap: 3 failures open the breaker, 2 probe successes close
    it, 60 s on the fallback before testing the primary again, 5 s per probe.
    """

    failure_threshold: int = Field(default=3, ge=1)
    success_threshold: int = Field(default=2, ge=1)
    open_duration: float = Field(default=60.0, gt=0)
    open_duration_multiplier: float = Field(default=1.0, ge=1)
    max_open_duration: float | None = Field(default=None, gt=0)
    half_open_max_calls: int = Field(default=1, ge=1)
    half_open_timeout: float = Field(default=5.0, gt=0)
    failure_rate_threshold: float | None = Field(default=None, gt=0, le=1)
    slow_call_threshold: float | None = Field(default=None, gt=0)
    first_token_timeout: float = Field(default=30.0, gt=0)
    chunk_timeout: float = Field(default=30.0, gt=0)
    max_queue_size: int = Field(default=100, ge=1)
    max_queue_wait: float = Field(default=30.0, gt=0)
    concurrency: dict[str, int] = Field(default_factory=lambda: {"gpu": 4, "cpu": 1})
    rejection_threshold: int = Field(default=5, ge=1)
    rejection_window: float = Field(default=10.0, gt=0)
    hard_open_duration: float = Field(default=30.0, gt=0)
    hard_open_low_water: float = Field(default=0.5, gt=0, le=1)


class TrustSettings(_Section):
    """``[trust]``: who may sign manifests (see docs/manifest.md, "Signatures").

    ``keys`` are Ed25519 public keys in hex, as printed by ``kensho keygen``; a
    manifest is used only if ``threshold`` of them signed it. With no keys, unsigned
    manifests are accepted, with a warning once per boot.
    """

    keys: list[str] = Field(default_factory=list)
    threshold: int = Field(default=1, ge=1)


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _check_endpoint(value: str | None) -> str | None:
    """An OTLP endpoint is an absolute ``http(s)://host[:port][/path]`` URL."""
    if value is None:
        return None
    value = value.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if any(c.isspace() for c in value):
        raise ValueError(f"{value!r} contains whitespace")
    return value


def _decode_pairs(value: object, what: str) -> object:
    """Percent-decode ``name=value`` pairs (the OTEL_* syntax) and check header syntax."""
    if not isinstance(value, dict):
        return value
    decoded = {unquote(str(k)).strip(): unquote(str(v)).strip() for k, v in value.items()}
    if what == "header":
        for name, text in decoded.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            if any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise ValueError(f"header {name!r} has a control character in its value")
    return decoded


class TelemetrySettings(_Section):
    """``[telemetry]``: OTLP/HTTP export of logs and traces, and the disk spool.

    Export is on when an endpoint is set. Each field also reads the standard
    OpenTelemetry variable named on it (``OTEL_EXPORTER_OTLP_ENDPOINT``...), so a
    collector configured for other services configures Kensho too. ``endpoint`` is
    the base URL (``/v1/logs`` and ``/v1/traces`` are appended); the per-signal
    endpoints are used as given. When the collector cannot be reached, batches wait
    in ``spool_dir`` (default: ``telemetry-spool`` in the data dir), at most
    ``spool_max_bytes`` (0: no spool), and are sent when it answers again.
    """

    endpoint: str | None = Field(
        default=None, json_schema_extra={"env": "OTEL_EXPORTER_OTLP_ENDPOINT"}
    )
    logs_endpoint: str | None = Field(
        default=None, json_schema_extra={"env": "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"}
    )
    traces_endpoint: str | None = Field(
        default=None, json_schema_extra={"env": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"}
    )
    headers: dict[str, str] = Field(
        default_factory=dict, json_schema_extra={"env": "OTEL_EXPORTER_OTLP_HEADERS"}
    )
    service_name: str = Field(
        default="kensho", min_length=1, json_schema_extra={"env": "OTEL_SERVICE_NAME"}
    )
    resource_attributes: dict[str, str] = Field(
        default_factory=dict, json_schema_extra={"env": "OTEL_RESOURCE_ATTRIBUTES"}
    )
    timeout: float = Field(default=10.0, gt=0, le=300)
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    retry_interval: float = Field(default=5.0, gt=0)
    queue_size: int = Field(default=8192, ge=1, le=1_000_000)

    @field_validator("endpoint", "logs_endpoint", "traces_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _check_endpoint(value)

    @field_validator("headers", mode="before")
    @classmethod
    def _headers(cls, value: object) -> object:
        return _decode_pairs(value, "header")

    @field_validator("resource_attributes", mode="before")
    @classmethod
    def _resource(cls, value: object) -> object:
        return _decode_pairs(value, "attribute")

    @property
    def enabled(self) -> bool:
        """Whether any endpoint is set, which is what turns export on."""
        return bool(self.endpoint or self.logs_endpoint or self.traces_endpoint)

    def signal_url(self, signal: Literal["logs", "traces"]) -> str | None:
        """Where ``signal`` is posted: its own endpoint, else the base one + ``/v1/…``."""
        own = self.logs_endpoint if signal == "logs" else self.traces_endpoint
        if own:
            return own
        if self.endpoint:
            return f"{self.endpoint.rstrip('/')}/v1/{signal}"
        return None

    def spool_path(self) -> Path:
        """The spool folder: ``spool_dir``, else ``telemetry-spool`` in the data dir."""
        return (
            self.spool_dir if self.spool_dir is not None else default_data_dir() / "telemetry-spool"
        )


class Settings(_Section):
    """All of Kensho's settings, one attribute per TOML section."""

    log: LogSettings = Field(default_factory=LogSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    share: ShareSettings = Field(default_factory=ShareSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    trust: TrustSettings = Field(default_factory=TrustSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)


def _origin_kind(annotation: Any) -> str:
    """Classify a field type as ``list``, ``dict`` or ``scalar`` for env parsing."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = {_origin_kind(arg) for arg in typing.get_args(annotation)} - {"scalar"}
        return kinds.pop() if kinds else "scalar"
    if origin in (list, tuple, set, frozenset):
        return "list"
    if origin is dict:
        return "dict"
    return "scalar"


def _parse_env_value(name: str, raw: str, kind: str) -> object:
    if kind == "list":
        return [item.strip() for item in raw.split(",") if item.strip()]
    if kind == "dict":
        result: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in raw.split(","))):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ConfigError(
                    f"{name}: expected comma-separated name=value pairs, got {pair!r}",
                    key=name,
                )
            result[key.strip()] = value.strip()
        return result
    return raw


def _env_names(section: str, field: str, extra: object) -> list[str]:
    names = [f"{ENV_PREFIX}{section.upper()}_{field.upper()}"]
    if isinstance(extra, dict) and isinstance(extra.get("env"), str):
        names.append(extra["env"])
    return names


def _section_models() -> dict[str, type[BaseModel]]:
    """Each TOML section's name and model, read from :class:`Settings`."""
    models: dict[str, type[BaseModel]] = {}
    for section, section_field in Settings.model_fields.items():
        model = section_field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        models[section] = model
    return models


def env_variables() -> dict[str, str]:
    """Every ``KENSHO_*`` variable Kensho reads (and the ``OTEL_*`` ones), mapped to what it sets.

    Values are dotted setting keys (``KENSHO_SERVER_PORT`` -> ``server.port``, the
    alias ``KENSHO_API_KEY`` -> ``server.api_key``); :data:`CONFIG_FILE_ENV` maps to
    ``"config file"``. Any other ``KENSHO_*`` variable is refused by
    :func:`load_settings`.
    """
    names = {CONFIG_FILE_ENV: "config file"}
    for section, model in _section_models().items():
        for name, field in model.model_fields.items():
            for var in _env_names(section, name, field.json_schema_extra):
                names[var] = f"{section}.{name}"
    return names


def _did_you_mean(name: str, known: Iterable[str], *, prefix: str = "") -> str:
    """`` (did you mean X?)`` for the closest known name, or an empty string.

    A shared prefix (``KENSHO_``) is ignored when comparing: it would make every
    name look close to every other.
    """
    stems = {k.removeprefix(prefix): k for k in known}
    close = difflib.get_close_matches(name.removeprefix(prefix), list(stems), n=1)
    return f" (did you mean {stems[close[0]]}?)" if close else ""


def _check_env_names(env: Mapping[str, str]) -> None:
    """Refuse ``KENSHO_*`` variables that set nothing, naming each one."""
    known = env_variables()
    unknown = sorted(var for var in env if var.startswith(ENV_PREFIX) and var not in known)
    if not unknown:
        return
    problems = [
        f"{var}: unknown variable, no setting has this name"
        + _did_you_mean(var, known, prefix=ENV_PREFIX)
        for var in unknown
    ]
    raise ConfigError("; ".join(problems), key=unknown[0])


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Collect overrides from the environment; also map dotted keys to variable names."""
    overrides: dict[str, dict[str, object]] = {}
    origins: dict[str, str] = {}
    for section, model in _section_models().items():
        for name, field in model.model_fields.items():
            for var in _env_names(section, name, field.json_schema_extra):
                if var in env:
                    kind = _origin_kind(field.annotation)
                    value = _parse_env_value(var, env[var], kind)
                    overrides.setdefault(section, {})[name] = value
                    origins[f"{section}.{name}"] = var
    return overrides, origins


def _unknown_key_message(where: str, loc: tuple[int | str, ...]) -> str:
    """``unknown setting 'server.prot' (did you mean server.port?)``."""
    key = ".".join(str(part) for part in loc)
    models = _section_models()
    section = models.get(str(loc[0])) if len(loc) == 2 else None
    if section is not None:
        known = [f"{loc[0]}.{name}" for name in section.model_fields]
    else:
        known = list(models)
    return f"{where}: unknown setting {key!r}{_did_you_mean(key, known)}"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc


def _default_path(env: Mapping[str, str], cwd: Path | None) -> Path | None:
    """The settings file when none is given: ``$KENSHO_CONFIG``, else ``./kensho.toml``."""
    named = env.get(CONFIG_FILE_ENV)
    if named:
        return Path(named) if cwd is None else cwd / named
    candidate = (cwd or Path.cwd()) / DEFAULT_CONFIG_FILE
    return candidate if candidate.is_file() else None


def load_settings(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Load settings from a TOML file and the environment.

    The file is ``path``, else ``$KENSHO_CONFIG``, else ``./kensho.toml`` if present.

    Raises :class:`ConfigError` naming the key (``server.port``) and where it came
    from (the file or the variable) for unknown keys and wrong types, and naming the
    variable for a ``KENSHO_*`` variable that sets nothing (with the closest real
    name when there is one).
    """
    env = os.environ if env is None else env
    _check_env_names(env)
    if path is None:
        path = _default_path(env, cwd)
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    overrides, origins = _env_overrides(env)
    for section, values in overrides.items():
        current = data.get(section, {})
        if isinstance(current, dict):
            data[section] = {**current, **values}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        where = origins.get(key) or (str(path) if path else "settings")
        if first["type"] == "extra_forbidden":
            message = _unknown_key_message(where, first["loc"])
        else:
            message = f"{where}: {key}: {first['msg']}"
        count = exc.error_count()
        if count > 1:
            message += f" (and {count - 1} more problem{'s' if count > 2 else ''})"
        raise ConfigError(message, key=key) from None
