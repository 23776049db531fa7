"""Settings: command-line flags > PARLEY_* environment variables > a TOML file > defaults."""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "PARLEY_"


class SettingsError(ValueError):
    """Settings that cannot be used, said in one sentence that names where they came from
    (the flag, the PARLEY_* variable or the TOML file)."""


def shown_url(url: str) -> str:
    """`url` as an error message may show it: without its password."""
    from eventstore.store import StoreConfig

    try:
        return StoreConfig(url).display_url
    except ValueError:  # not even a URL (a bad port, say): show no user info at all
        return url.rsplit("@", 1)[-1]


def check_mqtt_url(url: str) -> str:
    """`url` if it is one Parley can connect to (mqtt://host[:port]), else ValueError."""
    u = urlparse(url)
    try:
        port = u.port
    except ValueError:  # not a number, or beyond 65535
        port = -1
    if u.scheme in ("mqtt", "tcp") and u.hostname and port == -1:
        raise ValueError(f"the MQTT URL {shown_url(url)!r} has no valid port: use mqtt://host:port with a port "
                         "from 1 to 65535")
    if u.scheme not in ("mqtt", "tcp") or not u.hostname:
        raise ValueError(f"unsupported MQTT URL {shown_url(url)!r}: use mqtt://host:port")
    return url


def reachable_url(scheme: str, host: str, port: int) -> str:
    """The URL a client on this machine uses for a server bound to `host`: a wildcard bind
    address means this machine, and an IPv6 address goes in brackets (`mqtt://::1:1883`
    is no URL: `parley serve --host ::1` could not reach its own built-in broker)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def reachable_mqtt_url(host: str, port: int) -> str:
    return reachable_url("mqtt", host, port)


def check_database_url(url: str) -> str:
    if not url.startswith(("postgresql://", "postgres://", "sqlite:///")):
        raise ValueError(f"unsupported database URL {shown_url(url)!r}: use postgresql://user@host:port/database "
                         "or sqlite:///path/to/file.db (or leave it out for SQLite under the data directory)")
    try:
        urlparse(url).port  # a port that is not a number, or beyond 65535, raises here
    except ValueError:
        raise ValueError(f"database URL {shown_url(url)!r} has no valid port: use "
                         "postgresql://user@host:port/database with a port from 1 to 65535") from None
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = "127.0.0.1"
    http_port: int = 3000  # 0: any free port
    voice_port: int = 3001  # reserved for the voice WebSocket (a later issue)
    mqtt_url: str | None = None  # None: start the built-in broker
    builtin_broker_port: int = 1883  # 0: any free port
    mqtt_client_id: str | None = None
    mqtt_shared_group: str | None = None  # several Parley processes on one broker
    database_url: str | None = None  # None: SQLite under data_dir
    data_dir: Path = Path("data")
    demo: bool = False
    # Seconds, more than none: an interval of 0 was a busy loop on one core, and a negative
    # window or timeout meant "at once" without a word.
    liveness_window: float = Field(90.0, gt=0, allow_inf_nan=False)
    liveness_check_interval: float = Field(5.0, gt=0, allow_inf_nan=False)
    idle_timeout: float = Field(120.0, gt=0, allow_inf_nan=False)
    max_active_actors: int = Field(50_000, ge=1)
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False  # a line per HTTP request (http.request)

    @field_validator("http_port", "voice_port", "builtin_broker_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError(f"{value} is not a port: use 1-65535 (or 0 for any free port)")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        return check_mqtt_url(value) if value else None  # "": the built-in broker

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        return check_database_url(value) if value else None  # "": SQLite

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """`config_file`, else ./parley.toml if present. Flags left unset (None) do not override.
    Raises SettingsError with one sentence naming the flag, variable or file at fault."""
    path = config_file or (Path("parley.toml") if Path("parley.toml").is_file() else None)
    if config_file is not None and not config_file.is_file():
        what = "is a directory, not a TOML file" if config_file.is_dir() else "not found"
        raise SettingsError(f"config file {config_file} {what}")
    from_file = _read_toml(path) if path is not None else {}
    _check_env_names()
    flags = {k: v for k, v in overrides.items() if v is not None}

    class _FromFile(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})

    try:
        return _FromFile(**flags)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e, path, flags, from_file) for e in exc.errors())) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not a text file (TOML is UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    known = list(Settings.model_fields)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SettingsError(f"{path}: unknown setting {key!r} ({hint}known: {', '.join(known)})")
    return data


# PARLEY_* variables that are not settings: the test suite's (tests/conftest.py, .ci/run).
NOT_SETTINGS = ("PARLEY_TEST_", "PARLEY_REQUIRE_SERVICES")


def _check_env_names() -> None:
    """A misspelt PARLEY_* variable is refused as a misspelt key in the TOML file is: ignored,
    PARLEY_DATABSE_URL would run the server on SQLite without a word."""
    known = [(ENV_PREFIX + f).upper() for f in Settings.model_fields]
    for name in sorted(os.environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known and not upper.startswith(NOT_SETTINGS):
            close = difflib.get_close_matches(upper, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SettingsError(f"unknown setting variable {name} ({hint}known: {', '.join(known)})")


def _env_name(field: str) -> str | None:
    """The PARLEY_* variable that set `field`, if one did (pydantic-settings ignores case)."""
    wanted = (ENV_PREFIX + field).upper()
    return next((k for k in os.environ if k.upper() == wanted), None)


def _describe(error: Any, path: Path | None, flags: dict[str, Any], from_file: dict[str, Any]) -> str:
    field = str(error["loc"][0]) if error.get("loc") else ""
    env = _env_name(field)
    if field in flags:
        where = "--" + field.replace("_", "-")
    elif env is not None:
        where = env
    elif path is not None and field in from_file:
        where = f"{path}: {field}"
    else:
        where = field or "settings"
    msg = str(error["msg"]).removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    if error["type"] != "value_error":  # our own messages already quote the value
        msg += f" (got {error.get('input')!r})"
    return f"{where}: {msg}"
