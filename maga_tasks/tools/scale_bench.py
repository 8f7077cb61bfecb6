"""The scale benchmark (`maga bench --scale`): what a corpus of 20,000 shards costs the
parts that are not the LLM, on PostgreSQL and moto's S3 over HTTP.

Sections, each a table of figures with units (no timing is asserted anywhere):

- planning: `plan_run` over N source objects on S3: seconds, and the HTTP requests the
  planner's S3 clients sent (counted by a botocore `before-send` hook on boto3's default
  session, which every client the storage layer makes inherits).
- registry: W worker processes race over the same shards, each leasing every shard and
  registering the ones it won: lease+register operations per second (against one
  worker as the baseline) and double registrations (must be 0).
- dashboard: the dashboard's overview and `maga status` over a registry of many vs few
  registered shards (seeded with bulk SQL): page time of each and their ratio.
- memory: commit + output gate of one already-expanded shard (a synthetic checkpoint
  with 5 KB rewrites; `commit_and_validate`), in a child process each, for many vs few
  documents: peak RSS (ru_maxrss) and the ratio.
- airflow: one run of the DAG through a real scheduler + Celery worker over S shards,
  most of them already registered (`maga_tasks.tools.airflow_stack`).

Every server it needs (moto, the test LLM server at zero latency, the Airflow stack) it
starts itself and stops by PID; PostgreSQL databases it creates are dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from maga_tasks.reject_reasons import RejectReason
from maga_tasks.tools.bench import REPO, Figures, markdown_table, write_report

log = logging.getLogger(__name__)

PG_HOST = os.environ.get("MAGA_BENCH_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("MAGA_BENCH_PGPORT", "5432"))

FULL = {"objects": 20000, "workers": 16, "race_shards": 2000, "shards": (200, 20000), "docs": (1000, 10000),
        "airflow_shards": 2000, "airflow_new": 20}
SHORT = {"objects": 2000, "workers": 4, "race_shards": 200, "shards": (20, 200), "docs": (100, 1000),
         "airflow_shards": 20, "airflow_new": 1}
REWRITE_CHARS = 5000


# -- PostgreSQL -----------------------------------------------------------------------


def pg_user() -> str:
    """The PostgreSQL role: `MAGA_BENCH_PGUSER`, else root or postgres, whichever logs in."""
    import psycopg

    candidates = [os.environ["MAGA_BENCH_PGUSER"]] if os.environ.get("MAGA_BENCH_PGUSER") else ["root", "postgres"]
    for user in candidates:
        try:
            with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", connect_timeout=5):
                return user
        except psycopg.OperationalError:
            continue
    raise RuntimeError(f"no PostgreSQL at {PG_HOST}:{PG_PORT} for roles {candidates}")


class BenchDatabase:
    """A PostgreSQL database of this run, dropped at the end; `schema_url()` gives a
    registry URL in a fresh schema of it."""

    def __init__(self):
        import psycopg

        self.user = pg_user()
        self.name = f"maga_scale_{os.getpid()}_{secrets.token_hex(3)}"
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{PG_HOST}:{PG_PORT}/{self.name}"

    def schema_url(self, prefix: str) -> str:
        import psycopg

        schema = f"{prefix}_{secrets.token_hex(3)}"
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=self.user, dbname=self.name, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return f"{self.url}?options=-csearch_path%3D{schema}"

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def open_registry(url: str):
    from maga_tasks.registry import Registry

    registry = Registry(url)
    registry.upgrade()
    return registry


# -- moto S3 over HTTP ----------------------------------------------------------------


@contextmanager
def moto_server(log_dir: Path):
    """moto's S3 in server mode on a free loopback port; yields its URL."""
    import socket
    import urllib.request

    from maga_tasks.tools.airflow_stack import ManagedProcess, start_process

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    process: ManagedProcess = start_process(
        "moto", [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)], env, log_dir
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or not process.alive():
                    raise RuntimeError(f"moto server did not start:\n{process.log_tail()}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.stop()


def s3_credentials() -> None:
    """moto accepts any credentials; boto3 needs some. (The endpoint is passed to every
    call, never set in the environment the Airflow section hands on.)"""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def tiny_shard_bytes(rows: int = 2) -> bytes:
    """A small valid source parquet (tiny documents: the LLM is not the point here)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(rows)], "text": [f"Tiny document {i}." for i in range(rows)]}),
                   buffer)
    return buffer.getvalue()


def put_source_objects(endpoint: str, bucket: str, prefix: str, count: int) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    body = tiny_shard_bytes()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"{prefix}part-{i:06d}.parquet", Body=body),
                      range(count)))


class S3RequestCounter:
    """Counts the HTTP requests sent by every S3 client made from boto3's default
    session from now on (botocore's `before-send` event; retries count too)."""

    def __init__(self):
        import boto3

        boto3.setup_default_session()
        self.requests: dict[str, int] = {}
        boto3.DEFAULT_SESSION.events.register("before-send.s3", self._count)

    def _count(self, request=None, **_) -> None:
        operation = getattr(request, "context", {}).get("operation_name") or getattr(request, "method", "?")
        self.requests[operation] = self.requests.get(operation, 0) + 1

    def total(self) -> int:
        return sum(self.requests.values())

    def reset(self) -> None:
        self.requests.clear()


# -- planning -------------------------------------------------------------------------


def planning_suite(sizes: dict, db: BenchDatabase, work: Path, figures: Figures) -> dict:
    from maga_tasks.engine.planning import plan_run

    objects, baseline = sizes["objects"], max(1, sizes["objects"] // 10)
    setup = {"objects": objects, "baseline_objects": baseline}
    with moto_server(work) as endpoint:
        s3_credentials()
        started = time.perf_counter()
        put_source_objects(endpoint, "corpus", "flat/", objects)
        put_source_objects(endpoint, "baseline", "flat/", baseline)
        setup["seed_seconds"] = round(time.perf_counter() - started, 1)
        counter = S3RequestCounter()
        seconds = {}
        for name, bucket, count in (("baseline", "baseline", baseline), ("full", "corpus", objects)):
            registry = open_registry(db.schema_url("plan"))
            counter.reset()
            started = time.perf_counter()
            plan = plan_run(f"s3://{bucket}/flat/", "bench-recipe", registry, budget=8, s3_endpoint_url=endpoint)
            seconds[name] = time.perf_counter() - started
            if plan.candidates != count:
                raise RuntimeError(f"planned over {plan.candidates} objects, not {count}")
            label = f"{count:,} objects"
            figures.add(f"plan_run, {label}", seconds[name], "s")
            figures.add(f"S3 requests, {label}", counter.total(), "requests")
            setup[f"s3_requests_by_operation_{name}"] = dict(counter.requests)
            if name == "full":  # a later night: all but 8 shards registered
                seed_registered(registry, "bench-recipe", [(f"s3://{bucket}/flat/part-{i:06d}.parquet",
                                                            f"part-{i:06d}") for i in range(8, count)])
                counter.reset()
                started = time.perf_counter()
                plan = plan_run(f"s3://{bucket}/flat/", "bench-recipe", registry, budget=8, s3_endpoint_url=endpoint)
                figures.add(f"plan_run, {label}, all but 8 registered", time.perf_counter() - started, "s")
                figures.add(f"S3 requests, {label}, all but 8 registered", counter.total(), "requests")
            registry.close()
        figures.add("plan time ratio, 10x objects", seconds["full"] / seconds["baseline"], "x")
    return setup


# -- registry race --------------------------------------------------------------------


def _race_child(argv: list[str]) -> int:
    """One racing worker: lease every shard in its own order, register those it won."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--start-at", type=float, required=True)
    args = parser.parse_args(argv)
    from maga_tasks.data.layout import shard_paths
    from maga_tasks.engine.figures import ShardFigures
    from maga_tasks.engine.shard import ShardResult
    from maga_tasks.registry import Registry

    registry = Registry(args.registry)
    shards = [f"part-{i:06d}" for i in range(args.shards)]
    random.Random(args.name).shuffle(shards)
    figures = ShardFigures(documents=10, accepted=40, rejected=10, source_chars=1000, output_chars=5000)
    won = registered = operations = 0
    time.sleep(max(0.0, args.start_at - time.time()))
    started = time.perf_counter()
    for shard in shards:
        uri = f"s3://corpus/flat/{shard}.parquet"
        token = registry.lease("race", shard, uri, args.name, 300)
        operations += 1
        if token is None:
            continue
        won += 1
        result = ShardResult.of(shard_paths("s3://out", "race", shard), uri, figures)
        registered += registry.register("race", shard, result, f"sha-{shard}", token=token)
        operations += 1
    seconds = time.perf_counter() - started
    registry.close()
    print(json.dumps({"name": args.name, "won": won, "registered": registered, "operations": operations,
                      "seconds": seconds}))
    return 0


def race(url: str, workers: int, shards: int) -> dict:
    open_registry(url).close()
    start_at = time.time() + 3.0 + 0.3 * workers  # every child imported and connected first
    command = [sys.executable, "-m", "maga_tasks.tools.scale_bench", "_race_child", "--registry", url,
               "--shards", str(shards), "--start-at", str(start_at)]
    children = [subprocess.Popen(command + ["--name", f"w{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=REPO) for i in range(workers)]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=1800)
        if child.returncode != 0:
            raise RuntimeError(f"race worker failed: {err.strip()[-2000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(r["seconds"] for r in reports)
    registry = open_registry(url)
    with registry.db.read() as conn:
        from sqlalchemy import text

        events = conn.execute(text(
            "SELECT shard, COUNT(*) FROM shard_events WHERE recipe_id = 'race' AND event = 'register' GROUP BY shard"
        )).all()
    totals = registry.totals("race")
    registry.close()
    return {
        "operations_per_s": sum(r["operations"] for r in reports) / wall,
        "published_per_s": sum(r["registered"] for r in reports) / wall,
        "seconds": wall,
        # A shard registered twice: two workers both told they published it, or two
        # register events in the registry's own log.
        "double_registrations": max(sum(r["registered"] for r in reports) - shards,
                                    sum(count - 1 for _, count in events)),
        "registered": totals["by_status"]["registered"],
    }


def registry_suite(sizes: dict, db: BenchDatabase, figures: Figures) -> dict:
    workers, shards = sizes["workers"], sizes["race_shards"]
    baseline = race(db.schema_url("race1"), 1, shards)
    raced = race(db.schema_url("race"), workers, shards)
    figures.add("lease+register operations/s, 1 worker", baseline["operations_per_s"], "ops/s")
    figures.add(f"lease+register operations/s, {workers} workers racing", raced["operations_per_s"], "ops/s")
    figures.add(f"shards published/s, {workers} workers racing", raced["published_per_s"], "shards/s")
    figures.add(f"operations/s ratio, {workers} workers / 1", raced["operations_per_s"] / baseline["operations_per_s"], "x")
    figures.add(f"double registrations, {workers} workers", raced["double_registrations"], "shards")
    figures.add(f"shards registered, {workers} workers", raced["registered"], "shards")
    return {"workers": workers, "shards": shards, "race_seconds": round(raced["seconds"], 2),
            "double_registrations": raced["double_registrations"], "registered": raced["registered"]}


# -- dashboard and `maga status` ------------------------------------------------------

_GENRES = ("A step-by-step tutorial.", "An analytical report.", "A friendly dialogue.", "A short story.", "A Q&A sheet.")
_AUDIENCES = ("High-school students.", "Retired engineers.", "Busy parents.", "University students.", "Children.")
_REASONS = {RejectReason.LOW_KEYWORD_COVERAGE: 3000, RejectReason.PAIRS_INVALID_JSON: 1500, RejectReason.TRUNCATED: 500}


def seed_registered(registry, recipe_id: str, shards: list[tuple[str, str]]) -> None:
    """Make `(source_uri, shard)` pairs registered shards with figures, labels and a
    quality result each: one executemany for the rows (the registry's `record_planned`),
    then one UPDATE, one INSERT ... SELECT and the running totals `register` would add,
    not a transaction per shard (PostgreSQL)."""
    from sqlalchemy import text

    from maga_tasks.registry import queries

    registry.record_planned(recipe_id, shards)
    labels = json.dumps({"genres": [[g, 8] for g in _GENRES], "audiences": [[a, 8] for a in _AUDIENCES]})
    names = [shard for _, shard in shards]
    with registry.db.write() as conn:
        conn.execute(text(
            "UPDATE shards SET status = 'registered', documents = 10000, accepted = 45000, rejected = 5000,"
            " requests = 60000, prompt_tokens = 9000000, completion_tokens = 12000000, source_chars = 30000000,"
            " output_chars = 225000000, expansion_ratio = 7.5, rejects_by_reason = :reasons, label_summary = :labels,"
            " checksum = 'sha-' || shard, data_uri = 's3://out/data/' || shard || '.parquet',"
            " registered_at = updated_at, finished_at = updated_at WHERE recipe_id = :rid AND shard = ANY(:names)"
        ), {"rid": recipe_id, "labels": labels, "names": names, "reasons": json.dumps(_REASONS)})
        # What `register` adds to the running totals, here for all of them at once.
        conn.execute(queries.ADD_TO_TOTALS, [{"rid": recipe_id, "shard": name} for name in names])
        tallies = [("reason", reason, count) for reason, count in _REASONS.items()]
        tallies += [("genre", g, 8) for g in _GENRES] + [("audience", a, 8) for a in _AUDIENCES]
        conn.execute(queries.ADD_TO_TALLY, [
            {"rid": recipe_id, "kind": kind, "label": label, "total": count * len(names)} for kind, label, count in tallies
        ])
        conn.execute(text(
            "INSERT INTO quality_results (result_id, recipe_id, shard, suite, success, evaluated, failed, statistics,"
            " failed_expectations, docs_uri, created_at)"
            " SELECT md5(recipe_id || shard), recipe_id, shard, 'output', 1, 12, 0, '{}', '[]', NULL, updated_at"
            " FROM shards WHERE recipe_id = :rid AND shard = ANY(:names) ON CONFLICT DO NOTHING"
        ), {"rid": recipe_id, "names": names})
    # What autovacuum does after a bulk change: without it every count reads the heap rows
    # the statements above just wrote, which a registry in service has long since settled.
    with registry.db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE shards, quality_results"))


def _flat_shards(count: int) -> list[tuple[str, str]]:
    return [(f"s3://corpus/flat/part-{i:06d}.parquet", f"part-{i:06d}") for i in range(count)]


def _timed(call, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def dashboard_suite(sizes: dict, db: BenchDatabase, figures: Figures, repeats: int) -> dict:
    from maga_tasks.registry.dashboard import corpus_overview
    from maga_tasks.registry.reads import format_status

    pages = {}
    for count in sizes["shards"]:
        registry = open_registry(db.schema_url("dash"))
        seed_registered(registry, "bench-recipe", _flat_shards(count))
        # What the plugin's /maga/api/overview answers, and what `maga status` prints.
        page = _timed(lambda r=registry: json.dumps(corpus_overview(r), default=str), repeats)
        status = _timed(lambda r=registry: format_status(r.status(None)), repeats)
        registry.close()
        pages[count] = (statistics.median(page), statistics.median(status))
        for seconds in page:
            figures.add(f"dashboard overview, {count:,} shards", 1000 * seconds, "ms")
        for seconds in status:
            figures.add(f"maga status, {count:,} shards", 1000 * seconds, "ms")
    few, many = sizes["shards"]
    figures.add(f"dashboard time ratio, {many:,} / {few:,} shards", pages[many][0] / pages[few][0], "x (mark <= 2)")
    figures.add(f"maga status time ratio, {many:,} / {few:,} shards", pages[many][1] / pages[few][1], "x (mark <= 2)")
    return {"shards": list(sizes["shards"]), "repeats": repeats}


# -- gate + commit memory -------------------------------------------------------------


def synthesize_expanded_shard(work: Path, recipe, documents: int) -> str:
    """A tiny source shard of `documents` documents and a complete checkpoint of its
    expansion (every pair rewritten, 5 KB each, one pair per document rejected), as an
    expansion that stopped just before its commit leaves them. Returns the source URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from maga_tasks.data.checkpoint import Checkpoint, manifest
    from maga_tasks.data.layout import shard_paths
    from maga_tasks.data.source import open_shard
    from maga_tasks.data.schema import row_id
    from maga_tasks.data.storage import storage_for

    source = work / "source" / "part-000000.parquet"
    source.parent.mkdir(parents=True, exist_ok=True)
    # Sources of 3 KB: 5 KB rewrites of them keep the expansion ratio the output gate expects.
    body = "River deltas form where sediment settles as a current slows, and shift over centuries. " * 35
    texts = [f"Document {d}. {body}" for d in range(documents)]
    pq.write_table(pa.table({"id": [f"doc-{d:06d}" for d in range(documents)], "text": texts}), source)
    output_root = str(work / "out")
    paths = shard_paths(output_root, recipe.recipe_id, "part-000000")
    with open_shard(source, str(source)) as reader:
        identity = reader.identity()
    checkpoint = Checkpoint(storage_for(output_root), paths.work, manifest(recipe.recipe_id, str(source), identity))
    checkpoint.prepare()
    sentence = "River deltas form where a slowing current drops its sediment; they shift and feed wetlands. "
    rewrite = (sentence * (REWRITE_CHARS // len(sentence) + 1))[:REWRITE_CHARS]
    created = "2026-12-01T02:00:00+00:00"
    for d in range(documents):
        rows = []
        for p in range(recipe.pairs_per_document):
            rejected = p == recipe.pairs_per_document - 1
            rows.append({
                "id": row_id(recipe.recipe_id, paths.shard, f"doc-{d:06d}", p), "source_id": f"doc-{d:06d}",
                "source_shard": paths.shard, "pair_index": p, "genre": _GENRES[p % 5], "audience": _AUDIENCES[(p + d) % 5],
                "text": f"Rewrite {p} of document {d}. " + rewrite, "recipe_id": recipe.recipe_id, "model": recipe.model,
                "prompt_version": recipe.prompt_version, "prompt_tokens": 220, "completion_tokens": REWRITE_CHARS // 4,
                "pairs_prompt_tokens": 180 if p == 0 else 0, "pairs_completion_tokens": 150 if p == 0 else 0,
                "finish_reason": "stop", "keyword_coverage": 0.6, "source_chars": len(texts[d]),
                "source_truncated_tokens": None, "source_meta": None, "created_at": created,
                "reject_reason": RejectReason.LOW_KEYWORD_COVERAGE if rejected else None,
                "reject_detail": "coverage 0.05" if rejected else None,
            })
        checkpoint.append(d, rows)
    checkpoint.close()
    return str(source)


def gate_and_commit(source_uri: str, output_root: str, recipe, registry_url: str):
    """Commit and output gate of an already-expanded shard (`commit_and_validate`: its
    checkpoint to `data/`, `rejected/`, `magacorpus/`, then the gate, its result recorded
    in the registry); no lease, no LLM. The one call the memory section measures."""
    from maga_tasks.engine.publish import commit_and_validate

    registry = open_registry(registry_url)
    try:
        return commit_and_validate(source_uri, output_root, recipe, registry=registry)
    finally:
        registry.close()


def _gate_child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("output_root")
    parser.add_argument("--registry", required=True)
    args = parser.parse_args(argv)
    from maga_tasks.recipe import load_recipe

    started = time.perf_counter()
    report = gate_and_commit(args.source, args.output_root, load_recipe(), args.registry)
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "status": "passed" if report.success else "failed", "reason": None if report.success else report.reason(),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def memory_suite(sizes: dict, db: BenchDatabase, work: Path, figures: Figures) -> dict:
    from maga_tasks.recipe import load_recipe

    recipe = load_recipe()
    runs = {}
    for documents in sizes["docs"]:
        folder = work / f"gate-{documents}"
        source = synthesize_expanded_shard(folder, recipe, documents)
        done = subprocess.run(
            [sys.executable, "-m", "maga_tasks.tools.scale_bench", "_gate_child", source, str(folder / "out"),
             "--registry", db.schema_url("gate")],
            capture_output=True, text=True, cwd=REPO, timeout=3600, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"gate+commit child failed: {done.stderr.strip()[-3000:]}")
        runs[documents] = json.loads(done.stdout.strip().splitlines()[-1])
        figures.add(f"gate+commit peak RSS, {documents:,} documents", runs[documents]["peak_rss_mb"], "MiB")
        figures.add(f"gate+commit time, {documents:,} documents", runs[documents]["seconds"], "s")
    few, many = sizes["docs"]
    figures.add(f"gate+commit peak RSS ratio, {many:,} / {few:,} documents",
                runs[many]["peak_rss_mb"] / runs[few]["peak_rss_mb"], "x (mark <= 1.3)")
    return {"documents": list(sizes["docs"]), "rewrite_chars": REWRITE_CHARS, "pairs_per_document": recipe.pairs_per_document,
            "outcome": {str(d): r["status"] + (f" ({r['reason']})" if r.get("reason") else "") for d, r in runs.items()}}


# -- one Airflow run through the scheduler and Celery ---------------------------------


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children, the exited ones it reaped included."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            t = process.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue
    return total


def _tree_peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and its live children, summed."""
    import psutil

    root = psutil.Process(pid)
    total_kb = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def write_tiny_sources(folder: Path, shards: int, documents: int = 2) -> None:
    """`shards` source files of `documents` short real articles each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from maga_tasks.data.sample_corpus import wikipedia_summaries

    articles = wikipedia_summaries()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        texts = [articles[(i * documents + d) % len(articles)]["text"] for d in range(documents)]
        pq.write_table(pa.table({"id": [f"s{i}-d{d}" for d in range(documents)], "text": texts}),
                       folder / f"part-{i:06d}.parquet")


def _seconds_between(rows: list[tuple]) -> list[float]:
    return [(end - start).total_seconds() for start, end in rows if start is not None and end is not None]


def airflow_suite(sizes: dict, work: Path, figures: Figures) -> dict:
    """One manual run of the DAG over `airflow_shards` flat shards, all but
    `airflow_new` of them registered by the time the shard tasks start: the pool is
    closed (0 slots) while the run plans, the registry is seeded, then the pool opens."""
    from maga_tasks.recipe import load_recipe
    from maga_tasks.tools.airflow_stack import (
        DAG_ID,
        POOL,
        http_json,
        new_airflow_env,
        remove_airflow_env,
        start_celery_stack,
        use_celery,
        wait_for,
        wait_stack_ready,
    )
    from maga_tasks.tools.test_server_process import TestServerProcess

    shards, new = sizes["airflow_shards"], min(sizes["airflow_new"], sizes["airflow_shards"])
    slots = sizes["airflow_slots"]
    recipe_id = load_recipe().recipe_id
    source = work / "airflow-source"
    write_tiny_sources(source, shards)
    af = new_airflow_env(pool_slots=0)
    try:
        log_dir = af.home / "process-logs"
        llm = TestServerProcess(log_dir=log_dir).start().wait_ready()  # zero latency
        af.processes.append(llm)
        af.env.update(
            MAGA_ENDPOINTS=llm.url,
            MAGA_OUTPUT_ROOT=str(work / "airflow-out"),
            # No scheduled run when the DAG is unpaused: only the bench's own run.
            AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
            # One run maps every shard, the heaviest case for the scheduler and the API
            # server: core.max_map_length raised past the default 1,024 when the run is
            # larger (otherwise the DAG would publish the rest in continuation runs).
            AIRFLOW__CORE__MAX_MAP_LENGTH=str(max(1024, shards)),
            AIRFLOW__CORE__PARALLELISM=str(slots),
            PYTHONPATH=str(REPO),
        )
        queue = use_celery(af, concurrency=slots)
        processes = start_celery_stack(af, log_dir, queue, concurrency=slots)
        wait_stack_ready(af, 300)
        af.cli("dags", "unpause", DAG_ID)
        conf = {"planning_mode": "flat", "source": str(source), "shards_per_run": shards}
        run_id = f"scale-bench-{secrets.token_hex(3)}"
        af.cli("dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps(conf))

        def task_state(task_id: str):
            rows = af.query("SELECT state FROM task_instance WHERE dag_id = %(d)s AND run_id = %(r)s"
                            " AND task_id = %(t)s", {"d": DAG_ID, "r": run_id, "t": task_id})
            return rows[0][0] if rows else None

        wait_for(lambda: task_state("plan_shards") in ("success", "failed"), 600, 1.0, "plan_shards")
        if task_state("plan_shards") != "success":
            raise RuntimeError(f"plan_shards failed; see {af.logs}")
        registry = open_registry(af.registry_url)
        pairs = [(str(source / f"part-{i:06d}.parquet"), f"part-{i:06d}") for i in range(shards)]
        seed_registered(registry, recipe_id, pairs[new:])
        scheduler, worker, api = (processes[n].pid for n in ("scheduler", "celery-worker", "api-server"))
        cpu_before = {name: _tree_cpu_seconds(pid) for name, pid in (("scheduler", scheduler), ("worker", worker))}
        opened = time.monotonic()
        af.cli("pools", "set", POOL, str(slots), "vLLM request streams")

        def finished():
            rows = af.query("SELECT state FROM dag_run WHERE run_id = %(r)s", {"r": run_id})
            return rows and rows[0][0] in ("success", "failed") and rows[0][0]

        state = wait_for(finished, 3 * 3600, 2.0, f"run {run_id}")
        phase = time.monotonic() - opened
        cpu = {name: _tree_cpu_seconds(pid) - cpu_before[name]
               for name, pid in (("scheduler", scheduler), ("worker", worker))}
        token = af.token()
        started = time.perf_counter()
        status, _ = http_json(f"{af.api_url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100",
                              token=token, timeout=120)
        list_seconds = time.perf_counter() - started
        started = time.perf_counter()
        page_status, _ = http_json(f"{af.api_url}/maga/api/overview", token=token, timeout=120)
        page_seconds = time.perf_counter() - started
        api_peak = _tree_peak_rss_mb(api)
        mapped = af.query(
            "SELECT state, count(*) FROM task_instance WHERE dag_id = %(d)s AND run_id = %(r)s"
            " AND task_id = 'publish_shard' GROUP BY state", {"d": DAG_ID, "r": run_id})
        tasks = sum(n for _, n in mapped)
        durations = _seconds_between(af.query(
            "SELECT start_date, end_date FROM task_instance WHERE dag_id = %(d)s AND run_id = %(r)s"
            " AND task_id = 'publish_shard'", {"d": DAG_ID, "r": run_id}))
        waits = _seconds_between(af.query(
            "SELECT queued_dttm, start_date FROM task_instance WHERE dag_id = %(d)s AND run_id = %(r)s"
            " AND task_id = 'publish_shard'", {"d": DAG_ID, "r": run_id}))
        run_wall = _seconds_between(af.query("SELECT start_date, end_date FROM dag_run WHERE run_id = %(r)s",
                                              {"r": run_id}))
        totals = registry.totals(recipe_id)
        registry.close()
        figures.add(f"shard phase wall time, {tasks:,} shard tasks", phase, "s")
        figures.add("run wall time (plan, seeding pause and shard phase)", run_wall[0] if run_wall else None, "s")
        figures.add("scheduler overhead per shard task (shard phase wall / tasks)", phase / max(1, tasks), "s")
        figures.add("scheduler CPU per shard task", cpu["scheduler"] / max(1, tasks), "s")
        figures.add("Celery worker CPU per shard task", cpu["worker"] / max(1, tasks), "s")
        figures.add("shard task duration, median", statistics.median(durations) if durations else None, "s")
        figures.add("shard task queued -> running, median", statistics.median(waits) if waits else None, "s")
        figures.add("API server peak RSS", api_peak, "MiB")
        figures.add("API: 100 task instances of the run", 1000 * list_seconds, "ms")
        figures.add("API: dashboard overview (/maga/api/overview)", 1000 * page_seconds, "ms")
        figures.add("shards registered after the run", totals["by_status"]["registered"], "shards")
        return {"shards": shards, "new_shards": new, "run_state": state, "task_states": dict(mapped),
                "pool_slots": slots, "celery_concurrency": slots, "parallelism": slots,
                "max_map_length": max(1024, shards), "api_status": [status, page_status]}
    finally:
        remove_airflow_env(af)


# -- command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale benchmark (--scale)")
    group.add_argument("--scale", action="store_true", help="the scale benchmark instead of the throughput suites")
    group.add_argument("--scale-sections", default="planning,registry,dashboard,memory,airflow",
                       help="comma-separated sections of --scale to run")
    group.add_argument("--airflow-shards", type=int, help="--scale: shards of the Airflow run (full 2,000; short 20)")
    group.add_argument("--airflow-new", type=int, help="--scale: of those, shards not registered yet")
    group.add_argument("--airflow-slots", type=int, default=4,
                       help="--scale: pool slots, Celery concurrency and parallelism of the Airflow run")


SECTIONS = {
    "planning": "Planning over S3 source objects (moto over HTTP, registry on PostgreSQL)",
    "registry": "Registry: workers racing over the same shards (PostgreSQL)",
    "dashboard": "Dashboard and `maga status` over many registered shards (PostgreSQL)",
    "memory": "Gate + commit of one expanded shard, 5 KB rewrites (child process each)",
    "airflow": "Airflow: one run through the scheduler and Celery (PostgreSQL, Redis)",
}


def run_scale(args) -> dict:
    sizes = dict(SHORT if args.short else FULL)
    if args.airflow_shards:
        sizes["airflow_shards"] = args.airflow_shards
    if args.airflow_new is not None:
        sizes["airflow_new"] = args.airflow_new
    sizes["airflow_slots"] = args.airflow_slots
    sections = [s.strip() for s in args.scale_sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown --scale-sections {sorted(unknown)}; choose from {sorted(SECTIONS)}")
    repeats = 1 if args.short else max(3, args.repeats)
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "short": args.short,
                    "date": time.strftime("%Y-%m-%d", time.gmtime()), "sizes": sizes}
    work = Path(tempfile.mkdtemp(prefix="maga-scale-"))
    db = BenchDatabase()
    tables = []
    try:
        for section in sections:
            figures = Figures()
            started = time.perf_counter()
            log.info("scale section %s ...", section)
            if section == "planning":
                setup = planning_suite(sizes, db, work, figures)
            elif section == "registry":
                setup = registry_suite(sizes, db, figures)
            elif section == "dashboard":
                setup = dashboard_suite(sizes, db, figures, repeats)
            elif section == "memory":
                setup = memory_suite(sizes, db, work, figures)
            else:
                setup = airflow_suite(sizes, work, figures)
            setup["section_seconds"] = round(time.perf_counter() - started, 1)
            report[section] = {"setup": setup, "figures": figures.as_dict()}
            tables.append(markdown_table(SECTIONS[section], report[section]["figures"]))
            log.info("scale section %s done in %.1fs", section, setup["section_seconds"])
    finally:
        db.drop()
    return write_report(Path(args.out), "scale", report, tables)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_race_child"]:
        sys.exit(_race_child(sys.argv[2:]))
    if sys.argv[1:2] == ["_gate_child"]:
        sys.exit(_gate_child(sys.argv[2:]))
    raise SystemExit("run the scale benchmark as `maga bench --scale`")
