"""Run settings: where the workers are and how hard to drive them.

Nothing here changes what is written, so nothing here takes part in the recipe_id.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maga_tasks.redaction import install_log_redaction, redact_url, register_secret


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: tuple[str, ...] = Field(..., min_length=1)
    # Read from MAGA_API_KEY when not given; never logged.
    api_key: str | None = Field(default=None, repr=False)
    # Served model name, when it differs from the recipe's model (e.g. an alias).
    served_model: str | None = None
    # The ceiling of requests in flight across all endpoints.
    max_concurrency: int = Field(64, ge=1, le=4096)
    # Below that ceiling, each endpoint's window follows its load as its /metrics say
    # (`llm.adaptive`); False pins it at max_concurrency.
    adaptive_concurrency: bool = True
    # Seconds between reads of each endpoint's /metrics (each read moves the window once).
    adaptive_interval_s: float = Field(2.0, gt=0)
    # Each endpoint's window at the start; it doubles per read while the server has room.
    adaptive_initial_window: int = Field(8, ge=1, le=4096)
    request_timeout_s: float = Field(300.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    # One budget per request for every failure kind: timeouts, connection errors, 5xx,
    # bad bodies. 429 has its own, longer budget (it honours Retry-After).
    max_attempts: int = Field(6, ge=1, le=50)
    max_attempts_429: int = Field(20, ge=1, le=200)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    # Consecutive failures that take an endpoint out of rotation; it is probed back.
    endpoint_failure_threshold: int = Field(3, ge=1)
    endpoint_probe_interval_s: float = Field(2.0, gt=0)
    # How long every endpoint may be down before the shard gives up (task fails, retried).
    all_down_timeout_s: float = Field(60.0, ge=0)
    s3_endpoint_url: str | None = None
    # Finished documents buffered before a checkpoint segment is written to S3
    # (local checkpoints are flushed after every document).
    s3_checkpoint_every: int = Field(32, ge=1)
    progress_interval_s: float = Field(30.0, gt=0)
    # A JSON-lines file getting every answered request (its body and token counts): the
    # exact stream `maga bench` replays against the engine. Off in production.
    request_log: str | None = None
    # Failed tries after which a shard is `failed` for good and leaves the plan (until
    # requeued). A try the whole fleet failed (down, refusing) is not the shard's fault
    # and never makes it final.
    max_shard_failures: int = Field(3, ge=1)
    # Share of passing shards whose gates also write a full Data Docs site (chosen by a
    # hash of the shard name); failed shards always get one, every shard a JSON result.
    data_docs_sample_rate: float = Field(0.01, ge=0, le=1)

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = []
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint must be an http(s) URL: {redact_url(url)!r}")
            cleaned.append(url.rstrip("/").removesuffix("/v1"))
        return tuple(dict.fromkeys(cleaned))

    @model_validator(mode="after")
    def _register_secrets(self) -> RunSettings:
        # The key may come from an Airflow connection, not the environment, and an
        # endpoint may carry a password: both are masked wherever they appear from now
        # on, and this process's log handlers redact (the DAG's tasks and the CLI both
        # build their settings before any request).
        register_secret(self.api_key)
        for url in self.endpoints:
            register_secret(urlsplit(url).password)
        install_log_redaction()
        return self

    @property
    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("MAGA_API_KEY") or None
