"""`maga` exits with the code of its error when the registry refuses a shard (the
exception hierarchy and the other exit codes: tests/unit/test_errors.py)."""

from __future__ import annotations

import json

import pytest

from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.errors import EXIT_CONFLICT, EXIT_REFUSED
from maga_tasks.recipe import load_recipe
from tests.support.cli import maga, one_error_line

RECIPE = load_recipe()


def publish_args(source, out, registry_url: str, endpoint: str) -> list[str]:
    return ["publish-shard", str(source), "--output-root", str(out), "--registry", registry_url, "--endpoint", endpoint]


@pytest.mark.integration
def test_a_busy_shard_exits_4_then_publishes_with_0(tmp_path, registry, llm_server):
    source = write_sample_corpus(tmp_path / "src", 1, 4)[0]
    out = tmp_path / "out"
    registry.ensure_recipe(RECIPE)
    held = registry.lease(RECIPE.recipe_id, source.stem, str(source), "other-worker", ttl_s=600)
    assert held is not None

    busy = maga(*publish_args(source, out, registry.url, llm_server.url))
    assert busy.returncode == EXIT_CONFLICT, busy.stderr[-3000:]
    assert "leased by other-worker" in one_error_line(busy)
    assert llm_server.stats()["requests_total"] == 0

    assert registry.release(RECIPE.recipe_id, source.stem, "other-worker", token=held)
    done = maga(*publish_args(source, out, registry.url, llm_server.url))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["status"] == "registered"


@pytest.mark.integration
def test_a_shard_failed_for_good_exits_1(tmp_path, registry, llm_server):
    source = write_sample_corpus(tmp_path / "src", 1, 4)[0]
    registry.ensure_recipe(RECIPE)
    for attempt in range(3):  # the default max_shard_failures
        token = registry.lease(RECIPE.recipe_id, source.stem, str(source), f"worker-{attempt}", ttl_s=600)
        registry.mark_failed(RECIPE.recipe_id, source.stem, "disk full", owner=f"worker-{attempt}", max_failures=3,
                             token=token)
    assert registry.shard(RECIPE.recipe_id, source.stem)["status"] == "failed"

    done = maga(*publish_args(source, tmp_path / "out", registry.url, llm_server.url))
    assert done.returncode == EXIT_REFUSED, done.stderr[-3000:]
    assert "failed for good" in one_error_line(done)
    assert llm_server.stats()["requests_total"] == 0
