"""Arrow schemas of the committed output files and the deterministic row id."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from maga_tasks.reject_reasons import RejectReason

# Parquet metadata key of the committed files: the source version they were made from.
SOURCE_IDENTITY_KEY = b"maga.source_identity"


def source_identity_of(path) -> str | None:
    """The source identity a committed parquet file records (None for files written
    before identities were recorded)."""
    identity = (pq.read_schema(path).metadata or {}).get(SOURCE_IDENTITY_KEY)
    return identity.decode() if identity else None

ACCEPTED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source_id", pa.string()),
        ("source_shard", pa.string()),
        ("pair_index", pa.int32()),
        ("genre", pa.string()),
        ("audience", pa.string()),
        ("text", pa.string()),
        ("recipe_id", pa.string()),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
        # Usage of this pair's rewrite calls: every attempt of every sample drawn.
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        # Samples drawn for the pair (recipe `rewrite.samples`); null: no rewrite was asked.
        ("rewrite_samples", pa.int32()),
        # Usage of the document's pairs call, carried once, on its pair_index 0 row, so
        # that summing both pairs of columns over data + rejected gives the shard's usage.
        ("pairs_prompt_tokens", pa.int64()),
        ("pairs_completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("keyword_coverage", pa.float64()),
        # Numbers and names the rewrite states that its source does not hold (method/fidelity.py).
        ("invented_fact_count", pa.int32()),
        ("source_chars", pa.int64()),
        ("source_truncated_tokens", pa.int64()),  # set when the source was cut to the budget
        ("source_meta", pa.string()),  # JSON of the source row's other columns
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

REJECTED_SCHEMA = ACCEPTED_SCHEMA.append(pa.field("reject_reason", pa.string())).append(
    pa.field("reject_detail", pa.string())
)

LINEAGE_COLUMNS = (
    "id",
    "source_id",
    "source_shard",
    "pair_index",
    "genre",
    "audience",
    "text",
    "recipe_id",
    "model",
    "prompt_version",
    "finish_reason",
    "created_at",
)


# The finish reasons of an answer the model ended itself (vLLM says "stop", other
# servers "eos" or "end_turn"): cleaning accepts only these and the output gate checks
# the same set, so a shard cleaning lets through can pass the gate.
ACCEPTED_FINISH_REASONS = ("stop", "eos", "end_turn")

# The reject reason of a source row whose id an earlier row of the shard already has.
# The first row keeps the id and is the document; a repeated one is a source row, not a
# document: its rows are rejected and never counted as a document of the shard.
DUPLICATE_ID = RejectReason.DUPLICATE_ID


def row_id(recipe_id: str, source_shard: str, source_id: str, pair_index: int, position: int | None = None) -> str:
    """Deterministic output row id: the same inputs give the same id on every rerun.

    `position` (the source row's index in the shard) is given only for a row whose id
    repeats an earlier one, so its rejected rows keep ids of their own."""
    key = f"{recipe_id}\x1f{source_shard}\x1f{source_id}\x1f{pair_index}"
    if position is not None:
        key += f"\x1f#{position}"
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def shard_checksum(data: bytes, rejected: bytes) -> str:
    """The checksum the registry keeps for a committed shard: sha256 of the data file's
    bytes followed by the rejected file's."""
    digest = hashlib.sha256(data)
    digest.update(rejected)
    return digest.hexdigest()


# The released MAGACorpus layout (mga-fineweb-edu), for users who train on that format.
MAGACORPUS_SCHEMA = pa.schema(
    [
        (
            "meta",
            pa.struct(
                [
                    ("chunk_id", pa.string()),
                    ("docid", pa.string()),
                    ("meta_extra", pa.string()),
                    ("source", pa.string()),
                    ("split", pa.string()),
                    ("genre", pa.string()),
                    ("audience", pa.string()),
                    ("raw_text", pa.string()),
                ]
            ),
        ),
        ("content_split", pa.string()),
    ]
)


def magacorpus_row(row: dict, raw_text: str) -> dict:
    """An accepted output row in the MAGACorpus layout."""
    return {
        "meta": {
            "chunk_id": row["id"],
            "docid": row["source_id"],
            "meta_extra": row["source_meta"],
            "source": row["source_shard"],
            "split": "train",
            "genre": row["genre"],
            "audience": row["audience"],
            "raw_text": raw_text,
        },
        "content_split": row["text"],
    }
