"""The shard outcome: one type, and its dict is exactly the summary the DAG reads."""

from __future__ import annotations

import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.outcome import ShardOutcome


def test_a_summary_carries_only_the_fields_its_path_filled():
    paths = shard_paths("/out", "r1", "s1")
    outcome = ShardOutcome.of(paths, "/src/s1.jsonl", "quarantined", quality_success=False, reason=None)
    assert outcome.to_dict() == {
        "shard": "s1", "source_uri": "/src/s1.jsonl", "recipe_id": "r1", "status": "quarantined",
        "data_uri": paths.data, "rejected_uri": paths.rejected, "quality_success": False, "reason": None,
    }
    assert ShardOutcome.from_dict(outcome.to_dict()) == outcome


def test_free_texts_are_cleaned_and_unknown_keys_refused():
    paths = shard_paths("/out", "r1", "s1")
    outcome = ShardOutcome.of(paths, "/s", "trial", reason="bad\x1b[31m", failed_expectations=["a\x00b"])
    assert "\x1b" not in outcome.reason and "\x00" not in outcome.failed_expectations[0]
    assert "\x07" not in outcome.but(reason="x\x07").reason
    with pytest.raises(ValueError, match="not_a_field"):
        ShardOutcome.from_dict(outcome.to_dict() | {"not_a_field": 1})
