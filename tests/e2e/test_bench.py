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
                 "pipeline prefix-cache hit rate", "pipeline client CPU s per 1,000 requests", "pipeline peak RSS",
                 "pairs calls with grammar: output tokens/s", "pairs calls without grammar: output tokens/s",
                 "grammar cost: pairs time with / without"):
        assert engine[name]["runs"] == 1 and engine[name]["median"] > 0, name
    # The short sweep: two concurrencies, the pipeline's own (8) among them, and the best.
    assert report["engine"]["setup"]["sweep"] == [4, 8]
    for name in ("engine output tokens/s at concurrency 4", "engine output tokens/s at concurrency 8",
                 "best engine output tokens/s (sweep)", "pipeline output tokens/s, default settings",
                 "pipeline (default settings) / best engine"):
        assert engine[name]["runs"] == 1 and engine[name]["median"] > 0, name
    assert engine["best engine concurrency"]["median"] in (4, 8)
    # The replay is the recorded stream: the same prompt tokens, not an approximation.
    assert engine["replayed / recorded prompt tokens"]["median"] == pytest.approx(1.0, abs=0.01)
    assert client["peak RSS ratio, 10x documents"]["median"] > 0
    assert "| pipeline / engine throughput ratio (x) |" in (tmp_path / "bench.md").read_text()


@pytest.mark.vllm
def test_short_routing_benchmark_spreads_and_keeps_documents(tiny_model_dir, vllm_python, tmp_path):
    """`--suite routing --short`: two vLLM servers (about a minute), the same 4 documents
    once with affine routing and once through the round-robin balancer. No timings
    asserted: both modes were answered, the balancer used both servers, and affine
    routing computed fewer prompt tokens (each document's prefix once, not once per
    server it met)."""
    done = subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "bench", "--suite", "routing", "--short",
         "--model-dir", str(tiny_model_dir), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stderr[-3000:])
    report = json.loads((tmp_path / "bench.json").read_text())["routing"]
    figures = report["figures"]

    def median(name: str) -> float:
        assert figures[name]["runs"] == 1, name
        return figures[name]["median"]

    answered = {mode: [median(f"{mode}: requests answered, server {n}") for n in (1, 2)]
                for mode in ("affine", "round-robin")}
    assert sum(answered["affine"]) > 0
    assert min(answered["round-robin"]) > 0 and min(report["setup"]["balancer_forwarded"]) > 0
    for mode in ("affine", "round-robin"):
        assert median(f"{mode}: fleet output tokens/s") > 0
        assert 0 <= median(f"{mode}: prefix-cache hit rate, fleet") <= 1
    computed = {mode: median(f"{mode}: prompt tokens computed (not cached)") for mode in ("affine", "round-robin")}
    assert computed["affine"] < computed["round-robin"]


@pytest.mark.integration
def test_short_fleet_benchmark_prints_every_figure(tmp_path):
    """The shared-fleet suite on the capacity-limited test server (4 clients, fixed cap
    vs adaptive): every figure printed, the queue over time kept; no timing asserts."""
    done = subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "bench", "--suite", "fleet", "--short", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stderr[-4000:])
    report = json.loads((tmp_path / "bench.json").read_text())["fleet"]
    for mode in ("fixed", "adaptive"):
        for figure in ("output tokens/s (all clients)", "p50 latency, whole call", "p99 latency, whole call",
                       "timeouts (all clients)", "max server waiting queue"):
            assert report["figures"][f"{mode}: {figure}"]["runs"] == 1, (mode, figure)
        assert report["setup"]["queue_over_time"][f"{mode}-0"], mode
    assert report["figures"]["output tokens/s ratio adaptive / fixed"]["median"] > 0


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


@pytest.mark.integration
def test_short_scale_benchmark_prints_every_figure(tmp_path):
    """`maga bench --scale --short` on PostgreSQL, moto S3 and the test LLM server:
    every figure printed, no shard registered twice, the expanded shards pass their gate."""
    report = run_short_scale(tmp_path, "planning,registry,dashboard,memory")
    assert report["registry"]["figures"]["double registrations, 4 workers"]["median"] == 0
    assert report["registry"]["figures"]["shards registered, 4 workers"]["median"] == 200
    assert report["planning"]["figures"]["S3 requests, 2,000 objects"]["median"] >= 2  # 1,000 keys a page
    assert report["memory"]["setup"]["outcome"] == {"100": "passed", "1000": "passed"}
    assert "| double registrations, 4 workers (shards) | 0.000 |" in (tmp_path / "scale.md").read_text()


@pytest.mark.integration
@pytest.mark.airflow
def test_short_scale_benchmark_airflow_run(tmp_path):
    """The Airflow section of `--scale --short`: one run of 20 shards (19 already
    registered) through a scheduler and a Celery worker of its own; every shard ends
    registered and every figure is printed."""
    report = run_short_scale(tmp_path, "airflow")
    assert report["airflow"]["setup"]["run_state"] == "success", report["airflow"]["setup"]
    assert report["airflow"]["setup"]["task_states"] == {"success": 20}
    assert report["airflow"]["figures"]["shards registered after the run"]["median"] == 20
