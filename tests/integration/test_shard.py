"""expand_shard end to end against the test LLM server: accounting, faults, resume, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.data.schema import LINEAGE_COLUMNS
from maga_tasks.engine.shard import expand_shard
from maga_tasks.errors import EndpointsUnavailable
from maga_tasks.recipe import load_recipe
from maga_tasks.settings import RunSettings

pytestmark = pytest.mark.integration

RECIPE = load_recipe()
PAIRS = RECIPE.pairs_per_document


def settings(*urls: str, **extra) -> RunSettings:
    values = dict(endpoints=urls, max_concurrency=32, backoff_base_s=0.05, backoff_max_s=0.5, progress_interval_s=1)
    values.update(extra)
    return RunSettings(**values)


def read_output(result) -> tuple[pa.Table, pa.Table]:
    return pq.read_table(result.data_uri), pq.read_table(result.rejected_uri)


def assert_accounts_for_every_pair(result, documents: int) -> None:
    data, rejected = read_output(result)
    keys = [(s, p) for s, p in zip(data["source_id"].to_pylist(), data["pair_index"].to_pylist(), strict=True)]
    keys += [
        (s, p) for s, p in zip(rejected["source_id"].to_pylist(), rejected["pair_index"].to_pylist(), strict=True)
    ]
    assert len(keys) == len(set(keys)) == documents * PAIRS
    assert result.accepted + result.rejected == documents * PAIRS
    assert data.num_rows + rejected.num_rows == documents * PAIRS


@pytest.fixture
def shard_200(tmp_path) -> Path:
    return write_sample_corpus(tmp_path / "source", 1, 200)[0]


def test_expands_200_documents_with_full_lineage(tmp_path, llm_server, shard_200):
    result = expand_shard(str(shard_200), str(tmp_path / "out"), RECIPE, settings(llm_server.url))

    assert result.documents == 200
    assert result.accepted == 200 * PAIRS, result.rejects_by_reason
    assert_accounts_for_every_pair(result, 200)
    data, _ = read_output(result)
    for column in LINEAGE_COLUMNS:
        assert data[column].null_count == 0, column
    assert set(data["recipe_id"].to_pylist()) == {RECIPE.recipe_id}
    assert set(data["finish_reason"].to_pylist()) == {"stop"}
    assert min(data["keyword_coverage"].to_pylist()) >= RECIPE.cleaning.min_keyword_coverage
    assert Counter(data["source_id"].to_pylist()) == Counter({s: PAIRS for s in set(data["source_id"].to_pylist())})
    # Every token the server counted is in the output, and nowhere twice.
    stats = llm_server.stats()
    used_prompt = sum(data["prompt_tokens"].to_pylist()) + sum(data["pairs_prompt_tokens"].to_pylist())
    used_completion = sum(data["completion_tokens"].to_pylist()) + sum(data["pairs_completion_tokens"].to_pylist())
    assert used_prompt == stats["prompt_tokens_total"] == result.prompt_tokens
    assert used_completion == stats["completion_tokens_total"] == result.completion_tokens
    assert result.expansion_ratio > 1.5
    assert not (tmp_path / "out" / RECIPE.recipe_id / "_work" / "part-0000").exists()


def test_rerun_of_a_committed_shard_is_a_no_op(tmp_path, llm_server, shard_200):
    out = str(tmp_path / "out")
    first = expand_shard(str(shard_200), out, RECIPE, settings(llm_server.url), max_docs=20)
    requests_before = llm_server.stats()["requests_total"]
    mtime = os.stat(first.data_uri).st_mtime_ns

    again = expand_shard(str(shard_200), out, RECIPE, settings(llm_server.url), max_docs=20)

    assert again.already_committed
    assert llm_server.stats()["requests_total"] == requests_before
    # A trial over the first 20 documents is kept apart from the corpus itself.
    trial = tmp_path / "out" / "_trials" / "first-20" / RECIPE.recipe_id
    assert first.data_uri == str(trial / "data" / "part-0000.parquet")
    assert first.documents == 20 and not (tmp_path / "out" / RECIPE.recipe_id).exists()
    assert os.stat(first.data_uri).st_mtime_ns == mtime
    assert (again.accepted, again.rejected, again.documents) == (first.accepted, first.rejected, first.documents)
    assert (again.prompt_tokens, again.completion_tokens) == (first.prompt_tokens, first.completion_tokens)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "maga_tasks.cli", *args]


def test_sigkill_half_way_resumes_without_duplicates(tmp_path, llm_server_factory, shard_200):
    server = llm_server_factory(latency_ms=40)
    out = tmp_path / "out"
    work = out / RECIPE.recipe_id / "_work" / "part-0000"
    command = _cli(
        "expand-shard", str(shard_200), "--output-root", str(out), "--endpoint", server.url, "--concurrency", "16"
    )
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    finished_before = set()
    while time.monotonic() < deadline:
        lines = []
        if work.exists():
            lines = [line for p in work.glob("part-*.jsonl") for line in p.read_bytes().splitlines()]
        if len(lines) >= 60:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    for segment in work.glob("part-*.jsonl"):
        for line in segment.read_bytes().splitlines():
            try:
                finished_before.add(json.loads(line)["rows"][0]["source_id"])
            except ValueError:
                pass  # the torn last line
    assert 60 <= len(finished_before) < 200
    assert not (out / RECIPE.recipe_id / "data" / "part-0000.parquet").exists()
    server.reset()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_documents"] >= len(finished_before)
    by_doc = server.stats()["by_doc"]
    from urllib.parse import quote

    asked_again = [s for s in finished_before if by_doc.get(quote(f"part-0000:{s}", safe=""), 0)]
    assert asked_again == []

    reference = expand_shard(
        str(shard_200), str(tmp_path / "reference"), RECIPE, settings(server.url, max_concurrency=64)
    )
    for resumed_file, reference_file in (
        (summary["data_uri"], reference.data_uri),
        (summary["rejected_uri"], reference.rejected_uri),
    ):
        got = pq.read_table(resumed_file).drop_columns(["created_at"])
        want = pq.read_table(reference_file).drop_columns(["created_at"])
        assert got.num_rows == want.num_rows
        assert len(set(got["id"].to_pylist())) == got.num_rows
        assert got.equals(want)


FAULTS = {
    "http500:0.2": None,
    "http429:0.2": None,
    "timeout:0.05:1:hang=3": None,
    "disconnect:0.05": None,
    "bad_json:0.3": "pairs_invalid_json",
    "wrong_count:0.3": "pairs_wrong_count",
    "truncate:0.1": "truncated",
    "boilerplate:0.3": None,
    "empty:0.05": "empty",
    "off_topic:0.05": "low_keyword_coverage",
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_ends_as_retry_or_reasoned_rejection(tmp_path, llm_server_factory, fault):
    server = llm_server_factory(fault)
    shard = write_sample_corpus(tmp_path / "source", 1, 60)[0]
    result = expand_shard(str(shard), str(tmp_path / "out"), RECIPE, settings(server.url, request_timeout_s=1.5))

    assert_accounts_for_every_pair(result, 60)
    fired = server.stats()["faults_fired"]
    assert sum(fired.values()) > 0, fired
    expected_reason = FAULTS[fault]
    allowed = {expected_reason} if expected_reason else set()
    if expected_reason and expected_reason.startswith("pairs_"):
        # A new seed per attempt escapes the fault; only a document unlucky every time is rejected.
        assert result.accepted >= 50 * PAIRS
    assert set(result.rejects_by_reason) <= allowed, result.rejects_by_reason
    if expected_reason in ("truncated", "empty", "low_keyword_coverage"):
        assert result.rejects_by_reason.get(expected_reason, 0) > 0
    data, rejected = read_output(result)
    if fault.startswith("boilerplate"):
        texts = data["text"].to_pylist()
        assert not any(t.lower().startswith(("sure", "here is", "the following")) for t in texts)
        assert not any("i hope this helps" in t.lower() or "\nnote:" in t.lower() for t in texts)
    assert set(rejected["reject_reason"].to_pylist()) <= allowed


def test_a_rejected_rewrite_is_drawn_again_and_every_draw_is_counted(tmp_path, llm_server_factory):
    """`rewrite.samples: 3`: a pair whose rewrite the cleaning rejects is asked again with the
    next seed; the tokens of every draw are on the pair's row, and its draws are counted."""
    from maga_tasks.recipe import recipe_from_dict

    server = llm_server_factory("off_topic:0.5")  # aimed by seed: a new draw may escape
    shard = write_sample_corpus(tmp_path / "source", 1, 30)[0]
    once = expand_shard(str(shard), str(tmp_path / "once"), RECIPE, settings(server.url))
    server.reset()
    dumped = RECIPE.model_dump(mode="json")
    thrice = recipe_from_dict({**dumped, "rewrite": {**dumped["rewrite"], "samples": 3}})
    result = expand_shard(str(shard), str(tmp_path / "thrice"), thrice, settings(server.url))
    stats = server.stats()

    assert_accounts_for_every_pair(result, 30)
    off_once = once.rejects_by_reason.get("low_keyword_coverage", 0)
    off_thrice = result.rejects_by_reason.get("low_keyword_coverage", 0)
    print(f"\noff-topic rejections: one draw {off_once}, up to three {off_thrice}")
    assert off_once > 20 and off_thrice < off_once / 2, (off_once, off_thrice)
    assert result.accepted > once.accepted
    data, rejected = read_output(result)
    drawn = data["rewrite_samples"].to_pylist() + rejected["rewrite_samples"].to_pylist()
    assert sum(drawn) == stats["by_stage"]["rewrite"]
    assert max(data["rewrite_samples"].to_pylist()) > 1
    reasons = rejected["reject_reason"].to_pylist()
    assert {n for n, r in zip(rejected["rewrite_samples"].to_pylist(), reasons, strict=True) if r} == {3}
    spent = sum(
        sum(v or 0 for v in table[column].to_pylist())
        for table in (data, rejected)
        for column in ("completion_tokens", "pairs_completion_tokens")
    )
    assert spent == stats["completion_tokens_total"] == result.completion_tokens


def test_one_of_two_endpoints_dying_mid_shard(tmp_path, llm_server_factory, shard_200):
    healthy = llm_server_factory()
    dying = llm_server_factory("die_after:150")
    result = expand_shard(
        str(shard_200), str(tmp_path / "out"), RECIPE, settings(dying.url, healthy.url, endpoint_probe_interval_s=0.5)
    )
    assert dying.popen.wait(timeout=5) is not None
    assert result.accepted == 200 * PAIRS, result.rejects_by_reason
    assert_accounts_for_every_pair(result, 200)
    assert healthy.stats()["requests_total"] > 0


def test_all_endpoints_down_fails_the_shard_and_keeps_the_checkpoint(tmp_path, llm_server_factory, shard_200):
    dying = llm_server_factory("die_after:100")
    out = tmp_path / "out"
    with pytest.raises(EndpointsUnavailable):
        expand_shard(str(shard_200), str(out), RECIPE, settings(dying.url, all_down_timeout_s=2))
    paths = shard_paths(str(out), RECIPE.recipe_id, "part-0000")
    assert not Path(paths.data).exists()
    assert list(Path(paths.work).glob("part-*.jsonl"))

    healthy = llm_server_factory()
    result = expand_shard(str(shard_200), str(out), RECIPE, settings(healthy.url))
    assert result.resumed_documents > 0
    assert_accounts_for_every_pair(result, 200)


def test_s3_gives_the_same_result_as_local(tmp_path, llm_server, s3_env):
    import boto3

    shard = write_sample_corpus(tmp_path / "source", 1, 40)[0]
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="corpus")
    s3.upload_file(str(shard), "corpus", "source/part-0000.parquet")

    local = expand_shard(str(shard), str(tmp_path / "out"), RECIPE, settings(llm_server.url))
    remote = expand_shard(
        "s3://corpus/source/part-0000.parquet", "s3://corpus/out", RECIPE,
        settings(llm_server.url, s3_checkpoint_every=4),
    )

    assert remote.data_uri == f"s3://corpus/out/{RECIPE.recipe_id}/data/part-0000.parquet"
    for local_uri, remote_uri in ((local.data_uri, remote.data_uri), (local.rejected_uri, remote.rejected_uri)):
        bucket_key = remote_uri.removeprefix("s3://corpus/")
        target = tmp_path / bucket_key.replace("/", "_")
        s3.download_file("corpus", bucket_key, str(target))
        got = pq.read_table(target).drop_columns(["created_at"])
        assert got.equals(pq.read_table(local_uri).drop_columns(["created_at"]))
    leftovers = s3.list_objects_v2(Bucket="corpus", Prefix=f"out/{RECIPE.recipe_id}/_work/").get("KeyCount", 0)
    assert leftovers == 0
    again = expand_shard("s3://corpus/source/part-0000.parquet", "s3://corpus/out", RECIPE, settings(llm_server.url))
    assert again.already_committed and again.accepted == remote.accepted


def test_s3_lost_mid_shard_ends_the_shard_with_a_storage_error(tmp_path, llm_server_factory, monkeypatch):
    """Checkpoint segments are put from a background thread; a put that fails must still
    end the shard with a clear error, never vanish or leave a commit."""
    import threading

    import boto3

    from maga_tasks.data.storage import StorageError
    from tests.support.servers import free_port, stop_process, wait_http

    port = free_port()
    moto = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", process=moto)
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="out")
        shard = write_sample_corpus(tmp_path / "source", 1, 80)[0]
        llm = llm_server_factory(latency_ms=30)
        run_settings = settings(llm.url, max_concurrency=4, s3_endpoint_url=endpoint, s3_checkpoint_every=2)
        outcome: dict = {}

        def run():
            try:
                outcome["result"] = expand_shard(str(shard), "s3://out/corpus", RECIPE, run_settings)
            except Exception as error:  # handed to the test thread below
                outcome["error"] = error

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        work_prefix = f"corpus/{RECIPE.recipe_id}/_work/part-0000/part-"
        deadline = time.monotonic() + 60
        while s3.list_objects_v2(Bucket="out", Prefix=work_prefix).get("KeyCount", 0) < 2:
            assert time.monotonic() < deadline and worker.is_alive(), outcome
            time.sleep(0.05)
    finally:
        stop_process(moto)
    worker.join(timeout=180)
    assert not worker.is_alive()
    assert "result" not in outcome
    assert isinstance(outcome["error"], StorageError), outcome
