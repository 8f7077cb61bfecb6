"""The short benchmark runs end to end so it never rots; it prints figures, asserts no timings."""

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
    # The replay is the recorded stream: the same prompt tokens, not an approximation.
    assert engine["replayed / recorded prompt tokens"]["median"] == pytest.approx(1.0, abs=0.01)
    assert client["peak RSS ratio, 10x documents"]["median"] > 0
    assert "| pipeline / engine throughput ratio (x) |" in (tmp_path / "bench.md").read_text()


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
