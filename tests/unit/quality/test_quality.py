"""The great_expectations gates: a good shard passes, each injected defect fails with
its check named in the report and in the Data Docs HTML; input gate on parquet and
jsonl; GX never imported by merely importing the pipeline (Data Docs on S3:
tests/integration/test_quality.py)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.source import SourceColumns
from maga_tasks.errors import ShardInputError
from maga_tasks.quality import (
    QualityError,
    label_summary,
    load_committed,
    short_label,
    validate_input,
    validate_output,
)
from maga_tasks.recipe import load_recipe
from tests.support.shards import write_committed_shard, write_source_shard

RECIPE = load_recipe()
RID = RECIPE.recipe_id


def docs_html(report) -> str:
    """Every HTML page of a report's Data Docs site, concatenated."""
    site = Path(report.docs_uri).parent
    return "\n".join(page.read_text(encoding="utf-8") for page in sorted(site.rglob("*.html")))


def test_a_good_shard_passes_with_figures_and_labels(tmp_path):
    write_committed_shard(tmp_path, RECIPE, "part-0000", documents=6)
    committed = load_committed(shard_paths(str(tmp_path), RID, "part-0000"))
    report = validate_output(committed, RECIPE)

    assert report.success, report.failed_names
    assert report.failed == [] and report.gate == "output"
    stats = report.statistics
    assert stats["evaluated_expectations"] == stats["successful_expectations"] >= 20
    assert stats["suites"] == ["output.rows", "output.documents", "output.shard"]
    figures = stats["figures"]
    assert figures["documents"] == 6 and figures["accepted"] == 24 and figures["rejected"] == 6
    assert figures["accepted_per_document"] == 4.0
    assert RECIPE.quality.min_expansion_ratio < figures["expansion_ratio"] < RECIPE.quality.max_expansion_ratio
    assert len(stats["checksum"]) == 64
    assert report.labels["genres"][0] == ["step-by-step tutorial that teaches the topic in plain language", 6]
    assert report.labels["distinct_audiences"] == 5
    # A passing shard outside the Data Docs sample: the compact JSON result only.
    assert report.data_docs_uri is None
    assert report.docs_uri == report.result_uri == f"{tmp_path}/{RID}/quality/part-0000/output.json"
    assert not (tmp_path / RID / "quality" / "part-0000" / "output").exists()
    result = json.loads(Path(report.result_uri).read_text())
    assert result["success"] and result["data_docs_uri"] is None and result["shard"] == "part-0000"
    assert result["statistics"]["checksum"] == stats["checksum"]
    entries = {(e["check"], e["column"]): e for e in result["expectations"]}
    assert len(entries) == stats["evaluated_expectations"] and all(e["success"] for e in entries.values())
    assert entries[("unique_ids", "id")]["expectation"] == "expect_column_values_to_be_unique"
    assert entries[("unique_ids", "id")]["unexpected_count"] == 0
    assert entries[("text_length", "text_chars")]["element_count"] == 24
    assert entries[("accepted_per_document", "accepted")]["observed_value"] == 4.0
    assert Path(report.result_uri).stat().st_size < 30_000  # small, and readable
    json.dumps(report.to_dict())  # XCom- and registry-safe


def test_data_docs_for_a_sampled_shard_and_none_once_it_leaves_the_sample(tmp_path):
    write_committed_shard(tmp_path, RECIPE, "part-0000", documents=3)
    paths = shard_paths(str(tmp_path), RID, "part-0000")
    sampled = validate_output(load_committed(paths), RECIPE, data_docs_sample_rate=1.0)
    assert sampled.success
    assert sampled.docs_uri == sampled.data_docs_uri == f"{tmp_path}/{RID}/quality/part-0000/output/index.html"
    assert "output.rows" in docs_html(sampled)
    assert json.loads(Path(sampled.result_uri).read_text())["data_docs_uri"] == sampled.data_docs_uri
    # The same shard validated again outside the sample: the old site goes, the JSON stays.
    again = validate_output(load_committed(paths), RECIPE, data_docs_sample_rate=0.0)
    assert again.docs_uri == again.result_uri and not Path(sampled.data_docs_uri).exists()


def test_the_data_docs_sample_is_chosen_by_the_shard_name():
    from maga_tasks.quality.datadocs import data_docs_sampled

    names = [f"part-{i:05d}" for i in range(20_000)]
    chosen = [name for name in names if data_docs_sampled(name, 0.01)]
    assert 150 < len(chosen) < 250  # about 1%
    assert chosen == [name for name in names if data_docs_sampled(name, 0.01)]  # a retry chooses the same
    assert not any(data_docs_sampled(name, 0.0) for name in names[:100])
    assert all(data_docs_sampled(name, 1.0) for name in names[:100])


def test_the_gate_reads_a_shard_bigger_than_one_batch(tmp_path):
    write_committed_shard(tmp_path, RECIPE, "many", documents=40, defects=("duplicate_ids",))
    paths = shard_paths(str(tmp_path), RID, "many")
    whole, batched = load_committed(paths), load_committed(paths, batch_rows=7)
    assert "text" not in batched.rows and batched.rows["text_chars"].min() > 0
    assert batched.checksum == whole.checksum and batched.figures == whole.figures
    assert batched.labels == whole.labels and batched.labels["rows"] == 160
    assert batched.rows["text_chars"].tolist() == whole.rows["text_chars"].tolist()
    report = validate_output(batched, RECIPE)
    assert [item["check"] for item in report.failed] == ["unique_ids"]


@pytest.mark.parametrize(
    ("defect", "check"),
    [
        ("duplicate_ids", "unique_ids"),
        ("empty_texts", "text_length"),
        ("low_coverage", "keyword_coverage"),
        ("low_yield", "accepted_per_document"),
        ("truncated", "finish_reason_stop"),
    ],
)
def test_each_injected_defect_fails_its_expectation(tmp_path, defect, check):
    write_committed_shard(tmp_path, RECIPE, "bad", defects=(defect,))
    report = validate_output(load_committed(shard_paths(str(tmp_path), RID, "bad")), RECIPE)

    assert not report.success
    failed = {item["check"]: item for item in report.failed}
    assert check in failed, report.failed_names
    assert failed[check]["observed"] and failed[check]["expectation"].startswith("expect_")
    assert check in report.reason()
    assert f"{check}:" in docs_html(report)  # the check name is rendered in Data Docs
    assert report.docs_uri == report.data_docs_uri  # a failed shard always gets its Data Docs
    result = json.loads(Path(report.result_uri).read_text())
    assert not result["success"] and result["data_docs_uri"] == report.data_docs_uri
    assert check in {e["check"] for e in result["expectations"] if not e["success"]}


def test_low_yield_names_the_observed_mean(tmp_path):
    write_committed_shard(tmp_path, RECIPE, "thin", defects=("low_yield",))
    report = validate_output(load_committed(shard_paths(str(tmp_path), RID, "thin")), RECIPE)
    failed = {item["check"]: item for item in report.failed}
    assert failed["accepted_per_document"]["observed"] == "observed 1.0"
    assert failed["accepted_per_document"]["expected"] == {"min_value": RECIPE.quality.min_accepted_per_document}
    assert "expansion_ratio" in failed  # one rewrite per document no longer expands the corpus


def test_documents_must_match_the_expansion_result(tmp_path):
    from maga_tasks.engine.shard import ShardResult

    paths = shard_paths(str(tmp_path), RID, "part-0000")
    write_committed_shard(tmp_path, RECIPE, "part-0000", documents=4)
    claimed = ShardResult("part-0000", "/src/part-0000.parquet", RID, paths.data, paths.rejected, documents=5)
    report = validate_output(load_committed(paths), RECIPE, result=claimed)
    assert [item["check"] for item in report.failed] == ["documents_match_result"]


def test_thresholds_come_from_the_recipe(tmp_path):
    write_committed_shard(tmp_path, RECIPE, "part-0000", accepted_per_document=2)
    paths = shard_paths(str(tmp_path), RID, "part-0000")
    assert not validate_output(load_committed(paths), RECIPE).success
    lenient = type(RECIPE).model_validate(
        RECIPE.model_dump()
        | {"quality": RECIPE.quality.model_dump() | {"min_accepted_per_document": 2.0, "min_expansion_ratio": 1.0}}
    )
    write_committed_shard(tmp_path, lenient, "part-0000", accepted_per_document=2)
    report = validate_output(load_committed(shard_paths(str(tmp_path), lenient.recipe_id, "part-0000")), lenient)
    assert report.success, report.failed_names


def test_uncommitted_shard_cannot_be_validated(tmp_path):
    with pytest.raises(QualityError, match="not committed"):
        load_committed(shard_paths(str(tmp_path), RID, "missing"))


def test_checksum_covers_both_files(tmp_path):
    paths = shard_paths(str(tmp_path), RID, "part-0000")
    write_committed_shard(tmp_path, RECIPE, "part-0000")
    first = load_committed(paths).checksum
    assert load_committed(paths).checksum == first
    write_committed_shard(tmp_path, RECIPE, "part-0000", accepted_per_document=3)  # same rows, other split
    assert load_committed(paths).checksum != first


# -- input gate ------------------------------------------------------------------------------


def good_rows(n: int = 5) -> list[dict]:
    return [
        {"id": f"doc-{i}", "text": f"Document {i} is about river deltas and sediment.", "title": "t"} for i in range(n)
    ]


def test_input_gate_passes_a_clean_shard(tmp_path):
    source = write_source_shard(tmp_path / "src" / "part-0000.parquet", good_rows())
    report = validate_input(source, RECIPE, shard_paths(str(tmp_path / "out"), RID, "part-0000"))
    assert report.success, report.failed_names
    assert report.statistics["documents"] == 5
    assert report.docs_uri.endswith("/quality/part-0000/input.json") and report.data_docs_uri is None


def test_input_gate_names_missing_duplicate_and_empty_values(tmp_path):
    rows = good_rows(4) + [
        {"id": "doc-1", "text": "A second document with a repeated id.", "title": "t"},
        {"id": None, "text": "No id here.", "title": "t"},
        {"id": "doc-9", "text": None, "title": "t"},
        {"id": "doc-10", "text": "", "title": "t"},
    ]
    source = write_source_shard(tmp_path / "src" / "part-0001.parquet", rows)
    report = validate_input(source, RECIPE, shard_paths(str(tmp_path / "out"), RID, "part-0001"))
    checks = {item["check"] for item in report.failed}
    assert checks == {"source_id_not_null", "source_id_unique", "source_text_not_null", "source_text_length"}
    html = docs_html(report)
    for check in checks:
        assert f"{check}:" in html


def test_input_gate_reads_jsonl_gz_with_configured_columns(tmp_path):
    path = tmp_path / "src" / "drop.jsonl.gz"
    path.parent.mkdir(parents=True)
    lines = [json.dumps({"doc_id": i, "body": f"Text number {i} about deltas."}) for i in range(3)]
    lines.append(json.dumps({"doc_id": 1, "body": "dup"}))
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    columns = SourceColumns(id="doc_id", text="body")
    report = validate_input(str(path), RECIPE, shard_paths(str(tmp_path / "out"), RID, "drop"), columns=columns)
    assert [(item["check"], item["column"]) for item in report.failed] == [("source_id_unique", "doc_id_repeated")]


def test_input_gate_reports_missing_columns(tmp_path):
    source = write_source_shard(tmp_path / "src" / "odd.parquet", [{"key": "a", "content": "x"}])
    report = validate_input(source, RECIPE, shard_paths(str(tmp_path / "out"), RID, "odd"))
    assert not report.success
    assert "source_columns" in {item["check"] for item in report.failed}


def test_unreadable_source_raises_shard_input_error(tmp_path):
    broken = tmp_path / "src" / "broken.parquet"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ShardInputError):
        validate_input(str(broken), RECIPE, shard_paths(str(tmp_path / "out"), RID, "broken"))


# -- labels ----------------------------------------------------------------------------------


def test_short_labels_count_genres_by_their_first_clause():
    assert short_label("A step-by-step tutorial, friendly. It goes deep.") == "step-by-step tutorial"
    assert short_label("An analytical report with headings and evidence and more words") == (
        "analytical report with headings and evidence and more words"
    )
    # A catalogue entry is kept whole (it was cut to "radio script read aloud by a").
    assert short_label("a radio script read aloud by a presenter") == "radio script read aloud by a presenter"
    assert short_label("a step-by-step explainer that goes through the main points in order") == (
        "step-by-step explainer that goes through the main points in order"
    )
    assert short_label("") == "(none)" and short_label(None) == "(none)"


def test_a_long_label_is_cut_between_words_and_never_after_a_dangling_word():
    label = short_label("a long story told by a narrator of the old times for the children of the village")
    assert label == "long story told by a narrator of the old times…"
    assert short_label("one two three", words=2) == "one two…"


def test_label_summary_of_rows():
    import pandas as pd

    rows = pd.DataFrame(
        {
            "genre": ["A story. Warm.", "A story. Cold.", "A report."],
            "audience": ["Kids.", "Kids.", None],
            "pair_index": [0, 1, 0],
        }
    )
    summary = label_summary(rows)
    assert summary["genres"] == [["story", 2], ["report", 1]]
    assert summary["audiences"] == [["kids", 2], ["(none)", 1]]
    assert summary["pair_index"] == {"0": 2, "1": 1}


# -- import cost -----------------------------------------------------------------------------


def test_importing_the_pipeline_does_not_import_great_expectations():
    code = (
        "import sys, maga_tasks.quality.gates, maga_tasks.engine.publish, maga_tasks.engine.planning,"
        " maga_tasks.registry;"
        "print('great_expectations' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_input_gate_leaves_a_rare_bad_row_to_the_expansion(tmp_path):
    rows = good_rows(300) + [{"id": "doc-3", "text": "A repeated id.", "title": "t"}]
    source = write_source_shard(tmp_path / "src" / "part-0002.parquet", rows)
    report = validate_input(source, RECIPE, shard_paths(str(tmp_path / "out"), RID, "part-0002"))
    assert report.success, report.failed_names
