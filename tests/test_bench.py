"""The short benchmarks run end to end so they never rot; they print figures, assert no timings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.vllm
def test_short_benchmark_prints_every_figure(vllm_server, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MAGA_API_KEY", vllm_server.api_key or "")
    done = subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "bench", "--short", "--endpoint", vllm_server.url,
         "--served-model", vllm_server.served_model_name, "--model-dir", str(tiny_model_dir),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stderr[-4000:])  # the markdown tables, for the CI log
    report = json.loads((tmp_path / "bench.json").read_text())
    engine, client = report["engine"]["figures"], report["client"]["figures"]
    for name in ("engine output tokens/s", "pipeline output tokens/s", "pipeline / engine throughput ratio",
                 "pipeline prefix-cache hit rate", "pipeline client CPU s per 1,000 requests", "pipeline peak RSS"):
        assert engine[name]["runs"] == 1 and engine[name]["median"] > 0, name
    assert client["peak RSS ratio, 10x documents"]["median"] > 0
    assert "| pipeline / engine throughput ratio (x) |" in (tmp_path / "bench.md").read_text()


SCALE_FIGURES = {
    "planning": ("plan_run, 2,000 objects", "S3 requests, 2,000 objects", "plan time ratio, 10x objects",
                 "plan_run, 2,000 objects, all but 8 registered"),
    "registry": ("lease+register operations/s, 1 worker", "lease+register operations/s, 4 workers racing",
                 "operations/s ratio, 4 workers / 1", "double registrations, 4 workers", "shards registered, 4 workers"),
    "dashboard": ("dashboard overview, 200 shards", "maga status, 200 shards", "dashboard time ratio, 200 / 20 shards",
                  "maga status time ratio, 200 / 20 shards"),
    "memory": ("gate+commit peak RSS, 100 documents", "gate+commit peak RSS, 1,000 documents",
               "gate+commit peak RSS ratio, 1,000 / 100 documents"),
    "airflow": ("shard phase wall time, 20 shard tasks", "scheduler overhead per shard task (shard phase wall / tasks)",
                "scheduler CPU per shard task", "API server peak RSS", "shards registered after the run"),
}


@pytest.mark.integration
@pytest.mark.airflow
def test_short_scale_benchmark_prints_every_figure(tmp_path):
    """`maga bench --scale --short` on PostgreSQL, moto S3, the test LLM server and an
    Airflow stack of its own: every figure printed, no shard registered twice."""
    done = subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "bench", "--scale", "--short", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stderr[-6000:])  # the markdown tables, for the CI log
    report = json.loads((tmp_path / "scale.json").read_text())
    for section, names in SCALE_FIGURES.items():
        figures = report[section]["figures"]
        for name in names:
            assert figures[name]["runs"] == 1 and figures[name]["median"] is not None, (section, name)
    assert report["registry"]["figures"]["double registrations, 4 workers"]["median"] == 0
    assert report["registry"]["figures"]["shards registered, 4 workers"]["median"] == 200
    assert report["airflow"]["setup"]["run_state"] == "success", report["airflow"]["setup"]
    assert report["airflow"]["figures"]["shards registered after the run"]["median"] == 20
    assert report["planning"]["figures"]["S3 requests, 2,000 objects"]["median"] >= 2  # 1,000 keys a page
    assert report["memory"]["setup"]["llm_requests"] == {"100": 0, "1000": 0}
    table = (tmp_path / "scale.md").read_text()
    assert "| double registrations, 4 workers (shards) | 0.000 |" in table
