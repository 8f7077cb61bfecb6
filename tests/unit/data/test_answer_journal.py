"""The answer journal on its own: keys, torn and hostile lines, the size bound (its S3
snapshots on a moto server and a real shard killed mid-way:
tests/integration/test_answer_journal.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from maga_tasks.data.answer_journal import AnswerJournal, read_journal, request_digest
from maga_tasks.data.storage import LocalStorage
from tests.support.journal import BOUND, SAMPLING, answer, digest_of, journal_files


def test_the_digest_changes_with_anything_the_answer_depends_on():
    base = digest_of("a document")
    assert base == digest_of("a document")
    assert base != digest_of("another document")
    assert base != digest_of("a document", seed=2)
    assert base != request_digest("other-model", [{"role": "user", "content": "a document"}], SAMPLING,
                                  {"seed": 1, "kind": "rewrite"})
    hotter = SAMPLING.model_copy(update={"temperature": 1.3})
    assert base != request_digest("m", [{"role": "user", "content": "a document"}], hotter,
                                  {"seed": 1, "kind": "rewrite"})
    # A lone surrogate from a jsonl source still hashes.
    assert digest_of("odd \ud800 text") != base


def test_answers_of_unfinished_documents_survive_and_checkpointed_ones_go(tmp_path):
    work = tmp_path / "work"
    first = AnswerJournal(LocalStorage(), str(work), max_entry_bytes=BOUND)
    first.record(0, "d0/pairs/-1.0", digest_of("p0"), answer("pairs of 0"))
    first.record(1, "d1/pairs/-1.0", digest_of("p1"), answer("pairs of 1", 11, 6))
    first.record(1, "d1/rewrite/0", digest_of("r1"), answer("rewrite 0 of 1 \u00e9\u4e2d"))
    first.forget(0)  # document 0 was checkpointed
    # No close: the process is killed here. Every answer is already in the file.
    assert len(journal_files(work)) == 1

    second = AnswerJournal(LocalStorage(), str(work), max_entry_bytes=BOUND)
    assert second.load(done={0}) == 2
    again = second.stored_answer(1, "d1/rewrite/0", digest_of("r1"))
    assert (again.text, again.finish_reason, again.prompt_tokens, again.completion_tokens) == (
        "rewrite 0 of 1 \u00e9\u4e2d", "stop", 10, 5)
    assert second.stored_answer(1, "d1/pairs/-1.0", digest_of("p1")).prompt_tokens == 11
    # The same request with another prompt (a changed recipe or source) is asked again.
    assert second.stored_answer(1, "d1/rewrite/0", digest_of("r1 changed")) is None
    assert second.stored_answer(0, "d0/pairs/-1.0", digest_of("p0")) is None
    # The old journal is gone; this run's own holds what it carried over.
    assert journal_files(work) == [Path(second.uri)]
    third = AnswerJournal(LocalStorage(), str(work), max_entry_bytes=BOUND)
    assert third.load(done={1}) == 0  # document 1 checkpointed meanwhile: nothing to keep
    third.close()
    assert journal_files(work) == []


def test_torn_oversized_and_hostile_lines_are_skipped_never_an_error(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    good = {"i": 3, "r": "d3/rewrite/1", "h": digest_of("x"), "t": "kept", "f": "stop", "p": 4, "c": 2}
    lines = [
        json.dumps(good),
        json.dumps({**good, "i": -1}),
        json.dumps({**good, "i": True}),
        json.dumps({**good, "p": 10**12}),  # past the usage bound
        json.dumps({**good, "f": "stop\x1b[31m"}),
        json.dumps({**good, "h": "not-a-digest"}),
        json.dumps({**good, "t": ["not", "text"]}),
        json.dumps({**good, "r": "x" * 5000}),
        json.dumps({**good, "i": 4, "t": "y" * (BOUND + 10)}),  # over the line bound
        "[" * 100_000 + "]" * 100_000,  # nested past any parser's depth
        "not json at all",
        json.dumps({**good, "i": 5, "r": "d5/pairs/-1.0"}),
    ]
    torn = json.dumps({**good, "i": 6})[:40]
    (work / "answers-old.jsonl").write_text("\n".join(lines) + "\n" + torn)

    budget = [10 * 1024**2]
    entries = list(read_journal(work / "answers-old.jsonl", BOUND, budget))
    assert [(e.doc_index, e.request_id, e.completion.text) for e in entries] == [
        (3, "d3/rewrite/1", "kept"), (5, "d5/pairs/-1.0", "kept")]
    journal = AnswerJournal(LocalStorage(), str(work), max_entry_bytes=BOUND)
    assert journal.load(done={5}) == 1
    # A read budget bounds the whole read: past it the rest is asked again.
    assert list(read_journal(work / journal_files(work)[0].name, BOUND, [10])) == []


def test_the_file_stays_bounded_as_documents_are_checkpointed(tmp_path):
    work = tmp_path / "work"
    journal = AnswerJournal(LocalStorage(), str(work), max_entry_bytes=BOUND, compact_over_bytes=20_000)
    sizes = []
    for doc in range(400):
        for request in range(6):
            journal.record(doc, f"d{doc}/rewrite/{request}", digest_of(f"{doc}-{request}"), answer("z" * 100))
        if doc >= 8:  # eight documents in flight, the oldest finishes
            journal.forget(doc - 8)
        sizes.append(os.path.getsize(journal.uri))
    # 400 documents wrote about 1.2 MB of answers; the file never held much more than
    # its bound plus the documents in flight.
    live = 8 * 6 * 300
    assert max(sizes) <= 20_000 + live, max(sizes)
    journal.close()  # a failed run leaves only the answers of its unfinished documents
    assert {e.doc_index for e in read_journal(Path(journal.uri), BOUND, [10**9])} == set(range(392, 400))
