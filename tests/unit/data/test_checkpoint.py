"""Checkpoint lines: what a finished document wrote is what a resumed run reads back."""

from __future__ import annotations

from maga_tasks.data.checkpoint import Checkpoint
from maga_tasks.data.storage import LocalStorage


def test_rows_read_back_as_written_lone_surrogates_included(tmp_path):
    # A jsonl source may carry "\ud800" escapes: such text is kept as it was, not refused.
    rows = {
        0: [{"id": "a", "text": "plain text, ünïcode and 中文", "keyword_coverage": 0.6667, "prompt_tokens": 12}],
        1: [{"id": "b", "text": "a lone surrogate \ud800 here", "keyword_coverage": None, "prompt_tokens": 0}],
        2: [{"id": "c", "text": "big number", "prompt_tokens": 2**70}],
    }
    checkpoint = Checkpoint(LocalStorage(), str(tmp_path / "work"), {"source": "s"})
    checkpoint.prepare()
    for index, doc_rows in rows.items():
        checkpoint.append(index, doc_rows)
    checkpoint.close()

    resumed = Checkpoint(LocalStorage(), str(tmp_path / "work"), {"source": "s"})
    resumed.prepare()
    with resumed.local_segments() as segments:
        found = Checkpoint.index(segments)
        assert sorted(found) == [0, 1, 2]
        assert {index: Checkpoint.read(location) for index, location in found.items()} == rows
