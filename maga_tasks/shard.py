"""Expanding one source shard: stream documents, call the stages, checkpoint, commit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ShardResult:
    """What one `expand_shard` call did; small enough to be an Airflow XCom."""

    shard: str
    source_uri: str
    recipe_id: str
    data_uri: str
    rejected_uri: str
    documents: int = 0
    accepted: int = 0
    rejected: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    source_chars: int = 0
    output_chars: int = 0
    requests: int = 0
    seconds: float = 0.0
    resumed_documents: int = 0
    already_committed: bool = False

    @property
    def expansion_ratio(self) -> float:
        """Accepted output characters per source character."""
        return round(self.output_chars / self.source_chars, 4) if self.source_chars else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["expansion_ratio"] = self.expansion_ratio
        out["requests_per_s"] = round(self.requests / self.seconds, 2) if self.seconds else 0.0
        return out
