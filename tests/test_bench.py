"""The short benchmark runs end to end so it never rots; it prints figures, asserts no timings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm


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
