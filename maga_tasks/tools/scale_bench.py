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
The sections live in `tools.benchmarks` (`registry_scale`, `memory`, `airflow_scale`,
with `services` for PostgreSQL and moto); this module is the command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from maga_tasks.tools.benchmarks.airflow_scale import airflow_suite
from maga_tasks.tools.benchmarks.figures import Figures, markdown_table, write_report
from maga_tasks.tools.benchmarks.memory import _gate_child, memory_suite
from maga_tasks.tools.benchmarks.registry_scale import _race_child, dashboard_suite, planning_suite, registry_suite
from maga_tasks.tools.benchmarks.services import BenchDatabase

log = logging.getLogger(__name__)


FULL = {"objects": 20000, "workers": 16, "race_shards": 2000, "shards": (200, 20000), "docs": (1000, 10000),
        "airflow_shards": 2000, "airflow_new": 20}
SHORT = {"objects": 2000, "workers": 4, "race_shards": 200, "shards": (20, 200), "docs": (100, 1000),
         "airflow_shards": 20, "airflow_new": 1}


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
