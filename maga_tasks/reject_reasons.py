"""Every reason a row is rejected for, in one place.

A reason is stored in the `reject_reason` column of `rejected/` (and tallied in the
registry, the dashboard and the run report), so the values never change: a new reason is
a new member. `RejectReason` is a StrEnum, so a member is equal to, hashes like and is
written as its string; rows read back from parquet or a checkpoint hold plain strings.

A request that failed after the client's retries is rejected as `{stage}_request_{cause}`
(e.g. `rewrite_request_retries_exhausted`, `pairs_request_http_400`): the members ending
in `_request_` are those prefixes (`RejectReason.REWRITE_REQUEST.with_cause(...)`); the
cause is the client's (`llm.client.RequestFailed.reason`).

This module stands apart from `data/schema.py` (the columns) because reasons are made in
four packages (data, method, engine's duplicate handling, the judge) and each must import
it without pulling pyarrow or each other in; `tests/unit/test_reject_reasons.py` checks that no
module of maga_tasks spells a reason as a literal of its own.
"""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    # -- source rows: rejected before any model call (data/source.py) ------------------
    MISSING_ID = "missing_id"
    ID_TOO_LONG = "id_too_long"
    DUPLICATE_ID = "duplicate_id"
    INVALID_UTF8 = "invalid_utf8"
    TEXT_NOT_A_STRING = "text_not_a_string"
    MISSING_TEXT = "missing_text"
    EMPTY_TEXT = "empty_text"
    TEXT_TOO_LONG = "text_too_long"
    LINE_TOO_LONG = "line_too_long"
    INVALID_JSON_LINE = "invalid_json_line"

    # -- genre/audience pairs: every pair index of the document (method/stages.py) ---------
    PAIRS_FAILED = "pairs_failed"
    PAIRS_TRUNCATED = "pairs_truncated"
    PAIRS_INVALID_JSON = "pairs_invalid_json"
    PAIRS_WRONG_COUNT = "pairs_wrong_count"
    PAIRS_EMPTY_FIELD = "pairs_empty_field"
    PAIRS_LENGTH = "pairs_length"
    PAIRS_DUPLICATE = "pairs_duplicate"
    PAIRS_JUNK = "pairs_junk"
    PAIRS_NOT_IN_CATALOGUE = "pairs_not_in_catalogue"

    # -- a rewrite, by cleaning (method/cleaning.py) -----------------------------------
    TRUNCATED = "truncated"
    UNEXPECTED_FINISH_REASON = "unexpected_finish_reason"
    EMPTY = "empty"
    TOO_SHORT = "too_short"
    TOO_SHORT_FOR_SOURCE = "too_short_for_source"
    TOO_LONG_FOR_SOURCE = "too_long_for_source"
    LOW_KEYWORD_COVERAGE = "low_keyword_coverage"
    NEAR_COPY = "near_copy"
    # ... and by the detectors a recipe turns on (method/detectors.py); a detector is
    # named after the reason it gives.
    PROMPT_ECHO = "prompt_echo"
    REFUSAL = "refusal"
    TASK_TALK = "task_talk"
    REPETITION = "repetition"
    OTHER_LANGUAGE = "other_language"
    # ... and by the fidelity checks (method/fidelity.py)
    PAIR_LABEL_ECHO = "pair_label_echo"
    INVENTED_FACTS = "invented_facts"
    OFF_GENRE = "off_genre"

    # -- the judge's rows without a score (method/judging.py; not in rejected/) ----------
    JUDGE_INVALID_ANSWER = "judge_invalid_answer"
    JUDGE_STRUCTURED_OUTPUTS_REFUSED = "judge_structured_outputs_refused"
    JUDGE_SOURCE_MISSING = "judge_source_missing"

    # -- prefixes: a request that failed for good, the client's cause follows ------------
    PAIRS_REQUEST = "pairs_request_"
    REWRITE_REQUEST = "rewrite_request_"
    JUDGE_REQUEST = "judge_request_"

    def __repr__(self) -> str:
        # Shown as the string it is stored as, in a dict of counts in a log line as anywhere.
        return repr(self.value)

    @property
    def is_prefix(self) -> bool:
        return self.value.endswith("_")

    def with_cause(self, cause: str) -> str:
        """The stored reason of a failed request: this prefix and the client's cause."""
        if not self.is_prefix:
            raise ValueError(f"{self.value} is a whole reason, not a prefix")
        return f"{self.value}{cause}"


# The detectors a recipe runs by default (recipe.Cleaning.detectors), in their order. The
# fidelity checks (PAIR_LABEL_ECHO, INVENTED_FACTS) are measured on SmolLM2's answers only:
# its recipe turns them on; a recipe for another model does after measuring on its labels.
DETECTOR_REASONS = (
    RejectReason.PROMPT_ECHO,
    RejectReason.REFUSAL,
    RejectReason.TASK_TALK,
    RejectReason.REPETITION,
    RejectReason.OTHER_LANGUAGE,
)


def reject_reasons() -> set[str]:
    """Every whole reason (prefixes excluded), as stored."""
    return {reason.value for reason in RejectReason if not reason.is_prefix}


def reason_prefixes() -> set[str]:
    """The prefixes of the reasons a failed request gets (`pairs_request_`...)."""
    return {reason.value for reason in RejectReason if reason.is_prefix}


def is_known_reason(text: str) -> bool:
    """Whether `text` is a reason this pipeline writes: a whole one, or a prefix and a cause."""
    return text in reject_reasons() or any(text.startswith(p) and len(text) > len(p) for p in reason_prefixes())
