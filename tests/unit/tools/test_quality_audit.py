"""The quality report's audit of accepted rows, written apart from the cleaning's fidelity
checks so that each can catch what the other misses."""

from __future__ import annotations

from maga_tasks.tools.quality_report import _audit_invented_number, _audit_label_echo

SOURCE = "The bridge opened in 1932; it is 1,149 metres long and carries 160,000 vehicles a day."


def test_the_audit_finds_a_label_echo_the_source_does_not_hold():
    audience = "tourists planning a visit to the region"
    assert _audit_label_echo("Tourists planning a visit to the region love it.", SOURCE, audience)
    assert not _audit_label_echo("Visitors love the bridge.", SOURCE, audience)
    assert not _audit_label_echo("It opened in 1932; it is 1,149 metres long.", SOURCE, "it is 1,149 metres long")


def test_the_audit_finds_an_invented_number_of_two_digits_or_more():
    assert not _audit_invented_number("Opened in 1932, 1149 metres long, 160,000 vehicles.", SOURCE)
    assert _audit_invented_number("Opened in 1933.", SOURCE)
    assert not _audit_invented_number("It took 3 years.", SOURCE)  # one digit: not audited
