"""The short scale benchmark (`maga bench --scale --short`) and the figures each of its
sections must print."""

from __future__ import annotations

import json
import subprocess
import sys

SCALE_FIGURES = {
    "planning": ("plan_run, 2,000 objects", "S3 requests, 2,000 objects", "plan time ratio, 10x objects",
                 "plan_run, 2,000 objects, all but 8 registered"),
    "registry": ("lease+register operations/s, 1 worker", "lease+register operations/s, 4 workers racing",
                 "operations/s ratio, 4 workers / 1", "double registrations, 4 workers",
                 "shards registered, 4 workers"),
    "dashboard": ("dashboard overview, 200 shards", "maga status, 200 shards", "dashboard time ratio, 200 / 20 shards",
                  "maga status time ratio, 200 / 20 shards"),
    "memory": ("gate+commit peak RSS, 100 documents", "gate+commit peak RSS, 1,000 documents",
               "gate+commit peak RSS ratio, 1,000 / 100 documents"),
    "airflow": ("shard phase wall time, 20 shard tasks", "scheduler overhead per shard task (shard phase wall / tasks)",
                "scheduler CPU per shard task", "Celery worker CPU per shard task", "shard task duration, median",
                "API server peak RSS", "API: dashboard overview (/maga/api/overview)",
                "shards registered after the run"),
}


def run_short_scale(tmp_path, sections: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "bench", "--scale", "--short", "--scale-sections", sections,
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stderr[-6000:])  # the markdown tables, for the CI log
    report = json.loads((tmp_path / "scale.json").read_text())
    for section in sections.split(","):
        figures = report[section]["figures"]
        for name in SCALE_FIGURES[section]:
            assert figures[name]["runs"] >= 1 and figures[name]["median"] is not None, (section, name)
    return report
