"""The airflow section of the scale benchmark (`tools.scale_bench`): one DAG run through a
real scheduler and Celery worker over many shards, most of them already registered."""

from __future__ import annotations

import json
import secrets
import statistics
import time
from pathlib import Path

from maga_tasks.tools.benchmarks.figures import REPO, Figures
from maga_tasks.tools.benchmarks.registry_scale import seed_registered
from maga_tasks.tools.benchmarks.services import open_registry


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
