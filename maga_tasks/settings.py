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
    # Bound on one LLM answer's body (`llm.answer`): answer_envelope_bytes + the request's
    # max_tokens x answer_bytes_per_token. A token is a few characters and JSON escapes one
    # as at most 12 bytes (a surrogate pair), so 32 leaves room for any honest answer;
    # a body past the bound is not read further and is a failed attempt.
    answer_bytes_per_token: int = Field(32, ge=4, le=1024)
    answer_envelope_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024**2)
    # The longest jsonl source line read (bytes); a longer one is one rejected row
    # (`line_too_long`), skipped without being held. None: 4 bytes per character of the
    # recipe's `max_source_chars` plus 1 MiB (8 MiB with the default 2,000,000).
    max_line_bytes: int | None = Field(None, ge=1024)

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(normalize_endpoint(url) for url in value))

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


def normalize_endpoint(url: str) -> str:
    """An endpoint's base URL as the client uses it and as endpoints are compared: scheme
    and host in lower case, no trailing '/' or '/v1'. Anything but an http(s) URL with a
    host is a ValueError naming it (user-info masked)."""
    from urllib.parse import urlsplit

    from maga_tasks.redaction import redact_url, strip_control

    text = str(url).strip()
    try:
        parts = urlsplit(text)
        parts.port  # a port that is not a number raises here
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint must be an http(s) URL with a host: {strip_control(redact_url(text))[:200]!r}")
    path = parts.path.rstrip("/").removesuffix("/v1").rstrip("/")
    userinfo, at, host = parts.netloc.rpartition("@")
    base = f"{parts.scheme.lower()}://{userinfo}{at}{host.lower()}{path}"
    return base + (f"?{parts.query}" if parts.query else "")
