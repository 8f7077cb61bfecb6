"""The fidelity rates of a shard on hand-made rows: what each counts, what it leaves
out, and the same figures from the checkpoint's rows and from the committed files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maga_tasks.data.committed import read_measured
from maga_tasks.data.fidelity_rates import fidelity_rates
from maga_tasks.data.figures import ACCEPTED_FIGURE_COLUMNS, FIGURE_COLUMNS, FigureTally, figures_of_files
from maga_tasks.data.schema import ACCEPTED_SCHEMA, REJECTED_SCHEMA
from maga_tasks.method.cleaning import echo_judged_by, judged_by
from maga_tasks.recipe import Cleaning

# The smollm2 recipe's detectors, in its order: off_genre and invented_facts run after
# the label-echo check, prompt_echo and repetition before it.
RULES = Cleaning(detectors=("prompt_echo", "pair_label_echo", "repetition", "invented_facts", "off_genre"))
QA = "A question-and-answer sheet with a few questions"
LETTER = "A letter to a friend"
NEWS = "A news report"


def row(n: int, genre: str, text: str | None, facts: int | None, reason: str | None = None) -> dict:
    return {
        "id": f"r{n}", "source_id": f"d{n // 5}", "source_shard": "s", "pair_index": n % 5, "genre": genre,
        "audience": "students", "text": text, "source_chars": 100, "invented_fact_count": facts,
        "reject_reason": reason, "reject_detail": None,
    }


ACCEPTED = [
    row(0, QA, "What is it? A bridge. When? In 1932.", 0),  # cue kept
    row(1, QA, "What is it? Where is it? Why?", 2),  # cue missed (no answers); 2 invented facts
    row(2, LETTER, "Dear Sam,\nThe bridge is long.\nBest wishes", 1),  # cue kept; 1 invented fact
    row(3, NEWS, "The bridge opened.", 0),  # no cue for a news report
    row(4, LETTER, "The bridge is long.", None),  # no count (an older row): not fact-checked; cue missed
]
REJECTED = [
    row(5, NEWS, "Curious readers with no background in the field...", 0, "pair_label_echo"),  # judged
    row(6, NEWS, "In 2023 the bridge...", 3, "invented_facts"),  # after the echo check: judged
    row(7, QA, "A sheet with no question.", 0, "off_genre"),  # judged; rejected: no genre figure
    row(8, NEWS, "The bridge the bridge the bridge", 0, "repetition"),  # after echo in order: judged
    row(9, NEWS, "Rewrite the text as a news report", 1, "prompt_echo"),  # before it: not judged
    row(10, NEWS, "The bridge opened in", 5, "truncated"),  # never reached the detectors
    row(11, NEWS, None, None, "duplicate_id"),  # no text: nothing measured
]


def tally(rows_accepted, rows_rejected, judged) -> FigureTally:
    figures = FigureTally(judged)
    for item in rows_accepted:
        figures.add(item, rejected=False)
    for item in rows_rejected:
        figures.add(item, rejected=True)
    return figures


def test_judged_by_follows_the_recipes_order_of_detectors():
    assert echo_judged_by(RULES) == {"pair_label_echo", "repetition", "invented_facts", "off_genre"}
    assert judged_by("off_genre", RULES) == {"off_genre"}
    assert echo_judged_by(Cleaning(detectors=())) is None


def test_each_rate_counts_what_its_definition_says():
    figures = tally(ACCEPTED, REJECTED, echo_judged_by(RULES)).figures()
    # Rows whose invented facts were counted: every row with a count, accepted or rejected.
    assert (figures.fact_checked_rows, figures.invented_fact_rows) == (10, 5)
    # Judged by the echo check: the 4 accepted rows with counts and the rows rejected by
    # it or by a detector after it (not prompt_echo, not truncated).
    assert (figures.echo_checked_rows, figures.label_echo_rows) == (8, 1)
    # Accepted rows with a genre cue, measured on the text whatever its era: two sheets
    # and two letters, one of each showing it; a news report has no cue.
    assert (figures.genre_cue_rows, figures.genre_kept_rows) == (4, 2)
    assert figures.invented_fact_rate == 0.5
    assert figures.label_echo_rate == 0.125
    assert figures.genre_kept_rate == 0.5
    assert figures.to_dict()["label_echo_rate"] == 0.125


def test_nothing_measured_is_none_not_zero():
    no_echo_check = tally(ACCEPTED, REJECTED, None).figures()
    assert no_echo_check.label_echo_rate is None and no_echo_check.invented_fact_rate == 0.5
    old = tally([row(0, NEWS, "The bridge opened.", None)], [row(1, NEWS, "x", None, "truncated")],
                echo_judged_by(RULES)).figures()
    assert (old.invented_fact_rate, old.label_echo_rate, old.genre_kept_rate) == (None, None, None)
    assert fidelity_rates({"fact_checked_rows": None, "invented_fact_rows": None}) == {
        "invented_fact_rate": None, "label_echo_rate": None, "genre_kept_rate": None,
    }


def test_rates_over_shards_are_weighted_by_rows():
    # 1 of 2 rows and 0 of 98: 1% over both, not the 25% a mean of shard rates would say.
    sums = {"fact_checked_rows": 2 + 98, "invented_fact_rows": 1 + 0}
    assert fidelity_rates(sums)["invented_fact_rate"] == 0.01


def test_the_committed_files_give_the_figures_of_the_checkpoint_rows(tmp_path):
    judged = echo_judged_by(RULES)
    at_commit = tally(ACCEPTED, REJECTED, judged).figures()
    data, rejected = tmp_path / "data.parquet", tmp_path / "rejected.parquet"
    pq.write_table(pa.Table.from_pylist(ACCEPTED, ACCEPTED_SCHEMA), data)
    pq.write_table(pa.Table.from_pylist(REJECTED, REJECTED_SCHEMA), rejected)
    # The engine's light read: texts measured batch by batch (2 rows at a time), never kept.
    measured = [read_measured(data, ACCEPTED_FIGURE_COLUMNS, batch_rows=2), read_measured(rejected, FIGURE_COLUMNS)]
    assert "text" not in measured[0].column_names and measured[0].column("genre_kept").to_pylist() == [
        True, False, True, None, False,
    ]
    assert figures_of_files(*measured, judged) == at_commit
    # Whole tables with their texts give the same.
    assert figures_of_files(pq.read_table(data), pq.read_table(rejected), judged) == at_commit


@pytest.mark.parametrize("reason", ["pair_label_echo", "off_genre"])
def test_a_rejected_row_never_counts_for_the_genre_kept_rate(reason):
    figures = tally([], [row(0, QA, "What? Yes.", 0, reason)], echo_judged_by(RULES)).figures()
    assert figures.genre_cue_rows == 0 and figures.genre_kept_rate is None
