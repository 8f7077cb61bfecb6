"""The expectation suites of the gates, built from the recipe's thresholds
(`recipe.quality`, `recipe.cleaning`).

Every expectation carries a short check name (`unique_ids`, `keyword_coverage`, ...) in
its description, so a failure reads the same in the registry, the logs and the Data
Docs HTML. The builders take the `great_expectations.expectations` module as `gxe`, so
GX is imported only by the caller that runs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from maga_tasks.data.committed import MEASURED
from maga_tasks.data.schema import ACCEPTED_FINISH_REASONS, LINEAGE_COLUMNS
from maga_tasks.data.source import SourceColumns
from maga_tasks.quality.frames import DEFAULT_COLUMNS, MEASURED_LINEAGE, repeated_id_column, source_length_column
from maga_tasks.recipe import Recipe

if TYPE_CHECKING:
    from maga_tasks.data.figures import ShardFigures


def _expectation(gxe, kind: str, check: str, sentence: str, **kwargs):
    """One expectation labelled with its check name (rendered in Data Docs)."""
    return getattr(gxe, kind)(description=f"{check}: {sentence}", meta={"check": check}, **kwargs)


def input_checks(gxe, recipe: Recipe, columns: SourceColumns = DEFAULT_COLUMNS) -> list:
    """The shard is expandable; the rare bad row within `min_valid_source_share` is left
    to the expansion, which rejects it row by row with its reason."""
    q, chars = recipe.quality, source_length_column(columns)
    share = q.min_valid_source_share
    valid = f"at least {share:.1%}"
    return [
        _expectation(gxe, "ExpectTableColumnsToMatchSet", "source_columns",
                     f"the shard has the id column {columns.id!r} and the text column {columns.text!r}",
                     column_set=[columns.id, chars], exact_match=False),
        _expectation(gxe, "ExpectTableRowCountToBeBetween", "source_not_empty",
                     "the shard holds at least one document", min_value=1),
        _expectation(gxe, "ExpectColumnValuesToNotBeNull", "source_id_not_null",
                     f"{valid} of documents have an id", column=columns.id, mostly=share),
        # A repeated id costs its later rows only (the expansion rejects them as
        # duplicate_id): GX's uniqueness check would count every occurrence.
        _expectation(gxe, "ExpectColumnValuesToBeNull", "source_id_unique",
                     f"{valid} of rows are the first with their id (a later one is rejected as duplicate_id)",
                     column=repeated_id_column(columns), mostly=share),
        _expectation(gxe, "ExpectColumnValuesToNotBeNull", "source_text_not_null",
                     f"{valid} of documents have a text", column=chars, mostly=share),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "source_text_length",
                     f"{valid} of texts are {q.min_source_chars}..{q.max_source_chars} characters long",
                     column=chars, min_value=q.min_source_chars, max_value=q.max_source_chars, mostly=share),
    ]


def output_row_checks(gxe, recipe: Recipe, shard: str) -> list:
    q, pairs = recipe.quality, recipe.pairs_per_document
    checks = [
        _expectation(gxe, "ExpectTableColumnsToMatchSet", "output_columns",
                     "the data file has every lineage column",
                     column_set=list(MEASURED_LINEAGE), exact_match=False),
    ]
    for column in LINEAGE_COLUMNS:
        checks.append(
            _expectation(gxe, "ExpectColumnValuesToNotBeNull", f"lineage_not_null_{column}",
                         f"every accepted row has a {column}",
                         column=MEASURED.get(column, column))
        )
    coverage = recipe.cleaning.min_keyword_coverage
    checks += [
        _expectation(gxe, "ExpectColumnValuesToBeUnique", "unique_ids",
                     "output row ids are unique", column="id"),
        _expectation(gxe, "ExpectCompoundColumnsToBeUnique", "unique_document_pairs",
                     "one accepted row per (source document, pair index)",
                     column_list=["source_id", "pair_index"]),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "pair_index_range",
                     f"pair_index is in [0, {pairs})", column="pair_index", min_value=0, max_value=pairs - 1),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "text_length",
                     f"rewrites are {q.min_text_chars}..{q.max_text_chars} characters long",
                     column="text_chars", min_value=q.min_text_chars, max_value=q.max_text_chars),
        # The check keeps its historical name; its set is the one cleaning accepts.
        _expectation(gxe, "ExpectColumnValuesToBeInSet", "finish_reason_stop",
                     f"every rewrite ended by the model itself (finish_reason in {', '.join(ACCEPTED_FINISH_REASONS)};"
                     " not cut by max_tokens)",
                     column="finish_reason", value_set=list(ACCEPTED_FINISH_REASONS)),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "keyword_coverage",
                     f"keyword coverage >= {coverage} for at least {q.min_coverage_share:.0%} of rows",
                     column="keyword_coverage", min_value=coverage, mostly=q.min_coverage_share),
        _expectation(gxe, "ExpectColumnValuesToBeInSet", "recipe_id_matches",
                     f"every row belongs to recipe {recipe.recipe_id}",
                     column="recipe_id", value_set=[recipe.recipe_id]),
        _expectation(gxe, "ExpectColumnValuesToBeInSet", "source_shard_matches",
                     f"every row comes from shard {shard}", column="source_shard", value_set=[shard]),
    ]
    return checks


def output_document_checks(gxe, recipe: Recipe, result: ShardFigures | None) -> list:
    q, pairs = recipe.quality, recipe.pairs_per_document
    checks = [
        _expectation(gxe, "ExpectTableRowCountToBeBetween", "documents_present",
                     "the shard accounts for at least one source document", min_value=1),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "rows_per_document",
                     f"every document has exactly {pairs} rows across data and rejected (nothing dropped;"
                     " a repeated source id's rows are rejected as duplicate_id, not the document's)",
                     column="rows", min_value=pairs, max_value=pairs),
        _expectation(gxe, "ExpectColumnMeanToBeBetween", "accepted_per_document",
                     f"on average at least {q.min_accepted_per_document} accepted rewrites per document",
                     column="accepted", min_value=q.min_accepted_per_document),
    ]
    if result is not None:
        checks.append(
            _expectation(gxe, "ExpectTableRowCountToEqual", "documents_match_result",
                         f"the files hold the {result.documents} documents the expansion reported",
                         value=result.documents)
        )
    return checks


def output_shard_checks(gxe, recipe: Recipe) -> list:
    q = recipe.quality
    return [
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "expansion_ratio",
                     f"accepted output chars / source chars within [{q.min_expansion_ratio}, {q.max_expansion_ratio}]",
                     column="expansion_ratio", min_value=q.min_expansion_ratio, max_value=q.max_expansion_ratio),
    ]


__all__ = ["input_checks", "output_document_checks", "output_row_checks", "output_shard_checks"]
