"""What one shard's run did and what publishing it decided, as types every layer may
read (the engine makes them, the registry stores them, quality checks them):

- `ShardResult`: what one expansion (or a committed shard's files) amounts to: its
  files, its figures, its requests and time.
- `ShardOutcome`: what publishing the shard decided, the one type behind the shard's
  summary, the publish task's XCom and the JSON of `maga publish-shard`.

Which fields a summary carries depends on the path the shard took (a shard found
registered carries `skipped`, a trial `max_docs`, a judged one `judge_*`). A field a
path does not fill is `ABSENT` and left out of `to_dict()`, so the dict is exactly the
one the DAG, the dashboard and the CLI have always read: no key appears as None that
was missing before.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import asdict, dataclass
from typing import Any

from maga_tasks.data.figures import ShardFigures, fidelity_rates
from maga_tasks.data.layout import ShardPaths
from maga_tasks.redaction import clean_text


@dataclass
class _ShardFiles:
    """Which shard a result is about and where its files went."""

    shard: str
    source_uri: str
    recipe_id: str
    data_uri: str
    rejected_uri: str


# The bases in this order put the file fields first and the figures after them, so
# `ShardResult(shard, source_uri, recipe_id, data_uri, rejected_uri, ...)` still holds.
@dataclass
class ShardResult(ShardFigures, _ShardFiles):
    """What one `expand_shard` call did; small enough to be an Airflow XCom."""

    requests: int = 0  # attempts sent, retries included
    # Attempts that got no answer, by cause (`disconnected`, `timeout`, `http_503`, ...).
    failed_attempts: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    resumed_documents: int = 0
    already_committed: bool = False
    # The version of the source the rows were made from (`ShardReader.identity`).
    source_identity: str | None = None

    @classmethod
    def of(cls, paths: ShardPaths, source_uri: str, figures: ShardFigures, **run) -> ShardResult:
        """The result for a shard's `paths` with its figures (and `run` fields)."""
        return cls(paths.shard, source_uri, paths.recipe_id, paths.data, paths.rejected, **asdict(figures), **run)

    @classmethod
    def committed(cls, paths: ShardPaths, source_uri: str, figures: ShardFigures, identity: str | None) -> ShardResult:
        """The result of a shard found committed: its files' figures, no expansion run here."""
        return cls.of(paths, source_uri, figures, already_committed=True, source_identity=identity)

    def to_dict(self) -> dict:
        """The XCom and progress report: every field, the expansion ratio, the request
        rate and the fidelity rates."""
        out = asdict(self)
        out["expansion_ratio"] = self.expansion_ratio
        out |= fidelity_rates(out)
        out["requests_per_s"] = round(self.requests / self.seconds, 2) if self.seconds else 0.0
        return out


class _Absent(enum.Enum):
    ABSENT = "absent"

    def __repr__(self) -> str:
        return "ABSENT"


# A field this outcome does not carry (None is a value: a registry row's empty reason).
ABSENT = _Absent.ABSENT

# The figures an outcome carries, named as on `ShardResult` and in the registry's rows.
SUMMARY_FIGURES = (
    "documents", "accepted", "rejected", "prompt_tokens", "completion_tokens", "expansion_ratio", "source_identity",
)


def summary_figures(result: ShardResult) -> dict:
    """The figures of `result` an outcome carries (`SUMMARY_FIGURES`)."""
    return {name: getattr(result, name) for name in SUMMARY_FIGURES}


@dataclass(frozen=True)
class ShardOutcome:
    """One shard's outcome: where it is, what was decided, with which figures."""

    shard: str
    source_uri: str
    recipe_id: str
    status: str  # registered | quarantined | trial
    data_uri: str
    rejected_uri: str
    max_docs: int | _Absent = ABSENT  # a trial's documents per shard
    documents: int | _Absent = ABSENT
    accepted: int | _Absent = ABSENT
    rejected: int | _Absent = ABSENT
    prompt_tokens: int | _Absent = ABSENT
    completion_tokens: int | _Absent = ABSENT
    expansion_ratio: float | _Absent = ABSENT
    source_identity: str | None | _Absent = ABSENT
    checksum: str | None | _Absent = ABSENT
    docs_uri: str | None | _Absent = ABSENT
    quality_success: bool | _Absent = ABSENT
    failed_expectations: list[str] | _Absent = ABSENT
    reason: str | None | _Absent = ABSENT
    skipped: bool | _Absent = ABSENT  # decided before this call: nothing ran
    already_committed: bool | _Absent = ABSENT
    seconds: float | _Absent = ABSENT
    requests: int | _Absent = ABSENT
    resumed_documents: int | _Absent = ABSENT
    newly_registered: bool | _Absent = ABSENT
    judge_pass_share: float | _Absent = ABSENT
    judge_genre_kept_share: float | None | _Absent = ABSENT  # None: the recipe's judge asks no genre question
    judge_scored: int | _Absent = ABSENT
    judge_uri: str | _Absent = ABSENT
    judge_error: str | _Absent = ABSENT

    @classmethod
    def of(cls, paths: ShardPaths, source_uri: str, status: str, **fields: Any) -> ShardOutcome:
        """The outcome of the shard at `paths`; its free texts (a reason, failed
        expectations quoting source values) redacted, without control characters and
        bounded, since they leave through XComs and logs."""
        if fields.get("reason") is not None:
            fields["reason"] = clean_text(fields["reason"])
        if fields.get("failed_expectations"):
            fields["failed_expectations"] = [clean_text(name) for name in fields["failed_expectations"]]
        return cls(paths.shard, source_uri, paths.recipe_id, status, paths.data, paths.rejected, **fields)

    def but(self, **fields: Any) -> ShardOutcome:
        """This outcome with `fields` changed (a reason given is cleaned as in `of`)."""
        if fields.get("reason") is not None:
            fields["reason"] = clean_text(fields["reason"])
        return dataclasses.replace(self, **fields)

    def to_dict(self) -> dict:
        """The summary as a plain dict (the XCom, the CLI's JSON): the fields carried."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not ABSENT}

    @classmethod
    def from_dict(cls, summary: dict) -> ShardOutcome:
        """The outcome of a summary `to_dict` made (an XCom read back); unknown keys raise."""
        unknown = set(summary) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"not fields of a shard outcome: {sorted(unknown)}")
        return cls(**summary)


__all__ = ["ABSENT", "SUMMARY_FIGURES", "ShardOutcome", "ShardResult", "summary_figures"]
