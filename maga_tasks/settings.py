"""Run settings: where the workers are and how hard to drive them.

Nothing here changes what is written, so nothing here takes part in the recipe_id.

`RunSettings` is the one table of run settings: each field is declared here once, with
its type, default, bounds and help (`description`). A field marked `Knob(...)` is also
a `maga` option and/or a DAG param, built from the field by `maga_tasks.knobs`, so the
three cannot disagree (tests/unit/test_knobs.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maga_tasks.redaction import install_log_redaction, redact_url, register_secret, strip_control


@dataclass(frozen=True)
class Knob:
    """Where a run setting is exposed besides `RunSettings`.

    `cli`: its `maga` option (for a boolean, the flag that turns the default over);
    `param`: the nightly DAG has a param of the field's name; `env`: the environment
    variable that gives the DAG param's default in a deployment (else the field's)."""

    cli: str | None = None
    param: bool = False
    env: str | None = None


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: Annotated[tuple[str, ...], Knob(cli="--endpoint")] = Field(
        ..., min_length=1, description="LLM server base URL (repeatable)"
    )
    # Read from MAGA_API_KEY when not given; never logged.
    api_key: str | None = Field(default=None, repr=False, description="the LLM servers' API key")
    served_model: Annotated[str | None, Knob(cli="--served-model", param=True, env="MAGA_SERVED_MODEL")] = Field(
        None, description="model name the vLLM workers serve, when not the recipe's model (an alias)"
    )
    # 128, not 64: with adaptive concurrency (the default) this is only a ceiling; each
    # endpoint's window starts at adaptive_initial_window and grows only while the
    # server's /metrics show room, so a higher cap cannot flood a busy server and lets a
    # fleet of several endpoints fill up. A fixed window at 128 is asked for explicitly.
    max_concurrency: Annotated[int, Knob(cli="--concurrency", param=True)] = Field(
        128, ge=1, le=4096,
        description="ceiling of requests in flight per shard across endpoints (each endpoint's window adapts below it)",
    )
    adaptive_concurrency: Annotated[bool, Knob(cli="--fixed-concurrency", param=True)] = Field(
        True,
        description="follow each vLLM worker's /metrics (queue, KV cache, preemptions); off: a fixed max_concurrency",
    )
    adaptive_interval_s: float = Field(
        2.0, gt=0, description="seconds between reads of each endpoint's /metrics (each read moves the window once)"
    )
    adaptive_initial_window: int = Field(
        8, ge=1, le=4096, description="each endpoint's window at the start; it doubles per read while there is room"
    )
    # vLLM's /metrics do not say how many requests its engine runs at once; the deployment
    # does (--max-num-seqs). With it, the first read starts the window at a share of the
    # free slots instead of adaptive_initial_window (`llm.adaptive`).
    server_slots: Annotated[int, Knob(cli="--server-slots", param=True, env="MAGA_SERVER_SLOTS")] = Field(
        0, ge=0, le=65536,
        description="requests each endpoint's engine runs at once (vLLM's --max-num-seqs) "
        "where its /metrics do not say; 0: unknown",
    )
    request_timeout_s: Annotated[float, Knob(cli="--request-timeout")] = Field(
        300.0, gt=0, description="seconds per request"
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds to connect to an endpoint")
    # One budget per request for every failure kind: timeouts, connection errors, 5xx,
    # bad bodies. 429 has its own, longer budget (it honours Retry-After).
    max_attempts: int = Field(6, ge=1, le=50, description="attempts per request (timeouts, connection errors, 5xx)")
    max_attempts_429: int = Field(20, ge=1, le=200, description="attempts per request answered 429")
    backoff_base_s: float = Field(0.5, ge=0, description="first retry delay in seconds (doubles, with jitter)")
    backoff_max_s: float = Field(30.0, ge=0, description="longest retry delay in seconds")
    endpoint_failure_threshold: int = Field(
        3, ge=1, description="consecutive failures that take an endpoint out of rotation (it is probed back)"
    )
    endpoint_probe_interval_s: float = Field(
        2.0, gt=0, description="seconds between probes of an endpoint out of rotation"
    )
    all_down_timeout_s: Annotated[float, Knob(cli="--all-down-timeout")] = Field(
        60.0, ge=0,
        description="seconds every endpoint may be down before the shard fails (exit 3; the task is retried)",
    )
    s3_endpoint_url: Annotated[str | None, Knob(cli="--s3-endpoint-url")] = Field(
        None, description="S3-compatible endpoint (default: boto3's configuration)"
    )
    # Local checkpoints are flushed after every document.
    s3_checkpoint_every: int = Field(
        32, ge=1, description="finished documents buffered before a checkpoint segment is written to S3"
    )
    # 30, not 10: task logs are for operators, one line per milestone; a six-hour shard
    # at 10 s would log 2,160 progress lines.
    progress_interval_s: Annotated[float, Knob(cli="--progress-interval", param=True)] = Field(
        30.0, gt=0, description="seconds between progress log lines"
    )
    # The exact stream `maga bench` replays against the engine. Off in production.
    request_log: str | None = Field(
        None, description="a JSON-lines file getting every answered request (its body and token counts)"
    )
    # A try the whole fleet failed (down, refusing) is not the shard's fault and never
    # makes it final.
    max_shard_failures: Annotated[int, Knob(cli="--max-shard-failures", param=True)] = Field(
        3, ge=1, description="failed tries after which a shard is failed for good (until requeued)"
    )
    # Chosen by a hash of the shard name; every shard gets a JSON result.
    data_docs_sample_rate: Annotated[float, Knob(cli="--data-docs-sample-rate", param=True)] = Field(
        0.01, ge=0, le=1,
        description="share of passing shards that also get a full Data Docs site (failed ones always do)",
    )
    # A retry of a killed try waits up to this long for the dead lease to run out; the
    # DAG reads it from MAGA_LEASE_TTL_SECONDS (operators, not a run's conf, choose it).
    lease_ttl_s: Annotated[float, Knob(cli="--lease-ttl")] = Field(
        300.0, gt=0, description="seconds a shard's lease lasts without renewal"
    )
    # Bound on one LLM answer's body (`llm.answer`): answer_envelope_bytes + the request's
    # max_tokens x answer_bytes_per_token. A token is a few characters and JSON escapes one
    # as at most 12 bytes (a surrogate pair), so 32 leaves room for any honest answer;
    # a body past the bound is not read further and is a failed attempt.
    answer_bytes_per_token: int = Field(32, ge=4, le=1024, description="bytes an answer body may hold per max_tokens")
    answer_envelope_bytes: int = Field(
        64 * 1024, ge=1024, le=64 * 1024**2, description="bytes an answer body may hold besides its tokens"
    )
    # A longer line is one rejected row (`line_too_long`), skipped without being held.
    # None: 4 bytes per character of the recipe's `max_source_chars` plus 1 MiB (8 MiB
    # with the default 2,000,000).
    max_line_bytes: int | None = Field(None, ge=1024, description="the longest jsonl source line read, in bytes")

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


def setting_default(name: str) -> Any:
    """A run setting's default, for code that takes the value apart from RunSettings."""
    return RunSettings.model_fields[name].default


def normalize_endpoint(url: str) -> str:
    """An endpoint's base URL as the client uses it and as endpoints are compared: scheme
    and host in lower case, no trailing '/' or '/v1'. Anything but an http(s) URL with a
    host is a ValueError naming it (user-info masked)."""
    text = str(url).strip()
    try:
        parts = urlsplit(text)
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint must be an http(s) URL with a host: {strip_control(redact_url(text))[:200]!r}")
    path = parts.path.rstrip("/").removesuffix("/v1").rstrip("/")
    userinfo, at, host = parts.netloc.rpartition("@")
    base = f"{parts.scheme.lower()}://{userinfo}{at}{host.lower()}{path}"
    return base + (f"?{parts.query}" if parts.query else "")
