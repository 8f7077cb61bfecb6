"""The short benchmarks on the test LLM server, PostgreSQL and moto S3 run end to end so
they never rot; they print figures, assert no timings (those on the vLLM engine and
Airflow: tests/e2e/test_bench.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.bench import run_short_scale


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
