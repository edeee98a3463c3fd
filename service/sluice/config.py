"""Settings: command-line flags > ``SLUICE_*`` environment variables > defaults.

One immutable :class:`Settings` object is built at start-up and handed to
the app factory; nothing reads the environment after that.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .policies import Backpressure, RetryPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", frozen=True, extra="forbid")

    # --- listening -------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

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
    #: origins allowed by CORS; empty = CORS off (no Access-Control-* headers)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: SO_SNDBUF of client connections in bytes; unset = kernel autotuning
    client_sndbuf: int | None = Field(default=None, ge=1024)

    # --- requests ------------------------------------------------------------------
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    body_timeout: float = Field(default=30.0, gt=0)

    log_level: str = "INFO"

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # From the environment or a flag: "a,b,c". Lists pass as they are.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("upstream_base_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("upstream_base_url must start with http:// or https://")
        return value.rstrip("/")

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.retry_max_attempts,
            backoff_initial=self.retry_backoff_initial,
            backoff_max=self.retry_backoff_max,
            budget=self.retry_budget,
        )
