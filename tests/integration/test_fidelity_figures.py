"""A shard's fidelity rates, published against the test LLM server on SQLite and
PostgreSQL: the registry, the dashboard API and the dataset card hold the rates the
committed rows give when counted here from the parquet files, and registering the
committed files again gives the same."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.card import card_uri
from maga_tasks.engine.publish import publish_shard, register_committed_shard
from maga_tasks.method.fidelity import genre_kept
from maga_tasks.recipe import builtin_recipe_path, default_recipe_path, load_recipe
from maga_tasks.registry import Registry
from maga_tasks.registry.dashboard import corpus_overview
from maga_tasks.settings import RunSettings
from tests.support.cards import figures, split_card

# The smollm2 recipe's detectors, in their order (the default recipe runs none of the
# fidelity checks).
DETECTORS = [str(name) for name in load_recipe(builtin_recipe_path("smollm2-135m")).cleaning.detectors]
RATES = ("invented_fact_rate", "label_echo_rate", "genre_kept_rate")

pytestmark = pytest.mark.integration


def recipe_with(tmp_path: Path, detectors: list[str]):
    """The default recipe running these detectors; its gate asks one accepted row a
    document (the fidelity checks reject some of the test server's rewrites)."""
    data = yaml.safe_load(default_recipe_path().read_text(encoding="utf-8"))
    data.setdefault("cleaning", {})["detectors"] = detectors
    data.setdefault("quality", {})["min_accepted_per_document"] = 1.0
    path = tmp_path / f"recipe-{len(detectors)}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_recipe(path)


def rates_of_rows(data: list[dict], rejected: list[dict], detectors: list[str]) -> dict:
    """The three rates by their definitions (docs/real-model.md), counted on the rows."""
    counted = [r for r in data + rejected if r["invented_fact_count"] is not None]
    # The label-echo check runs among the detectors, in the recipe's order; a row rejected
    # by it or by a detector after it, or accepted, was judged by it.
    after = set(detectors[detectors.index("pair_label_echo"):]) if "pair_label_echo" in detectors else None
    judged = [r for r in counted if after is not None and r.get("reject_reason", None) in after | {None}]
    cues = [kept for r in data if (kept := genre_kept(r["text"], r["genre"])) is not None]

    def share(part: int, whole: int):
        return round(part / whole, 4) if whole else None

    return {
        "invented_fact_rate": share(sum(r["invented_fact_count"] > 0 for r in counted), len(counted)),
        "label_echo_rate": share(sum(r.get("reject_reason") == "pair_label_echo" for r in judged), len(judged)),
        "genre_kept_rate": share(sum(cues), len(cues)),
    }


def publish(tmp_path: Path, recipe, registry, llm_server) -> tuple[dict, dict]:
    """Publish one 12-document shard; its summary and the rates of its committed rows."""
    source = str(write_sample_corpus(tmp_path / "source", 1, 12)[0])
    out = str(tmp_path / "out")
    settings = RunSettings(endpoints=(llm_server.url,), max_concurrency=16, backoff_base_s=0.05)
    summary = publish_shard(source, out, recipe, settings, registry, owner="w1")
    paths = shard_paths(out, recipe.recipe_id, summary["shard"])
    data, rejected = pq.read_table(paths.data).to_pylist(), pq.read_table(paths.rejected).to_pylist()
    return summary, rates_of_rows(data, rejected, [str(name) for name in recipe.cleaning.detectors])


def test_published_rates_are_those_of_the_committed_rows_everywhere(tmp_path, registry, llm_server):
    # The test server's rewrites name their audience in six words (every one is a label
    # echo): here the recipe runs every fidelity check but that one, so the shard registers.
    recipe = recipe_with(tmp_path, [name for name in DETECTORS if name != "pair_label_echo"])
    rid, out = recipe.recipe_id, str(tmp_path / "out")
    summary, expected = publish(tmp_path, recipe, registry, llm_server)
    assert summary["status"] == "registered", summary
    # Every rewrite counted; step-by-step and question-and-answer genres among the
    # accepted; the label-echo check not run, so not measured.
    assert expected["invented_fact_rate"] is not None and expected["genre_kept_rate"] is not None, expected
    assert expected["label_echo_rate"] is None

    row = registry.shard(rid, summary["shard"])
    assert {name: row[name] for name in RATES} == expected
    totals = registry.totals(rid)
    assert {name: totals[name] for name in RATES} == expected  # one shard: the recipe's rates

    page = corpus_overview(registry, recipe_id=rid)
    version = page["recipes"][0]
    assert {name: version["shards"][0][name] for name in RATES} == expected
    assert {name: version["totals"][name] for name in RATES} == expected
    assert {name: page["totals"][name] for name in RATES} == expected

    _, body = split_card(Path(card_uri(out, rid)).read_text(encoding="utf-8"))
    shown = figures(body)
    assert shown["rewrites with an invented fact (invented-fact rate)"] == (
        f"{100 * expected['invented_fact_rate']:.1f}%"
    )
    assert shown["rewrites echoing their pair's label (label-echo rate)"] == "not measured"
    assert shown["accepted rows keeping their genre's form (genre-kept rate)"] == (
        f"{100 * expected['genre_kept_rate']:.1f}%"
    )

    # The committed files registered again, in another registry: the figures read from
    # the files are the ones tallied at commit.
    other = Registry(str(tmp_path / "other.db"))
    other.upgrade()
    try:
        source = str(tmp_path / "source" / f"{summary['shard']}.parquet")
        assert register_committed_shard(source, out, recipe, other)["status"] == "registered"
        stored = other.shard(rid, summary["shard"])
        assert {name: stored[name] for name in RATES} == expected
        assert {k: stored[k] for k in row if k.endswith("_rows")} == {k: row[k] for k in row if k.endswith("_rows")}
    finally:
        other.close()


def test_a_shard_of_label_echoes_is_quarantined_with_its_rates_shown(tmp_path, registry, llm_server):
    recipe = recipe_with(tmp_path, DETECTORS)
    summary, expected = publish(tmp_path, recipe, registry, llm_server)
    assert summary["status"] == "quarantined" and summary["accepted"] == 0, summary
    assert expected["label_echo_rate"] == 1.0 and expected["genre_kept_rate"] is None
    row = corpus_overview(registry, recipe_id=recipe.recipe_id)["recipes"][0]["shards"][0]
    assert {name: row[name] for name in RATES} == expected
    # Not published: the recipe's totals and its card count registered shards only.
    totals = registry.totals(recipe.recipe_id)
    assert all(totals[name] is None for name in RATES)
