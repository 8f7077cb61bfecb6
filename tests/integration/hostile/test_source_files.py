"""Hostile source files and file names (issue 19's source edge), each a real file on
disk (or in the moto S3 server), read by the real pipeline against the test LLM server.

The threat model: source data and file names are untrusted. A bad line or document is
one rejected row with its reason, the other rows are expanded; a file that is no source
shard is one clear line; a bad name or a link out of the source folder is reported and
skipped while planning goes on; a checkpoint never outlives the source version it was
made from.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maga_tasks.data.checkpoint import Checkpoint
from maga_tasks.data.layout import shard_paths
from maga_tasks.data.source import LINE_SLACK_BYTES, MAX_JSON_DEPTH, shown
from maga_tasks.data.storage import storage_for
from maga_tasks.engine.planning import source_shards
from maga_tasks.engine.publish import publish_shard
from maga_tasks.engine.shard import expand_shard
from maga_tasks.errors import EndpointsUnavailable
from maga_tasks.recipe import load_recipe
from maga_tasks.settings import RunSettings
from tests.support.paths import REPO

pytestmark = pytest.mark.integration

RECIPE = load_recipe()
PAIRS = RECIPE.pairs_per_document
MAX_CHARS = RECIPE.quality.max_source_chars


def settings(url: str, **extra) -> RunSettings:
    values = dict(endpoints=(url,), max_concurrency=16, backoff_base_s=0.05, backoff_max_s=0.2, all_down_timeout_s=1)
    return RunSettings(**(values | extra))


def good_rows(sample_articles, count: int = 3) -> list[dict]:
    return [{"id": f"good-{i}", "text": sample_articles[i]["text"]} for i in range(count)]


# -- one hostile row among good ones: one rejected row with its reason --------------------


def _deep_line(depth: int) -> bytes:
    return b'{"id": "deep", "text": "some text", "extra": ' + b"[" * depth + b"]" * depth + b"}\n"


# name -> (file format, the hostile line's bytes, its source id in the output, reason, RunSettings extras)
HOSTILE_ROWS = {
    "json-nested-50000-deep": ("jsonl", _deep_line(50_000), "#row1", "invalid_json_line", {}),
    "json-nested-past-the-depth-bound": ("jsonl", _deep_line(MAX_JSON_DEPTH + 5), "#row1", "invalid_json_line", {}),
    "line-over-max-line-bytes": (
        "jsonl", json.dumps({"id": "long", "text": "word " * 60_000}).encode() + b"\n", "#row1", "line_too_long",
        {"max_line_bytes": 100_000},
    ),
    "gzip-line-over-max-line-bytes": (
        "jsonl.gz", json.dumps({"id": "long", "text": "word " * 60_000}).encode() + b"\n", "#row1", "line_too_long",
        {"max_line_bytes": 100_000},
    ),
    "line-not-utf8": ("jsonl", b'{"id": "latin1", "text": "caf\xe9 au lait"}\n', "#row1", "invalid_utf8", {}),
    "line-utf16": ("jsonl", json.dumps({"id": "u16", "text": "hello"}).encode("utf-16"), "#row1", "invalid_utf8", {}),
    "line-not-an-object": ("jsonl", b'["id", "text"]\n', "#row1", "invalid_json_line", {}),
    "text-over-max-source-chars": (
        "jsonl", json.dumps({"id": "too-long", "text": "w" * (MAX_CHARS + 1)}).encode() + b"\n", "too-long",
        "text_too_long", {},
    ),
    "id-of-a-megabyte": ("jsonl", json.dumps({"id": "i" * 1_000_000, "text": "t"}).encode() + b"\n", "#row1",
                         "id_too_long", {}),
    "text-a-number": ("jsonl", b'{"id": "num", "text": 12345}\n', "num", "text_not_a_string", {}),
    "parquet-text-not-utf8": ("parquet", b"caf\xe9 \xff", "hostile", "invalid_utf8", {}),
    "parquet-text-over-max-source-chars": ("parquet", b"w" * (MAX_CHARS + 1), "hostile", "text_too_long", {}),
}


def write_with_hostile_row(path: Path, fmt: str, hostile: bytes, good: list[dict]) -> None:
    """`good[0]`, the hostile row, then the other good rows."""
    if fmt == "parquet":  # the hostile bytes are the text of row "hostile"
        ids = [good[0]["id"], "hostile", *(r["id"] for r in good[1:])]
        texts = [good[0]["text"].encode(), hostile, *(r["text"].encode() for r in good[1:])]
        pq.write_table(pa.table({"id": ids, "text": pa.array(texts, pa.binary())}), path)
        return
    lines = [json.dumps(good[0]).encode() + b"\n", hostile, *(json.dumps(r).encode() + b"\n" for r in good[1:])]
    body = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(body) if fmt == "jsonl.gz" else body)


@pytest.mark.parametrize("case", HOSTILE_ROWS)
def test_a_hostile_row_is_one_rejected_row_with_its_reason(case, tmp_path, llm_server, sample_articles):
    fmt, hostile, source_id, reason, extra = HOSTILE_ROWS[case]
    shard = tmp_path / f"hostile.{fmt}"
    good = good_rows(sample_articles)
    write_with_hostile_row(shard, fmt, hostile, good)

    result = expand_shard(str(shard), str(tmp_path / "out"), RECIPE, settings(llm_server.url, **extra))

    rejected = [r for r in pq.read_table(result.rejected_uri).to_pylist() if r["source_id"] == source_id]
    assert [r["reject_reason"] for r in rejected] == [reason] * PAIRS, rejected[:1]
    assert rejected[0]["reject_detail"] and rejected[0]["source_chars"] == 0
    assert result.documents == 4 and result.accepted == len(good) * PAIRS, result.rejects_by_reason
    accepted_ids = set(pq.read_table(result.data_uri)["source_id"].to_pylist())
    assert accepted_ids == {r["id"] for r in good}


# -- files that are no source shard: one clear line, nothing committed ---------------------


def _list_text_parquet(path: Path, rows: int) -> None:
    table = pa.table({"id": pa.array([f"d{i}" for i in range(rows)], pa.string()),
                      "text": pa.array([["a", "b"]] * rows, pa.list_(pa.string()))})
    pq.write_table(table, path)


NOT_A_SHARD = {
    "parquet-0-rows-list-of-strings-text": lambda path: _list_text_parquet(path, 0),
    "parquet-list-of-strings-text": lambda path: _list_text_parquet(path, 3),
    "gzip-cut-in-the-middle": lambda path: path.write_bytes(gzip.compress(b'{"id": "a", "text": "t"}\n' * 5000)[:200]),
}


@pytest.mark.parametrize("case", NOT_A_SHARD)
def test_a_file_that_is_no_shard_is_one_line_and_commits_nothing(case, tmp_path, llm_server):
    shard = tmp_path / ("bad.parquet" if case.startswith("parquet") else "bad.jsonl.gz")
    NOT_A_SHARD[case](shard)
    done = subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "expand-shard", str(shard), "--output-root", str(tmp_path / "out"),
         "--endpoint", llm_server.url],
        capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("maga: error:")]
    assert len(errors) == 1 and shard.name in errors[0]
    assert not list((tmp_path / "out").rglob("data/*.parquet"))
    assert llm_server.stats()["requests_total"] == 0


# -- one oversize document is a rejected row, never the shard's quarantine ------------------


def test_a_50_mb_document_is_a_rejected_row_not_a_quarantined_shard(tmp_path, registry, llm_server, sample_articles):
    good = good_rows(sample_articles, 150)
    huge = "lorem " * 8_500_000  # 51 MB
    rows = good[:70] + [{"id": "huge", "text": huge}] + good[70:]
    shard = tmp_path / "part-0000.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), shard)
    del huge, rows

    summary = publish_shard(str(shard), str(tmp_path / "out"), RECIPE, settings(llm_server.url), registry, owner="t")

    assert summary["status"] == "registered", summary.get("reason")
    assert summary["accepted"] == 150 * PAIRS
    rejected = pq.read_table(summary["rejected_uri"]).to_pylist()
    assert {(r["source_id"], r["reject_reason"]) for r in rejected} == {("huge", "text_too_long")}
    assert "51,000,000 characters" in rejected[0]["reject_detail"]


# -- file names and links: reported, skipped, planning goes on ----------------------------


def _symlink_out(folder: Path) -> list[str]:
    outside = folder.parent / "outside"
    outside.mkdir()
    (outside / "secret.parquet").write_bytes(b"PAR1 not a corpus file")
    (folder / "escape.parquet").symlink_to(outside / "secret.parquet")
    return ["escape.parquet"]


def _named(*names: str):
    def make(folder: Path) -> list[str]:
        for name in names:
            (folder / name).write_text(json.dumps({"id": "a", "text": "t"}) + "\n")
        return list(names)
    return make


# name -> writes the hostile files into the source folder, returns their names
HOSTILE_NAMES = {
    "percent-only": _named("%.parquet"),
    "terminal-escape": _named("\x1b[31mred\x1b[0m.jsonl"),
    "newline-and-bell": _named("two\nlines\a.jsonl"),
    "two-names-one-shard": _named("a b.jsonl", "a_b.jsonl"),
    "same-stem-two-formats": _named("part-0007.jsonl", "part-0007.parquet"),
    "symlink-out-of-the-folder": _symlink_out,
}


@pytest.mark.parametrize("case", HOSTILE_NAMES)
def test_a_hostile_file_name_is_reported_and_skipped(case, tmp_path, caplog):
    folder = tmp_path / "source"
    folder.mkdir()
    for good in ("part-0000", "part-0001"):
        (folder / f"{good}.jsonl").write_text(json.dumps({"id": "a", "text": "t"}) + "\n")
    inside = folder / "inside-link.jsonl"  # a link that stays inside the folder is a shard like any other
    inside.symlink_to(folder / "part-0000.jsonl")
    hostile = HOSTILE_NAMES[case](folder)

    with caplog.at_level(logging.WARNING):
        planned = source_shards(str(folder))

    assert [shard for _, shard in planned] == ["inside-link", "part-0000", "part-0001"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(hostile), warnings
    for line in warnings:  # one line each, nothing a terminal would act on
        assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in line), line
    for name in hostile:
        assert sum(shown(name) in line for line in warnings) == 1, (shown(name), warnings)


# -- a checkpoint belongs to one source version -------------------------------------------


def _new_version(text: str) -> str:
    """Other content of exactly the same bytes: the words in reverse order."""
    return " ".join(reversed(text.split(" ")))


@pytest.mark.parametrize(
    ("where", "mtime"), [("local", "new-mtime"), ("local", "mtime-restored"), ("s3", "mtime-restored")]
)
def test_a_replaced_source_starts_the_shard_afresh(where, mtime, tmp_path, request, registry, llm_server_factory,
                                                   sample_articles, caplog):
    old = {f"doc-{i:02d}": sample_articles[i]["text"] for i in range(40)}
    new = {doc_id: _new_version(text) for doc_id, text in old.items()}
    local = tmp_path / "part-0000.jsonl"

    def write(texts: dict) -> None:
        local.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))

    write(old)
    stat = local.stat()
    source, out, fetch = str(local), str(tmp_path / "out"), Path
    if where == "s3":
        import boto3

        s3 = boto3.client("s3", endpoint_url=request.getfixturevalue("s3_env"))
        bucket = f"corpus-{uuid.uuid4().hex[:8]}"  # the moto server lives for the session
        s3.create_bucket(Bucket=bucket)
        s3.upload_file(str(local), bucket, "src/part-0000.jsonl")
        source, out = f"s3://{bucket}/src/part-0000.jsonl", f"s3://{bucket}/out"

        def fetch(uri: str) -> Path:
            target = tmp_path / uri.rsplit("/", 1)[-1]
            s3.download_file(bucket, uri.removeprefix(f"s3://{bucket}/"), str(target))
            return target

    # Interrupted: the server dies after 150 requests, a checkpoint of the old version stays.
    dying = llm_server_factory("die_after:150")
    with pytest.raises(EndpointsUnavailable):
        publish_shard(source, out, RECIPE, settings(dying.url, max_concurrency=4, s3_checkpoint_every=2), registry,
                      owner="t")
    paths = shard_paths(out, RECIPE.recipe_id, "part-0000")
    with Checkpoint(storage_for(out), paths.work, {}).local_segments() as segments:
        assert 0 < len(Checkpoint.index(segments)) < len(old)

    # Replaced: same path, same size, new content (and, for one case, the old mtime back).
    write(new)
    assert local.stat().st_size == stat.st_size
    if mtime == "mtime-restored":
        os.utime(local, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert local.stat().st_mtime_ns == stat.st_mtime_ns
    if where == "s3":
        s3.upload_file(str(local), bucket, "src/part-0000.jsonl")

    healthy = llm_server_factory()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maga_tasks.data.checkpoint"):
        summary = publish_shard(source, out, RECIPE, settings(healthy.url), registry, owner="t")

    discarded = [r.getMessage() for r in caplog.records if "discarded" in r.getMessage()]
    assert len(discarded) == 1 and "source_identity" in discarded[0], discarded
    assert summary["status"] == "registered" and summary["resumed_documents"] == 0
    # Every document was asked for again, from the new text: no row comes from the old one.
    assert sum(1 for count in healthy.stats()["by_doc"].values() if count) == len(new)
    new_identity = "sha256:" + hashlib.sha256(local.read_bytes()).hexdigest()
    assert summary["source_identity"] == new_identity
    assert registry.shard(RECIPE.recipe_id, "part-0000")["source_identity"] == new_identity
    export = pq.read_table(fetch(paths.export)).to_pylist()
    assert len(export) == summary["accepted"] > 0
    assert all(row["meta"]["raw_text"] == new[row["meta"]["docid"]] for row in export)
    data = pq.read_table(fetch(paths.data))
    assert data.schema.metadata[b"maga.source_identity"] == new_identity.encode()


def test_a_shard_registered_after_a_crash_between_commit_and_register_keeps_its_source_identity(
    tmp_path, registry, llm_server_factory, sample_articles
):
    """`maga register-shard` heals a shard whose try died after its commit: the identity
    comes from the committed files, not from the lost try's result."""
    from maga_tasks.engine.publish import register_committed_shard

    source = tmp_path / "part-0000.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in good_rows(sample_articles)))
    out = str(tmp_path / "out")
    committed = expand_shard(str(source), out, RECIPE, settings(llm_server_factory().url))
    summary = register_committed_shard(str(source), out, RECIPE, registry)
    identity = "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    assert committed.source_identity == summary["source_identity"] == identity
    assert registry.shard(RECIPE.recipe_id, "part-0000")["source_identity"] == identity


# -- memory: a decompression bomb is read in bounded pieces --------------------------------

_PEAK_RSS = """
import resource, sys
from pathlib import Path
from maga_tasks.data.source import SourceColumns, measure_source, open_shard
path = Path(sys.argv[1])
with open_shard(path, str(path)) as reader:
    reader.identity()
    total = reader.count()
    documents = sum(1 for _ in reader)
measure_source(path, "jsonl.gz", SourceColumns(), "text_chars")
status = Path("/proc/self/status").read_text()
peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
print(total, documents, peak_kb)
"""


def _peak_rss_kb(path: Path) -> tuple[int, int, int]:
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path)], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(REPO)}, check=True)
    total, documents, peak = map(int, done.stdout.split())
    return total, documents, peak


def test_a_decompression_bomb_reads_in_bounded_memory(tmp_path, sample_articles):
    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=6) as handle:
        handle.write(json.dumps({"id": "before", "text": "fine"}).encode() + b"\n")
        handle.write(b'{"id": "bomb", "text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(512):  # one line of 512 MiB
            handle.write(chunk)
        handle.write(b'"}\n' + json.dumps({"id": "after", "text": "fine"}).encode() + b"\n")
    honest = tmp_path / "honest.jsonl.gz"
    with gzip.open(honest, "wb", compresslevel=6) as handle:
        i = 0
        while honest.stat().st_size < bomb.stat().st_size:
            for _ in range(200):
                text = sample_articles[i % len(sample_articles)]["text"]
                handle.write(json.dumps({"id": f"d{i}", "text": text}).encode() + b"\n")
                i += 1
            handle.flush()

    bomb_rows, bomb_docs, bomb_kb = _peak_rss_kb(bomb)
    honest_rows, honest_docs, honest_kb = _peak_rss_kb(honest)

    ratio = bomb_kb / honest_kb
    print(f"\npeak RSS reading a {bomb.stat().st_size / 1e6:.1f} MB jsonl.gz with one 512 MiB line:"
          f" {bomb_kb / 1024:.0f} MiB;"
          f" an honest {honest.stat().st_size / 1e6:.1f} MB jsonl.gz of {honest_rows} documents:"
          f" {honest_kb / 1024:.0f} MiB;"
          f" ratio {ratio:.2f} (line bound {(4 * MAX_CHARS + LINE_SLACK_BYTES) / 2**20:.1f} MiB)")
    assert (bomb_rows, bomb_docs) == (3, 3)
    assert honest_docs == honest_rows > 1000
    assert ratio <= 1.5
