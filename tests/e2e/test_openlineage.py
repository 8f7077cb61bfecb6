"""OpenLineage events of the shard tasks, from a real `airflow dags test` run of the DAG
against the test LLM server (2 shards x 4 documents) with the provider installed:

- through the provider's file transport: a START and a COMPLETE per `publish_shard` map
  index, the source shard as input, the shard's data, rejected and MAGACorpus files as
  outputs (namespace `file`, absolute paths), our facets equal to the registry's
  figures, the provider's `parent` facet naming the DAG run, and every event valid
  (`tests/support/lineage.py` says against what);
- a lineage backend that answers 500 to everything: the run succeeds all the same and
  every shard is registered, though the backend got the events.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from maga_tasks.lineage_facets import PRODUCER
from tests.support.airflow import DAG_ID, dag_runs, task_instances
from tests.support.hostile_servers import RecordingServer
from tests.support.lineage import read_events, validate_event

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.timeout(600)]

SHARDS, DOCS = 2, 4
PUBLISH_JOB = f"{DAG_ID}.publish_shard"
# Logical dates of their own (after the DAG's start_date): dags_test_env runs other cases' dates too.
FIRST_DATE, SECOND_DATE = "2024-07-01", "2024-07-02"


def write_recipe(folder: Path, name: str):
    from maga_tasks.recipe import load_recipe, recipe_from_dict

    recipe = recipe_from_dict({**load_recipe().model_dump(mode="json"), "name": name})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    return recipe


def run_dag(af, tmp_path: Path, llm_url: str, registry_url: str, transport: dict, ds: str):
    """One `airflow dags test` of a fresh 2 x 4 corpus with lineage sent to `transport`;
    (recipe, source folder, output root, the CLI's output)."""
    from maga_tasks.data.sample_corpus import write_sample_corpus

    source, output_root = tmp_path / "corpus", tmp_path / "expanded"
    write_sample_corpus(source, shards=SHARDS, docs_per_shard=DOCS)
    recipe = write_recipe(tmp_path / "recipes", "lineage")
    conf = {
        "source": str(source), "output_root": str(output_root), "recipe": "lineage", "endpoints": [llm_url],
        "planning_mode": "flat", "shards_per_run": 10, "max_concurrency": 8,
    }
    env = {
        "AIRFLOW_CONN_MAGA_REGISTRY": registry_url,
        "MAGA_RECIPES_DIR": str(tmp_path / "recipes"),
        "MAGA_ENDPOINTS": llm_url,
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(transport),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "maga-test",
    }
    done = af.cli("dags", "test", DAG_ID, ds, "-c", json.dumps(conf), extra_env=env, timeout=500, check=False)
    return recipe, source, output_root, done.stdout + done.stderr


def registered(registry_url: str, recipe_id: str) -> dict[str, dict]:
    from maga_tasks.registry import Registry

    return {row["shard"]: row for row in Registry(registry_url).shards(recipe_id) if row["status"] == "registered"}


def test_shard_tasks_emit_their_datasets_and_figures(dags_test_env, af_llm_server_factory, postgres_registry_url,
                                                      tmp_path):
    events_file = tmp_path / "lineage" / "events.jsonl"
    events_file.parent.mkdir()
    llm = af_llm_server_factory()
    recipe, source, output_root, output = run_dag(
        dags_test_env, tmp_path, llm.url, postgres_registry_url,
        {"type": "file", "log_file_path": str(events_file), "append": True}, FIRST_DATE,
    )
    assert "state=success" in output, output[-5000:]
    rows = registered(postgres_registry_url, recipe.recipe_id)
    assert sorted(rows) == ["part-0000", "part-0001"] and all(r["documents"] == DOCS for r in rows.values())

    events = read_events(events_file)
    # Every event is valid; our facets were checked against our schema, the provider's against its.
    kinds = {kind for event in events for kind in validate_event(event)}
    assert {"ours", "provider", "client"} <= kinds, kinds

    publish = [e for e in events if e["job"]["name"] == PUBLISH_JOB]
    by_run: dict[str, dict[str, dict]] = {}
    for event in publish:
        by_run.setdefault(event["run"]["runId"], {})[event["eventType"]] = event
    assert len(by_run) == SHARDS, {run: sorted(types) for run, types in by_run.items()}
    (run_id, *_), = [r for r in dag_runs(dags_test_env) if str(r[1]).startswith(FIRST_DATE)]
    shard_of_index = {ti[1]: ti[2] for ti in task_instances(dags_test_env, run_id) if ti[0] == "publish_shard"}
    seen_indexes = set()
    for pair in by_run.values():
        assert set(pair) == {"START", "COMPLETE"}, sorted(pair)
        start, complete = pair["START"], pair["COMPLETE"]
        map_index = complete["run"]["facets"]["airflow"]["taskInstance"]["map_index"]
        seen_indexes.add(map_index)
        shard = shard_of_index[map_index]
        row = rows[shard]
        source_file, = [str(p) for p in source.iterdir() if p.name.startswith(shard + ".")]

        # Inputs: the source shard, on START and COMPLETE alike.
        for event in (start, complete):
            assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [("file", source_file)]
        # Outputs: the shard's three files, once written.
        assert start.get("outputs", []) == []
        version = output_root / recipe.recipe_id
        expected = [str(version / kind / f"{shard}.parquet") for kind in ("data", "rejected", "magacorpus")]
        assert [(d["namespace"], d["name"]) for d in complete["outputs"]] == [("file", name) for name in expected]
        assert all(Path(name).is_file() for name in expected)
        statistics = {d["name"]: d["outputFacets"].get("outputStatistics", {}).get("rowCount")
                      for d in complete["outputs"]}
        assert statistics == {expected[0]: row["accepted"], expected[1]: row["rejected"], expected[2]: None}

        # Our facets: the registry's figures and the recipe.
        facets = complete["run"]["facets"]
        assert facets["magaShard"]["_producer"] == facets["magaRecipe"]["_producer"] == PRODUCER
        assert {k: facets["magaRecipe"].get(k) for k in ("recipeId", "model", "modelRevision", "promptVersion")} == {
            "recipeId": recipe.recipe_id, "model": recipe.model, "modelRevision": recipe.model_revision,
            "promptVersion": recipe.prompt_version,
        }
        shard_facet = facets["magaShard"]
        assert shard_facet["shard"] == shard and shard_facet["status"] == row["status"] == "registered"
        assert (shard_facet["documents"], shard_facet["accepted"], shard_facet["rejected"]) == (
            row["documents"], row["accepted"], row["rejected"])
        assert shard_facet["rejectedByReason"] == row["rejects_by_reason"]
        assert (shard_facet["promptTokens"], shard_facet["completionTokens"]) == (
            row["prompt_tokens"], row["completion_tokens"])
        assert shard_facet["expansionRatio"] == row["expansion_ratio"]
        assert shard_facet["yieldShare"] == round(row["accepted"] / (row["accepted"] + row["rejected"]), 4)
        assert shard_facet["qualityGatePassed"] is True and shard_facet["failedExpectations"] == []
        assert shard_facet["checksum"] == row["checksum"]
        assert "magaShard" not in start["run"]["facets"]

        # The run facets the provider adds link the task's run to the Airflow DAG run.
        for event in (start, complete):
            parent = event["run"]["facets"]["parent"]
            assert (parent["job"]["namespace"], parent["job"]["name"]) == ("maga-test", DAG_ID)
            uuid.UUID(parent["run"]["runId"])
            assert event["run"]["facets"]["airflow"]["dagRun"]["run_id"] == run_id
    assert seen_indexes == set(shard_of_index) == {0, 1}
    # The DAG run's own events carry the run id the shard tasks name as their parent.
    dag_run_ids = {e["run"]["runId"] for e in events if e["job"]["name"] == DAG_ID}
    parents = {e["run"]["facets"]["parent"]["run"]["runId"] for e in publish}
    assert len(parents) == 1 and parents <= dag_run_ids, (parents, dag_run_ids)


def test_a_lineage_backend_that_fails_fails_no_task(dags_test_env, af_llm_server_factory, postgres_registry_url,
                                                    tmp_path):
    """An HTTP backend on loopback answering 500 to every event (retried once, to keep the
    test short): the run succeeds and registers every shard; the backend did get events."""
    llm = af_llm_server_factory()
    with RecordingServer(status=500) as backend:
        transport = {"type": "http", "url": backend.url, "timeout": 5, "retry": {"total": 1, "backoff_factor": 0}}
        recipe, _, _, output = run_dag(dags_test_env, tmp_path, llm.url, postgres_registry_url, transport, SECOND_DATE)
        requests = list(backend.requests)
    assert "state=success" in output, output[-5000:]
    assert sorted(registered(postgres_registry_url, recipe.recipe_id)) == ["part-0000", "part-0001"]
    assert sum(r["path"] == "/api/v1/lineage" for r in requests) >= 2 * SHARDS, requests
