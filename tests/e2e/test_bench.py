"""The short benchmarks on the vLLM CPU engine and through Airflow run end to end so they
never rot; they print figures, assert no timings (the others:
tests/integration/test_bench.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.bench import run_short_scale


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
@pytest.mark.airflow
def test_short_scale_benchmark_airflow_run(tmp_path):
    """The Airflow section of `--scale --short`: one run of 20 shards (19 already
    registered) through a scheduler and a Celery worker of its own; every shard ends
    registered and every figure is printed."""
    report = run_short_scale(tmp_path, "airflow")
    assert report["airflow"]["setup"]["run_state"] == "success", report["airflow"]["setup"]
    assert report["airflow"]["setup"]["task_states"] == {"success": 20}
    assert report["airflow"]["figures"]["shards registered after the run"]["median"] == 20
