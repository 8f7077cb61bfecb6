"""The planning, registry-race and dashboard sections of the scale benchmark
(`tools.scale_bench`); race workers run as `python -m maga_tasks.tools.scale_bench _race_child`."""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from maga_tasks.reject_reasons import RejectReason
from maga_tasks.tools.benchmarks.figures import REPO, Figures
from maga_tasks.tools.benchmarks.services import (
    BenchDatabase,
    S3RequestCounter,
    moto_server,
    open_registry,
    put_source_objects,
    s3_credentials,
)

log = logging.getLogger(__name__)


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


def _race_child(argv: list[str]) -> int:
    """One racing worker: lease every shard in its own order, register those it won."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--start-at", type=float, required=True)
    args = parser.parse_args(argv)
    from maga_tasks.data.figures import ShardFigures
    from maga_tasks.data.layout import shard_paths
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
    figures.add(f"operations/s ratio, {workers} workers / 1",
                raced["operations_per_s"] / baseline["operations_per_s"], "x")
    figures.add(f"double registrations, {workers} workers", raced["double_registrations"], "shards")
    figures.add(f"shards registered, {workers} workers", raced["registered"], "shards")
    return {"workers": workers, "shards": shards, "race_seconds": round(raced["seconds"], 2),
            "double_registrations": raced["double_registrations"], "registered": raced["registered"]}


SAMPLE_GENRES = ("A step-by-step tutorial.", "An analytical report.", "A friendly dialogue.", "A short story.",
                 "A Q&A sheet.")


SAMPLE_AUDIENCES = ("High-school students.", "Retired engineers.", "Busy parents.", "University students.", "Children.")


_REASONS = {RejectReason.LOW_KEYWORD_COVERAGE: 3000, RejectReason.PAIRS_INVALID_JSON: 1500, RejectReason.TRUNCATED: 500}


def seed_registered(registry, recipe_id: str, shards: list[tuple[str, str]]) -> None:
    """Make `(source_uri, shard)` pairs registered shards with figures, labels and a
    quality result each: one executemany for the rows (the registry's `record_planned`),
    then one UPDATE, one INSERT ... SELECT and the running totals `register` would add,
    not a transaction per shard (PostgreSQL)."""
    from sqlalchemy import text

    from maga_tasks.registry import queries

    registry.record_planned(recipe_id, shards)
    labels = json.dumps({"genres": [[g, 8] for g in SAMPLE_GENRES], "audiences": [[a, 8] for a in SAMPLE_AUDIENCES]})
    names = [shard for _, shard in shards]
    with registry.db.write() as conn:
        conn.execute(text(
            "UPDATE shards SET status = 'registered', documents = 10000, accepted = 45000, rejected = 5000,"
            " requests = 60000, prompt_tokens = 9000000, completion_tokens = 12000000, source_chars = 30000000,"
            " output_chars = 225000000, expansion_ratio = 7.5, rejects_by_reason = :reasons, label_summary = :labels,"
            " fact_checked_rows = 49000, invented_fact_rows = 9800, echo_checked_rows = 46000, label_echo_rows = 1000,"
            " genre_cue_rows = 9000, genre_kept_rows = 6000,"
            " checksum = 'sha-' || shard, data_uri = 's3://out/data/' || shard || '.parquet',"
            " registered_at = updated_at, finished_at = updated_at WHERE recipe_id = :rid AND shard = ANY(:names)"
        ), {"rid": recipe_id, "labels": labels, "names": names, "reasons": json.dumps(_REASONS)})
        # What `register` adds to the running totals, here for all of them at once.
        conn.execute(queries.ADD_TO_TOTALS, [{"rid": recipe_id, "shard": name} for name in names])
        tallies = [("reason", reason, count) for reason, count in _REASONS.items()]
        tallies += [("genre", g, 8) for g in SAMPLE_GENRES] + [("audience", a, 8) for a in SAMPLE_AUDIENCES]
        conn.execute(queries.ADD_TO_TALLY, [
            {"rid": recipe_id, "kind": kind, "label": label, "total": count * len(names)}
            for kind, label, count in tallies
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
