"""Settings: command-line flags > PARLEY_* environment variables > a TOML file > defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARLEY_", extra="forbid")

    host: str = "127.0.0.1"
    http_port: int = 3000
    voice_port: int = 3001  # reserved for the voice WebSocket (a later issue)
    mqtt_url: str | None = None  # None: start the built-in broker
    builtin_broker_port: int = 1883
    mqtt_client_id: str | None = None
    mqtt_shared_group: str | None = None  # several Parley processes on one broker
    database_url: str | None = None  # None: SQLite under data_dir
    data_dir: Path = Path("data")
    demo: bool = False
    liveness_window: float = 90.0
    liveness_check_interval: float = 5.0
    idle_timeout: float = 120.0
    max_active_actors: int = 50_000
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """`config_file`, else ./parley.toml if present. Flags left unset (None) do not override."""
    path = config_file or (Path("parley.toml") if Path("parley.toml").is_file() else None)
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} not found")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})

    return _FromFile(**{k: v for k, v in overrides.items() if v is not None})
