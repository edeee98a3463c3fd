"""Settings: command-line flags > ``SLUICE_*`` environment variables > config file > defaults.

One immutable :class:`Settings` object is built at start-up
(:func:`load_settings`) and handed to the app factory; nothing reads the
environment or the file after that, except provider and gateway keys, which
the file names by environment variable and :func:`load_settings` resolves
once (a key never lives in the file itself).

The config file (TOML, ``--config``) holds every flag's setting under its
own name plus what only a file can say: the model list with its
deployments, fallbacks and hedging, and the virtual keys with their limits.
``sluice.example.toml`` documents every key.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .policies import Backpressure, RetryPolicy


class ConfigError(Exception):
    """The settings or the config file are invalid; the message names the bad key."""


def _base_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/")


#: the client APIs an OpenAI-compatible deployment serves unless it says otherwise
OPENAI_APIS = frozenset({"chat", "completions", "responses", "embeddings"})


class DeploymentConfig(BaseModel):
    """One place a model is served: an OpenAI-compatible base URL and its key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: OpenAI-style base URL including ``/v1``
    base_url: str
    #: name of the environment variable holding the provider key (never the key itself)
    api_key_env: str | None = None
    #: the model name the provider knows; default: the public name
    model: str | None = None
    weight: float = Field(default=1.0, gt=0)
    #: shown in metrics and logs; default: ``<public model>#<index>``
    name: str | None = None
    #: whose API the endpoint speaks: ``openai`` (bearer key) or ``anthropic`` (``x-api-key``, ``anthropic-version``)
    provider: Literal["openai", "anthropic"] = "openai"
    #: the client APIs this deployment serves; default: every OpenAI API for
    #: ``openai`` (chat, completions, responses, embeddings and the other /v1
    #: routes), ``messages`` (and its count_tokens) for ``anthropic``
    apis: list[Literal["chat", "completions", "responses", "messages", "embeddings"]] | None = None

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        return _base_url(value)

    @property
    def served_apis(self) -> frozenset[str]:
        if self.apis is not None:
            return frozenset(self.apis)
        return OPENAI_APIS if self.provider == "openai" else frozenset({"messages"})


class ModelConfig(BaseModel):
    """A public model name and the deployments that serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    deployments: list[DeploymentConfig] = Field(min_length=1)
    #: ``least_busy``: fewest active streams per unit of weight; ``weighted``: random by weight
    strategy: Literal["least_busy", "weighted"] = "least_busy"
    #: other public models to try, in order, when every deployment of this one failed
    fallbacks: list[str] = Field(default_factory=list)
    #: start the same request on another deployment if no token came by then
    hedge_after_ms: float | None = Field(default=None, gt=0)
    #: or hedge after this percentile of the model's observed time to first token
    hedge_after: Literal["p50", "p90", "p95", "p99"] | None = None


class VirtualKeyConfig(BaseModel):
    """A gateway key a client sends as ``Authorization: Bearer``, with optional limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    #: the environment variable holding the key
    key_env: str = Field(min_length=1)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_concurrent_streams: int | None = Field(default=None, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", frozen=True, extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if _config_file is not None:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=_config_file),)
        return sources

    # --- listening -------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: hypercorn trio worker processes on the one port (one core each)
    workers: int = Field(default=1, ge=1, le=64)

    # --- upstream ----------------------------------------------------------------
    #: OpenAI-style base URL including ``/v1``; ``None`` starts the embedded simulator.
    upstream_base_url: str | None = None
    upstream_api_key: SecretStr | None = None
    connect_timeout: float = Field(default=5.0, gt=0)
    #: from the request until the upstream's first event
    first_token_timeout: float = Field(default=60.0, gt=0)
    #: between two upstream reads once the stream has started
    idle_timeout: float = Field(default=60.0, gt=0)
    #: a whole non-streaming completion
    completion_timeout: float = Field(default=600.0, gt=0)
    retry_max_attempts: int = Field(default=3, ge=1, le=10)
    retry_budget: float = Field(default=15.0, gt=0)
    retry_backoff_initial: float = Field(default=0.2, ge=0)
    retry_backoff_max: float = Field(default=5.0, ge=0)

    # --- streams -------------------------------------------------------------------
    #: channel capacity in batches (one batch = what one upstream read returned)
    buffer_size: int = Field(default=16, ge=1, le=65536)
    #: bytes one stream's relay may hold (its queue and the write in flight): the
    #: per-stream memory bound; the backpressure policy decides what happens beyond it
    stream_buffer_bytes: int = Field(default=65536, ge=1024)
    #: bytes all streams' relays may hold together before new streams get 503 with
    #: Retry-After; unset = max_streams x stream_buffer_bytes
    memory_budget_bytes: int | None = Field(default=None, ge=1024)
    backpressure: Backpressure = Backpressure.BLOCK
    #: how long the ``error`` policy waits for room before ending the stream
    max_wait_ms: float = Field(default=1000.0, ge=0)
    #: ``: ping`` comments while waiting for the first token (seconds)
    ping_interval: float = Field(default=15.0, gt=0)
    #: per-worker cap on concurrent streams; more get 503 with Retry-After
    max_streams: int = Field(default=1024, ge=1)

    #: a client that stops reading is cut after its unread data has waited this
    #: long (seconds; TCP_USER_TIMEOUT on every client connection); 0 = never
    stall_timeout: float = Field(default=30.0, ge=0)
    #: on SIGTERM/SIGINT, how long in-flight streams may run before they are
    #: ended with a ``server_shutting_down`` error event (seconds)
    drain_timeout: float = Field(default=10.0, ge=0)
    #: gateway API keys clients must send as ``Authorization: Bearer``; empty = open
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    #: the key that opens ``/dashboard``; required for it when gateway keys are configured
    admin_api_key: SecretStr | None = None
    #: origins allowed by CORS; empty = CORS off (no Access-Control-* headers)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: an idle keep-alive connection is closed after this long without a request (seconds)
    keep_alive_timeout: float = Field(default=75.0, gt=0)
    #: a connection must send a complete request head within this long of opening, or
    #: of the first byte of its next request (seconds)
    request_head_timeout: float = Field(default=10.0, gt=0)
    #: SO_SNDBUF of client connections in bytes (the kernel doubles it); 0 = kernel
    #: autotuning, which grows to megabytes per socket when a client stops reading
    client_sndbuf: int = Field(default=65536, ge=0)
    #: SO_RCVBUF of upstream connections in bytes (the kernel doubles it); 0 = kernel autotuning.
    #: Set after connect, so never below half the host's tcp_rmem default (131072 -> 65536):
    #: it stops autotuning from growing the buffer, it cannot shrink it
    upstream_rcvbuf: int = Field(default=65536, ge=0)

    # --- requests ------------------------------------------------------------------
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    body_timeout: float = Field(default=30.0, gt=0)
    #: longest ``model`` a request may name (characters); longer gets 400. The
    #: name becomes a log field and a metrics label: megabytes of it must not.
    max_model_name_length: int = Field(default=256, ge=1)

    # --- metrics -----------------------------------------------------------------------
    #: distinct values a Prometheus label takes from requests (client-chosen model
    #: names, upstream status codes); more are counted as ``other``. Configured
    #: model and deployment names never count against it.
    metrics_max_label_values: int = Field(default=100, ge=1)

    # --- the embedded simulator (no upstream configured) --------------------------------
    #: completion tokens (tokens x n) one simulated request may ask for; more gets 400
    simulator_max_tokens: int = Field(default=100_000, ge=1)
    #: longest a simulated answer may be scheduled to take (ttft + itl x tokens + stall), seconds
    simulator_max_stream_seconds: float = Field(default=600.0, gt=0)

    # --- tracing (OpenTelemetry) ----------------------------------------------------------
    #: OTLP/HTTP base endpoint (``http://collector:4318``; ``/v1/traces`` is appended); tracing is on
    #: when this or OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set
    otel_endpoint: str | None = None
    #: the ``service.name`` of the gateway's spans; unset = OTEL_SERVICE_NAME, else "sluice"
    otel_service_name: str | None = None
    #: how long shutdown waits for the last spans to be exported (seconds)
    otel_flush_timeout: float = Field(default=5.0, ge=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"] = "INFO"

    # --- routing (config file) -------------------------------------------------------
    #: public models; empty = every model name goes to the one upstream as it is
    models: list[ModelConfig] = Field(default_factory=list)
    #: a deployment that failed this many times in a row rests for ``cooldown_seconds``
    cooldown_failures: int = Field(default=3, ge=1)
    cooldown_seconds: float = Field(default=30.0, ge=0)
    #: hedging by percentile waits for this many observed first tokens before it starts
    hedge_min_samples: int = Field(default=20, ge=1)

    # --- limits (config file) ----------------------------------------------------------
    keys: list[VirtualKeyConfig] = Field(default_factory=list)
    #: Redis shared by every worker and instance for limits and cooldowns; unset = in-process
    redis_url: str | None = None

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # From the environment or a flag: "a,b,c". Lists pass as they are.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("otel_endpoint")
    @classmethod
    def _an_http_endpoint(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("otel_endpoint must start with http:// or https://")
        return value.strip()

    @field_validator("upstream_base_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("upstream_base_url must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _routes_are_consistent(self) -> Settings:
        names = [model.name for model in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate model name(s) {duplicates}")
        for index, model in enumerate(self.models):
            for fallback in model.fallbacks:
                if fallback not in names or fallback == model.name:
                    raise ValueError(f"models[{index}].fallbacks: {fallback!r} is not another configured model")
        key_names = [key.name for key in self.keys]
        if len(set(key_names)) != len(key_names):
            raise ValueError("keys: duplicate key name")
        return self

    @property
    def memory_budget(self) -> int:
        """The worker's budget for relay buffers, in bytes."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        return self.max_streams * self.stream_buffer_bytes

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.retry_max_attempts,
            backoff_initial=self.retry_backoff_initial,
            backoff_max=self.retry_backoff_max,
            budget=self.retry_budget,
        )


#: the config file the next :class:`Settings` reads (set only inside :func:`load_settings`)
_config_file: Path | None = None


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from flags (``overrides``), ``SLUICE_*`` variables and the config file.

    Raises :class:`ConfigError` with one line per bad key, and checks that
    every environment variable the file names for a key is set.
    """
    global _config_file
    path = Path(config_file) if config_file else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            with path.open("rb") as handle:
                tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _config_file = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        lines = []
        for error in exc.errors(include_url=False):
            key = ".".join(str(part) for part in error["loc"]) or "(top level)"
            lines.append(f"{where}{key}: {error['msg']}")
        raise ConfigError("\n".join(lines)) from None
    finally:
        _config_file = None
    missing = [
        variable
        for variable in [d.api_key_env for m in settings.models for d in m.deployments] + [k.key_env for k in settings.keys]
        if variable is not None and not os.environ.get(variable)
    ]
    if missing:
        raise ConfigError(f"environment variable(s) named in the config are not set: {', '.join(sorted(set(missing)))}")
    return settings
