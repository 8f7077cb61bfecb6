"""The answer journal: an answered request is never asked again after a crash.

Its S3 snapshots on a moto server and a journaled chat against the test LLM server, then
a real shard run against that server killed with SIGKILL mid-shard and rerun: the
server's per-request counts show that no request whose answer had reached the client was
asked again. (The journal on its own: tests/unit/data/test_answer_journal.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest

from maga_tasks.data.answer_journal import AnswerJournal, JournaledChat
from maga_tasks.data.checkpoint import Checkpoint
from maga_tasks.data.layout import shard_paths
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.data.storage import LocalStorage, storage_for
from maga_tasks.engine.shard import expand_shard
from maga_tasks.llm.client import Completion
from maga_tasks.recipe import load_recipe
from maga_tasks.settings import RunSettings
from tests.support.journal import BOUND, SAMPLING, answer, digest_of, journal_files

RECIPE = load_recipe()


@pytest.mark.integration
def test_on_s3_the_live_answers_are_put_with_each_checkpoint_segment(s3_env):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="journal")
    work = "s3://journal/out/_work/part-0000"
    storage = storage_for(work, s3_env)
    checkpoint = Checkpoint(storage, work, {}, s3_every=2)
    journal = AnswerJournal(storage, work, max_entry_bytes=BOUND)
    journal.attach(checkpoint)
    for doc in range(4):
        journal.record(doc, f"d{doc}/pairs/-1.0", digest_of(f"p{doc}"), answer(f"pairs {doc}"))
    assert not [k for k in _keys(s3) if "answers-" in k]  # nothing put yet: S3 has no appends
    for doc in (0, 1):  # two documents finish: the checkpoint puts a segment, the journal its snapshot
        checkpoint.append(doc, [{"doc": doc}])
        journal.forget(doc)
    checkpoint.flush()
    answers = [k for k in _keys(s3) if "answers-" in k]
    assert len(answers) == 1
    # The process dies here. A rerun finds documents 2 and 3's answers, nothing of 0 and 1.
    resumed = AnswerJournal(storage, work, max_entry_bytes=BOUND)
    assert resumed.load(done={0, 1}) == 2
    assert resumed.stored_answer(3, "d3/pairs/-1.0", digest_of("p3")).text == "pairs 3"
    assert [k for k in _keys(s3) if "answers-" in k] == [resumed.uri.removeprefix("s3://journal/")]
    checkpoint.close()


def _keys(s3) -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket="journal").get("Contents", [])]


@pytest.mark.integration
def test_a_journaled_chat_asks_only_what_the_journal_lacks(tmp_path, llm_server):
    from maga_tasks.llm.client import LLMClient, run_client
    from maga_tasks.method.prompts import rewrite_messages

    settings = RunSettings(endpoints=(llm_server.url,), max_concurrency=4)
    messages = rewrite_messages(RECIPE, "Bees make honey from nectar.", "A poem.", "Children.")
    work = str(tmp_path / "work")

    async def ask(journal: AnswerJournal) -> Completion:
        async with LLMClient(settings, RECIPE.model) as client:
            chat = JournaledChat(client, journal, 7)
            return await chat.chat(messages, SAMPLING, seed=5, request_id="doc7/rewrite/0", affinity="doc7",
                                   kind="rewrite")

    first = run_client(ask(AnswerJournal(LocalStorage(), work, max_entry_bytes=BOUND)))
    assert llm_server.stats()["requests_total"] == 1
    resumed = AnswerJournal(LocalStorage(), work, max_entry_bytes=BOUND)
    resumed.load(done=set())
    again = run_client(ask(resumed))
    assert llm_server.stats()["requests_total"] == 1  # the journal answered
    assert (again.text, again.prompt_tokens, again.completion_tokens) == (
        first.text, first.prompt_tokens, first.completion_tokens)


# -- a real shard killed with SIGKILL and rerun --------------------------------------------


# One draw per pair (the default recipe), or up to 3 with half the rewrites spoiled: the
# journal keys each draw, so a rerun asks none of them again either.
DRAWS = {"one draw": (1, ()), "redrawn rewrites": (3, ("off_topic:0.5",))}


@pytest.mark.integration
@pytest.mark.parametrize("draws", DRAWS)
def test_sigkill_mid_shard_then_rerun_asks_no_answered_request_again(tmp_path, llm_server_factory, draws):
    from maga_tasks.recipe import recipe_from_dict

    samples, faults = DRAWS[draws]
    dumped = RECIPE.model_dump(mode="json")
    redrawn = {**dumped, "rewrite": {**dumped["rewrite"], "samples": samples}}
    recipe = RECIPE if samples == 1 else recipe_from_dict(redrawn)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe.to_yaml(), encoding="utf-8")
    server = llm_server_factory(*faults, latency_ms=150)
    source = write_sample_corpus(tmp_path / "source", 1, 120)[0]
    out = tmp_path / "out"
    work = Path(shard_paths(str(out), recipe.recipe_id, "part-0000").work)
    command = [sys.executable, "-m", "maga_tasks.cli", "expand-shard", str(source), "--output-root", str(out),
               "--endpoint", server.url, "--concurrency", "16", "--recipe", str(recipe_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, finished, journaled = read_work(work)
            if len(finished) >= 20 and len({doc for doc, _ in journaled} - finished) >= 3:
                break
            assert process.poll() is None, "the shard ended before it could be killed"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    finished_ids, finished, journaled = read_work(work)
    first_run = server.stats()["by_request"]
    server.reset()

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    second_run = server.stats()["by_request"]

    # What the client had received before the kill: every request of a checkpointed
    # document, and every journaled answer of the others.
    doc_keys = {quote(f"part-0000:{source_id}", safe="") for source_id in finished_ids}
    received = {key for key in first_run if key.split("/")[0] in doc_keys} | {request for _, request in journaled}
    journal_only = {request for doc, request in journaled if doc not in finished}
    assert journal_only, "the kill must leave answers of unfinished documents for the test to mean anything"
    if samples > 1:  # answers of further draws were among them
        assert any(key.split("/")[2].endswith((".1", ".2")) for key in received), sorted(received)[:10]
    asked_again = sorted(key for key in received if second_run.get(key))
    assert asked_again == [], asked_again
    # Each request reached the server once per run at most; across both runs exactly once,
    # but for those still in flight at the kill (asked, never answered: asked again).
    assert set(first_run.values()) <= {1} and set(second_run.values()) <= {1}
    in_flight = set(first_run) - received
    assert len(in_flight) <= 16
    for key in set(first_run) | set(second_run):
        assert first_run.get(key, 0) + second_run.get(key, 0) == (2 if key in in_flight else 1), key
    assert all(second_run.get(key) == 1 for key in in_flight)
    print(f"\nkill -9: {len(received)} answers received before the kill ({len(journal_only)} only in the journal),"
          f" asked again 0; {len(in_flight)} in flight at the kill asked again;"
          f" rerun asked {sum(second_run.values())} requests")

    # The journal's answers give the very rows a clean run gives, and the journal is gone.
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert not work.exists()
    reference = expand_shard(str(source), str(tmp_path / "reference"), recipe,
                             RunSettings(endpoints=(server.url,), max_concurrency=64))
    for got_uri, want_uri in ((summary["data_uri"], reference.data_uri),
                              (summary["rejected_uri"], reference.rejected_uri)):
        got = pq.read_table(got_uri).drop_columns(["created_at"])
        want = pq.read_table(want_uri).drop_columns(["created_at"])
        assert got.equals(want)


def read_work(work: Path) -> tuple[set[str], set[int], set[tuple[int, str]]]:
    """What a killed run left: the source ids and indices of the documents in its
    checkpoint, and (document, request id) of its journaled answers. Torn lines skipped."""
    finished_ids, finished = set(), set()
    for segment in work.glob("part-*.jsonl"):
        for line in segment.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            finished.add(record["i"])
            finished_ids.add(record["rows"][0]["source_id"])
    journaled = set()
    for journal in journal_files(work):
        for line in journal.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            journaled.add((record["i"], record["r"]))
    return finished_ids, finished, journaled
