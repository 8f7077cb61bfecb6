"""Reject reasons are defined once (maga_tasks/reject_reasons.py) and made from there."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pyarrow as pa
import pytest

import maga_tasks
from maga_tasks.reject_reasons import RejectReason, is_known_reason, reason_prefixes, reject_reasons

PACKAGE = Path(maga_tasks.__file__).parent
ENUM_MODULE = PACKAGE / "reject_reasons.py"
# Literals that spell a reason's value but mean something else, with why.
NOT_REASONS = {
    ("tools/test_server/faults.py", "empty"): "a fault kind of the test server (it answers with empty text)",
}


def package_sources() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path != ENUM_MODULE)


def reason_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each string literal in `path` that is a reason, or an f-string that
    starts with a reason prefix (`f"rewrite_request_{cause}"`)."""
    whole, prefixes = reject_reasons(), reason_prefixes()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in whole or node.value in prefixes:
                found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            head = str(node.values[0].value)
            if any(head.startswith(prefix) for prefix in prefixes):
                found.append((node.lineno, head))
    return sorted(set(found))  # an f-string's leading part is a Constant of its own too


def test_no_module_spells_a_reason_of_its_own():
    stray = []
    for path in package_sources():
        relative = path.relative_to(PACKAGE).as_posix()
        stray += [f"{relative}:{line}: {text!r}" for line, text in reason_literals(path)
                  if (relative, text) not in NOT_REASONS]
    assert stray == [], "use RejectReason instead of a literal:\n" + "\n".join(stray)


def test_the_literal_finder_finds_literals(tmp_path):
    """The walk above must be able to fail: it sees plain and f-string reasons."""
    module = tmp_path / "stray.py"
    module.write_text('def f(cause):\n    return "near_copy", f"rewrite_request_{cause}", "not_a_reason"\n')
    assert reason_literals(module) == [(2, "near_copy"), (2, "rewrite_request_")]


def test_the_allowances_are_still_needed():
    for (relative, text), why in NOT_REASONS.items():
        assert (relative, text) in {(relative, t) for _, t in reason_literals(PACKAGE / relative)}, why


def test_every_reason_is_made_somewhere():
    """Each member is used by a module of the package (a reason nobody makes is a stale
    entry, and documentation listing it would be wrong)."""
    used = set()
    for path in package_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "RejectReason":
                used.add(node.attr)
    assert {reason.name for reason in RejectReason} - used == set()


def test_values_are_stored_as_plain_strings(tmp_path):
    reason = RejectReason.LOW_KEYWORD_COVERAGE
    assert reason == "low_keyword_coverage" and str(reason) == "low_keyword_coverage"
    assert json.dumps({reason: 1, "r": reason}) == '{"low_keyword_coverage": 1, "r": "low_keyword_coverage"}'
    assert str({reason: 1}) == "{'low_keyword_coverage': 1}"  # a log line of counts reads as before
    assert pa.array([reason, None]).to_pylist() == ["low_keyword_coverage", None]


def test_a_failed_request_keeps_its_stored_form():
    assert RejectReason.REWRITE_REQUEST.with_cause("retries_exhausted") == "rewrite_request_retries_exhausted"
    assert is_known_reason("pairs_request_http_400") and is_known_reason("duplicate_id")
    assert not is_known_reason("pairs_request_") and not is_known_reason("invalid_pairs")
    with pytest.raises(ValueError):
        RejectReason.EMPTY.with_cause("x")


def test_values_are_unique_and_prefixes_apart():
    values = [reason.value for reason in RejectReason]
    assert len(values) == len(set(values))
    assert reject_reasons() & reason_prefixes() == set()
    assert {"task_talk", "pairs_not_in_catalogue", "duplicate_id"} <= reject_reasons()
