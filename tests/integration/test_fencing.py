"""Fencing and the heartbeat, on SQLite and PostgreSQL: every lease has a token, a stale
token's writes change nothing, a worker paused past its lease (SIGSTOP) and resumed
(SIGCONT) stops within a heartbeat and publishes nothing, and the heartbeat survives a
registry that goes away for a while. Workers are real processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import secrets
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import pyarrow.parquet as pq
import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.data.schema import shard_checksum
from maga_tasks.data.storage import LocalStorage
from maga_tasks.engine.commit import committed_result
from maga_tasks.engine.publish import publish_shard
from maga_tasks.engine.shard import ShardResult, documents_in_flight
from maga_tasks.recipe import load_recipe
from maga_tasks.registry import (
    LeaseLost,
    Registry,
    RegistryConflict,
    ShardBusy,
    iso,
    utc_now,
)
from maga_tasks.settings import RunSettings
from tests.support.servers import PG_TEST_DSN, pg_test_user
from tests.support.shards import write_committed_shard

RECIPE = load_recipe()
RID = RECIPE.recipe_id
PAIRS = RECIPE.pairs_per_document
SHARD = "part-0000"
CONCURRENCY = 4
# Nothing listens here: a test using it proves that no LLM request was needed.
DEAD = RunSettings(endpoints=("http://127.0.0.1:9",), all_down_timeout_s=0.5, max_attempts=1, backoff_base_s=0)


def _result(shard: str) -> ShardResult:
    return ShardResult(
        shard, f"/src/{shard}.parquet", RID, f"/out/data/{shard}.parquet", f"/out/rejected/{shard}.parquet",
        documents=2, accepted=8, rejected=2,
    )


# -- the registry's fence ----------------------------------------------------------------------


def test_a_stale_token_changes_nothing_and_its_register_is_refused(registry):
    first = registry.lease(RID, "s1", "/src/s1.parquet", "try-1", ttl_s=0.3)
    time.sleep(0.5)
    second = registry.lease(RID, "s1", "/src/s1.parquet", "try-2", ttl_s=60)  # takeover by expiry
    assert first == 1 and second == 2

    assert not registry.progress(RID, "s1", "try-1", token=first, status="expanding", ttl_s=60)
    with pytest.raises(LeaseLost, match="token 1 is stale"):
        registry.record_commit(RID, "s1", first, "sha-stale")
    with pytest.raises(LeaseLost, match="token 1 is stale"):
        registry.register(RID, "s1", _result("s1"), "sha-stale", token=first)
    with pytest.raises(LeaseLost):
        registry.quarantine(RID, "s1", "stale gate", [], token=first)
    assert registry.mark_failed(RID, "s1", "stale failure", owner="try-1", token=first) is None
    assert not registry.release(RID, "s1", "try-1", token=first)
    with pytest.raises(ShardBusy, match="try-2"):  # no token: only while no live lease holds it
        registry.register(RID, "s1", _result("s1"), "sha-operator")
    row = registry.shard(RID, "s1")
    assert row["lease_owner"] == "try-2" and row["lease_token"] == 2 and row["status"] == "leased"
    assert row["checksum"] is None and row["commit_token"] is None

    registry.record_commit(RID, "s1", second, "sha-2")
    assert registry.shard(RID, "s1")["commit_token"] == 2
    assert registry.register(RID, "s1", _result("s1"), "sha-2", token=second)
    assert not registry.register(RID, "s1", _result("s1"), "sha-2", token=second)  # idempotent for its owner
    with pytest.raises(LeaseLost, match="stale"):  # even the same bytes: the stale writer is refused by token
        registry.register(RID, "s1", _result("s1"), "sha-2", token=first)
    with pytest.raises(RegistryConflict):
        registry.record_commit(RID, "s1", second, "sha-3")
    row = registry.shard(RID, "s1")
    assert row["status"] == "registered" and row["checksum"] == "sha-2"
    events = [(e["event"], e["owner"], (e["detail"] or {}).get("token")) for e in registry.events(RID, "s1")]
    assert events == [("lease", "try-1", 1), ("takeover", "try-2", 2), ("commit", None, 2), ("register", None, 2)]


def _stage_a_commit(tmp_path, registry, out: str) -> tuple[str, str]:
    """What a worker leaves when it stops right after its commit was recorded: staged
    files under its token, nothing published. Returns (source, recorded checksum)."""
    source = str(tmp_path / "source" / f"{SHARD}.parquet")
    token = registry.lease(RID, SHARD, source, "stopped-worker", ttl_s=0.3)
    write_committed_shard(str(tmp_path / "built"), RECIPE, SHARD)
    built = shard_paths(str(tmp_path / "built"), RID, SHARD)
    paths = shard_paths(out, RID, SHARD)
    files = {paths.data: built.data, paths.rejected: built.rejected, paths.export: built.data}  # export: any bytes
    for staged, published in paths.staged(token):
        LocalStorage().put_file(staged, files[published])
    checksum = shard_checksum(Path(built.data).read_bytes(), Path(built.rejected).read_bytes())
    registry.record_commit(RID, SHARD, token, checksum)
    time.sleep(0.4)  # its lease runs out
    return source, checksum


def test_the_next_owner_publishes_a_recorded_staged_commit_without_expanding(tmp_path, registry):
    out = str(tmp_path / "out")
    source, checksum = _stage_a_commit(tmp_path, registry, out)
    assert not Path(shard_paths(out, RID, SHARD).data).exists()

    summary = publish_shard(source, out, RECIPE, DEAD, registry, owner="next-owner")  # DEAD: no LLM request possible

    assert summary["status"] == "registered" and summary["checksum"] == checksum, summary
    paths = shard_paths(out, RID, SHARD)
    assert shard_checksum(Path(paths.data).read_bytes(), Path(paths.rejected).read_bytes()) == checksum
    assert not Path(paths.work).exists()
    assert [e[0] for e in _events(registry)] == ["lease", "commit", "takeover", "register"]


def test_published_files_that_differ_from_the_recorded_commit_are_not_registered(tmp_path, registry):
    out = str(tmp_path / "out")
    source, _ = _stage_a_commit(tmp_path, registry, out)
    LocalStorage().delete_prefix(shard_paths(out, RID, SHARD).work)  # staging gone ...
    write_committed_shard(out, RECIPE, SHARD, accepted_per_document=3)  # ... and other bytes in data/

    with pytest.raises(RegistryConflict, match="not the commit's"):
        publish_shard(source, out, RECIPE, DEAD, registry, owner="next-owner")
    assert registry.shard(RID, SHARD)["status"] != "registered"


# -- two writers on one shard ------------------------------------------------------------------


def _settings(endpoint: str) -> RunSettings:
    return RunSettings(endpoints=(endpoint,), max_concurrency=CONCURRENCY, backoff_base_s=0.05, progress_interval_s=0.3)


def _publish_worker(url: str, source: str, out: str, endpoint: str, owner: str, ttl_s: float, outcome: str) -> None:
    """One worker process: publish the shard, write what happened (and when) to `outcome`."""
    logging.basicConfig(
        filename=f"{outcome}.log", level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(message)s"
    )
    registry = Registry(url)
    try:
        summary = publish_shard(source, out, RECIPE, _settings(endpoint), registry, owner=owner, lease_ttl_s=ttl_s)
        result = {"status": summary["status"], "checksum": summary.get("checksum")}
    except Exception as error:  # noqa: BLE001 - the test reads the outcome; the process ends normally either way
        result = {"error": type(error).__name__, "message": str(error)}
    result["at"] = time.time()
    Path(outcome).write_text(json.dumps(result))
    registry.close()


def _start_worker(url, source, out, endpoint, owner, ttl_s, outcome):
    process = multiprocessing.get_context("spawn").Process(
        target=_publish_worker, args=(url, source, out, endpoint, owner, ttl_s, str(outcome)), name=owner
    )
    process.start()
    return process


def _checkpointed(out: str) -> int:
    """Documents finished in the shard's checkpoint (every worker's segment lines)."""
    work = Path(shard_paths(out, RID, SHARD).work)
    return sum(len(p.read_bytes().splitlines()) for p in work.glob("part-*.jsonl")) if work.exists() else 0


def _wait_for(condition, what: str, timeout: float = 180.0, interval: float = 0.05, workers=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for worker in workers:
            assert worker.is_alive(), f"{worker.name} exited (code {worker.exitcode}) while waiting for {what}"
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _events(registry: Registry) -> list[tuple]:
    return [(e["event"], e["owner"], (e["detail"] or {}).get("token")) for e in registry.events(RID, SHARD)]


def _assert_one_clean_publication(registry: Registry, out: str, source: str, documents: int) -> dict:
    """Exactly one registered set of rows, its checksum the bytes on disk, every source
    document with exactly `PAIRS` rows across data and rejected."""
    paths = shard_paths(out, RID, SHARD)
    row = registry.shard(RID, SHARD)
    assert row["status"] == "registered", row
    on_disk = shard_checksum(Path(paths.data).read_bytes(), Path(paths.rejected).read_bytes())
    assert row["checksum"] == on_disk
    assert [e[0] for e in _events(registry)].count("register") == 1
    data, rejected = pq.read_table(paths.data), pq.read_table(paths.rejected)
    ids = data["id"].to_pylist() + rejected["id"].to_pylist()
    assert len(ids) == len(set(ids)) == documents * PAIRS
    per_doc = Counter(data["source_id"].to_pylist() + rejected["source_id"].to_pylist())
    source_ids = pq.read_table(source, columns=["id"])["id"].to_pylist()
    assert per_doc == Counter({source_id: PAIRS for source_id in source_ids})
    assert row["documents"] == documents and row["accepted"] == data.num_rows and row["rejected"] == rejected.num_rows
    assert not Path(paths.work).exists()  # checkpoint and staged commits gone with the registration
    return row


@pytest.mark.integration
@pytest.mark.parametrize("resume", ["while_the_new_owner_expands", "after_the_new_owner_registered"])
def test_a_worker_paused_past_its_lease_is_fenced_out(tmp_path, registry, llm_server_factory, resume):
    documents, ttl_s = 8, 1.2
    server = llm_server_factory(latency_ms=800)  # a document (pairs, then its rewrites) takes > 1.6 s > the lease
    source = str(write_sample_corpus(tmp_path / "source", 1, documents)[0])
    out = str(tmp_path / "out")
    outcome_a, outcome_b = tmp_path / "a.json", tmp_path / "b.json"

    stale = _start_worker(registry.url, source, out, server.url, "worker-a", ttl_s, outcome_a)
    new = None
    try:
        _wait_for(lambda: _checkpointed(out) >= 2, "worker-a to finish two documents", workers=[stale])
        os.kill(stale.pid, signal.SIGSTOP)
        paused_at = _checkpointed(out)
        time.sleep(2 * ttl_s)  # past its lease

        new = _start_worker(registry.url, source, out, server.url, "worker-b", ttl_s, outcome_b)
        _wait_for(lambda: ("takeover", "worker-b", 2) in _events(registry), "the takeover", workers=[new])
        if resume == "while_the_new_owner_expands":
            _wait_for(lambda: _checkpointed(out) > paused_at, "worker-b to finish a document", workers=[new])
            assert registry.shard(RID, SHARD)["status"] == "expanding"
        else:
            _wait_for(lambda: outcome_b.exists(), "worker-b to finish")
        resumed_at = time.time()
        os.kill(stale.pid, signal.SIGCONT)

        stale.join(timeout=120)
        new.join(timeout=300)
        assert stale.exitcode == 0 and new.exitcode == 0
    finally:
        for worker in (stale, new):
            if worker is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGCONT)
                worker.kill()

    a, b = json.loads(outcome_a.read_text()), json.loads(outcome_b.read_text())
    assert b["status"] == "registered", b
    # The stale worker stopped within a heartbeat of being resumed, with the lease lost.
    assert a["error"] == "LeaseLost", a
    assert a["at"] - resumed_at < ttl_s / 3 + 2.0, (a["at"] - resumed_at, a)
    assert "lease 1 of worker-a is lost" in a["message"] or "token 1" in a["message"]

    row = _assert_one_clean_publication(registry, out, source, documents)
    assert row["checksum"] == b["checksum"]
    events = _events(registry)
    assert events[:2] == [("lease", "worker-a", 1), ("takeover", "worker-b", 2)]
    assert [e for e in events[2:] if e[0] in ("commit", "register")] == [("commit", None, 2), ("register", None, 2)]
    assert not any(e[2] == 1 for e in events[2:])  # nothing of the stale token got in
    paths = shard_paths(out, RID, SHARD)
    with pytest.raises(LeaseLost, match="token 1 is stale"):  # the stale writer's register, refused by token
        registry.register(RID, SHARD, committed_result(source, paths, LocalStorage(), RECIPE), row["checksum"], token=1)
    assert registry.shard(RID, SHARD)["checksum"] == row["checksum"]
    # The stale worker's extra requests are bounded by what it had in flight when it resumed.
    assert server.stats()["requests_total"] <= (documents + 2 * documents_in_flight(CONCURRENCY)) * (1 + PAIRS)


@pytest.mark.integration
def test_a_fenced_commit_on_s3_publishes_the_staged_bytes(tmp_path, registry, llm_server, s3_env):
    import boto3

    s3, bucket = boto3.client("s3", endpoint_url=s3_env), f"fenced-{secrets.token_hex(4)}"  # moto lives all session
    s3.create_bucket(Bucket=bucket)
    source = str(write_sample_corpus(tmp_path / "source", 1, 8)[0])
    summary = publish_shard(source, f"s3://{bucket}/out", RECIPE, _settings(llm_server.url), registry, owner="w1")

    assert summary["status"] == "registered", summary
    prefix = f"out/{RID}"
    data = s3.get_object(Bucket=bucket, Key=f"{prefix}/data/{SHARD}.parquet")["Body"].read()
    rejected = s3.get_object(Bucket=bucket, Key=f"{prefix}/rejected/{SHARD}.parquet")["Body"].read()
    assert registry.shard(RID, SHARD)["checksum"] == summary["checksum"] == shard_checksum(data, rejected)
    assert s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/magacorpus/")["KeyCount"] == 1
    assert s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/_work/")["KeyCount"] == 0
    assert [e[0] for e in _events(registry)] == ["lease", "commit", "register"]


# -- the heartbeat through a registry outage ---------------------------------------------------


@pytest.fixture
def pg_worker_url(pg_schema_url):
    """A PostgreSQL role of the test's own for the worker, so that its connections can be
    cut and refused without touching anyone else's; yields (worker URL, role, admin)."""
    import psycopg

    schema = parse_qs(urlparse(pg_schema_url).query)["options"][0].split("=", 1)[1]
    role = f"maga_fence_{secrets.token_hex(4)}"
    admin = psycopg.connect(user=pg_test_user(), autocommit=True, **PG_TEST_DSN)
    admin.execute(f'CREATE ROLE "{role}" LOGIN')
    admin.execute(f'GRANT ALL ON SCHEMA "{schema}" TO "{role}"')
    url = (
        f"postgresql://{role}@{PG_TEST_DSN['host']}:{PG_TEST_DSN['port']}/{PG_TEST_DSN['dbname']}"
        f"?options={quote('-csearch_path=' + schema)}&application_name={role}"
    )
    yield url, role, admin
    admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
    admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    admin.execute(f'DROP OWNED BY "{role}"')
    admin.execute(f'DROP ROLE "{role}"')
    admin.close()


def _cut_postgres(admin, role: str, seconds: float) -> None:
    """Cut the worker's registry connections and refuse new ones for `seconds`."""
    admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
    killed = admin.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = %s AND usename = %s AND pid <> pg_backend_pid()",
        (PG_TEST_DSN["dbname"], role),
    ).fetchone()[0]
    time.sleep(seconds)
    admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
    return killed


def _lock_sqlite(path: str, seconds: float) -> None:
    """Hold the SQLite registry's write lock for `seconds`: every write waits."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute("BEGIN EXCLUSIVE")
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_heartbeat_survives_a_registry_outage(tmp_path, llm_server_factory, backend, request):
    documents, ttl_s, outage_s = 24, 6.0, 1.5
    server = llm_server_factory(latency_ms=300)
    source = str(write_sample_corpus(tmp_path / "source", 1, documents)[0])
    out = str(tmp_path / "out")
    outcome = tmp_path / "worker.json"
    if backend == "postgresql":
        url, role, admin = request.getfixturevalue("pg_worker_url")
        Registry(url).upgrade()  # as the worker's role, which owns its tables
        reader = Registry(request.getfixturevalue("pg_schema_url"))

        def cut() -> int:
            return _cut_postgres(admin, role, outage_s)
    else:
        url = str(tmp_path / "registry.db")
        Registry(url).upgrade()
        reader = Registry(url)

        def cut() -> None:
            return _lock_sqlite(url, outage_s)

    worker = _start_worker(url, source, out, server.url, "worker", ttl_s, outcome)
    try:
        _wait_for(lambda: _checkpointed(out) >= 1, "the first document", workers=[worker])
        outages = 0
        while outages < 3 and _checkpointed(out) < documents - 8:
            before = _checkpointed(out)
            killed = cut()
            ended = iso(utc_now())
            outages += 1
            if backend == "postgresql":
                assert killed >= 1  # the worker's pooled connections were cut
            # Renewals run off the event loop: the expansion went on while the registry was away.
            assert _checkpointed(out) > before
            # The heartbeat survived: a renewal got through after the outage.
            _wait_for(
                lambda ended=ended: reader.shard(RID, SHARD)["updated_at"] > ended, "a renewal", timeout=ttl_s,
                workers=[worker],
            )
        assert outages >= 2, "the shard ended before the registry was cut twice; make it longer"
        worker.join(timeout=300)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()

    result = json.loads(outcome.read_text())
    assert result.get("status") == "registered", result
    row = _assert_one_clean_publication(reader, out, source, documents)
    assert row["checksum"] == result["checksum"] and row["attempts"] == 1
    events = [(e["event"], e["owner"]) for e in reader.events(RID, SHARD)]
    assert events == [("lease", "worker"), ("commit", None), ("register", None)]  # one lease held throughout
    log = Path(f"{outcome}.log").read_text()
    assert "is lost" not in log
    if backend == "postgresql":
        # The renewals met real database errors, retried them and got through (a cut
        # met at connect time is the registry's RegistryUnavailable).
        assert re.search(r"lease renewal failed \((OperationalError|RegistryUnavailable)", log), log[-3000:]
        assert "lease renewed after" in log
    reader.close()


@pytest.mark.integration
def test_an_outage_longer_than_the_lease_stops_the_worker_and_a_retry_resumes(
    tmp_path, llm_server_factory, pg_worker_url, pg_schema_url
):
    url, role, admin = pg_worker_url
    documents, ttl_s = 16, 2.0
    server = llm_server_factory(latency_ms=300)
    source = str(write_sample_corpus(tmp_path / "source", 1, documents)[0])
    out = str(tmp_path / "out")
    Registry(url).upgrade()
    reader = Registry(pg_schema_url)

    first = _start_worker(url, source, out, server.url, "try-1", ttl_s, tmp_path / "first.json")
    try:
        _wait_for(lambda: _checkpointed(out) >= 2, "two documents", workers=[first])
        cut_at = time.monotonic()
        admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        first.join(timeout=ttl_s + 30)  # renewals fail until the lease runs out; then the worker stops
        stopped_after = time.monotonic() - cut_at
        admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        assert first.exitcode == 0
    finally:
        admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        if first.is_alive():
            first.kill()
    outcome = json.loads((tmp_path / "first.json").read_text())
    # Mostly the renewal thread sees it first; a try still waiting for the server when the
    # lease runs out is the same outage seen by the shard's loop.
    assert outcome["error"] == "LeaseLost" and "expired while" in outcome["message"], outcome
    assert stopped_after < ttl_s + 10
    kept = _checkpointed(out)
    assert 2 <= kept < documents  # the checkpoint stays for the retry
    assert not Path(shard_paths(out, RID, SHARD).data).exists()

    second = _start_worker(url, source, out, server.url, "try-2", ttl_s, tmp_path / "second.json")
    second.join(timeout=300)
    result = json.loads((tmp_path / "second.json").read_text())
    assert result.get("status") == "registered", result
    row = _assert_one_clean_publication(reader, out, source, documents)
    assert row["attempts"] == 2 and row["lease_token"] == 2
    # The retry asked only for what the checkpoint lacked.
    assert server.stats()["requests_total"] <= (documents + 2 * documents_in_flight(CONCURRENCY)) * (1 + PAIRS)
    reader.close()


@pytest.mark.integration
def test_a_retry_waits_for_a_killed_tries_lease_then_takes_over(tmp_path, registry, llm_server_factory):
    documents, ttl_s = 8, 3.0
    server = llm_server_factory(latency_ms=300)
    source = str(write_sample_corpus(tmp_path / "source", 1, documents)[0])
    out = str(tmp_path / "out")
    killed = _start_worker(registry.url, source, out, server.url, "try-1", ttl_s, tmp_path / "try-1.json")
    try:
        _wait_for(lambda: _checkpointed(out) >= 2, "two documents", workers=[killed])
    finally:
        killed.kill()  # SIGKILL: its lease stays until it expires
    killed.join()

    with pytest.raises(ShardBusy, match="try-1"):  # not waiting: busy at once
        publish_shard(source, out, RECIPE, _settings(server.url), registry, owner="try-2", lease_ttl_s=ttl_s)
    started = time.monotonic()
    summary = publish_shard(
        source, out, RECIPE, _settings(server.url), registry, owner="try-2", lease_ttl_s=ttl_s, lease_wait_s=2 * ttl_s
    )
    assert summary["status"] == "registered" and summary["resumed_documents"] >= 2, summary
    assert time.monotonic() - started < 2 * ttl_s + 60
    _assert_one_clean_publication(registry, out, source, documents)
    assert [(e[0], e[1]) for e in _events(registry)][:2] == [("lease", "try-1"), ("takeover", "try-2")]
