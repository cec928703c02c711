"""Settings from the environment (and an optional ``.env``), validated once at start-up.

Bot settings are prefixed ``BOT_``; the platforms keep their own standard names
(``SLACK_BOT_TOKEN``, ``DISCORD_BOT_TOKEN``, ...). Secrets are ``SecretStr`` so they never
appear in a repr or a log line.
"""

from __future__ import annotations

import difflib
import enum
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SLACK_API_URL = "https://slack.com/api/"
DEFAULT_DISCORD_API_URL = "https://discord.com/api/v10"
DEFAULT_DISCORD_GATEWAY_URL = "wss://gateway.discord.gg/"

IdList = Annotated[frozenset[str], NoDecode]


class DeniedMode(enum.StrEnum):
    REFUSE = "refuse"  # a polite one-line refusal
    SILENT = "silent"  # no reply at all


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "chatglm-bot"


def _alias(*names: str) -> Any:
    return Field(None, validation_alias=AliasChoices(*names))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BOT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Model
    model_path: str = "THUDM/chatglm2-6b-int4"
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(0, ge=0, description="intra-op threads of the inference thread; 0 = auto")
    int4_kernel: Literal["auto", "native", "torch"] = "auto"
    max_batch_size: int = Field(8, ge=1, le=64, description="conversations decoded together")
    prefix_cache_mb: int = Field(1024, ge=0, description="memory for kept conversation KV caches")

    # Sampling and limits
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    max_new_tokens: int = Field(512, ge=1, le=8192)
    max_context_tokens: int = Field(8192, ge=64)
    max_message_chars: int = Field(8000, ge=1)

    # Model service
    queue_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)
    stream_interval: float = Field(1.0, ge=0.0)

    # Storage
    database_url: str = "sqlite:///chatglm-bot.db"
    data_dir: Path = Field(
        default_factory=lambda: _default_data_dir(),
        description="where a relative SQLite path lives (default $XDG_DATA_HOME/chatglm-bot)",
    )
    event_retention_hours: float = Field(72.0, gt=0)
    history_retention_days: float = Field(0.0, ge=0, description="forget turns older than this; 0 = keep")
    recover_window_s: float = Field(900.0, ge=0, description="answer unanswered events younger than this")

    # Delivery and replicas
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long running answers may finish")
    lease_s: float = Field(30.0, gt=0, description="a dead replica's events are taken over after this")
    replica_id: str = Field(
        "",
        max_length=200,
        description="names this process among replicas, unique per live process (default host:port)",
    )

    # HTTP (/healthz, /metrics, /slack/events)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)

    # The OpenAI-compatible API server (`chatglm-bot api`)
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="clients must send it as a bearer token")

    # Where answers come from: the in-process engine, or an OpenAI-compatible server
    backend: Literal["local", "openai"] = "local"
    openai_base_url: str = Field("", description="e.g. http://gpu-box:8000/v1")
    openai_api_key: SecretStr | None = None
    openai_model: str = ""
    openai_concurrency: int = Field(8, ge=1, description="streams open at once to the backend")

    # Access control
    access_denied_mode: DeniedMode = DeniedMode.REFUSE
    slack_allowed_users: IdList = frozenset()
    slack_allowed_channels: IdList = frozenset()
    discord_allowed_users: IdList = frozenset()
    discord_allowed_channels: IdList = frozenset()

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # Slack (standard names)
    slack_bot_token: SecretStr | None = _alias("SLACK_BOT_TOKEN")
    slack_signing_secret: SecretStr | None = _alias("SLACK_SIGNING_SECRET")
    slack_app_token: SecretStr | None = _alias("SLACK_APP_TOKEN")
    slack_api_url: str = Field(DEFAULT_SLACK_API_URL, validation_alias=AliasChoices("SLACK_API_URL"))
    slack_thread_followups: bool = True
    # Only `chatglm-bot doctor` reads these two: it compares the app's live manifest with the shipped one.
    slack_app_config_token: SecretStr | None = _alias("SLACK_APP_CONFIG_TOKEN")
    slack_app_id: str = Field("", validation_alias=AliasChoices("SLACK_APP_ID"))

    # Discord (standard names)
    discord_bot_token: SecretStr | None = _alias("DISCORD_BOT_TOKEN")
    discord_api_url: str = Field(DEFAULT_DISCORD_API_URL, validation_alias=AliasChoices("DISCORD_API_URL"))
    discord_gateway_url: str = Field(
        DEFAULT_DISCORD_GATEWAY_URL, validation_alias=AliasChoices("DISCORD_GATEWAY_URL")
    )
    discord_message_content: bool = False
    discord_admin_ids: IdList = frozenset()
    discord_shards: str = Field(
        "",
        description="this replica's gateway shards as IDS/COUNT (e.g. 0/2, or 0,1/4); empty = one session",
    )

    @field_validator(
        "slack_allowed_users",
        "slack_allowed_channels",
        "discord_allowed_users",
        "discord_allowed_channels",
        "discord_admin_ids",
        mode="before",
    )
    @classmethod
    def _split_ids(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("discord_shards")
    @classmethod
    def _check_shards(cls, value: str) -> str:
        if value.strip():
            parse_shards(value)
        return value.strip()

    def shard_spec(self) -> tuple[tuple[int, ...], int] | None:
        """(shard ids, shard count) from BOT_DISCORD_SHARDS, or None for one unsharded session."""
        return parse_shards(self.discord_shards) if self.discord_shards else None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    # Choices are case-insensitive everywhere (BOT_DEVICE=CPU works).
    @field_validator("model_dtype", "device", "int4_kernel", "access_denied_mode", "backend", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_context(self) -> Settings:
        if self.max_new_tokens >= self.max_context_tokens:
            raise ValueError(
                f"BOT_MAX_NEW_TOKENS ({self.max_new_tokens}) must be below "
                f"BOT_MAX_CONTEXT_TOKENS ({self.max_context_tokens})"
            )
        if self.backend == "openai":
            if not self.openai_base_url.strip():
                raise ValueError(
                    "BOT_BACKEND=openai needs BOT_OPENAI_BASE_URL (the server's /v1 URL, "
                    "e.g. http://gpu-box:8000/v1)"
                )
            if not self.openai_model.strip():
                raise ValueError(
                    "BOT_BACKEND=openai needs BOT_OPENAI_MODEL (a name the server's /v1/models lists)"
                )
        return self

    @property
    def slack_enabled(self) -> bool:
        return self.slack_bot_token is not None

    @property
    def discord_enabled(self) -> bool:
        return self.discord_bot_token is not None

    @property
    def slack_socket_mode(self) -> bool:
        return self.slack_app_token is not None

    def allowlists(self, platform: str) -> tuple[frozenset[str], frozenset[str]]:
        """(users, channels) allowed on ``platform``; an empty set allows everyone."""
        users: frozenset[str] = getattr(self, f"{platform}_allowed_users", frozenset())
        channels: frozenset[str] = getattr(self, f"{platform}_allowed_channels", frozenset())
        return users, channels


class ConfigError(Exception):
    """A misconfiguration; the CLI prints its message as one line and exits."""


def secret_values(settings: Settings) -> list[str]:
    """The configured secrets' plain values, for log redaction only."""
    fields = (
        settings.slack_bot_token,
        settings.slack_signing_secret,
        settings.slack_app_token,
        settings.slack_app_config_token,
        settings.discord_bot_token,
        settings.api_key,
        settings.openai_api_key,
    )
    return [field.get_secret_value() for field in fields if field is not None and field.get_secret_value()]


# Read where they are used, before any Settings exist (the native kernel's build wait).
def parse_shards(value: str) -> tuple[tuple[int, ...], int]:
    """``"0,1/4"`` -> ((0, 1), 4): the Discord gateway shards one replica runs, out of all of them."""
    ids_text, slash, count_text = value.strip().partition("/")
    try:
        count = int(count_text)
        ids = tuple(sorted({int(part) for part in ids_text.split(",") if part.strip()}))
    except ValueError:
        ids, count = (), 0
    if not slash or count < 1 or not ids or any(not 0 <= shard < count for shard in ids):
        raise ValueError(
            "BOT_DISCORD_SHARDS must be IDS/COUNT with every id below COUNT "
            f"(e.g. 0/2 or 0,1/4), not {value!r}"
        )
    return ids, count


OTHER_ENV_NAMES = frozenset({"BOT_KERNEL_BUILD_WAIT_S"})


def env_names() -> frozenset[str]:
    """Every environment variable a setting is read from (``BOT_*`` and the platforms' own names)."""
    names: set[str] = set(OTHER_ENV_NAMES)
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        else:
            names.add(f"BOT_{name.upper()}")
    return frozenset(names)


def unknown_setting_warnings(
    environ: Mapping[str, str] | None = None, env_file: str | None = ".env"
) -> list[str]:
    """A warning for each ``BOT_*`` variable (environment or ``.env``) that is no setting, naming the
    closest real one: a misspelled variable would otherwise be ignored without a word."""
    environ = os.environ if environ is None else environ
    given: dict[str, str] = {name: "environment" for name in environ}
    if env_file is not None and os.path.isfile(env_file):
        given.update({name: env_file for name in dotenv_values(env_file)})
    known = env_names()
    return [
        _unknown(name, where, known)
        for name, where in sorted(given.items())
        if name.upper().startswith("BOT_")
        and not name.upper().startswith("BOT_TEST_")
        and name.upper() not in known
    ]


def _unknown(name: str, where: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name.upper(), list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{name} (from {where}) is not a chatglm-bot setting and is ignored{hint}"
