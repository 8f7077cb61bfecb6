"""The dataset card of a corpus version, written from a real registry (SQLite and
PostgreSQL) as shards register: its figures are the registry's, its configs load the
registered rows, untrusted reasons and labels stay text, a failed write fails no shard,
and on S3 it is one object put whole."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maga_tasks.data.figures import ShardFigures
from maga_tasks.data.layout import shard_paths
from maga_tasks.data.outcome import ShardResult
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.card import CARD_NAME, card_uri, write_card
from maga_tasks.engine.publish import publish_shard, register_committed_shard
from maga_tasks.recipe import load_recipe
from maga_tasks.settings import RunSettings
from tests.support.cards import CONFIGS, HOSTILE, assert_values_stay_text, config_rows, figures_match, split_card
from tests.support.shards import write_committed_shard

RECIPE = load_recipe()
RID = RECIPE.recipe_id
# Nothing listens here: publishing committed shards needs no LLM request.
DEAD = RunSettings(endpoints=("http://127.0.0.1:9",), all_down_timeout_s=0.5, max_attempts=1, backoff_base_s=0)


def source_of(tmp_path: Path, shard: str) -> str:
    return str(tmp_path / "source" / f"{shard}.parquet")


def read_card(out: str) -> tuple[dict, str]:
    return split_card(Path(card_uri(out, RID)).read_text(encoding="utf-8"))


def test_the_card_follows_the_registry_and_its_configs_load_the_registered_rows(tmp_path, registry):
    out = str(tmp_path / "out")
    assert not Path(card_uri(out, RID)).exists()
    for index, documents in enumerate((6, 9, 4)):
        shard = f"part-{index:04d}"
        write_committed_shard(out, RECIPE, shard, documents=documents)
        summary = publish_shard(source_of(tmp_path, shard), out, RECIPE, DEAD, registry, owner="w1")
        assert summary["status"] == "registered"
        header, body = read_card(out)  # rewritten at each registration
        totals = registry.totals(RID)
        assert totals["registered_shards"] == index + 1
        figures_match(body, totals)

    assert totals["documents"] == 19 and totals["accepted"] == 19 * (RECIPE.pairs_per_document - 1)
    assert totals["rejects_by_reason"] == {"low_keyword_coverage": 19}
    assert "            19  low_keyword_coverage" in body
    loaded = config_rows(header, Path(out) / RID)
    assert loaded == {"default": totals["accepted"], "rejected": totals["rejected"], "magacorpus": 0}

    # A quarantined shard's committed files stay in data/: the card counts only what is
    # registered, and says so.
    write_committed_shard(out, RECIPE, "part-0009", defects=("duplicate_ids",))
    assert publish_shard(source_of(tmp_path, "part-0009"), out, RECIPE, DEAD, registry, owner="w1")["status"] == (
        "quarantined"
    )
    write_card(out, RECIPE, registry)
    header, body = read_card(out)
    figures_match(body, registry.totals(RID))
    assert registry.totals(RID)["accepted"] == totals["accepted"]
    assert "Shards not registered: quarantined 1." in body
    assert config_rows(header, Path(out) / RID)["default"] > totals["accepted"]


def test_hostile_reasons_and_labels_in_the_registry_stay_text_in_the_card(tmp_path, registry):
    out = str(tmp_path / "out")
    # A committed file whose reject reasons are hostile: the figures count them as written.
    _, rejected_uri = write_committed_shard(out, RECIPE, "part-0000")
    rejected = pq.read_table(rejected_uri)
    reasons = pa.array([HOSTILE] * rejected.num_rows, pa.string())
    pq.write_table(rejected.set_column(rejected.schema.get_field_index("reject_reason"), "reject_reason", reasons),
                   rejected_uri)
    assert register_committed_shard(source_of(tmp_path, "part-0000"), out, RECIPE, registry)["status"] == "registered"
    # Labels from another writer of the registry, not cut to a few words as the gate cuts them.
    paths = shard_paths(out, RID, "part-0001")
    result = ShardResult.of(paths, source_of(tmp_path, "part-0001"), ShardFigures(documents=1, accepted=5))
    hostile_labels = {"genres": [[HOSTILE, 5]], "audiences": [[HOSTILE + " audience", 5]]}
    assert registry.register(RID, "part-0001", result, "c" * 64, label_summary=hostile_labels)
    write_card(out, RECIPE, registry)

    text = Path(card_uri(out, RID)).read_text(encoding="utf-8")
    assert [line for line in text.splitlines() if line.strip() in ("---", "...")] == ["---", "---"]
    header, body = split_card(text)
    assert header["configs"] == CONFIGS
    code = assert_values_stay_text(body, RID)
    assert "</script><img src=x onerror=alert(1)>" in code and "sekret1234" not in text and "\x1b" not in text
    totals = registry.totals(RID)
    assert totals["rejects_by_reason"] == {HOSTILE: 6}  # the registry keeps it as written
    figures_match(body, totals)


def test_a_card_that_cannot_be_written_leaves_the_shard_registered(tmp_path, registry, caplog):
    out = str(tmp_path / "out")
    write_committed_shard(out, RECIPE, "part-0000")
    (Path(out) / RID / CARD_NAME).mkdir(parents=True)  # nothing can replace a folder by a file
    with caplog.at_level(logging.WARNING, logger="maga_tasks.engine.card"):
        summary = publish_shard(source_of(tmp_path, "part-0000"), out, RECIPE, DEAD, registry, owner="w1")
    assert summary["status"] == "registered" and summary["newly_registered"]
    assert registry.shard(RID, "part-0000")["status"] == "registered"
    assert any("dataset card of " + RID in record.getMessage() for record in caplog.records)
    assert (Path(out) / RID / CARD_NAME).is_dir()


@pytest.mark.integration
def test_publishing_writes_the_card_whose_configs_load_every_kind_of_file(tmp_path, registry, llm_server):
    source = str(write_sample_corpus(tmp_path / "source", 1, 12)[0])
    out = str(tmp_path / "out")
    settings = RunSettings(endpoints=(llm_server.url,), max_concurrency=16, backoff_base_s=0.05)
    trial = publish_shard(source, out, RECIPE, settings, registry, owner="w1", max_docs=3)
    assert trial["status"] == "trial" and not list(Path(out).rglob(CARD_NAME))  # a trial writes no card

    summary = publish_shard(source, out, RECIPE, settings, registry, owner="w1")
    assert summary["status"] == "registered", summary
    header, body = read_card(out)
    totals = registry.totals(RID)
    assert totals["documents"] == 12 and totals["prompt_tokens"] > 0
    figures_match(body, totals)
    assert config_rows(header, Path(out) / RID) == {
        "default": totals["accepted"], "rejected": totals["rejected"], "magacorpus": totals["accepted"],
    }
    assert_values_stay_text(body, RID)


@pytest.mark.integration
def test_on_s3_the_card_is_one_object_put_whole(tmp_path, registry, s3_env):
    import boto3

    out = str(tmp_path / "out")
    write_committed_shard(out, RECIPE, "part-0000")
    register_committed_shard(source_of(tmp_path, "part-0000"), out, RECIPE, registry)
    s3, bucket = boto3.client("s3", endpoint_url=s3_env), f"card-{secrets.token_hex(4)}"  # moto lives all session
    s3.create_bucket(Bucket=bucket)

    uri = write_card(f"s3://{bucket}/corpus", RECIPE, registry)
    assert uri == f"s3://{bucket}/corpus/{RID}/README.md"
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listed] == [f"corpus/{RID}/README.md"]
    header, body = split_card(s3.get_object(Bucket=bucket, Key=f"corpus/{RID}/README.md")["Body"].read().decode())
    assert header["configs"][0]["config_name"] == "default"
    figures_match(body, registry.totals(RID))
